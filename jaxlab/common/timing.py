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
