"""Reading llama-architecture GGUF files into Hugging Face Llama tensors and config.

``read_gguf(path)`` returns ``(hf_config, tensors)``: a ``LlamaConfig``-style dict as found in a Hugging Face
``config.json`` and a ``{hf_tensor_name: float32 array}`` dict in Hugging Face layout (``[out, in]`` for linear
weights). Quantised tensors are dequantised with ``gguf.quants.dequantize`` (Q4_1: ``x = d*q + m``, Q8_0:
``x = d*q``, blocks of 32 along the input dimension).

GGUF stores dimensions innermost-first, so a tensor listed with shape ``[in, out]`` is the row-major ``[out, in]``
matrix of Hugging Face. The HF->GGUF converter reorders the rows of ``q_proj`` and ``k_proj`` inside each head
(GGUF's RoPE rotates adjacent pairs, Hugging Face's rotates the two halves of a head); ``read_gguf`` undoes that
reordering, so the weights work with a half-split RoPE and compare directly with Hugging Face checkpoints.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _require_gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError('reading GGUF files needs the "gguf" package: pip install "jaxlab[smollm2]"') from e
  return gguf


def open_gguf(path_or_reader):
  """A ``gguf.GGUFReader`` for ``path`` (memory-mapped); a reader passed in is returned unchanged.

  Raises FileNotFoundError for a missing file and ValueError when the file does not start with the GGUF magic.
  """
  gguf = _require_gguf()
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  path = os.fspath(path_or_reader)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:
    raise ValueError(f"{path}: cannot parse the GGUF file: {e}") from e


def gguf_field(reader, key: str, default: Any = KeyError) -> Any:
  """The value of metadata field ``key`` (a Python scalar, string or list); ``default`` when absent.

  Without a default a missing key raises KeyError naming the key.
  """
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise KeyError(f"GGUF metadata has no field {key!r}")
    return default
  return field.contents()


def gguf_architecture(reader) -> str:
  return str(gguf_field(reader, "general.architecture", ""))


def _check_architecture(reader) -> str:
  arch = gguf_architecture(reader)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  return arch


def hf_config_from_gguf(path_or_reader) -> dict:
  """The Hugging Face ``LlamaConfig`` dict described by the GGUF metadata of a llama-architecture file."""
  reader = open_gguf(path_or_reader)
  arch = _check_architecture(reader)

  def get(key, default=KeyError):
    return gguf_field(reader, f"{arch}.{key}", default)

  hidden = int(get("embedding_length"))
  n_head = int(get("attention.head_count"))
  n_kv = int(get("attention.head_count_kv", n_head))
  head_dim = int(get("attention.key_length", hidden // n_head))
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", None)
    if tokens is not None:
      vocab = len(tokens)
    else:
      embd = _tensor_by_name(reader).get("token_embd.weight")
      if embd is None:
        raise ValueError("GGUF file gives no vocabulary size (no llama.vocab_size, tokens or token_embd.weight)")
      vocab = int(embd.shape[-1])
  scaling = get("rope.scaling.type", None)
  if scaling not in (None, "none"):
    raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": hidden,
    "intermediate_size": int(get("feed_forward_length")),
    "num_hidden_layers": int(get("block_count")),
    "num_attention_heads": n_head,
    "num_key_value_heads": n_kv,
    "head_dim": head_dim,
    "vocab_size": int(vocab),
    "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
    "rope_theta": _f32(get("rope.freq_base", 10000.0)),
    "max_position_embeddings": int(get("context_length", 2048)),
    "tie_word_embeddings": "output.weight" not in _tensor_by_name(reader),
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
  }
  for name in ("bos", "eos", "padding"):
    value = gguf_field(reader, f"tokenizer.ggml.{name}_token_id", None)
    if value is not None:
      config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(value)
  return config


def _f32(x) -> float:
  """A float32 metadata value as the shortest decimal that reads back to it (9.9999997e-06 -> 1e-05)."""
  return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if x is not None else None


def _tensor_by_name(reader) -> dict:
  return {t.name: t for t in reader.tensors}


def hf_tensor_name(gguf_name: str) -> str:
  """The Hugging Face Llama name of a llama GGUF tensor; ValueError for names without an equivalent."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def gguf_tensor_name(hf_name: str) -> str:
  """The llama GGUF name of a Hugging Face Llama tensor (inverse of ``hf_tensor_name``)."""
  for g, h in _GLOBAL_NAMES.items():
    if h == hf_name:
      return g
  m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
  if m:
    for g, h in _BLOCK_NAMES.items():
      if h == m.group(2):
        return f"blk.{m.group(1)}.{g}.{m.group(3)}"
  raise ValueError(f"Hugging Face tensor {hf_name!r} has no llama GGUF equivalent")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Row order of the HF->GGUF converter: within each head, halves ``[a0..a_{h/2-1}, b0..]`` become pairs
  ``[a0, b0, a1, b1, ...]`` (``w.reshape(n_head, 2, h/2, -1).swapaxes(1, 2)``)."""
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of ``rope_permute``: GGUF (adjacent-pair) row order back to Hugging Face (half-split) order."""
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
  """The float32 values of a ``gguf`` ReaderTensor in row-major order (shape = GGUF shape reversed)."""
  gguf = _require_gguf()
  qtype = tensor.tensor_type
  try:
    values = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
  except NotImplementedError as e:
    raise ValueError(f"GGUF tensor {tensor.name!r}: quantisation type {qtype.name} is not supported") from e
  shape = tuple(int(d) for d in reversed(tensor.shape))
  values = np.asarray(values, dtype=np.float32)
  if values.size != int(np.prod(shape)):
    raise ValueError(f"GGUF tensor {tensor.name!r}: {values.size} values do not fill shape {shape}")
  return values.reshape(shape)


def read_gguf(path_or_reader) -> tuple[dict, dict[str, np.ndarray]]:
  """``(hf_config, tensors)`` of a llama GGUF file: every tensor dequantised to float32, named and laid out as in a
  Hugging Face ``LlamaForCausalLM`` checkpoint, with q/k rows back in Hugging Face order.

  ``lm_head.weight`` is present only when the file has an ``output.weight`` (``tie_word_embeddings`` is then false).
  """
  reader = open_gguf(path_or_reader)
  config = hf_config_from_gguf(reader)
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    name = hf_tensor_name(t.name)
    w = dequantize_tensor(t)
    if name.endswith("q_proj.weight"):
      w = rope_unpermute(w, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      w = rope_unpermute(w, config["num_key_value_heads"])
    tensors[name] = w
  _check_shapes(config, tensors)
  return config, tensors


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """Hugging Face Llama tensor shapes for ``config`` (``lm_head.weight`` only when embeddings are untied)."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  hd = config.get("head_dim") or d // config["num_attention_heads"]
  q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config.get("tie_word_embeddings", False):
    shapes["lm_head.weight"] = (v, d)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
      p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
      p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
      p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
      p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
    })
  return shapes


def _check_shapes(config: dict, tensors: dict[str, np.ndarray]) -> None:
  want = expected_shapes(config)
  missing = sorted(set(want) - set(tensors))
  if missing:
    raise ValueError(f"GGUF file lacks {len(missing)} tensors of the llama layout, e.g. {missing[:3]}")
  extra = sorted(set(tensors) - set(want))
  if extra:
    raise ValueError(f"GGUF file has tensors outside the configured layout: {extra[:3]}")
  for name, shape in want.items():
    if tensors[name].shape != shape:
      raise ValueError(f"GGUF tensor for {name} has shape {tensors[name].shape}, expected {shape}")
