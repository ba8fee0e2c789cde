"""AGNN's command lines end to end on a tiny graph in the raw Planetoid format and on NAS-Bench-Graph."""
import json

from tests.agnn.conftest import write_tiny_planetoid
from tests.test_cli import run


def test_planetoid_search_cli_runs_baselines_search_and_retrain(tiny_planetoid_dir, tmp_path):
  args = ["jaxlab.train", "--config", "configs/agnn/cora.py:smoke", f"--config.data.data_dir={tiny_planetoid_dir}",
          "--config.data.edge_multiple=128", f"--workdir={tmp_path}"]
  out = run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert {"GCN", "GAT", "search"} <= set(results)
  assert results["search"]["architectures"] == 4
  assert results["search"]["retrain"]["seeds"] == 2
  history = [json.loads(line) for line in open(tmp_path / "search.jsonl")]
  assert len(history) == 4
  assert "| GAT |" in (tmp_path / "table.md").read_text()
  # the same command again replays the stored history instead of training the children again
  again = run(args + ["--config.baselines.run=False"])
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[1/4]" not in again.stdout
  assert [json.loads(line) for line in open(tmp_path / "search.jsonl")] == history


def test_nasbench_cli_writes_curves_table_and_plot(tmp_path):
  out = run(["jaxlab.train", "--config", "configs/agnn/nasbench.py:smoke", f"--workdir={tmp_path}"])
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert set(results["curves"]) == {"agnn", "random", "graphnas"}
  for curve in results["curves"].values():
    assert len(curve["mean"]) == 12 and 0.3 < curve["mean"][-1] < 0.84
  assert (tmp_path / "best_so_far.png").stat().st_size > 0
  assert "| agnn: test of best-by-validation |" in (tmp_path / "table.md").read_text()


def test_pubmed_without_allx_names_the_missing_file(tmp_path):
  write_tiny_planetoid(tmp_path, "pubmed")
  (tmp_path / "ind.pubmed.allx").unlink()
  out = run(["jaxlab.train", "--config", "configs/agnn/pubmed.py:smoke", f"--config.data.data_dir={tmp_path}",
             f"--workdir={tmp_path / 'run'}"])
  assert out.returncode != 0
  assert "ind.pubmed.allx" in out.stderr
