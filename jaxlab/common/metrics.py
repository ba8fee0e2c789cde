"""JSONL metrics (process 0 only) and a one-line progress report."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


class MetricWriter:
  """Appends one JSON object per record to ``workdir/metrics.jsonl``; flushes every line."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, filename)
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)

  def write(self, step: int, kind: str, **values) -> None:
    if not self._active:
      return
    record = {"step": int(step), "kind": kind}
    record.update({k: _to_python(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


class Progress:
  """Prints ``step/total loss steps/s ETA`` lines; the rate excludes the first (compiling) interval."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
    self.total = total_steps
    self.stream = stream
    self._t0 = None
    self._s0 = start_step

  def update(self, step: int, **values) -> None:
    if jax.process_index() != 0:
      return
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._s0 = now, step
      rate = float("nan")
    else:
      rate = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate and math.isfinite(rate) and rate > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
    parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "-- steps/s")
    parts.append(f"ETA {_fmt_seconds(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "--"
  s = int(s)
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def write_json_atomic(path: str, obj) -> None:
  """Writes ``obj`` as JSON so that readers only ever see the old or the complete new file."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(jax.tree.map(_to_python, obj), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
