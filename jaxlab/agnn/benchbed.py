"""Controllers on NAS-Bench-Graph: best-so-far test accuracy against the number of architectures queried.

Each strategy searches the table with reward = validation accuracy; after every query the curve records
the test accuracy of the best-by-validation architecture so far (the architecture a user would pick), never
the best test accuracy seen. Runs are repeated over seeds and averaged.
"""
from __future__ import annotations

import os

import numpy as np

from jaxlab.agnn import search as search_lib
from jaxlab.agnn.nasbench import NasBenchGraph
from jaxlab.common.plots import save_figure

CHECKPOINTS = (10, 20, 50, 100, 200, 500, 1000)


def run_strategy(bench: NasBenchGraph, strategy, budget: int, batch_size: int,
                 history_path=None) -> tuple[np.ndarray, np.ndarray]:
  """One search; returns the best-so-far test accuracy (of the best-by-validation architecture) and the best
  validation accuracy so far, each [budget]."""
  def evaluate(proposals):
    out = []
    for p in proposals:
      entry = bench.query(p.arch)
      out.append({"reward": entry.valid, "test": entry.test, "latency": entry.latency})
    return out

  records = search_lib.run_search(strategy, evaluate, budget=budget, batch_size=batch_size,
                                  history_path=history_path)
  test = np.asarray(search_lib.best_so_far(records, key="reward", report="test"), np.float64)
  return test, np.maximum.accumulate(np.asarray([r.reward for r in records], np.float64))


def run(config, workdir: str, log) -> dict:
  from jaxlab.agnn.train import make_strategy
  ncfg = config.nasbench
  bench = NasBenchGraph(config.data.name)
  curves, valid_curves = {}, {}
  for name in ncfg.strategies:
    runs, valids = [], []
    for seed in range(ncfg.seeds):
      history = os.path.join(workdir, f"{name}_seed{seed}.jsonl")
      strategy = make_strategy(name, bench.space, config.search, seed)
      test, valid = run_strategy(bench, strategy, ncfg.budget, config.search.batch_size, history)
      runs.append(test)
      valids.append(valid)
    curves[name], valid_curves[name] = np.stack(runs), np.stack(valids)
    final = curves[name][:, -1]
    log(f"{name}: best-so-far test after {ncfg.budget} queries {100 * final.mean():.2f} ± {100 * final.std():.2f}")
  optimum = bench.optimum()
  results = {"dataset": config.data.name, "budget": ncfg.budget, "seeds": ncfg.seeds, "optimum": optimum,
             "curves": {k: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()} for k, v in curves.items()},
             "valid_curves": {k: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()}
                              for k, v in valid_curves.items()},
             "summary": {k: {f"test_at_{n}": float(v[:, n - 1].mean()) for n in CHECKPOINTS if n <= ncfg.budget}
                         for k, v in curves.items()}}
  plot(results, os.path.join(workdir, "best_so_far.png"))
  return results


def table(results: dict) -> str:
  points = [n for n in CHECKPOINTS if n <= results["budget"]]
  rows = ["| strategy | " + " | ".join(f"{n} queries" for n in points) + " |",
          "|---|" + "---|" * len(points)]
  for kind, label in (("curves", "test of best-by-validation"), ("valid_curves", "best validation")):
    for name, curve in results.get(kind, {}).items():
      cells = [f"{100 * curve['mean'][n - 1]:.2f} ± {100 * curve['std'][n - 1]:.2f}" for n in points]
      rows.append(f"| {name}: {label} | " + " | ".join(cells) + " |")
  opt = results["optimum"]
  rows.append("")
  rows.append(f"Accuracy % after each number of queries (the test accuracy of the best-by-validation architecture "
              f"so far, and the best validation accuracy so far), mean ± std over {results['seeds']} "
              f"seeds, NAS-Bench-Graph {results['dataset']}. Table optimum: best validation "
              f"{100 * opt['best_valid']:.2f} (its test {100 * opt['best_valid_test']:.2f}), best test "
              f"{100 * opt['best_test']:.2f}, median test {100 * opt['median_test']:.2f}.")
  return "\n".join(rows) + "\n"


def plot(results: dict, out_png: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, curve in results["curves"].items():
    mean, std = np.asarray(curve["mean"]) * 100, np.asarray(curve["std"]) * 100
    x = np.arange(1, len(mean) + 1)
    ax.plot(x, mean, label=name)
    ax.fill_between(x, mean - std, mean + std, alpha=0.15)
  ax.axhline(100 * results["optimum"]["best_valid_test"], color="gray", ls="--", lw=0.8,
             label="test of best-validation entry")
  ax.set(xscale="log", xlabel="architectures queried", ylabel="test accuracy % (best by validation so far)",
         title=f"NAS-Bench-Graph {results['dataset']}, {results['seeds']} seeds")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return save_figure(fig, out_png)
