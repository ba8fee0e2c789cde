"""The command lines end to end: train (and resume) on a smoke config, clear errors, the benchmark runner."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run(args, **kw):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, **kw)


def test_train_cli_writes_metrics_and_resumes(nbody_smoke_dir, tmp_path):
  args = ["jaxlab.train", "--config", "configs/ponita/nbody.py:smoke", f"--config.data.nbody_dir={nbody_smoke_dir}",
          f"--workdir={tmp_path}"]
  first = run(args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test: mse" in first.stdout
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["kind"] == "train"]
  assert train and all("step" in r and "loss" in r for r in train)
  assert any("val/mse" in r for r in records if r["kind"] == "eval")
  results = json.load(open(tmp_path / "results.json"))
  assert results["test"]["mse"] > 0
  second = run(args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed" in second.stdout
  again = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len([r for r in again if r["kind"] == "train"]) == len(train)  # no step was trained twice


def test_misspelled_config_key_is_a_clear_error(tmp_path):
  out = run(["jaxlab.train", "--config", "configs/ponita/nbody.py:smoke", "--config.model.hiden=8",
             f"--workdir={tmp_path}"])
  assert out.returncode != 0
  assert "hiden" in out.stderr


def test_unknown_variant_is_a_clear_error(tmp_path):
  out = run(["jaxlab.train", "--config", "configs/ponita/nbody.py:gpu9", f"--workdir={tmp_path}"])
  assert out.returncode != 0
  assert "unknown variant 'gpu9'" in out.stderr


def test_icgnn_precoding_cli_trains_and_tabulates_baselines(tmp_path):
  out = run(["jaxlab.train", "--config", "configs/icgnn/precoding.py:smoke", f"--workdir={tmp_path}"])
  assert out.returncode == 0, out.stderr[-3000:]
  table = json.load(open(tmp_path / "table.json"))
  assert set(table) == {"k8_n8", "k16_n16"}
  for row in table.values():
    assert {"ICGNN", "WMMSE", "RZF", "MRT"} <= set(row)
    assert row["WMMSE"] > row["RZF"] > row["MRT"] > 0  # the loaded regime K = N, where WMMSE leads
  assert (tmp_path / "table.md").exists() and (tmp_path / "curves.png").exists()


def test_icgnn_cellfree_cli_trains_and_tabulates_baselines(tmp_path):
  out = run(["jaxlab.train", "--config", "configs/icgnn/cellfree.py:smoke", f"--workdir={tmp_path}"])
  assert out.returncode == 0, out.stderr[-3000:]
  table = json.load(open(tmp_path / "table.json"))
  assert set(table) == {"l25_k10_n4", "l50_k20_n8"}
  for row in table.values():
    assert {"ICGNN", "ICGNN p5", "wmmse", "fractional", "equal", "max_min"} <= set(row)
    assert row["wmmse"] > row["equal"] > 0
  assert (tmp_path / "se_cdf_l50_k20_n8.png").exists()


def test_merging_demo_cli_small_end_to_end(tmp_path):
  """Base, experts, four merges, the evolved merge and fusion; the evolved config reproduces through the CLI."""
  out = run(["jaxlab.train", "--config", "configs/merging/skills.py:small", f"--workdir={tmp_path}"])
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  rows = results["test_exact_match"]
  assert {"base", "expert:arith", "expert:reverse", "merge:linear", "merge:task_arithmetic", "merge:ties",
          "merge:dare_ties", "merge:evolved_ties"} <= set(rows)
  assert {"target:sft (lam=1)", "target:fuse MinCE", "target:fuse AvgCE"} <= set(results["fusion_test_exact_match"])
  assert all(0.0 <= v <= 1.0 for row in rows.values() for v in row.values())
  assert (tmp_path / "table.md").exists() and (tmp_path / "homogeneous.png").exists()
  assert len((tmp_path / "evolve" / "history.jsonl").read_text().splitlines()) == 8
  merged = run(["jaxlab.merging.merge", str(tmp_path / "evolve" / "best.yaml"), str(tmp_path / "again"), "--quiet"])
  assert merged.returncode == 0, merged.stderr[-3000:]
  from jaxlab.merging import hf
  a, b = hf.load_tensors(tmp_path / "again"), hf.load_tensors(tmp_path / "models" / "merge_evolved_ties")
  assert a.keys() == b.keys()
  for k in a:
    assert (a[k] == b[k]).all(), k
