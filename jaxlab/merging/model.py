"""A decoder-only transformer of the Llama family in Flax NNX.

RMSNorm, rotary position embeddings (Hugging Face "rotate half" layout), grouped-query attention, SwiGLU MLP, tied
or untied input/output embeddings.  Parameters use Hugging Face Llama names through :func:`model_to_tensors` and
:func:`model_from_tensors`, so a checkpoint read from safetensors or GGUF loads directly and a merged checkpoint
written by ``jaxlab.merging.merge`` is a plain Llama checkpoint.

Dense weights are stored ``[in, out]`` (``x @ w``); the Hugging Face layout ``[out, in]`` is the transpose, applied
on conversion.  Activations run in the parameter dtype, with softmax, norms and logits in float32.

Generation keeps a key/value cache of fixed length: prompts are left-aligned into the cache (left padding, padded
keys masked), so every sequence of a batch writes its next token at the same cache index and one compiled decode
step serves all lengths.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
  "LlamaConfig", "Llama", "model_from_tensors", "model_to_tensors", "tensor_shapes", "generate", "token_nll",
  "lm_loss", "init_cache", "generate_from_state",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position: int = 2048
  bos_id: int | None = None
  eos_id: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                       "set head_dim")
    if self.dim_head % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.dim_head}")

  @property
  def dim_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
    """From a Hugging Face ``config.json`` dict of a Llama-family model."""
    arch = hf.get("model_type", "llama")
    if arch not in ("llama", "mistral", "qwen2"):
      raise ValueError(f"config.json model_type {arch!r} is not a Llama-family decoder")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"config.json lacks {missing}")
    return cls(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"), rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))

  def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.dim_head, "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position, "hidden_act": "silu", "torch_dtype": dtype,
    }
    if self.bos_id is not None:
      out["bos_token_id"] = self.bos_id
    if self.eos_id is not None:
      out["eos_token_id"] = self.eos_id
    return out


def _dense(rngs, shape, dtype, scale=0.02):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, dim: int, theta: float):
  """cos/sin tables ``[..., T, dim]`` for integer positions (Hugging Face rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """x: ``[B, T, H, D]``; cos/sin: ``[B, T, D]``."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  xf = x.astype(jnp.float32)
  return (xf * cos[:, :, None] + rot.astype(jnp.float32) * sin[:, :, None]).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs):
    d, hd = cfg.hidden_size, cfg.dim_head
    self.cfg = cfg
    self.q_proj = _dense(rngs, (d, cfg.num_heads * hd), dtype)
    self.k_proj = _dense(rngs, (d, cfg.num_kv_heads * hd), dtype)
    self.v_proj = _dense(rngs, (d, cfg.num_kv_heads * hd), dtype)
    self.o_proj = _dense(rngs, (cfg.num_heads * hd, d), dtype, scale=0.02 / np.sqrt(2 * cfg.num_layers))

  def __call__(self, x, cos, sin, key_mask, cache=None, index=None):
    """x ``[B, T, d]``; key_mask ``[B, S]`` (S = T without cache, the cache length with one).

    With a cache ``(k, v)`` of shape ``[B, S, K, D]`` the new keys/values are written at ``index`` and the
    queries attend to every cache slot ``< index + T`` that ``key_mask`` admits.
    """
    cfg = self.cfg
    b, t, _ = x.shape
    hd, nh, nk = cfg.dim_head, cfg.num_heads, cfg.num_kv_heads
    q = (x @ self.q_proj[...]).reshape(b, t, nh, hd)
    k = (x @ self.k_proj[...]).reshape(b, t, nk, hd)
    v = (x @ self.v_proj[...]).reshape(b, t, nk, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
      ck, cv = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      cache = (k, v)
      q_pos = index + jnp.arange(t)
    else:
      q_pos = jnp.arange(t)
    s = k.shape[1]
    causal = jnp.arange(s)[None, :] <= q_pos[:, None]                       # [T, S]
    allowed = causal[None] & key_mask[:, None, :].astype(bool)                # [B, T, S]
    g = nh // nk
    qg = q.reshape(b, t, nk, g, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype)).astype(jnp.float32) / np.sqrt(hd)
    scores = jnp.where(allowed[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, nh * hd)
    return out.astype(x.dtype) @ self.o_proj[...], cache


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _dense(rngs, (d, f), dtype)
    self.up_proj = _dense(rngs, (d, f), dtype)
    self.down_proj = _dense(rngs, (f, d), dtype, scale=0.02 / np.sqrt(2 * cfg.num_layers))

  def __call__(self, x):
    return (jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])) @ self.down_proj[...]


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.self_attn = Attention(cfg, dtype, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, cos, sin, key_mask, cache=None, index=None):
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
  """Causal language model; ``model(tokens)`` gives float32 logits ``[B, T, V]``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.embed_tokens = _dense(rngs, (config.vocab_size, config.hidden_size), dtype)
    self.layers = nnx.List([Block(config, dtype, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.lm_head = None if config.tie_embeddings else _dense(rngs, (config.hidden_size, config.vocab_size), dtype)

  def __call__(self, tokens, positions=None, mask=None, cache=None, index=None):
    """tokens ``[B, T]``; positions ``[B, T]`` (default ``0..T-1``); mask ``[B, S]`` admits keys (default all).

    With ``cache`` (from :func:`init_cache`) and the write ``index``, returns ``(logits, new_cache)``.
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if mask is None:
      mask = jnp.ones((b, t if cache is None else cache[0][0].shape[1]), bool)
    x = self.embed_tokens[...][tokens]
    cos, sin = rope_tables(positions, self.config.dim_head, self.config.rope_theta)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], index)
      new_cache.append(c)
    x = self.norm(x).astype(jnp.float32)
    head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    logits = x @ head.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face names


def _layer_names(i: int) -> dict[str, tuple[str, str, bool]]:
  p = f"model.layers.{i}."
  return {
      p + "self_attn.q_proj.weight": ("self_attn", "q_proj", True),
      p + "self_attn.k_proj.weight": ("self_attn", "k_proj", True),
      p + "self_attn.v_proj.weight": ("self_attn", "v_proj", True),
      p + "self_attn.o_proj.weight": ("self_attn", "o_proj", True),
      p + "mlp.gate_proj.weight": ("mlp", "gate_proj", True),
      p + "mlp.up_proj.weight": ("mlp", "up_proj", True),
      p + "mlp.down_proj.weight": ("mlp", "down_proj", True),
      p + "input_layernorm.weight": ("input_layernorm", "weight", False),
      p + "post_attention_layernorm.weight": ("post_attention_layernorm", "weight", False),
  }


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor name -> shape (``[out, in]`` for dense weights) of a checkpoint of this config."""
  d, f, hd = config.hidden_size, config.intermediate_size, config.dim_head
  shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (config.num_heads * hd, d),
        p + "self_attn.k_proj.weight": (config.num_kv_heads * hd, d),
        p + "self_attn.v_proj.weight": (config.num_kv_heads * hd, d),
        p + "self_attn.o_proj.weight": (d, config.num_heads * hd),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
    })
  shapes["model.norm.weight"] = (d,)
  if not config.tie_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, d)
  return shapes


def model_to_tensors(model: Llama) -> dict[str, np.ndarray]:
  """Hugging Face-named host arrays (dense weights transposed to ``[out, in]``); tied heads are not repeated."""
  out = {"model.embed_tokens.weight": np.asarray(model.embed_tokens[...])}
  for i, layer in enumerate(model.layers):
    for name, (mod, attr, transpose) in _layer_names(i).items():
      value = np.asarray(getattr(getattr(layer, mod), attr)[...])
      out[name] = value.T if transpose else value
  out["model.norm.weight"] = np.asarray(model.norm.weight[...])
  if model.lm_head is not None:
    out["lm_head.weight"] = np.asarray(model.lm_head[...]).T
  return out


def model_from_tensors(config: LlamaConfig, tensors, *, dtype=jnp.float32) -> Llama:
  """A :class:`Llama` holding ``tensors`` (Hugging Face names and layout); every tensor is checked by shape.

  A tied config ignores an ``lm_head.weight`` equal to the embedding; an untied one requires it.
  """
  expected = tensor_shapes(config)
  missing = [n for n in expected if n not in tensors]
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) for this config, e.g. {missing[:3]}")
  extra = [n for n in tensors if n not in expected and not (n == "lm_head.weight" and config.tie_embeddings)
           and not n.endswith("rotary_emb.inv_freq")]
  if extra:
    raise ValueError(f"checkpoint has tensor(s) this config does not use, e.g. {extra[:3]}")
  for name, shape in expected.items():
    got = tuple(np.shape(tensors[name]))
    if got != shape:
      raise ValueError(f"tensor {name} has shape {got}, config expects {shape}")
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))
  put = lambda v, transpose=False: nnx.Param(jnp.asarray(np.asarray(v).T if transpose else np.asarray(v), dtype))
  model.embed_tokens = put(tensors["model.embed_tokens.weight"])
  for i, layer in enumerate(model.layers):
    for name, (mod, attr, transpose) in _layer_names(i).items():
      setattr(getattr(layer, mod), attr, put(tensors[name], transpose))
  model.norm.weight = put(tensors["model.norm.weight"])
  if not config.tie_embeddings:
    model.lm_head = put(tensors["lm_head.weight"], True)
  return model


