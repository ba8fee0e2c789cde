"""Benchmark timing: compile vs run, warm-up, block_until_ready, median/p10/p90, XLA cost analysis."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import numpy as np


def environment() -> dict[str, Any]:
  import flax
  dev = jax.devices()[0]
  return {"device_kind": dev.device_kind, "platform": dev.platform, "num_devices": jax.device_count(),
          "jax_version": jax.__version__, "flax_version": flax.__version__, "python": platform.python_version(),
          "host_cpus": os.cpu_count()}


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get("flops")
  return float(value) if value and value > 0 else None


def time_jitted(fn: Callable, args: tuple, *, carry: bool = False, warmup: int = 3, iters: int = 20,
                examples_per_call: int | None = None, jit_kwargs: dict | None = None) -> dict[str, Any]:
  """Times ``jax.jit(fn)(*args)``: trace+lower, compile, then ``iters`` blocked calls after ``warmup``.

  With ``carry=True`` the function returns ``(new_first_arg, ...)`` and the first argument is threaded
  through the calls, as a training step's donated state is.
  """
  jitted = jax.jit(fn, **(jit_kwargs or {}))
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  args = list(args)

  def call():
    out = compiled(*args)
    jax.block_until_ready(out)
    if carry:
      args[0] = out[0]

  for _ in range(warmup):
    call()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  times_ms = np.asarray(times) * 1e3
  median = float(np.median(times_ms))
  flops = _flops(compiled)
  record = {"trace_s": t1 - t0, "compile_s": t2 - t1, "step_ms_median": median,
            "step_ms_p10": float(np.percentile(times_ms, 10)), "step_ms_p90": float(np.percentile(times_ms, 90)),
            "iters": iters, "flops": flops, "gflop_per_s": flops / median * 1e-6 if flops else None}
  if examples_per_call:
    record["examples_per_s"] = examples_per_call / (median * 1e-3)
  return record


def append_jsonl(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def profile(compiled, args: tuple, trace_dir: str, *, carry: bool = False, steps: int = 3) -> dict[str, Any]:
  """Runs ``steps`` calls of a compiled function under ``jax.profiler`` and sums device time per op class.

  Classes: ``matmul`` (ops whose computation contains a dot), ``transpose_copy`` (copy/transpose fusions that
  move data into another layout), ``other`` (elementwise and reductions). Works on CPU without TensorFlow.
  """
  import glob
  import gzip
  import re
  text = compiled.as_text()
  calls = dict(re.findall(r"%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)", text))
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S)}
  shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", text))

  def kind(name):
    body = bodies.get(calls.get(name, ""), "")
    if " dot(" in body or name.startswith("dot"):
      return "matmul"
    if name.startswith(("copy", "transpose")):
      return "transpose_copy"
    return "other"

  args = list(args)
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      out = compiled(*args)
      jax.block_until_ready(out)
      if carry:
        args[0] = out[0]
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X" and e["name"] in shapes]
  per_class: dict[str, float] = {}
  per_op: dict[str, float] = {}
  for e in events:
    ms = e["dur"] / 1e3 / steps
    per_class[kind(e["name"])] = per_class.get(kind(e["name"]), 0.0) + ms
    per_op[e["name"]] = per_op.get(e["name"], 0.0) + ms
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
  return {"op_ms_per_step": per_class, "op_ms_total": sum(per_class.values()),
          "top_ops": [{"op": k, "kind": kind(k), "shape": shapes[k], "ms": v} for k, v in top],
          "trace": path}
