"""GGUF reading: block dequantisation against a numpy reference, names/shapes, q/k row order, config, tokenizers."""
import gguf
import numpy as np
import pytest

from jaxlab.merging import gguf_io
from jaxlab.merging import model as model_mod
from jaxlab.merging import tokenizer as tkn

Q = gguf.GGMLQuantizationType
CFG = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=96)


# ------------------------------------------------------------------------------------------------------------------
# numpy reference of the two block formats (32 values per block, little-endian)


def ref_dequant_q8_0(raw: np.ndarray) -> np.ndarray:
  """Q8_0 block: float16 scale d, then 32 int8 q; x = d*q."""
  blocks = raw.reshape(-1, 34)
  d = blocks[:, :2].copy().view("<f2").astype(np.float32)
  q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
  return (d * q).reshape(raw.shape[0], -1)


def ref_dequant_q4_1(raw: np.ndarray) -> np.ndarray:
  """Q4_1 block: float16 scale d, float16 minimum m, 16 bytes: low nibbles = values 0..15, high = 16..31."""
  blocks = raw.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
  m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
  qs = blocks[:, 4:]
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
  return (d * q + m).reshape(raw.shape[0], -1)


def pack_q8_0(d, q):
  """Bytes of Q8_0 blocks from scales ``d[n]`` and int8 values ``q[n, 32]``."""
  return np.concatenate([np.asarray(d, "<f2")[:, None].view(np.uint8), np.asarray(q, np.int8).view(np.uint8)], 1)


def pack_q4_1(d, m, q):
  """Bytes of Q4_1 blocks from scales, minima and 4-bit values ``q[n, 32]``."""
  q = np.asarray(q, np.uint8)
  nib = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
  return np.concatenate([np.asarray(d, "<f2")[:, None].view(np.uint8), np.asarray(m, "<f2")[:, None].view(np.uint8),
                         nib], 1)


def test_block_layouts_hand_built():
  rng = np.random.default_rng(0)
  d = rng.uniform(0.01, 0.1, 6).astype(np.float16)
  m = rng.uniform(-1, 0, 6).astype(np.float16)
  q8 = rng.integers(-127, 128, (6, 32))
  q4 = rng.integers(0, 16, (6, 32))
  raw8 = pack_q8_0(d, q8).reshape(2, 3 * 34)
  raw4 = pack_q4_1(d, m, q4).reshape(2, 3 * 20)
  want8 = (d.astype(np.float32)[:, None] * q8).reshape(2, 96)
  want4 = (d.astype(np.float32)[:, None] * q4 + m.astype(np.float32)[:, None]).reshape(2, 96)
  np.testing.assert_allclose(ref_dequant_q8_0(raw8), want8, rtol=1e-6)
  np.testing.assert_allclose(ref_dequant_q4_1(raw4), want4, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gguf.quants.dequantize(raw8, Q.Q8_0), want8, rtol=1e-6)
  np.testing.assert_allclose(gguf.quants.dequantize(raw4, Q.Q4_1), want4, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# tiny llama GGUF files


def hf_tensors(seed=0, untied=False):
  c = CFG
  rng = np.random.default_rng(seed)
  hd = c["hidden"] // c["heads"]
  d, f = c["hidden"], c["ffn"]
  t = {"model.embed_tokens.weight": rng.normal(0, 0.1, (c["vocab"], d)),
       "model.norm.weight": rng.uniform(0.5, 2.0, d)}
  if untied:
    t["lm_head.weight"] = rng.normal(0, 0.1, (c["vocab"], d))
  for i in range(c["layers"]):
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.3, (c["heads"] * hd, d))
    t[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.3, (c["kv_heads"] * hd, d))
    t[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.3, (c["kv_heads"] * hd, d))
    t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.3, (d, c["heads"] * hd))
    t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.3, (f, d))
    t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.3, (f, d))
    t[p + "mlp.down_proj.weight"] = rng.normal(0, 0.3, (d, f))
    t[p + "input_layernorm.weight"] = rng.uniform(0.5, 2.0, d)
    t[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 2.0, d)
  return {k: v.astype(np.float32) for k, v in t.items()}


