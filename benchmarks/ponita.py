"""PONITA speed: training step (forward, forces where used, backward, update), inference, compile time.

Workloads (the reference's standard settings, synthetic inputs of the real shapes):
  rmd17  aspirin-like: 21 atoms fully connected with self-loops, batch 5, hidden 128, basis 256, 5 layers,
         20 orientations, energy + forces (second-order training), EMA, clipping, rotation augmentation
  nbody  5 particles, batch 100, 16 orientations, 5 layers, layer scale, vector output

  python -m jaxlab.benchmark --only ponita [--out benchmarks/results/ponita.jsonl]
  python benchmarks/ponita.py --torch-python /path/to/python-with-torch   # also time the PyTorch port
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs.ponita import nbody as nbody_config  # noqa: E402
from configs.ponita import rmd17 as rmd17_config  # noqa: E402
from jaxlab.common import loop, timing  # noqa: E402
from jaxlab.ponita import train as ponita_train  # noqa: E402
from jaxlab.ponita.model import count_params  # noqa: E402

WORKLOADS = ("rmd17", "nbody")


def _positions(rng, b, n, min_dist=0.9):
  """Random molecule-like positions with no two atoms closer than ``min_dist`` Å."""
  out = np.zeros((b, n, 3), np.float32)
  for g in range(b):
    pts = []
    while len(pts) < n:
      p = rng.normal(size=3) * 1.6
      if all(np.linalg.norm(p - q) > min_dist for q in pts):
        pts.append(p)
    out[g] = pts
  return out


def synthetic_batch(workload: str, batch_size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  if workload == "rmd17":
    n = 21
    z = rng.choice([1, 6, 8], size=n)
    return {"pos": _positions(rng, batch_size, n),
            "scalars": np.broadcast_to(np.eye(9, dtype=np.float32)[z], (batch_size, n, 9)).copy(),
            "node_mask": np.ones((batch_size, n), bool), "energy": rng.normal(size=batch_size).astype(np.float32),
            "forces": rng.normal(size=(batch_size, n, 3)).astype(np.float32),
            "example_mask": np.ones(batch_size, bool)}
  n = 5
  pos = rng.normal(size=(batch_size, n, 3)).astype(np.float32)
  return {"pos": pos, "scalars": rng.choice([-1.0, 1.0], size=(batch_size, n, 1)).astype(np.float32),
          "vectors": rng.normal(size=(batch_size, n, 1, 3)).astype(np.float32) * 0.3,
          "node_mask": np.ones((batch_size, n), bool),
          "target": pos + rng.normal(size=pos.shape).astype(np.float32) * 0.3, "example_mask": np.ones(batch_size, bool)}


def build(workload: str, dtype: str = "float32"):
  config = (rmd17_config if workload == "rmd17" else nbody_config).get_config()
  config.model.dtype = dtype
  config.train.test_rotations = 0  # inference is timed as one pass; evaluation may average several
  mcfg, tcfg = config.model, config.train
  batch = synthetic_batch(workload, tcfg.batch_size)
  if workload == "rmd17":
    loss_fn, eval_fn = ponita_train.rmd17_objectives(mcfg, tcfg)
    dims = dict(num_scalar_in=9, num_vector_in=0, num_scalar_out=1, num_vector_out=0, global_pool=True)
  else:
    loss_fn, eval_fn = ponita_train.nbody_objectives(mcfg, tcfg)
    dims = dict(num_scalar_in=1, num_vector_in=1, num_scalar_out=0, num_vector_out=1, global_pool=False)
  task = loop.Task(init_model=ponita_train.model_factory(mcfg, **dims), loss_fn=loss_fn, eval_fn=eval_fn,
                   train_batch=lambda step: batch, steps_per_epoch=1000, eval_sets={}, finalize=dict,
                   select="", calibrate=ponita_train.calibrator(mcfg))
  return config, task, batch


def run_jax(workload: str, iters: int, dtype: str = "float32", profile_dir: str = "") -> list[dict]:
  config, task, batch = build(workload, dtype)
  with tempfile.TemporaryDirectory() as tmp:
    trainer = loop.Trainer(task, config.train, tmp)
    state = trainer.init_state(calibrate_batch=batch)
  dev_batch = jax.tree.map(jnp.asarray, batch)
  params = count_params(task.init_model(jax.random.key(0)))
  base = {"method": "ponita", "impl": "jaxlab", "workload": workload, "dtype": dtype, "params": params,
          "batch_size": config.train.batch_size, "num_ori": config.model.num_ori, **timing.environment()}
  records = []
  train = timing.time_jitted(trainer._train_step, (state, dev_batch), carry=True, iters=iters,
                             examples_per_call=config.train.batch_size, jit_kwargs={"donate_argnums": (0,)})
  records.append({**base, "what": "train_step", **train})
  if profile_dir:
    state = trainer.init_state(calibrate_batch=batch)
    compiled = jax.jit(trainer._train_step, donate_argnums=(0,)).lower(state, dev_batch).compile()
    state, _ = compiled(state, dev_batch)
    prof = timing.profile(compiled, (state, dev_batch), os.path.join(profile_dir, f"{workload}_{dtype}"), carry=True)
    records.append({**base, "what": "train_step_profile", **prof})
  state = trainer.init_state(calibrate_batch=None)
  key = jax.random.key(0)
  infer = timing.time_jitted(lambda p, r, b: trainer._eval_step(p, r, b, key), (state["params"], state["rest"],
                             dev_batch), iters=iters, examples_per_call=config.train.batch_size)
  what = "inference_energy_forces" if workload == "rmd17" else "inference"
  records.append({**base, "what": what, **infer})
  return records


def run_torch(python: str, workload: str, iters: int) -> list[dict]:
  with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as f:
    cmd = [python, os.path.join(REPO, "benchmarks", "reference", "ponita_torch.py"), "--workload", workload,
           "--threads", str(os.cpu_count()), "--steps", str(iters), "--out", f.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in f if line.strip()]


def main(out: str | None = None, argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description="PONITA benchmarks")
  ap.add_argument("--workloads", default=",".join(WORKLOADS))
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16")
  ap.add_argument("--torch-python", default=os.environ.get("JAXLAB_TORCH_PYTHON", ""),
                  help="a python with torch: also time the PyTorch port of the reference in this run")
  ap.add_argument("--profile-dir", default="", help="also trace the training step and sum time per op class")
  ap.add_argument("--out", default=out)
  args = ap.parse_args(argv)
  records = []
  for workload in args.workloads.split(","):
    for dtype in args.dtypes.split(","):
      records += run_jax(workload, args.iters, dtype, args.profile_dir)
    if args.torch_python:
      records += run_torch(args.torch_python, workload, args.iters)
  for r in records:
    r.setdefault("method", "ponita")
    if args.out:
      timing.append_jsonl(args.out, r)
  print_table(records)
  return records


def print_table(records: list[dict]) -> None:
  print(f"{'workload':8s} {'impl':12s} {'dtype':8s} {'what':26s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} "
        f"{'compile s':>9s} {'ex/s':>8s}")
  for r in records:
    if "step_ms_median" not in r:
      continue
    print(f"{r['workload']:8s} {r.get('impl', ''):12s} {r.get('dtype', 'float32'):8s} {r['what']:26s} "
          f"{r['step_ms_median']:10.1f} {r['step_ms_p10']:8.1f} {r['step_ms_p90']:8.1f} "
          f"{r.get('compile_s', float('nan')):9.2f} {r.get('examples_per_s', float('nan')):8.1f}")
  for r in records:
    if r["what"] == "train_step_profile":
      classes = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(r["op_ms_per_step"].items(), key=lambda kv: -kv[1]))
      print(f"{r['workload']} profile of one training step (op time, may overlap): {classes}")
  jax_train = {r["workload"]: r for r in records if r.get("impl") == "jaxlab" and r["what"] == "train_step"
               and r.get("dtype") == "float32"}
  for r in records:
    if r.get("impl") != "jaxlab" and r.get("what") == "train_step" and r["workload"] in jax_train:
      ratio = r["step_ms_median"] / jax_train[r["workload"]]["step_ms_median"]
      print(f"{r['workload']}: jaxlab train step is {ratio:.2f}x the speed of {r.get('impl')}")


if __name__ == "__main__":
  main()
