"""Streaming merge of tiny Llama-shaped checkpoints, checked against plain numpy and the in-memory path."""
import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxlab.merging import hf
from jaxlab.merging.config import load_config
from jaxlab.merging.merge import merge_in_memory, run_merge

H, I, V, L = 16, 24, 32, 2
SHARD = 3000  # bytes: forces several shards for inputs and outputs


def _config(tied=False, layers=L):
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
          "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
          "tie_word_embeddings": tied, "torch_dtype": "float32"}


def _llama(seed, base=None, tied=False, layers=L, scale=0.05):
  """Llama-shaped tensors; with `base`, a fine-tune of it (base + small noise)."""
  rng = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (V, H)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H // 2, H),
                   p + "self_attn.v_proj.weight": (H // 2, H), p + "self_attn.o_proj.weight": (H, H),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                   p + "post_attention_layernorm.weight": (H,)})
  shapes["model.norm.weight"] = (H,)
  if not tied:
    shapes["lm_head.weight"] = (V, H)
  out = {}
  for n, s in shapes.items():
    if base is None:
      out[n] = rng.normal(size=s).astype(np.float32)
    else:
      out[n] = (base.get(n, np.zeros(s)) + scale * rng.normal(size=s)).astype(np.float32)
  return out


def _write(path, tensors, config, files=True):
  hf.write_checkpoint(path, iter(tensors.items()), config, max_shard_bytes=SHARD)
  if files:
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
      json.dump({"model": os.path.basename(path)}, f)
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d = tmp_path_factory.mktemp("models")
  base = _llama(0)
  m1 = _llama(1, base)
  m2 = _llama(2, base)
  for name, t in (("base", base), ("m1", m1), ("m2", m2)):
    _write(d / name, t, _config())
  return d, {"base": base, "m1": m1, "m2": m2}


def _cfg(method, **extra):
  models = [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "m2", "parameters": {"weight": [0.2, 1.0], "density": 0.7}}]
  cfg = {"merge_method": method, "base_model": "base", "models": models, "dtype": "float32"}
  if method == "linear":
    cfg = {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}] + models}
  cfg.update(extra)
  return cfg


def _digest(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[p] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


@pytest.mark.parametrize("method, dtype", [("linear", "float32"), ("ties", "bfloat16"), ("dare_ties", "float16")])
def test_streaming_equals_in_memory(models, tmp_path, method, dtype):
  d, t = models
  cfg = _cfg(method, dtype=dtype)
  before = _digest(d)
  c = load_config(cfg, base_dir=d)
  out = run_merge(c, tmp_path / "out", max_shard_bytes=SHARD, seed=3, progress=False, prefetch=method == "ties")
  assert _digest(d) == before  # inputs untouched
  assert os.path.isfile(os.path.join(out, hf.INDEX_FILE))  # sharded
  got = hf.load_tensors(out)
  mem = merge_in_memory(c, {"base": t["base"], "m1": t["m1"], "m2": t["m2"]}, seed=3)
  assert list(got) == list(mem)
  want = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
  for n in mem:
    assert got[n].dtype == want and mem[n].dtype == want
    assert got[n].tobytes() == mem[n].tobytes(), n
  conf = json.load(open(os.path.join(out, "config.json")))
  assert conf["torch_dtype"] == dtype and conf["hidden_size"] == H
  assert json.load(open(os.path.join(out, "tokenizer.json"))) == {"model": "base"}


def test_linear_is_weighted_average(models, tmp_path):
  d, t = models
  out = run_merge(load_config(_cfg("linear"), base_dir=d), tmp_path / "out", progress=False)
  got = hf.load_tensors(out)
  for n in t["base"]:
    li = int(n.split(".")[2]) if ".layers." in n else None
    w2 = 0.2 if li is None else 0.2 + 0.8 * li / (L - 1)  # gradient [0.2, 1.0]; non-layer tensors: first anchor
    ws = np.array([1.0, 0.6, w2])
    ref = (ws[0] * t["base"][n].astype(np.float64) + ws[1] * t["m1"][n] + ws[2] * t["m2"][n]) / ws.sum()
    np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=1e-6, err_msg=n)