def converter_permute(w, n_head):
  """Row order written by the HF->GGUF converter for q (n_head) and k (n_kv_head)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
  "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
}


def to_gguf_name(name):
  if name in GGUF_NAMES:
    return GGUF_NAMES[name]
  _, _, i, rest = name.split(".", 3)
  module = rest.rsplit(".", 1)[0]
  return f"blk.{i}.{GGUF_NAMES[module]}.weight"


def write_gguf(path, tensors, quant=None, arch="llama", tokenizer="gpt2", raw=None):
  """Writes ``tensors`` (HF names/layout) as a llama GGUF file the way the HF converter does."""
  c = CFG
  quant = quant or {}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c["layers"])
  w.add_context_length(256)
  w.add_embedding_length(c["hidden"])
  w.add_feed_forward_length(c["ffn"])
  w.add_head_count(c["heads"])
  w.add_head_count_kv(c["kv_heads"])
  w.add_rope_freq_base(50000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(c["vocab"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if tokenizer == "gpt2":
    tokens, types, merges = tiny_bpe_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
  elif tokenizer == "llama":
    tokens, scores, types = tiny_sp_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
  for name, value in tensors.items():
    if name.endswith("q_proj.weight"):
      value = converter_permute(value, c["heads"])
    elif name.endswith("k_proj.weight"):
      value = converter_permute(value, c["kv_heads"])
    gname = to_gguf_name(name)
    if raw and gname in raw:
      w.add_tensor(gname, raw[gname][0], raw_dtype=raw[gname][1])
    elif name in quant:
      w.add_tensor(gname, gguf.quants.quantize(value, quant[name]), raw_dtype=quant[name])
    else:
      w.add_tensor(gname, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def tiny_bpe_vocab():
  """Byte-level BPE vocabulary of 96 tokens: 3 control tokens, letters, digits, 24 punctuation marks, the byte-level
  symbols of space and newline ('Ġ', 'Ċ') and 5 merged tokens."""
  letters = [chr(i) for i in range(ord("a"), ord("z") + 1)] + [chr(i) for i in range(ord("A"), ord("Z") + 1)]
  chars = letters + list("0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[]") + ["Ġ", "Ċ"]
  merged = ["he", "ll", "llo", "hello", "Ġw"]
  merges = ["h e", "l l", "ll o", "he llo", "Ġ w"]
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars + merged
  assert len(tokens) == CFG["vocab"]
  return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def tiny_sp_vocab():
  """SentencePiece-style vocabulary: <unk>, <s>, </s>, 3 byte pieces, letters, merged pieces ranked by score."""
  pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "wo", "wor", "worl",
            "world", "▁world"]
  tokens = ["<unk>", "<s>", "</s>", "<0xC3>", "<0xA9>", "<0x21>"] + pieces
  scores = [0.0] * 6 + [-float(i) for i in range(len(pieces))]
  types = [2, 3, 3, 6, 6, 6] + [1] * len(pieces)
  return tokens, scores, types


@pytest.fixture(scope="module")
def tied_file(tmp_path_factory):
  t = hf_tensors()
  quant = {"model.embed_tokens.weight": Q.Q8_0, "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
           "model.layers.1.self_attn.k_proj.weight": Q.Q4_1, "model.layers.1.self_attn.q_proj.weight": Q.Q8_0}
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", t, quant)
  return path, t, quant


def test_read_names_shapes_config(tied_file):
  path, t, _ = tied_file
  config, got = gguf_io.read_gguf(path)
  assert set(got) == set(t)
  for name in t:
    assert got[name].shape == t[name].shape, name
    assert got[name].dtype == np.float32
  assert config == {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96,
    "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "max_position_embeddings": 256, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
  }


def test_float_tensors_and_qk_order_exact(tied_file):
  path, t, quant = tied_file
  _, got = gguf_io.read_gguf(path)
  for name in t:
    if name not in quant:
      np.testing.assert_array_equal(got[name], t[name], err_msg=name)
  # the float32 q/k of layer 0 come back in Hugging Face row order
  assert "model.layers.0.self_attn.q_proj.weight" not in quant


def test_quantised_tensors_match_reference(tied_file):
  path, t, quant = tied_file
  _, got = gguf_io.read_gguf(path)
  heads = {"q_proj": CFG["heads"], "k_proj": CFG["kv_heads"]}
  for name, qtype in quant.items():
    value = t[name]
    kind = name.split(".")[-2]
    if kind in heads:
      value = converter_permute(value, heads[kind])
    raw = gguf.quants.quantize(value, qtype)
    ref = (ref_dequant_q8_0 if qtype == Q.Q8_0 else ref_dequant_q4_1)(raw)
    if kind in heads:
      n = heads[kind]
      ref = ref.reshape(n, -1, 2, ref.shape[1]).swapaxes(1, 2).reshape(ref.shape)
    np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-6, err_msg=name)
    step = np.abs(value).max() / (127 if qtype == Q.Q8_0 else 7)
    assert np.abs(got[name] - t[name]).max() <= step, name


def test_rope_permutation_inverse():
  w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(gguf_io.rope_unpermute(converter_permute(w, 3), 3), w)
  np.testing.assert_array_equal(gguf_io.rope_permute(w, 3), converter_permute(w, 3))
  # head 0 with 8 rows: halves [0..3 | 4..7] interleave to 0,4,1,5,...
  assert converter_permute(w, 3)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]
  with pytest.raises(ValueError, match="heads"):
    gguf_io.rope_unpermute(w[:10], 3)


def _rope(x, pos, interleaved, theta=10000.0):
  """numpy RoPE on ``x[T, H, D]``: adjacent pairs (GGUF/llama.cpp) or the two halves of a head (Hugging Face)."""
  d = x.shape[-1]
  ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)                     # [T, D/2]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d // 2], x[..., d // 2:])
  ra, rb = a * cos - b * sin, a * sin + b * cos
  return np.stack([ra, rb], -1).reshape(x.shape) if interleaved else np.concatenate([ra, rb], -1)


def test_gguf_row_order_is_for_interleaved_rope():
  """Attention scores of permuted q/k under adjacent-pair RoPE equal those of HF q/k under half-split RoPE."""
  rng = np.random.default_rng(1)
  heads, hd, d, t = 2, 8, 12, 5
  x = rng.normal(size=(t, d))
  wq, wk = rng.normal(size=(heads * hd, d)), rng.normal(size=(heads * hd, d))
  pos = np.arange(t, dtype=np.float64)

  def scores(wq, wk, interleaved):
    q = _rope((x @ wq.T).reshape(t, heads, hd), pos, interleaved)
    k = _rope((x @ wk.T).reshape(t, heads, hd), pos, interleaved)
    return np.einsum("thd,shd->hts", q, k)

  hf = scores(wq, wk, interleaved=False)
  np.testing.assert_allclose(scores(converter_permute(wq, heads), converter_permute(wk, heads), True), hf, atol=1e-9)
  assert np.abs(scores(wq, wk, interleaved=True) - hf).max() > 1e-3


def test_name_mapping_round_trip():
  for name in hf_tensors(untied=True):
    assert gguf_io.hf_tensor_name(gguf_io.gguf_tensor_name(name)) == name
    assert gguf_io.gguf_tensor_name(name) == to_gguf_name(name)
  with pytest.raises(ValueError, match="rope_freqs"):
    gguf_io.hf_tensor_name("rope_freqs.weight")


def test_untied_output(tmp_path):
  t = hf_tensors(untied=True)
  config, got = gguf_io.read_gguf(write_gguf(tmp_path / "untied.gguf", t, tokenizer=None))
  assert config["tie_word_embeddings"] is False
  np.testing.assert_array_equal(got["lm_head.weight"], t["lm_head.weight"])


def test_loads_into_model(tied_file):
  config, got = gguf_io.read_gguf(tied_file[0])
  cfg = model_mod.LlamaConfig.from_hf(config)
  model = model_mod.model_from_tensors(cfg, got)
  back = model_mod.model_to_tensors(model)
  for name in got:
    np.testing.assert_array_equal(back[name], got[name], err_msg=name)
  assert model(np.zeros((1, 3), np.int32)).shape == (1, 3, CFG["vocab"])


def test_errors(tmp_path):
  bad = tmp_path / "not.gguf"
  bad.write_text("hello, not a gguf file")
  with pytest.raises(ValueError, match="not a GGUF file"):
    gguf_io.read_gguf(bad)
  with pytest.raises(FileNotFoundError):
    gguf_io.read_gguf(tmp_path / "missing.gguf")
  other = write_gguf(tmp_path / "qwen.gguf", hf_tensors(), arch="qwen2", tokenizer=None)
  with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
    gguf_io.read_gguf(other)
  # Q8_1 blocks have no dequantiser
  block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
  raw = {"blk.0.ffn_up.weight": (np.zeros((CFG["ffn"], CFG["hidden"] // block * size), np.uint8), Q.Q8_1)}
  q81 = write_gguf(tmp_path / "q81.gguf", hf_tensors(), tokenizer=None, raw=raw)
  with pytest.raises(ValueError, match="Q8_1 is not supported"):
    gguf_io.read_gguf(q81)


def test_missing_tensor_error(tmp_path):
  t = hf_tensors()
  del t["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="lacks 1 tensors"):
    gguf_io.read_gguf(write_gguf(tmp_path / "short.gguf", t, tokenizer=None))


# ------------------------------------------------------------------------------------------------------------------
# tokenizers from GGUF metadata


def test_gpt2_tokenizer(tied_file):
  tok = tkn.tokenizer_from_gguf(tied_file[0])
  ids = tkn.encode(tok, "hello world")
  assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġw", "o", "r", "l", "d"]
  assert tkn.decode(tok, ids) == "hello world"
  ids = tkn.encode(tok, "<|im_start|>hi 42<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert [tok.id_to_token(i) for i in ids[1:-1]] == ["h", "i", "Ġ", "4", "2"]
  assert tkn.decode(tok, ids, skip_special_tokens=True) == "hi 42"
  assert tkn.decode(tok, ids) == "<|im_start|>hi 42<|im_end|>"


def test_sentencepiece_tokenizer(tmp_path):
  path = write_gguf(tmp_path / "sp.gguf", hf_tensors(), tokenizer="llama")
  tok = tkn.tokenizer_from_gguf(path)
  ids = tkn.encode(tok, "hello world")
  assert [tok.id_to_token(i) for i in ids] == ["▁hello", "▁world"]
  assert tkn.decode(tok, ids) == "hello world"
  ids = tkn.encode(tok, "hello é!")
  assert [tok.id_to_token(i) for i in ids] == ["▁hello", "▁", "<0xC3>", "<0xA9>", "<0x21>"]
  assert tkn.decode(tok, ids) == "hello é!"


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="no embedded tokenizer"):
    tkn.tokenizer_from_gguf(write_gguf(tmp_path / "none.gguf", hf_tensors(), tokenizer=None))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tkn.load_tokenizer(tmp_path)


def test_save_and_load_tokenizer(tied_file, tmp_path):
  tok = tkn.tokenizer_from_gguf(tied_file[0])
  tkn.save_tokenizer(tok, tmp_path / "tok")
  again = tkn.load_tokenizer(tmp_path / "tok")
  text = "<|im_start|>hello world<|im_end|>"
  assert tkn.encode(again, text) == tkn.encode(tok, text)


def test_chat_prompt():
  text = tkn.chat_prompt("Hi")
  assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
  assert tkn.chat_prompt(msgs, add_generation_prompt=False) == "<|im_start|>system\nS<|im_end|>\n" \
                                                                "<|im_start|>user\nU<|im_end|>\n"
  assert tkn.chat_prompt("Hi", system=None) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  with pytest.raises(ValueError, match="role"):
    tkn.chat_prompt([{"content": "x"}])
