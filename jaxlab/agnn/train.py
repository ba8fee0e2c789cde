"""AGNN from a config: architecture search on a Planetoid data set, or controller runs on NAS-Bench-Graph.

planetoid  1. GCN and GAT trained by ``child.train_children`` over ``baselines.seeds`` seeds;
           2. the search (``search.strategy``: agnn, random or graphnas) over ``space.gnn_space``, rewarding
              each child with its mean validation accuracy over ``search.seeds_per_child`` seeds, AGNN with
              constrained parameter sharing when ``search.sharing``; the history is ``search.jsonl`` and a
              killed run resumes by replaying it;
           3. the best architecture (by validation reward) retrained from scratch over ``retrain.seeds`` seeds.
           Writes ``results.json`` and ``table.md``.
nasbench   every strategy in ``nasbench.strategies`` from ``nasbench.seeds`` seeds on a NAS-Bench-Graph table:
           reward = validation accuracy, reported = test accuracy of the best-by-validation architecture so
           far. Writes ``results.json``, ``table.md`` and ``best_so_far.png``.
"""
from __future__ import annotations

import os
import time

import numpy as np

from jaxlab.agnn import child as child_lib
from jaxlab.agnn import data as data_lib
from jaxlab.agnn import search as search_lib
from jaxlab.agnn.controller import ControllerConfig
from jaxlab.agnn.space import decode_gnn, encode_gnn, gat_layers, gcn_layers, gnn_space
from jaxlab.common import loop
from jaxlab.common.metrics import write_json_atomic


def data_dir(config) -> str:
  """``config.data.data_dir``, else ``$JAXLAB_DATA``, else ``../shared/data`` beside the repository."""
  return config.data.data_dir or str(data_lib.default_data_dir())


def child_hparams(cfg) -> child_lib.ChildHParams:
  return child_lib.ChildHParams(**{k: cfg[k] for k in cfg.keys()})


def make_strategy(name: str, space, scfg, seed: int, initial=None):
  ccfg = ControllerConfig(**{k: scfg.controller[k] for k in scfg.controller.keys()})
  if name == "agnn":
    return search_lib.AGNNController(space, ccfg, seed, initial=initial)
  if name == "graphnas":
    return search_lib.GraphNASController(space, ccfg, seed)
  if name == "random":
    return search_lib.RandomSearch(space, seed)
  raise ValueError(f"search.strategy must be one of agnn, graphnas, random; got {name!r}")


def _summary(result: child_lib.ChildResult) -> dict:
  return {"test_mean": float(np.mean(result.test_acc)), "test_std": float(np.std(result.test_acc)),
          "val_mean": float(np.mean(result.val_acc)), "val_std": float(np.std(result.val_acc)),
          "seeds": len(result.test_acc), "num_params": result.num_params, "seconds": result.seconds}


class ChildEvaluator:
  """The search's ``evaluate``: trains each proposed child over a few seeds; AGNN children may inherit.

  With sharing, the parameters of the current best architecture are kept, and a child derived from it
  starts from them in every homogeneous layer (``sharing.inherit``).
  """

  def __init__(self, task, space, num_classes: int, hp, seeds, sharing: bool, parallel: str = "vmap"):
    self.task, self.space, self.num_classes, self.hp, self.parallel = task, space, num_classes, hp, parallel
    self.seeds, self.sharing = tuple(seeds), sharing
    self.trained = {}   # arch -> (layers, params) of recently trained children, for sharing

  def __call__(self, proposals):
    out = []
    for proposal in proposals:
      layers = decode_gnn(self.space, proposal.arch, self.num_classes)
      parent = self.trained.get(proposal.parent) if self.sharing and proposal.parent is not None else None
      result = child_lib.train_children(layers, self.task, self.seeds, self.hp, parent=parent,
                                        parallel=self.parallel)
      if self.sharing:
        self.trained[proposal.arch] = (layers, result.params)
      out.append({"reward": result.reward, "test": float(np.mean(result.test_acc)),
                  "num_params": result.num_params, "seconds": result.seconds,
                  "inherited": sum(result.inherited)})
    return out

  def keep_only(self, arch):
    """Forget the weights of every child but ``arch`` (the new parent)."""
    self.trained = {a: v for a, v in self.trained.items() if a == arch}