def test_ties_full_density_matches_numpy(models):
  _, t = models
  cfg = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 1.0},
         "models": [{"model": "m1", "parameters": {"weight": 0.6}}, {"model": "m2", "parameters": {"weight": 1.5}}]}
  got = merge_in_memory(cfg, t)
  n = "model.layers.1.mlp.up_proj.weight"
  b = t["base"][n].astype(np.float64)
  u = np.stack([0.6 * (t["m1"][n] - b), 1.5 * (t["m2"][n] - b)])
  w = np.array([0.6, 1.5])[:, None, None] * np.ones_like(u)
  s = np.where(u.sum(0) >= 0, 1.0, -1.0)
  agree = np.sign(u) == s
  ref = b + np.where(agree, u, 0).sum(0) / np.where(agree, w, 0).sum(0)
  np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=1e-6)


def _ties_ref(base, srcs, weights, densities):
  """numpy TIES (mergekit semantics): per model keep max(1, int(density * n)) largest |delta|, sum-elected signs,
  disjoint weighted mean."""
  b = base.astype(np.float64)
  us = []
  for x, w, d in zip(srcs, weights, densities):
    delta = (x.astype(np.float64) - b).ravel()
    k = max(1, int(d * delta.size))
    keep = np.zeros(delta.size, bool)
    keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
    us.append(w * np.where(keep, delta, 0).reshape(b.shape))
  u = np.stack(us)
  ws = np.array(weights, np.float64).reshape((-1,) + (1,) * b.ndim)
  agree = np.sign(u) == np.where(u.sum(0) >= 0, 1.0, -1.0)
  den = np.where(agree, ws, 0).sum(0)
  return b + np.where(agree, u, 0).sum(0) / np.where(den == 0, 1, den)


@pytest.mark.parametrize("density", [0.7, 0.3, 0.6, 0.9])
def test_ties_kept_count_uses_float64_density(density):
  rng = np.random.default_rng(5)
  base = rng.normal(size=10).astype(np.float32)
  perm = [rng.permutation(10) for _ in range(2)]
  srcs = [base + (0.1 * (p + 1) * np.where(rng.random(10) < 0.5, -1, 1)).astype(np.float32) for p in perm]
  k = max(1, int(density * 10))
  for i, s in enumerate(srcs):
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "m", "parameters": {"weight": 1.0, "density": density}}]}
    got = merge_in_memory(cfg, {"base": {"w": base}, "m": {"w": s}})["w"]
    changed = got != base
    assert changed.sum() == k, (i, changed.sum())
    assert set(np.flatnonzero(changed)) == set(np.flatnonzero(perm[i] >= 10 - k))
  cfg = {"merge_method": "ties", "base_model": "base",
         "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": density}},
                    {"model": "m2", "parameters": {"weight": 1.3, "density": 0.7}}]}
  got = merge_in_memory(cfg, {"base": {"w": base}, "m1": {"w": srcs[0]}, "m2": {"w": srcs[1]}})["w"]
  np.testing.assert_allclose(got, _ties_ref(base, srcs, [0.6, 1.3], [density, 0.7]), rtol=1e-6, atol=1e-7)


def test_dare_seed_reproducible(models):
  _, t = models
  a = merge_in_memory(_cfg("dare_ties"), t, seed=1)
  b = merge_in_memory(_cfg("dare_ties"), t, seed=1)
  c = merge_in_memory(_cfg("dare_ties"), t, seed=2)
  n = "model.layers.0.mlp.down_proj.weight"
  assert a[n].tobytes() == b[n].tobytes()
  assert a[n].tobytes() != c[n].tobytes()
  # order independence: merging a reordered dict gives the same tensors
  rev = {k: dict(reversed(list(v.items()))) for k, v in t.items()}
  d = merge_in_memory(_cfg("dare_ties"), rev, seed=1)
  assert d[n].tobytes() == a[n].tobytes()