# ----------------------------------------------------------------------------------------------------------------
# losses, likelihood and generation


def lm_loss(model: Llama, tokens, mask):
  """Mean next-token cross-entropy over positions whose *target* has ``mask`` set; also returns the count."""
  logits = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = mask[:, 1:].astype(jnp.float32)
  count = m.sum()
  return (nll * m).sum() / jnp.maximum(count, 1.0), count


@functools.partial(jax.jit, static_argnums=(0,))
def _nll_sums(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  loss, count = lm_loss(model, tokens, mask)
  return loss * count, count


def token_nll(model: Llama, tokens, mask):
  """(summed next-token negative log-likelihood, number of predicted tokens) for targets with ``mask`` set."""
  graphdef, state = nnx.split(model)
  s, c = _nll_sums(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool))
  return float(s), float(c)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32):
  shape = (batch, length, config.num_kv_heads, config.dim_head)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def generate_from_state(graphdef, state, prompt, lengths, max_new_tokens, greedy, temperature, key, eos_id):
  """The jitted core of :func:`generate` on ``nnx.split`` parts (vmap it over stacked states to decode several
  same-shaped models at once)."""
  model = nnx.merge(graphdef, state)
  b, t = prompt.shape
  total = t + max_new_tokens
  # left-align: sequence i occupies cache slots [t - len_i, t)
  shift = t - lengths
  src = jnp.arange(t)[None, :] - shift[:, None]
  left = jnp.where(src >= 0, jnp.take_along_axis(prompt, jnp.clip(src, 0, t - 1), axis=1), 0)
  valid = jnp.concatenate([src >= 0, jnp.ones((b, max_new_tokens), bool)], axis=1)
  positions = jnp.maximum(src, 0)
  dtype = model.embed_tokens[...].dtype
  cache = init_cache(model.config, b, total, dtype)
  logits, cache = model(left, positions, valid, cache, 0)

  def pick(logits, k):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)

  def step(carry, i):
    cache, last_logits, done = carry
    tok = pick(last_logits, jax.random.fold_in(key, i))
    tok = jnp.where(done, eos_id if eos_id is not None else 0, tok) if eos_id is not None else tok
    done = done | (tok == eos_id) if eos_id is not None else done
    pos = (lengths + i)[:, None]
    logits, cache = model(tok[:, None], pos, valid, cache, t + i)
    return (cache, logits[:, -1], done), tok

  done0 = jnp.zeros((b,), bool)
  _, toks = jax.lax.scan(step, (cache, logits[:, -1], done0), jnp.arange(max_new_tokens))
  return toks.T


