"""ICGNN training: unsupervised, on the negative sum-SE through the whole pipeline (GNN → powers → CG → SE).

precoding  MU-MISO channels drawn fresh every step (seeded by the step, so a resumed run sees the same data),
           users and antennas varying per sample through padding; test sets of fixed size, including sizes
           never seen in training and the loaded regime K = N.
cellfree   link graphs of cell-free setups (``cellfree.py``), padded to a budget with ``jaxlab.graph``.

After training, the best parameters are scored on every test set next to the classical baselines, and the
table is written to ``workdir/table.json`` and ``workdir/table.md``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.common import loop, metrics as metrics_lib
from jaxlab.common.data import ArrayDataset
from jaxlab.icgnn import metrics, precoding
from jaxlab.icgnn.model import ICGNN, precoding_powers, user_feature_dims, user_graph

# ----- MU-MISO precoding ------------------------------------------------------------------------------------


def host_channels(rng: np.random.Generator, batch: int, users: tuple[int, int], antennas: tuple[int, int],
                  k_max: int, n_max: int, antennas_per_user: tuple[float, float] | None = None) -> dict:
  """A padded batch of i.i.d. Rayleigh channels with per-sample sizes (numpy, host side).

  K is uniform in ``users``; N is uniform in ``antennas``, or, with ``antennas_per_user = (a, b)``, uniform in
  ``[ceil(a·K), floor(b·K)]`` (clipped to ``n_max``), which keeps the ratio N/K in a chosen range.
  """
  k = rng.integers(users[0], users[1] + 1, size=batch)
  if antennas_per_user is not None:
    lo = np.ceil(antennas_per_user[0] * k).astype(int)
    hi = np.minimum(np.floor(antennas_per_user[1] * k).astype(int), n_max)
    n = lo + (rng.random(batch) * (hi - lo + 1)).astype(int)
  else:
    n = rng.integers(antennas[0], antennas[1] + 1, size=batch)
  if k.max() > k_max or n.max() > n_max:
    raise ValueError(f"sampled sizes exceed the padding (K <= {k_max}, N <= {n_max})")
  user_mask = np.arange(k_max)[None] < k[:, None]
  antenna_mask = np.arange(n_max)[None] < n[:, None]
  h = (rng.standard_normal((batch, k_max, n_max)) + 1j * rng.standard_normal((batch, k_max, n_max))) / np.sqrt(2)
  h = h * user_mask[:, :, None] * antenna_mask[:, None, :]
  return {"H": h.astype(np.complex64), "user_mask": user_mask, "antenna_mask": antenna_mask}


def cg_iterations(cfg, num_users: int) -> int:
  """``cfg.cg_iters`` if positive, else the (padded) number of users K, where CG is exact in exact arithmetic."""
  return int(cfg.cg_iters) if cfg.cg_iters > 0 else int(num_users)


def icgnn_precoder(model: ICGNN, batch: dict, P: float, sigma2: float, cg_iters: int, *, rounds: int = 1,
                   precoder_stats: bool = False):
  """The full forward pass: graph → GNN → ``(p, λ)`` → optimal-structure precoder by CG. ``W`` is ``[B,N,K]``.

  With ``precoder_stats`` the graph also carries the link gains of a current precoder, starting from RZF (the
  structure with equal ``p = λ = P/K``, by the same CG); ``rounds > 1`` repeats GNN → precoder with the same
  weights, each round reading the gains of the previous round's precoder.
  """
  H, user_mask, antenna_mask = batch["H"], batch["user_mask"], batch["antenna_mask"]
  solve = lambda p, lam: precoding.optimal_structure(H, p, lam, sigma2, cg_iters=cg_iters, user_mask=user_mask,
                                                     antenna_mask=antenna_mask)
  W = None
  if precoder_stats:
    equal = P / jnp.maximum(jnp.sum(user_mask, axis=1, keepdims=True), 1) * user_mask
    W = solve(equal, equal)
  for _ in range(rounds):
    graph, node_mask, edge_mask = user_graph(H, P, sigma2, user_mask, antenna_mask, W)
    out = model(graph, node_mask, edge_mask, in_degree=H.shape[1] - 1).reshape(H.shape[0], H.shape[1], 2)
    W = solve(*precoding_powers(out, P, user_mask))
  return W


def batch_sum_se(H, W, sigma2, user_mask):
  return metrics.sum_se(H, W, sigma2, user_mask)


def precoding_model_factory(mcfg):
  def init(key):
    return ICGNN(*user_feature_dims(mcfg.precoder_stats), 2, hidden=mcfg.hidden, num_layers=mcfg.num_layers,
                 shared=mcfg.shared, aggregation=mcfg.aggregation, message_layers=mcfg.message_layers,
                 rngs=nnx.Rngs(key))
  return init


def precoding_test_sets(dcfg) -> dict[str, dict]:
  """Fixed test sets: name ``k{K}_n{N}`` → channels of that size (seeded by the size)."""
  sets = {}
  for k, n in dcfg.test_sizes:
    rng = np.random.default_rng([dcfg.test_seed, k, n])
    sets[f"k{k}_n{n}"] = host_channels(rng, dcfg.num_test, (k, k), (n, n), k, n)
  return sets


def precoding_task(config) -> tuple[loop.Task, dict]:
  dcfg, mcfg, tcfg, scfg = config.data, config.model, config.train, config.system
  if scfg.snr_db is None or scfg.sigma2 <= 0:
    raise ValueError(f"system.sigma2 must be > 0, got {scfg.sigma2}")
  P, sigma2 = float(10.0**(scfg.snr_db / 10.0) * scfg.sigma2), float(scfg.sigma2)
  k_max, n_max = int(dcfg.train_users[1]), int(dcfg.train_antennas[1])
  ratio = tuple(dcfg.antennas_per_user) if dcfg.antennas_per_user else None

  def train_batch(step):
    rng = np.random.default_rng([tcfg.seed, step])
    return host_channels(rng, tcfg.batch_size, tuple(dcfg.train_users), tuple(dcfg.train_antennas), k_max, n_max,
                         ratio)

  val = host_channels(np.random.default_rng([dcfg.test_seed, 0]), dcfg.num_val, tuple(dcfg.train_users),
                      tuple(dcfg.train_antennas), k_max, n_max, ratio)
  tests = precoding_test_sets(dcfg)

  def precoder(model, batch):
    return icgnn_precoder(model, batch, P, sigma2, cg_iterations(mcfg, batch["H"].shape[1]), rounds=mcfg.rounds,
                          precoder_stats=mcfg.precoder_stats)

  def loss_fn(model, batch, key):
    W = precoder(model, batch)
    sum_se = jnp.mean(batch_sum_se(batch["H"], W, sigma2, batch["user_mask"]))
    return -sum_se, {"sum_se": sum_se}

  def eval_fn(model, batch, key):
    W = precoder(model, batch)
    w = batch["example_mask"].astype(jnp.float32)
    return {"sum_se": jnp.sum(batch_sum_se(batch["H"], W, sigma2, batch["user_mask"]) * w), "count": jnp.sum(w)}

  def finalize(s):
    mean = s["sum_se"] / max(s["count"], 1.0)
    return {"sum_se": mean, "neg_sum_se": -mean}

  eval_sets = {name: ArrayDataset(arrays, tcfg.eval_batch_size, name=f"precoding {name}").eval_batches
               for name, arrays in {"val": val, **tests}.items()}
  task = loop.Task(init_model=precoding_model_factory(mcfg), loss_fn=loss_fn, eval_fn=eval_fn,
                   train_batch=train_batch, steps_per_epoch=int(dcfg.steps_per_epoch), eval_sets=eval_sets,
                   finalize=finalize, select="neg_sum_se")
  return task, {"P": P, "sigma2": sigma2, "tests": tests}


def precoding_baselines(H, user_mask, antenna_mask, P, sigma2, cfg) -> dict[str, jax.Array]:
  """Mean sum-SE of the classical precoders on one test set (fixed size, so no padding)."""
  k, n = H.shape[1], H.shape[2]
  out = {}
  candidates = {"MRT": lambda: precoding.mrt(H, P),
                "RZF": lambda: precoding.rzf(H, P, sigma2),
                f"RZF-CG{cfg.baseline_cg_iters}": lambda: precoding.rzf_cg(H, P, sigma2, cfg.baseline_cg_iters),
                "WMMSE": lambda: precoding.wmmse(H, P, sigma2, iters=cfg.wmmse_iters, tol=cfg.wmmse_tol)[0]}
  if k <= n:
    candidates["ZF"] = lambda: precoding.zf(H, P)
  for name, make in candidates.items():
    W = jax.jit(make)()
    out[name] = float(jnp.mean(batch_sum_se(H, W, sigma2, user_mask)))
  return out


def precoding_table(result: loop.Result, task: loop.Task, info: dict, config, workdir: str) -> dict:
  table = {}
  for name, arrays in info["tests"].items():
    row = precoding_baselines(jnp.asarray(arrays["H"]), jnp.asarray(arrays["user_mask"]),
                              jnp.asarray(arrays["antenna_mask"]), info["P"], info["sigma2"], config.eval)
    row["ICGNN"] = result.metrics[name]["sum_se"] if name in result.metrics else float("nan")
    row["ICGNN/WMMSE %"] = 100.0 * row["ICGNN"] / row["WMMSE"]
    row["ICGNN/RZF %"] = 100.0 * row["ICGNN"] / row["RZF"]
    table[name] = row
  write_table(table, workdir, f"sum-SE (bit/s/Hz), mean over {config.data.num_test} channels, "
              f"SNR {config.system.snr_db} dB")
  return table


def write_table(table: dict, workdir: str, title: str) -> None:
  metrics_lib.write_json_atomic(os.path.join(workdir, "table.json"), table)
  columns = sorted({c for row in table.values() for c in row}, key=lambda c: ("%" in c, c != "ICGNN", c))
  lines = [f"{title}", "", "| test set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, row in table.items():
    lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "" for c in columns) + " |")
  tmp = os.path.join(workdir, "table.md.tmp")
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, os.path.join(workdir, "table.md"))


# ----- entry point ------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, mesh=None, stop_at_step: int | None = None,
                       eval_only: bool = False) -> loop.Result:
  if config.task == "precoding":
    task, info = precoding_task(config)
    tabulate = precoding_table
  elif config.task == "cellfree":
    from jaxlab.icgnn import cellfree_train
    task, info = cellfree_train.cellfree_task(config)
    tabulate = cellfree_train.cellfree_table
  else:
    raise ValueError(f"config.task must be 'precoding' or 'cellfree', got {config.task!r}")
  result = loop.train(task, config.train, workdir, mesh=mesh, config_json=json.dumps(config.to_dict(), sort_keys=True),
                      stop_at_step=stop_at_step, eval_only=eval_only)
  if result.metrics:
    table = tabulate(result, task, info, config, workdir)
    for name, row in table.items():
      print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
  return result


def load_trained(config, workdir: str):
  """``(model, task, info)`` with the best parameters of the run in ``workdir`` (trained with ``config``)."""
  from jaxlab.common import checkpoint
  if config.task == "precoding":
    task, info = precoding_task(config)
  else:
    from jaxlab.icgnn import cellfree_train
    task, info = cellfree_train.cellfree_task(config)
  trainer = loop.Trainer(task, config.train, workdir)
  state = trainer.init_state()
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
  state, _ = checkpointer.restore(state)  # the parameter structure must match; other settings may differ
  checkpointer.close()
  return nnx.merge(trainer.graphdef, state["best_params"], state["rest"]), task, info
