"""AGNN speed: child-training throughput on Cora, one seed at a time against several seeds in one call.

  python -m jaxlab.benchmark --only agnn [--out benchmarks/results/agnn.jsonl] [-- --seeds 8 --random-archs 4]

Each architecture (GCN, GAT and a few seeded random draws from the AGNN space) is trained for the full
200 epochs from ``--seeds`` seeds, in each mode of ``jaxlab.agnn.child.train_children``:

  separate    one ``train_children`` call per seed (how a search without batching trains children);
  sequential  all seeds in one compiled call, one after another (``lax.map``);
  vmap        all seeds in one compiled call, batched with ``jax.vmap``;
  multi       all seeds in one compiled call through the layers' native model axis (where available).

Reported per mode: wall seconds for all seeds after compilation, runs per minute (full 200-epoch trainings),
the speedup over ``separate``, and the compile seconds of the first call. Also the controller's
propose + observe time per architecture.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from jaxlab.agnn import child, data, search  # noqa: E402
from jaxlab.agnn.controller import ControllerConfig  # noqa: E402
from jaxlab.agnn.space import decode_gnn, gat_layers, gcn_layers, gnn_space  # noqa: E402
from jaxlab.common import timing  # noqa: E402


def architectures(num_random: int, num_classes: int, seed: int = 0) -> dict:
  space = gnn_space(2)
  rng = np.random.default_rng(seed)
  archs = {"gcn": gcn_layers(num_classes), "gat": gat_layers(num_classes)}
  for i in range(num_random):
    arch = tuple(int(rng.integers(size)) for size in space.sizes)
    archs[f"random{i}"] = decode_gnn(space, arch, num_classes)
  return archs


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def child_records(task, layers, seeds, hp, modes, base) -> list[dict]:
  records, times = [], {}
  for mode in modes:
    if mode == "separate":
      first = _timed(lambda: [child.train_children(layers, task, [s], hp) for s in seeds[:1]])
      wall = _timed(lambda: [child.train_children(layers, task, [s], hp) for s in seeds])
      compile_s = first - wall / len(seeds)
    else:
      first = _timed(lambda: child.train_children(layers, task, seeds, hp, parallel=mode))
      wall = _timed(lambda: child.train_children(layers, task, seeds, hp, parallel=mode))
      compile_s = first - wall
    times[mode] = wall
    compile_s = max(compile_s, 0.0)
    # a search compiles every new architecture once: runs per minute including that compilation
    records.append({**base, "what": f"child_training_{mode}", "seeds": len(seeds), "wall_s": wall,
                    "runs_per_min": 60.0 * len(seeds) / wall, "compile_s": compile_s,
                    "runs_per_min_with_compile": 60.0 * len(seeds) / (wall + compile_s)})
  for r in records:
    r["speedup_over_separate"] = times["separate"] / r["wall_s"] if "separate" in times else None
  return records


def controller_records(base, steps: int = 50) -> list[dict]:
  space = gnn_space(2)
  rng = np.random.default_rng(0)
  out = []
  for name, strategy in (("agnn", search.AGNNController(space, ControllerConfig(guide="sample"), 0)),
                         ("graphnas", search.GraphNASController(space, ControllerConfig(), 0))):
    def step():
      proposals = strategy.propose(1)
      strategy.observe(proposals, [float(rng.random())])
    compile_s = _timed(lambda: [step() for _ in range(3)])
    wall = _timed(lambda: [step() for _ in range(steps)])
    out.append({**base, "what": f"controller_step_{name}", "step_ms_median": 1e3 * wall / steps,
                "first_3_steps_s": compile_s})
  return out


def print_table(records: list[dict]) -> None:
  print("| architecture | mode | seeds | wall s | runs/min | speedup vs separate | compile s | runs/min incl. compile |")
  print("|---|---|---|---|---|---|---|---|")
  for r in records:
    if r["what"].startswith("child_training_"):
      speed = f"{r['speedup_over_separate']:.2f}" if r.get("speedup_over_separate") else ""
      print(f"| {r['arch']} | {r['what'][len('child_training_'):]} | {r['seeds']} | {r['wall_s']:.1f} | "
            f"{r['runs_per_min']:.1f} | {speed} | {r['compile_s']:.1f} | {r['runs_per_min_with_compile']:.1f} |")
  for r in records:
    if r["what"].startswith("controller_step_"):
      print(f"{r['what']}: {r['step_ms_median']:.1f} ms per architecture")


def main(out: str | None = None, argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description="AGNN benchmarks")
  ap.add_argument("--dataset", default="cora")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--seeds", type=int, default=8)
  ap.add_argument("--random-archs", type=int, default=2)
  ap.add_argument("--epochs", type=int, default=200)
  ap.add_argument("--modes", default=",".join(("separate",) + child.PARALLEL))
  ap.add_argument("--out", default=out)
  args = ap.parse_args(argv)
  ds = data.load_planetoid(args.dataset, args.data_dir)
  task = child.node_task(ds)
  hp = child.ChildHParams(epochs=args.epochs)
  env = {"method": "agnn", "dataset": args.dataset, "epochs": args.epochs, **timing.environment()}
  seeds = list(range(args.seeds))
  modes = [m for m in args.modes.split(",") if m]
  records = []
  for name, layers in architectures(args.random_archs, ds.num_classes).items():
    base = {**env, "arch": name, "layers": [vars(layer) for layer in layers]}
    records += child_records(task, layers, seeds, hp, modes, base)
    print_table(records[-len(modes):])
  records += controller_records(env)
  for r in records:
    if args.out:
      timing.append_jsonl(args.out, r)
  print_table(records)
  return records


if __name__ == "__main__":
  main(argv=sys.argv[1:])
