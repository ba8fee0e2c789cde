"""PONITA training: the N-body, rMD17 and QM9 tasks on the shared loop (``jaxlab.common.loop``).

Each ``*_task`` turns a config into a :class:`jaxlab.common.loop.Task`: dense padded arrays, a loss, per-batch
metric sums and their finalisation. Randomness inside the jitted step (rotation augmentation, random grid
rotations, test-time rotation averaging) comes from the key the loop derives from the step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.common import loop
from jaxlab.common.data import ArrayDataset
from jaxlab.ponita import data as data_lib
from jaxlab.ponita import geometry
from jaxlab.ponita.model import Ponita, calibrate

GRID_ROTATIONS = ("none", "random_per_graph")


# ----- shared pieces ---------------------------------------------------------------------------------------
def model_factory(mcfg, *, num_scalar_in, num_vector_in, num_scalar_out, num_vector_out, global_pool):
  if mcfg.grid_rotation not in GRID_ROTATIONS:
    raise ValueError(f"model.grid_rotation must be one of {GRID_ROTATIONS}, got {mcfg.grid_rotation!r}")
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if mcfg.dtype not in dtypes:
    raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {mcfg.dtype!r}")

  def init(key):
    return Ponita(num_scalar_in=num_scalar_in, num_vector_in=num_vector_in, num_scalar_out=num_scalar_out,
                  num_vector_out=num_vector_out, hidden=mcfg.hidden, basis_dim=mcfg.basis_dim,
                  degree=mcfg.degree, num_layers=mcfg.num_layers, num_ori=mcfg.num_ori, widening=mcfg.widening,
                  layer_scale=mcfg.layer_scale or None, multiple_readouts=mcfg.multiple_readouts,
                  radius=mcfg.radius or None, global_pool=global_pool, dtype=dtypes[mcfg.dtype],
                  rngs=nnx.Rngs(params=key))
  return init


def grid_rotation(mcfg, key, batch_size):
  """A random grid rotation per graph (equivariance in expectation) or None (fixed grid)."""
  if mcfg.grid_rotation == "random_per_graph" and mcfg.num_ori > 0:
    return geometry.random_rotations(key, batch_size)
  return None


def rotate(rot_Bx3x3, x_BxNx3):
  return jnp.einsum("bxy,bny->bnx", rot_Bx3x3, x_BxNx3)


def calibrator(mcfg):
  def run(model, batch):
    calibrate(model, jnp.asarray(batch["pos"]), jnp.asarray(batch["scalars"]),
              None if "vectors" not in batch else jnp.asarray(batch["vectors"]), jnp.asarray(batch["node_mask"]))
  return run


def resolve_data_dir(data_dir: str) -> Path:
  return Path(data_dir) if data_dir else data_lib.default_data_dir()


# ----- N-body ----------------------------------------------------------------------------------------------
def nbody_dir(config, workdir: str) -> Path:
  """Where the N-body files are read from; generated there (seeded, exact) when absent.

  The standard set is looked for in ``$JAXLAB_DATA/nbody`` and otherwise generated once into
  ``~/.cache/jaxlab`` (never into the shared data folder); other sizes go into the run's workdir.
  """
  dcfg = config.data
  if dcfg.nbody_dir:
    path = Path(dcfg.nbody_dir)
  elif dcfg.num_train_sims == 10000 and dcfg.num_eval_sims == 2000:
    base = os.environ.get(data_lib.DATA_ENV_VAR)
    shared = Path(base) / "nbody" if base else None
    if shared is not None and data_lib.nbody_file(shared, "loc", "test", dcfg.suffix).exists():
      path = shared
    else:
      path = Path.home() / ".cache" / "jaxlab" / f"nbody_seed{dcfg.seed}"
  else:
    path = Path(workdir) / "nbody_data"
  if not data_lib.nbody_file(path, "loc", "test", dcfg.suffix).exists():
    print(f"generating the charged N-body data set in {path} (seed {dcfg.seed}) ...", flush=True)
    data_lib.generate_nbody(path, num_train=dcfg.num_train_sims, num_valid=dcfg.num_eval_sims,
                            num_test=dcfg.num_eval_sims, seed=dcfg.seed, suffix=dcfg.suffix,
                            num_steps=dcfg.num_steps)
  return path


def nbody_arrays(split: dict) -> dict:
  return {"pos": split["pos"], "scalars": split["charges"], "vectors": split["vel"][:, :, None, :],
          "node_mask": np.ones(split["pos"].shape[:2], bool), "target": split["target"]}


def nbody_objectives(mcfg, tcfg):
  """Loss (MSE of predicted positions, with rotation augmentation) and evaluation sums for N-body."""

  def predict(model, batch, key, augment):
    pos, vel, target = batch["pos"], batch["vectors"][:, :, 0], batch["target"]
    k_aug, k_grid = jax.random.split(key)
    if augment:
      rot = geometry.random_rotations(k_aug, pos.shape[0])
      pos, vel, target = rotate(rot, pos), rotate(rot, vel), rotate(rot, target)
    _, v = model(pos, batch["scalars"], vel[:, :, None, :], batch["node_mask"],
                 grid_rotation(mcfg, k_grid, pos.shape[0]))
    return pos + v[:, :, 0], target

  def per_sample_mse(pred, target, mask):
    return jnp.sum(jnp.sum((pred - target)**2, -1) * mask, -1) / (3.0 * jnp.sum(mask, -1))

  def loss_fn(model, batch, key):
    pred, target = predict(model, batch, key, tcfg.rotation_augmentation)
    mse = jnp.mean(per_sample_mse(pred, target, batch["node_mask"]))
    return mse, {"mse": mse}

  def eval_fn(model, batch, key):
    pred, target = predict(model, batch, key, False)
    w = batch["example_mask"].astype(jnp.float32)
    return {"sq_err": jnp.sum(per_sample_mse(pred, target, batch["node_mask"]) * w), "count": jnp.sum(w)}

  return loss_fn, eval_fn


def nbody_task(config, workdir: str) -> loop.Task:
  dcfg, mcfg, tcfg = config.data, config.model, config.train
  path = nbody_dir(config, workdir)
  splits = {"train": data_lib.load_nbody(path, "train", dcfg.suffix, max_samples=dcfg.max_train),
            "val": data_lib.load_nbody(path, "valid", dcfg.suffix, max_samples=dcfg.max_eval),
            "test": data_lib.load_nbody(path, "test", dcfg.suffix, max_samples=dcfg.max_eval)}
  train = ArrayDataset(nbody_arrays(splits["train"]), tcfg.batch_size, seed=tcfg.seed, name="nbody train")
  evals = {k: ArrayDataset(nbody_arrays(splits[k]), tcfg.eval_batch_size, name=f"nbody {k}") for k in ("val", "test")}

  loss_fn, eval_fn = nbody_objectives(mcfg, tcfg)
  return loop.Task(
      init_model=model_factory(mcfg, num_scalar_in=1, num_vector_in=1, num_scalar_out=0, num_vector_out=1,
                               global_pool=False),
      loss_fn=loss_fn, eval_fn=eval_fn, train_batch=train.train_batch, steps_per_epoch=train.steps_per_epoch,
      eval_sets={k: v.eval_batches for k, v in evals.items()},
      finalize=lambda s: {"mse": s["sq_err"] / s["count"]}, select="mse", calibrate=calibrator(mcfg))


# ----- rMD17 -----------------------------------------------------------------------------------------------
RMD17_NUM_ELEMENTS = 9  # one-hot over atomic numbers 0..8 (H, C, N, O occur)


def rmd17_arrays(split: dict, charges: np.ndarray, stats: dict) -> dict:
  m, n = split["coords"].shape[:2]
  onehot = np.eye(RMD17_NUM_ELEMENTS, dtype=np.float32)[charges]
  energy = (np.asarray(split["energies"], np.float64) - stats["energy_mean"]) / stats["force_rms"]
  return {"pos": split["coords"].astype(np.float32), "scalars": np.broadcast_to(onehot, (m, n, onehot.shape[-1])),
          "node_mask": np.ones((m, n), bool), "energy": energy.astype(np.float32),
          "forces": (split["forces"] / stats["force_rms"]).astype(np.float32)}


def rmd17_objectives(mcfg, tcfg):
  """Loss ``MSE_E / force_weight + MSE_F`` on scaled targets (rotation augmentation) and evaluation sums
  (with ``test_rotations`` > 0: the mean prediction over that many random rotations)."""

  def energy_forces(model, batch, rot, k_grid):
    pos = batch["pos"] if rot is None else rotate(rot, batch["pos"])
    e, f = model.energy_and_forces(pos, batch["scalars"], None, batch["node_mask"],
                                   grid_rotation(mcfg, k_grid, pos.shape[0]))
    return e, (f if rot is None else rotate(jnp.swapaxes(rot, 1, 2), f))

  def loss_fn(model, batch, key):
    k_aug, k_grid = jax.random.split(key)
    rot = geometry.random_rotations(k_aug, batch["pos"].shape[0]) if tcfg.rotation_augmentation else None
    e, f = energy_forces(model, batch, rot, k_grid)
    energy_mse = jnp.mean((e - batch["energy"])**2)
    mask = batch["node_mask"][..., None].astype(jnp.float32)
    force_mse = jnp.sum((f - batch["forces"])**2 * mask) / (3.0 * jnp.sum(mask))
    return energy_mse / tcfg.force_weight + force_mse, {"energy_mse": energy_mse, "force_mse": force_mse}

  def eval_fn(model, batch, key):
    n_rot = max(tcfg.test_rotations, 1)
    e_sum, f_sum = 0.0, 0.0
    for r in range(n_rot):
      k_rot, k_grid = jax.random.split(jax.random.fold_in(key, r))
      rot = geometry.random_rotations(k_rot, batch["pos"].shape[0]) if tcfg.test_rotations > 0 else None
      e, f = energy_forces(model, batch, rot, k_grid)
      e_sum, f_sum = e_sum + e, f_sum + f
    e, f = e_sum / n_rot, f_sum / n_rot
    w = batch["example_mask"].astype(jnp.float32)
    atom = batch["node_mask"].astype(jnp.float32) * w[:, None]
    return {"energy_abs_err": jnp.sum(jnp.abs(e - batch["energy"]) * w), "count": jnp.sum(w),
            "force_abs_err": jnp.sum(jnp.sum(jnp.abs(f - batch["forces"]), -1) * atom),
            "force_count": 3.0 * jnp.sum(atom)}

  return loss_fn, eval_fn


def rmd17_task(config, workdir: str) -> loop.Task:
  dcfg, mcfg, tcfg = config.data, config.model, config.train
  raw = data_lib.load_rmd17(resolve_data_dir(config.data_dir), dcfg.molecule, dcfg.split_style, dcfg.split_index)
  if raw["nuclear_charges"].max() >= RMD17_NUM_ELEMENTS:
    raise ValueError(f"rMD17 {dcfg.molecule}: atomic numbers above {RMD17_NUM_ELEMENTS - 1} are not supported")
  stats = data_lib.rmd17_stats(raw["train"])
  arrays = {k: rmd17_arrays(raw[k], raw["nuclear_charges"], stats) for k in ("train", "val", "test")}
  if dcfg.max_train:
    arrays["train"] = {k: v[:dcfg.max_train] for k, v in arrays["train"].items()}
  if dcfg.max_eval:
    arrays["val"] = {k: v[:dcfg.max_eval] for k, v in arrays["val"].items()}
    arrays["test"] = {k: v[:dcfg.max_eval] for k, v in arrays["test"].items()}
  train = ArrayDataset(arrays["train"], tcfg.batch_size, seed=tcfg.seed, name="rmd17 train")
  evals = {k: ArrayDataset(arrays[k], tcfg.eval_batch_size, name=f"rmd17 {k}") for k in ("val", "test")}
  scale = stats["force_rms"] * data_lib.KCAL_TO_MEV  # model units -> meV (energy) and meV/Å (forces)

  loss_fn, eval_fn = rmd17_objectives(mcfg, tcfg)

  def finalize(s):
    return {"energy_mae_mev": s["energy_abs_err"] / s["count"] * scale,
            "force_mae_mev_per_a": s["force_abs_err"] / s["force_count"] * scale}

  return loop.Task(
      init_model=model_factory(mcfg, num_scalar_in=RMD17_NUM_ELEMENTS, num_vector_in=0, num_scalar_out=1,
                               num_vector_out=0, global_pool=True),
      loss_fn=loss_fn, eval_fn=eval_fn, train_batch=train.train_batch, steps_per_epoch=train.steps_per_epoch,
      eval_sets={k: v.eval_batches for k, v in evals.items()}, finalize=finalize,
      select=tcfg.select_metric, calibrate=calibrator(mcfg))


# ----- QM9 -------------------------------------------------------------------------------------------------
QM9_ELEMENTS = (1, 6, 7, 8, 9)  # H, C, N, O, F


def qm9_arrays(split: dict, mean: np.ndarray, std: np.ndarray) -> dict:
  charges = split["charges"]
  lookup = np.zeros(max(QM9_ELEMENTS) + 1, np.int64)
  lookup[list(QM9_ELEMENTS)] = np.arange(len(QM9_ELEMENTS))
  mask = charges > 0
  onehot = np.eye(len(QM9_ELEMENTS), dtype=np.float32)[lookup[charges]] * mask[..., None]
  return {"pos": split["positions"], "scalars": onehot, "node_mask": mask,
          "target": ((split["targets"] - mean) / std).astype(np.float32)}


def qm9_task(config, workdir: str) -> loop.Task:
  dcfg, mcfg, tcfg = config.data, config.model, config.train
  raw = data_lib.load_qm9(resolve_data_dir(config.data_dir), tuple(dcfg.targets), max_molecules=dcfg.max_molecules
                          or None)
  mean = raw["train"]["targets"].mean(0)
  std = raw["train"]["targets"].std(0)
  arrays = {k: qm9_arrays(raw[k], mean, std) for k in ("train", "val", "test")}
  train = ArrayDataset(arrays["train"], tcfg.batch_size, seed=tcfg.seed, name="qm9 train")
  evals = {k: ArrayDataset(arrays[k], tcfg.eval_batch_size, name=f"qm9 {k}") for k in ("val", "test")}
  names = list(raw["target_names"])
  units = list(raw["target_units"])
  # eV targets are reported in meV, as in the paper's table.
  report = np.array([1000.0 if u == "eV" else 1.0 for u in units]) * std

  def predict(model, batch, key, augment):
    k_aug, k_grid = jax.random.split(key)
    pos = batch["pos"]
    if augment:
      pos = rotate(geometry.random_rotations(k_aug, pos.shape[0]), pos)
    s, _ = model(pos, batch["scalars"], None, batch["node_mask"], grid_rotation(mcfg, k_grid, pos.shape[0]))
    return s

  def loss_fn(model, batch, key):
    l1 = jnp.mean(jnp.abs(predict(model, batch, key, tcfg.rotation_augmentation) - batch["target"]))
    return l1, {"l1": l1}

  def eval_fn(model, batch, key):
    w = batch["example_mask"].astype(jnp.float32)
    err = jnp.abs(predict(model, batch, key, False) - batch["target"])
    return {**{f"abs_err_{n}": jnp.sum(err[:, i] * w) for i, n in enumerate(names)}, "count": jnp.sum(w)}

  def finalize(s):
    out = {f"mae_{n}": s[f"abs_err_{n}"] / s["count"] * report[i] for i, n in enumerate(names)}
    out["mae_standardized"] = sum(s[f"abs_err_{n}"] for n in names) / (s["count"] * len(names))
    return out

  return loop.Task(
      init_model=model_factory(mcfg, num_scalar_in=len(QM9_ELEMENTS), num_vector_in=0, num_scalar_out=len(names),
                               num_vector_out=0, global_pool=True),
      loss_fn=loss_fn, eval_fn=eval_fn, train_batch=train.train_batch, steps_per_epoch=train.steps_per_epoch,
      eval_sets={k: v.eval_batches for k, v in evals.items()}, finalize=finalize, select="mae_standardized",
      calibrate=calibrator(mcfg))


TASKS = {"nbody": nbody_task, "rmd17": rmd17_task, "qm9": qm9_task}


def build_task(config, workdir: str) -> loop.Task:
  if config.task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {config.task!r}")
  return TASKS[config.task](config, workdir)


def train_and_evaluate(config, workdir: str, mesh=None, stop_at_step: int | None = None,
                       eval_only: bool = False) -> loop.Result:
  return loop.train(build_task(config, workdir), config.train, workdir, mesh=mesh,
                    config_json=json.dumps(config.to_dict(), sort_keys=True), stop_at_step=stop_at_step,
                    eval_only=eval_only)