def test_passthrough_slices(models, tmp_path):
  d, t = models
  cfg = {"merge_method": "passthrough", "base_model": "base", "slices": [
    {"sources": [{"model": "m1", "layer_range": [0, 2]}]},
    {"sources": [{"model": "m2", "layer_range": [1, 2]}]}]}
  out = run_merge(load_config(cfg, base_dir=d), tmp_path / "out", progress=False)
  got = hf.load_tensors(out)
  assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 3
  k = "self_attn.q_proj.weight"
  np.testing.assert_array_equal(got[f"model.layers.0.{k}"], t["m1"][f"model.layers.0.{k}"])
  np.testing.assert_array_equal(got[f"model.layers.1.{k}"], t["m1"][f"model.layers.1.{k}"])
  np.testing.assert_array_equal(got[f"model.layers.2.{k}"], t["m2"][f"model.layers.1.{k}"])
  np.testing.assert_array_equal(got["model.embed_tokens.weight"], t["base"]["model.embed_tokens.weight"])
  assert len(got) == 3 + 3 * 9


def test_mismatched_shapes_and_architecture(models, tmp_path):
  d, t = models
  bad = dict(t["m2"])
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((I + 1, H), np.float32)
  _write(tmp_path / "m2", bad, _config(), files=False)
  cfg = _cfg("ties")
  cfg["base_model"] = str(d / "base")
  cfg["models"][0]["model"] = str(d / "m1")
  cfg["models"][1]["model"] = str(tmp_path / "m2")
  with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*\(24, 16\).*\(25, 16\)"):
    run_merge(cfg, tmp_path / "out", progress=False)
  conf = _config()
  conf["vocab_size"] = V + 1
  _write(tmp_path / "m3", t["m2"], conf, files=False)
  cfg["models"][1]["model"] = str(tmp_path / "m3")
  with pytest.raises(ValueError, match="'vocab_size' differs.*m3"):
    run_merge(cfg, tmp_path / "out", progress=False)
  assert not os.path.exists(tmp_path / "out")


def test_tied_embeddings(tmp_path):
  base = _llama(0, tied=True)
  a, b = _llama(1, base, tied=True), _llama(2, base, tied=True)
  for n, x in (("base", base), ("a", a), ("b", b)):
    _write(tmp_path / n, x, _config(tied=True), files=False)
  cfg = {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}
  (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
  out = run_merge(str(tmp_path / "c.yaml"), tmp_path / "out", progress=False)
  got = hf.load_tensors(out)
  assert "lm_head.weight" not in got
  n = "model.embed_tokens.weight"
  ref = base[n] + 0.5 * (a[n] - base[n]) + 0.5 * (b[n] - base[n])
  np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=1e-6)
  assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
  # one model with an lm_head, the others without: a clear error
  _write(tmp_path / "untied", _llama(3, base), _config(tied=True), files=False)
  cfg["models"][1]["model"] = "untied"
  (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg))
  with pytest.raises(ValueError, match="untied stores lm_head.weight but .*base does not"):
    run_merge(str(tmp_path / "c2.yaml"), tmp_path / "out2", progress=False)


def test_output_guard(models, tmp_path):
  d, _ = models
  c = load_config(_cfg("linear"), base_dir=d)
  with pytest.raises(ValueError, match="would overwrite the input"):
    run_merge(c, d / "m1", overwrite=True, progress=False)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("keep")
  with pytest.raises(FileExistsError, match="not empty"):
    run_merge(c, tmp_path / "out", progress=False)
  assert (tmp_path / "out" / "x").read_text() == "keep"


def test_cli_end_to_end(models, tmp_path):
  d, t = models
  cfg = _cfg("task_arithmetic")
  for m in cfg["models"]:
    m["model"] = os.path.relpath(d / m["model"], tmp_path)
  cfg["base_model"] = os.path.relpath(d / "base", tmp_path)
  (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
  cmd = [sys.executable, "-m", "jaxlab.merging.merge", str(tmp_path / "cfg.yaml"), str(tmp_path / "out"),
         "--shard-size", str(SHARD), "--seed", "0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd + ["--compile-cache", str(tmp_path / "jit")], capture_output=True, text=True, cwd="/",
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert os.listdir(tmp_path / "jit")  # compiled kernels stored
  assert "[merge]" in r.stderr and f"{len(t['base'])}/{len(t['base'])} tensors" in r.stderr
  shards = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
  got = {}
  for s in shards:
    got.update(load_file(str(tmp_path / "out" / s)))
  n = "model.layers.1.self_attn.o_proj.weight"
  ref = t["base"][n] + 0.6 * (t["m1"][n] - t["base"][n]) + 1.0 * (t["m2"][n] - t["base"][n])
  np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=1e-6)
  r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, cwd="/", env=env, timeout=120)
  assert r.returncode == 2 and "not empty" in r.stderr and r.stderr.count("\n") == 1