def _planetoid(config, workdir: str, log) -> dict:
  dcfg = config.data
  dataset = data_lib.load_planetoid(dcfg.name, data_dir(config))
  task = child_lib.node_task(dataset, edge_multiple=dcfg.edge_multiple)
  hp = child_hparams(config.child)
  results = {"dataset": dcfg.name, "num_nodes": dataset.num_nodes, "num_edges": dataset.num_edges}
  seeds = list(range(config.baselines.seeds))
  if config.baselines.run:
    gat_hp = hp
    if config.baselines.gat_learning_rate or config.baselines.gat_weight_decay:
      gat_hp = child_lib.ChildHParams(**{**vars(hp), "learning_rate": config.baselines.gat_learning_rate or
                                         hp.learning_rate, "weight_decay": config.baselines.gat_weight_decay or
                                         hp.weight_decay})
    for name, layers, h in (("GCN", gcn_layers(dataset.num_classes), hp),
                            ("GAT", gat_layers(dataset.num_classes, output_heads=config.baselines.gat_output_heads),
                             gat_hp)):
      summary = _summary(child_lib.train_children(layers, task, seeds, h, parallel=config.parallel))
      results[name] = summary
      log(f"{name}: test {100 * summary['test_mean']:.1f} ± {100 * summary['test_std']:.1f} "
          f"over {len(seeds)} seeds ({summary['seconds']:.1f} s)")

  scfg = config.search
  space = gnn_space(scfg.num_layers)
  if scfg.budget > 0:
    initial = None
    if scfg.initial:
      handcrafted = {"gat": gat_layers, "gcn": gcn_layers}
      if scfg.initial not in handcrafted:
        raise ValueError(f"search.initial must be '', 'gat' or 'gcn', got {scfg.initial!r}")
      initial = encode_gnn(space, handcrafted[scfg.initial](dataset.num_classes))
    strategy = make_strategy(scfg.strategy, space, scfg, scfg.seed, initial=initial)
    child_seeds = [1000 + s for s in range(scfg.seeds_per_child)]
    evaluate = ChildEvaluator(task, space, dataset.num_classes, hp, child_seeds,
                              sharing=scfg.sharing and scfg.strategy == "agnn", parallel=config.parallel)

    def evaluate_and_forget(proposals):
      # Only the current parent's weights can be inherited: drop the rest before training the next batch.
      evaluate.keep_only(strategy.best[0] if strategy.best else None)
      return evaluate(proposals)

    start = time.perf_counter()
    records = search_lib.run_search(strategy, evaluate_and_forget, budget=scfg.budget, batch_size=scfg.batch_size,
                                    history_path=os.path.join(workdir, "search.jsonl"),
                                    progress=lambda r: log(f"[{r.index + 1}/{scfg.budget}] reward "
                                                           f"{r.reward:.4f} test {r.info.get('test', 0):.4f}"),
                                    max_seconds=scfg.max_minutes * 60 if scfg.max_minutes > 0 else None)
    best = max(records, key=lambda r: r.reward)
    layers = decode_gnn(space, best.arch, dataset.num_classes)
    final = _summary(child_lib.train_children(layers, task, list(range(config.retrain.seeds)), hp,
                                              parallel=config.parallel))
    results["search"] = {
        "strategy": scfg.strategy, "sharing": bool(scfg.sharing), "architectures": len(records),
        "search_seconds": sum(r.seconds for r in records), "wall_seconds_this_run": time.perf_counter() - start,
        "best_arch": list(best.arch), "best_layers": [vars(layer) for layer in layers], "best_reward": best.reward,
        "retrain": final}
    log(f"{scfg.strategy}: best reward {best.reward:.4f}; retrained test {100 * final['test_mean']:.1f} ± "
        f"{100 * final['test_std']:.1f} over {final['seeds']} seeds")
  return results


def _planetoid_table(results: dict) -> str:
  rows = ["| model | test accuracy % (mean ± std) | seeds | parameters |", "|---|---|---|---|"]
  entries = [(k, results[k]) for k in ("GCN", "GAT") if k in results]
  if "search" in results:
    entries.append((f"{results['search']['strategy']} search, best", results["search"]["retrain"]))
  for name, s in entries:
    rows.append(f"| {name} | {100 * s['test_mean']:.1f} ± {100 * s['test_std']:.1f} | {s['seeds']} | "
                f"{s['num_params']} |")
  return "\n".join(rows) + "\n"


def train_and_evaluate(config, workdir: str, eval_only: bool = False) -> loop.Result:
  if eval_only:
    raise ValueError("agnn has no --eval_only: a search's results are in its workdir's results.json")
  os.makedirs(workdir, exist_ok=True)
  if config.task == "planetoid":
    results = _planetoid(config, workdir, print)
    table = _planetoid_table(results)
  elif config.task == "nasbench":
    from jaxlab.agnn import benchbed
    results = benchbed.run(config, workdir, print)
    table = benchbed.table(results)
  else:
    raise ValueError(f"config 'task' must be 'planetoid' or 'nasbench', got {config.task!r}")
  write_json_atomic(os.path.join(workdir, "results.json"), results)
  tmp = os.path.join(workdir, "table.md.tmp")
  with open(tmp, "w") as f:
    f.write(table)
  os.replace(tmp, os.path.join(workdir, "table.md"))
  print(table)
  metrics = {k: {"test_acc": v["test_mean"]} for k, v in results.items() if isinstance(v, dict) and "test_mean" in v}
  if "search" in results:
    metrics["search"] = {"test_acc": results["search"]["retrain"]["test_mean"],
                         "architectures": results["search"]["architectures"]}
  if "summary" in results:
    metrics.update(results["summary"])
  return loop.Result(step=0, best_step=0, metrics=metrics, state=None, graphdef=None)