def generate(model: Llama, prompt_ids, prompt_lengths, max_new_tokens: int, *, temperature: float = 0.0,
             key=None, eos_id: int | None = None) -> np.ndarray:
  """Continue right-padded prompts ``[B, T]`` of the given lengths; returns the new tokens ``[B, max_new_tokens]``.

  ``temperature=0`` is greedy; otherwise tokens are sampled from ``softmax(logits / temperature)`` with ``key``.
  After ``eos_id`` a sequence repeats ``eos_id``.
  """
  prompt = jnp.asarray(prompt_ids, jnp.int32)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if prompt.ndim != 2 or lengths.shape != (prompt.shape[0],):
    raise ValueError(f"prompt_ids must be [B, T] and prompt_lengths [B], got {prompt.shape} and {lengths.shape}")
  if int(lengths.min()) < 1 or int(lengths.max()) > prompt.shape[1]:
    raise ValueError(f"prompt_lengths must lie in [1, {prompt.shape[1]}], got {np.asarray(lengths)}")
  greedy = temperature == 0.0
  if not greedy and key is None:
    raise ValueError("sampling (temperature > 0) needs a key")
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  out = generate_from_state(graphdef, state, prompt, lengths, int(max_new_tokens), greedy,
                  jnp.asarray(max(temperature, 1e-6), jnp.float32), key, eos_id)
  return np.asarray(out)
