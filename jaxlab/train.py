"""Train any jaxlab method from a config file.

  python -m jaxlab.train --config configs/<method>/<exp>.py[:variant] --workdir DIR [--config.key=value ...]

Writes DIR/metrics.jsonl, DIR/checkpoints/ and DIR/results.json; the same command again resumes from the last
checkpoint. The config's ``method`` picks the package (``jaxlab.<method>.train.train_and_evaluate``).
``--eval_only`` evaluates the best parameters of the latest checkpoint instead (e.g. of a stopped run).
"""
from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

METHODS = ("ponita", "icgnn", "agnn", "merging")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, optionally with :variant", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (metrics, checkpoints, results)")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "evaluate the best parameters of the latest checkpoint in "
                               "--workdir on the validation and test sets, without training further")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from jaxlab.common import mesh
  mesh.maybe_initialize_distributed()
  config = _CONFIG.value
  method = config.get("method")
  if method not in METHODS:
    raise ValueError(f"config 'method' must be one of {METHODS}, got {method!r}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  module = importlib.import_module(f"jaxlab.{method}.train")
  result = module.train_and_evaluate(config, _WORKDIR.value, eval_only=_EVAL_ONLY.value)
  for split, values in result.metrics.items():
    print(f"{split}: " + ", ".join(f"{k} {v:.6g}" for k, v in values.items()))


def run():
  # Config files import from configs/ relative to the repository root.
  sys.path.insert(0, os.getcwd())
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
