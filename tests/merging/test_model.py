"""The Llama model against a plain numpy forward pass, KV-cached generation against full recomputation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import model as M

CFG = M.LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    rope_theta=500.0, tie_embeddings=False)


def _random_tensors(cfg, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in M.tensor_shapes(cfg).items():
    out[name] = (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                 else 0.2 * rng.standard_normal(shape)).astype(np.float32)
  return out


def _numpy_forward(cfg, t, tokens):
  """Hugging Face Llama semantics written out with numpy, one sequence at a time."""
  hd, nh, nk = cfg.dim_head, cfg.num_heads, cfg.num_kv_heads

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

  def rope(x, pos):  # x [T, H, D]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  n = len(tokens)
  pos = np.arange(n, dtype=np.float64)
  x = t["model.embed_tokens.weight"][tokens].astype(np.float64)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    h = rms(x, t[p + "input_layernorm.weight"])
    q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, nh, hd), pos)
    k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, nk, hd), pos)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, nk, hd)
    out = np.zeros((n, nh, hd))
    for head in range(nh):
      kv = head // (nh // nk)
      s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[:, head] = a @ v[:, kv]
    x = x + out.reshape(n, nh * hd) @ t[p + "self_attn.o_proj.weight"].T
    h = rms(x, t[p + "post_attention_layernorm.weight"])
    g = h @ t[p + "mlp.gate_proj.weight"].T
    u = h @ t[p + "mlp.up_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
  x = rms(x, t["model.norm.weight"])
  head = t["model.embed_tokens.weight"] if cfg.tie_embeddings else t["lm_head.weight"]
  return x @ head.T


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy(tied):
  cfg = M.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tied})
  t = _random_tensors(cfg)
  model = M.model_from_tensors(cfg, t)
  tokens = np.array([[3, 7, 1, 30, 2, 9]])
  got = np.asarray(model(jnp.asarray(tokens)))[0]
  want = _numpy_forward(cfg, t, tokens[0])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tensor_round_trip_and_shapes():
  t = _random_tensors(CFG, 1)
  back = M.model_to_tensors(M.model_from_tensors(CFG, t))
  assert back.keys() == t.keys()
  for k in t:
    np.testing.assert_array_equal(back[k], t[k])
  fresh = M.model_to_tensors(M.Llama(CFG, rngs=nnx.Rngs(0)))
  assert {k: v.shape for k, v in fresh.items()} == M.tensor_shapes(CFG)


def test_config_hf_round_trip():
  assert M.LlamaConfig.from_hf(CFG.to_hf()) == M.LlamaConfig(**{**CFG.__dict__, "head_dim": CFG.dim_head})


def test_errors_name_the_problem():
  t = _random_tensors(CFG)
  bad = dict(t, **{"model.layers.1.mlp.up_proj.weight": np.zeros((5, 5), np.float32)})
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight has shape"):
    M.model_from_tensors(CFG, bad)
  missing = {k: v for k, v in t.items() if k != "model.norm.weight"}
  with pytest.raises(ValueError, match="model.norm.weight"):
    M.model_from_tensors(CFG, missing)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    M.LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="model_type"):
    M.LlamaConfig.from_hf({"model_type": "bert"})


def test_padded_keys_and_positions_do_not_leak():
  model = M.model_from_tensors(CFG, _random_tensors(CFG, 2))
  tokens = jnp.array([[5, 6, 7, 8]])
  ref = model(tokens)
  # the same sequence left-padded by two garbage tokens, masked, with positions restarting at 0
  padded = jnp.array([[30, 31, 5, 6, 7, 8]])
  mask = jnp.array([[False, False, True, True, True, True]])
  pos = jnp.array([[0, 0, 0, 1, 2, 3]])
  got = model(padded, pos, mask)[:, 2:]
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_recomputation():
  model = M.model_from_tensors(CFG, _random_tensors(CFG, 3))
  prompts = [[4, 9, 2, 11, 3], [7, 1], [20, 21, 22]]
  t = max(map(len, prompts))
  ids = np.zeros((3, t), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  new = M.generate(model, ids, [len(p) for p in prompts], 6)
  for i, p in enumerate(prompts):
    seq = list(p)
    for _ in range(6):
      seq.append(int(np.argmax(np.asarray(model(jnp.asarray([seq])))[0, -1])))
    assert new[i].tolist() == seq[len(p):]


def test_sampling_follows_key_and_eos_stops():
  model = M.model_from_tensors(CFG, _random_tensors(CFG, 4))
  ids, lens = np.array([[1, 2, 3]]), [3]
  a = M.generate(model, ids, lens, 8, temperature=1.0, key=jax.random.key(1))
  b = M.generate(model, ids, lens, 8, temperature=1.0, key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  greedy = M.generate(model, ids, lens, 8)
  eos = int(greedy[0, 2])
  stopped = M.generate(model, ids, lens, 8, eos_id=eos)[0]
  first = stopped.tolist().index(eos)
  assert (stopped[first:] == eos).all() and first <= 2
  with pytest.raises(ValueError, match="needs a key"):
    M.generate(model, ids, lens, 2, temperature=0.5)


def test_token_nll_matches_numpy():
  t = _random_tensors(CFG, 5)
  model = M.model_from_tensors(CFG, t)
  tokens = np.array([[3, 4, 5, 6, 0], [1, 2, 3, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  total, count = M.token_nll(model, tokens, mask)
  want = 0.0
  for row, m in zip(tokens, mask):
    logits = _numpy_forward(CFG, t, row)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want -= sum(logp[j, row[j + 1]] for j in range(len(row) - 1) if m[j + 1])
  assert count == mask[:, 1:].sum()
  assert total == pytest.approx(want, rel=1e-4)
