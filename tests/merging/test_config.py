"""mergekit YAML schema parsing: precedence, gradients, filters, paths and errors."""
import os

import numpy as np
import pytest

from jaxlab.merging.config import load_config

YAML = """
merge_method: ties
base_model: base
models:
  - model: base
  - model: m1
    parameters:
      weight: 0.7
      density: [0.2, 0.8]
  - model: sub/m2
    parameters:
      weight:
        - filter: self_attn
          value: 0.1
        - filter: mlp
          value: [1.0, 0.0, 1.0]
parameters:
  weight: 0.5
  density: 0.9
  normalize: false
  lambda:
    - filter: mlp
      value: 2.0
dtype: bfloat16
tokenizer_source: base
"""


@pytest.fixture
def cfg_dir(tmp_path):
  for m in ("base", "m1", "sub/m2"):
    (tmp_path / m).mkdir(parents=True)
  (tmp_path / "cfg.yaml").write_text(YAML)
  return tmp_path


def test_paths_relative_to_yaml_and_defaults(cfg_dir, monkeypatch):
  monkeypatch.chdir("/")
  cfg = load_config(cfg_dir / "cfg.yaml")
  assert cfg.base_model.path == str(cfg_dir / "base")
  assert cfg.model_paths == [str(cfg_dir / p) for p in ("base", "m1", "sub/m2")]
  assert cfg.tokenizer_source == str(cfg_dir / "base")
  assert cfg.output_dtype == "bfloat16"
  g = cfg.params_for("model.layers.0.mlp.up_proj.weight", None, 0, 5)
  assert g == {"lambda": 2.0, "normalize": False, "rescale": False, "int8_mask": False}
  g = cfg.params_for("model.layers.0.self_attn.q_proj.weight", None, 0, 5)
  assert g["lambda"] == 1.0  # filter list without a match falls back to the method default


def test_precedence_gradient_and_filters(cfg_dir):
  cfg = load_config(cfg_dir / "cfg.yaml")
  m1, m2 = 1, 2
  # model-level gradient [0.2, 0.8] over 5 layers: layer 2 is the midpoint
  p = cfg.params_for("model.layers.2.mlp.up_proj.weight", m1, 2, 5)
  assert p["weight"] == 0.7 and np.isclose(p["density"], 0.5)
  assert np.isclose(cfg.params_for("model.layers.1.mlp.up_proj.weight", m1, 1, 5)["density"], 0.35)
  # non-layer tensors are evaluated at t = 0: the first anchor (mergekit)
  assert np.isclose(cfg.params_for("model.embed_tokens.weight", m1)["density"], 0.2)
  assert np.isclose(cfg.params_for("model.norm.weight", m1)["density"], 0.2)
  assert np.isclose(cfg.params_for("lm_head.weight", m1)["density"], 0.2)
  # a one-layer range sits at t = 1: the last anchor
  assert np.isclose(cfg.params_for("model.layers.0.mlp.up_proj.weight", m1, 0, 1)["density"], 0.8)
  # filters, first match wins, values may be gradients; no match -> global
  assert cfg.params_for("model.layers.3.self_attn.q_proj.weight", m2, 3, 5)["weight"] == 0.1
  assert np.isclose(cfg.params_for("model.layers.1.mlp.up_proj.weight", m2, 1, 5)["weight"], 0.5)
  assert np.isclose(cfg.params_for("model.layers.2.mlp.up_proj.weight", m2, 2, 5)["weight"], 0.0)
  assert cfg.params_for("model.layers.2.input_layernorm.weight", m2, 2, 5)["weight"] == 0.5
  assert cfg.params_for("model.layers.2.input_layernorm.weight", m2, 2, 5)["density"] == 0.9


def test_slice_precedence(tmp_path):
  for m in ("a", "b"):
    (tmp_path / m).mkdir()
  cfg = load_config({
    "merge_method": "slerp", "base_model": "a",
    "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]},
                            {"model": "b", "layer_range": [0, 3], "parameters": {"t": 0.9}}],
                "parameters": {"t": [0.0, 1.0]}}],
    "parameters": {"t": 0.3}}, base_dir=tmp_path)
  assert cfg.params_for("model.layers.1.x", None, 1, 3, slice_index=0)["t"] == 0.5
  assert cfg.params_for("model.norm.weight", None)["t"] == 0.3
  assert cfg.resolve("t", "model.layers.1.x", str(tmp_path / "b"), 1, 3, 0) == 0.9
  assert cfg.slices[0].num_layers == 3


def test_dtype_none_and_defaults(tmp_path):
  for m in ("a", "b"):
    (tmp_path / m).mkdir()
  cfg = load_config({"merge_method": "dare_ties", "base_model": "a", "models": [{"model": "b",
                     "parameters": {"weight": 1}}]}, base_dir=tmp_path)
  p = cfg.params_for("model.layers.0.mlp.up_proj.weight", 1, 0, 2)
  assert p == {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False, "weight": 1, "density": 1.0}
  assert cfg.output_dtype is None
  lin = load_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}, base_dir=tmp_path)
  with pytest.raises(ValueError, match="'weight' is required.*model"):
    lin.params_for("x", 0)


@pytest.mark.parametrize("raw, err, match", [
  ({"merge_method": "frankenmerge", "models": [{"model": "a"}]}, ValueError, "known methods: linear"),
  ({"merge_method": "linear", "models": [{"model": "missing"}]}, FileNotFoundError, "missing"),
  ({"merge_method": "ties", "models": [{"model": "a"}]}, ValueError, "needs base_model"),
  ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": 1}}]}, ValueError, "'wieght'"),
  ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int8"}, ValueError, "dtype must be"),
  ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"}, ValueError, "union"),
  ({"merge_method": "linear", "models": [{"model": "a"}], "foo": 1}, ValueError, "unknown config key"),
  ({"merge_method": "linear"}, ValueError, "exactly one of 'models' and 'slices'"),
  ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                           {"model": "a", "layer_range": [2, 4]}]}]},
   ValueError, "exactly one source"),
  ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 2]}]}]},
   ValueError, "layer_range"),
  ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [1, {"value": 2}]}}]},
   ValueError, "all numbers"),
  ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                      {"model": "a", "layer_range": [2, 4]}]}]},
   ValueError, "each model only once"),
])
def test_errors(tmp_path, raw, err, match):
  (tmp_path / "a").mkdir()
  with pytest.raises(err, match=match):
    load_config(raw, base_dir=tmp_path)


def test_missing_yaml_and_missing_model_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="merge config not found"):
    load_config(tmp_path / "nope.yaml")
  (tmp_path / "c.yaml").write_text("merge_method: linear\nmodels:\n  - model: ./gone\n")
  with pytest.raises(FileNotFoundError, match=f"models\\[0\\].*{os.path.join(str(tmp_path), 'gone')}"):
    load_config(tmp_path / "c.yaml")
  cfg = load_config(tmp_path / "c.yaml", check_paths=False)
  assert cfg.models[0].path == str(tmp_path / "gone")


def test_example_config_parses():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg = load_config(os.path.join(root, "configs", "merging", "example_ties.yaml"), check_paths=False)
  assert cfg.merge_method == "ties" and len(cfg.models) == 3
  code = cfg.model_paths.index(cfg.models[2].path)
  assert cfg.params_for("model.layers.4.self_attn.q_proj.weight", code, 4, 30)["weight"] == 0.3
  assert cfg.params_for("model.layers.4.mlp.up_proj.weight", code, 4, 30)["weight"] == 0.5
  assert np.isclose(cfg.params_for("model.layers.29.mlp.up_proj.weight", 1, 29, 30)["density"], 0.7)
