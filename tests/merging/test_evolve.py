"""Layer-wise genomes decode to exact per-layer merges; batched scoring equals one-by-one; the search resumes."""
import json
import os

import numpy as np
import pytest

from jaxlab.merging import evolve, lm, merge, skills
from jaxlab.merging.model import LlamaConfig, model_from_tensors, tensor_shapes

TOK = skills.CharTokenizer()
CFG = LlamaConfig(vocab_size=len(TOK.vocab), hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                  num_kv_heads=1, bos_id=TOK.bos_id, eos_id=TOK.eos_id)


def _models(n, seed=0):
  rng = np.random.default_rng(seed)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in tensor_shapes(CFG).items()}
  experts = [{k: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
             for _ in range(n)]
  return base, experts


def test_linear_genome_is_per_layer_weighted_average():
  base, experts = _models(2)
  paths = ["/m/a", "/m/b"]
  g = evolve.Genome("linear", CFG.num_layers, paths, None, layer_granularity=2)
  assert g.groups == 3 and g.size == 6     # layers {0,1}, {2}, non-layer; x 2 models x weight
  x = np.array([0.2, 0.6, 1.0, 0.5, 0.3, 0.9])
  out = merge.merge_in_memory(g.to_config(x), dict(zip(paths, experts)))
  v = g.values(x)
  for name, value in out.items():
    lay = [i for i in range(CFG.num_layers) if name.startswith(f"model.layers.{i}.")]
    group = lay[0] // 2 if lay else -1
    w = v[group, :, 0]
    want = (w[0] * experts[0][name] + w[1] * experts[1][name]) / w.sum()
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ties_genome_decodes_into_the_box():
  g = evolve.Genome("ties", CFG.num_layers, ["/a", "/b"], "/base", weight_bounds=(0.0, 1.0), density_min=0.1)
  assert g.size == 4 * 2 * 2
  v = g.values(np.full(g.size, 7.0))
  assert v[..., 0].max() == 1.0 and v[..., 1].max() == 1.0
  v = g.values(np.full(g.size, -7.0))
  assert v[..., 0].min() == 0.0 and v[..., 1].min() == pytest.approx(0.1)
  cfg = g.to_config(g.initial(1.0, 0.5))
  assert cfg["base_model"] == "/base" and cfg["merge_method"] == "ties"
  assert cfg["models"][1]["parameters"]["density"][2] == {"filter": "model.layers.2.", "value": 0.5}
  with pytest.raises(ValueError, match="needs a base model"):
    evolve.Genome("ties", 3, ["/a"], None)
  with pytest.raises(ValueError, match="supports"):
    evolve.Genome("slerp", 3, ["/a"], "/b")


def test_batched_scoring_equals_single_models():
  _, experts = _models(3, seed=1)
  pairs = skills.sample("inc", 12, (1, 3), "dev", seed=0)
  many = evolve.exact_match_many(experts, CFG, TOK, pairs)
  one = [lm.exact_match(model_from_tensors(CFG, t), TOK, pairs) for t in experts]
  np.testing.assert_allclose(many, one)


def test_search_writes_history_and_resumes_by_replay(tmp_path):
  base, experts = _models(2, seed=2)
  tensors = {"/base": base, "/a": experts[0], "/b": experts[1]}
  g = evolve.Genome("task_arithmetic", CFG.num_layers, ["/a", "/b"], "/base")
  dev = {"inc": skills.sample("inc", 8, (1, 3), "dev", seed=0)}
  kw = dict(max_evals=8, popsize=4, sigma0=0.3, seed=1, log=lambda *_: None)
  first = evolve.cma_search(g, tensors, CFG, TOK, dev, str(tmp_path / "a"), **kw)
  hist = (tmp_path / "a" / "history.jsonl").read_text().splitlines()
  assert len(hist) == 8
  # a killed search: keep the first five rows; the rerun replays them and re-scores only the rest
  os.makedirs(tmp_path / "b")
  (tmp_path / "b" / "history.jsonl").write_text("\n".join(hist[:5]) + "\n")
  second = evolve.cma_search(g, tensors, CFG, TOK, dev, str(tmp_path / "b"), **kw)
  assert (tmp_path / "b" / "history.jsonl").read_text().splitlines() == hist
  assert second["x"] == first["x"] and second["fitness"] == first["fitness"]
  best = json.loads((tmp_path / "b" / "best.json").read_text())
  assert best["config"]["merge_method"] == "task_arithmetic"
  assert (tmp_path / "b" / "best.yaml").exists()
  # a history from other settings does not replay silently
  with pytest.raises(ValueError, match="does not replay"):
    evolve.cma_search(g, tensors, CFG, TOK, dev, str(tmp_path / "b"), **dict(kw, seed=5))