def _slerp_ref(a, b, t):
  a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
  cos = np.clip(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64), -1, 1)
  om = np.arccos(cos)
  out = (np.sin((1 - t) * om) * a64 + np.sin(t * om) * b64) / np.sin(om)
  return out.reshape(a.shape)


def test_slerp_slices_with_filters_and_gradient(models):
  _, t = models
  cfg = {"merge_method": "slerp", "base_model": "base", "slices": [{"sources": [
    {"model": "base", "layer_range": [0, 2]}, {"model": "m2", "layer_range": [0, 2]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]}}
  got = merge_in_memory(cfg, {"base": t["base"], "m2": t["m2"]})
  for n, tt in (("model.layers.0.self_attn.k_proj.weight", 0.0), ("model.layers.1.self_attn.k_proj.weight", 1.0),
                ("model.layers.0.mlp.up_proj.weight", 0.3), ("lm_head.weight", 0.3)):
    np.testing.assert_allclose(got[n], _slerp_ref(t["base"][n], t["m2"][n], tt), rtol=1e-4, atol=1e-5, err_msg=n)


def test_tokenizer_vocab_mismatch_warns(tmp_path):
  for name, vocab in (("a", {"x": 0, "y": 1}), ("b", {"x": 0, "y": 1}), ("c", {"x": 1, "y": 0})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
  from jaxlab.merging.merge import check_tokenizers
  assert check_tokenizers([str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.warns(UserWarning, match="tokenizer vocabularies differ"):
    assert not check_tokenizers([str(tmp_path / n) for n in "abc"])


def _band_mask(delta, k, skip):
  order = np.argsort(-np.abs(delta.ravel()), kind="stable")
  mask = np.zeros(delta.size, bool)
  mask[order[skip:skip + k]] = True
  return mask.reshape(delta.shape)


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_ties_matches_numpy(models, normalize):
  _, t = models
  cfg = {"merge_method": "breadcrumbs_ties", "base_model": "base", "parameters": {"normalize": normalize},
         "models": [{"model": "m1", "parameters": {"weight": 0.7, "density": 0.5, "gamma": 0.125}},
                    {"model": "m2", "parameters": {"weight": 1.3, "density": 0.25, "gamma": 0.25}}]}
  got = merge_in_memory(cfg, t)
  n = "model.layers.0.self_attn.q_proj.weight"  # 256 entries: every kept count is an exact integer
  b = t["base"][n].astype(np.float64)
  ws = [0.7, 1.3]
  masks = [_band_mask(t["m1"][n] - b, 128, 32), _band_mask(t["m2"][n] - b, 64, 64)]
  u = np.stack([w * np.where(m, t[k][n] - b, 0) for w, m, k in zip(ws, masks, ("m1", "m2"))])
  s = np.where(u.sum(0) >= 0, 1.0, -1.0)  # mergekit: a zero sum elects +1; zero entries never agree
  agree = np.sign(u) == s
  num = np.where(agree, u, 0).sum(0)
  if normalize:
    den = np.where(agree, np.array(ws)[:, None, None], 0).sum(0)
    num = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
  np.testing.assert_allclose(got[n], b + num, rtol=1e-5, atol=1e-6)


def test_passthrough_models_casts_dtype(models):
  _, t = models
  got = merge_in_memory({"merge_method": "passthrough", "models": [{"model": "m1"}], "dtype": "float16"}, t)
  assert list(got) == list(t["m1"])
  for n, a in t["m1"].items():
    assert got[n].dtype == np.float16 and got[n].tobytes() == a.astype(np.float16).tobytes()


def test_missing_tensor_error(models):
  _, t = models
  m2 = dict(t["m2"])
  del m2["model.layers.1.mlp.gate_proj.weight"]
  with pytest.raises(ValueError, match="'model.layers.1.mlp.gate_proj.weight' is in .*base but not in .*m2"):
    merge_in_memory(_cfg("ties"), {"base": t["base"], "m1": t["m1"], "m2": m2})
