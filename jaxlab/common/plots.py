"""Plots a person would rather look at than read (PNG, matplotlib's Agg backend)."""
from __future__ import annotations

import json
import os


def _scale(values) -> str:
  """Log scale for positive curves (losses, errors); linear where a value is <= 0 (e.g. a negative sum-rate)."""
  return "log" if values and min(values) > 0 else "linear"


def learning_curves(metrics_jsonl: str, out_png: str, title: str = "") -> str | None:
  """Training loss and every validation metric against the step, from a run's ``metrics.jsonl``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not os.path.exists(metrics_jsonl):
    return None
  records = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
  train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
  evals = [r for r in records if r.get("kind") == "eval"]
  names = sorted({k for r in evals for k in r if k.startswith("val/")})
  fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.4), squeeze=False)
  ax = axes[0, 0]
  if train:
    ax.plot(*zip(*train), lw=0.8)
  ax.set(xlabel="step", ylabel="training loss", yscale=_scale([v for _, v in train]), title=title or "training loss")
  for ax, name in zip(axes[0, 1:], names):
    points = [(r["step"], r[name]) for r in evals if name in r]
    ax.plot(*zip(*points), marker="o", ms=3)
    ax.set(xlabel="step", ylabel=name, yscale=_scale([v for _, v in points]), title=name)
  fig.tight_layout()
  return save_figure(fig, out_png)


def save_figure(fig, out_png: str) -> str:
  """Writes ``fig`` to ``out_png`` atomically (a temporary file, then a rename) and closes it."""
  import matplotlib.pyplot as plt
  tmp = out_png + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png
