"""ICGNN for cell-free power allocation: link graphs of setups → per-link powers → closed-form MR sum-SE.

Training minimises the negative sum-SE of distributed MR precoding (the book's i.i.d. closed form, which is
differentiable in the powers) over a fixed set of generated setups; the per-AP budget holds by construction
(:func:`jaxlab.icgnn.model.cellfree_powers`). Test sets hold setups of the training size and larger ones
(more APs and UEs at the same density, more antennas per AP), scored next to the power-allocation baselines.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import graph as jgraph
from jaxlab.common import loop
from jaxlab.common.data import ArrayDataset
from jaxlab.icgnn import cellfree, metrics
from jaxlab.icgnn.model import ICGNN, cellfree_powers

SETUP_KEYS = ("beta_SxLxK", "gamma_SxLxK", "serve_SxLxK", "pilot_SxK", "ap_mask_SxL", "ue_mask_SxK")


def system_for(scfg, num_aps: int, num_ues: int, num_antennas: int) -> cellfree.CellFreeSetup:
  """The configured system with another size; the area grows with the APs so that the density stays fixed."""
  side = scfg.area_side_m * math.sqrt(num_aps / scfg.num_aps)
  return cellfree.CellFreeSetup(
      num_aps=num_aps, num_antennas=num_antennas, num_ues=num_ues, area_side_m=side, tau_p=scfg.tau_p,
      tau_c=scfg.tau_c, ul_power_mw=scfg.ul_power_mw, rho_max_mw=scfg.rho_max_mw,
      shadowing_std_db=scfg.shadowing_std_db)


class SetupSet:
  """Generated setups with their link graphs; batches of whole setups as (graph batch, dense arrays)."""

  def __init__(self, system: cellfree.CellFreeSetup, num_setups: int, seed: int, batch_size: int, name: str):
    self.system, self.batch_size, self.name = system, batch_size, name
    data = cellfree.generate(jax.random.key(seed), system, num_setups)
    self.arrays = {k: np.asarray(data[k]) for k in SETUP_KEYS}
    self.graphs = cellfree.link_graphs(self.arrays, num_antennas=system.num_antennas)
    self.budget = jgraph.estimate_budget(self.graphs, batch_size)
    self.num_setups = num_setups

  def batch(self, index: np.ndarray, valid: np.ndarray) -> dict:
    graph = jgraph.pad_graphs([self.graphs[i] for i in index], self.budget, check=False)
    setup = {k: v[index] for k, v in self.arrays.items()}
    setup["ue_mask_SxK"] = setup["ue_mask_SxK"] & valid[:, None]
    antennas = np.full(len(index), self.system.num_antennas, np.float32)
    return {"graph": graph, "setup": setup, "antennas": antennas, "example_mask": valid}

  def train_batch(self, step: int, seed: int) -> dict:
    rows = ArrayDataset({"index": np.arange(self.num_setups)}, self.batch_size, seed=seed).train_batch(step)
    return self.batch(rows["index"], rows["example_mask"])

  def eval_batches(self):
    for rows in ArrayDataset({"index": np.arange(self.num_setups)}, self.batch_size).eval_batches():
      yield self.batch(rows["index"], rows["example_mask"])


def model_factory(mcfg):
  def init(key):
    return ICGNN(len(cellfree.NODE_FEATURES), len(cellfree.EDGE_TYPES), 2, hidden=mcfg.hidden,
                 num_layers=mcfg.num_layers, shared=mcfg.shared, aggregation=mcfg.aggregation,
                 message_layers=mcfg.message_layers, rngs=nnx.Rngs(key))
  return init


def icgnn_powers(model: ICGNN, batch: dict, system: cellfree.CellFreeSetup) -> jax.Array:
  """Dense per-link powers ``[S, L, K]`` for a batch: GNN on the link graphs, per-AP normalised head."""
  graph = batch["graph"]
  node_mask, edge_mask = jgraph.node_mask(graph), jgraph.edge_mask(graph)
  beta = batch["setup"]["beta_SxLxK"]
  num_setups, num_aps, num_ues = beta.shape
  out = model(graph, node_mask, edge_mask)
  rho = cellfree_powers(out, graph, node_mask, num_aps, system.rho_max_mw)
  return cellfree.links_to_dense(rho, graph.nodes["ap"], graph.nodes["ue"], num_aps=num_aps, num_ues=num_ues,
                                 graph_n=jgraph.node_graph_ids(graph), num_graphs=num_setups, mask_n=node_mask)


def se_of(rho, setup: dict, antennas, system: cellfree.CellFreeSetup):
  """Per-UE SE ``[S, K]``; ``antennas`` per setup ``[S]`` (the only system constant that differs between sets)."""
  return cellfree.mr_se(rho, setup, jnp.asarray(antennas)[:, None], tau_p=system.tau_p, tau_c=system.tau_c)


def cellfree_task(config) -> tuple[loop.Task, dict]:
  dcfg, mcfg, tcfg, scfg = config.data, config.model, config.train, config.system
  train_system = system_for(scfg, scfg.num_aps, scfg.num_ues, scfg.num_antennas)
  train = SetupSet(train_system, dcfg.num_train, dcfg.seed, tcfg.batch_size, "train")
  if dcfg.num_train % tcfg.batch_size:
    raise ValueError(f"data.num_train ({dcfg.num_train}) must be a multiple of train.batch_size "
                     f"({tcfg.batch_size})")
  val = SetupSet(train_system, dcfg.num_val, dcfg.seed + 1, tcfg.eval_batch_size, "val")
  tests = {}
  for l, k, n in dcfg.test_sizes:
    system = system_for(scfg, l, k, n)
    tests[f"l{l}_k{k}_n{n}"] = SetupSet(system, dcfg.num_test, dcfg.seed + 1000 + 7 * l + k + n,
                                        tcfg.eval_batch_size, f"l{l}_k{k}_n{n}")

  def loss_fn(model, batch, key):
    se = se_of(icgnn_powers(model, batch, train_system), batch["setup"], batch["antennas"], train_system)
    total = jnp.mean(cellfree.sum_se(se, batch["setup"]["ue_mask_SxK"]))
    return -total, {"sum_se": total}

  def eval_fn(model, batch, key):
    se = se_of(icgnn_powers(model, batch, train_system), batch["setup"], batch["antennas"], train_system)
    w = batch["example_mask"].astype(jnp.float32)
    return {"sum_se": jnp.sum(cellfree.sum_se(se, batch["setup"]["ue_mask_SxK"]) * w), "count": jnp.sum(w)}

  def finalize(s):
    mean = s["sum_se"] / max(s["count"], 1.0)
    return {"sum_se": mean, "neg_sum_se": -mean}

  eval_sets = {"val": val.eval_batches, **{name: s.eval_batches for name, s in tests.items()}}
  task = loop.Task(init_model=model_factory(mcfg), loss_fn=loss_fn, eval_fn=eval_fn,
                   train_batch=lambda step: train.train_batch(step, tcfg.seed),
                   steps_per_epoch=dcfg.num_train // tcfg.batch_size, eval_sets=eval_sets, finalize=finalize,
                   select="neg_sum_se")
  return task, {"tests": tests}


def cellfree_table(result: loop.Result, task: loop.Task, info: dict, config, workdir: str) -> dict:
  from jaxlab.icgnn.train import write_table
  table, curves = {}, {}
  model = nnx.merge(result.graphdef, result.state["best_params"], result.state["rest"])
  for name, dataset in info["tests"].items():
    system = dataset.system
    arrays = {k: jnp.asarray(v) for k, v in dataset.arrays.items()}
    powers = cellfree.baseline_powers(arrays, system)
    rho = jnp.concatenate([icgnn_powers(model, jax.tree.map(jnp.asarray, b), system)[:int(b["example_mask"].sum())]
                           for b in dataset.eval_batches()])
    powers = {"ICGNN": rho, **powers}
    antennas = np.full(dataset.num_setups, system.num_antennas, np.float32)
    row = {}
    for method, r in powers.items():
      se = se_of(r, arrays, antennas, system)
      row[method] = float(jnp.mean(cellfree.sum_se(se, arrays["ue_mask_SxK"])))
      row[f"{method} p5"] = float(cellfree.percentile_se(se, arrays["ue_mask_SxK"], 5.0))
      curves[method] = np.asarray(se)[np.asarray(arrays["ue_mask_SxK"])]
    row["ICGNN/WMMSE %"] = 100.0 * row["ICGNN"] / row["wmmse"]
    table[name] = row
    metrics.se_cdf_plot(curves, os.path.join(workdir, f"se_cdf_{name}.png"), title=f"cell-free {name}")
  write_table(table, workdir, f"cell-free sum-SE (bit/s/Hz) and 5th-percentile per-UE SE, mean over "
              f"{config.data.num_test} setups")
  return table
