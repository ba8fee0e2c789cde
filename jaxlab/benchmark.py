"""Run the benchmark scripts in benchmarks/ and append their JSONL records.

  python -m jaxlab.benchmark [--only METHOD] [--out FILE] [-- extra args for the script]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ponita", "icgnn", "agnn", "merging")


def load(method: str):
  path = os.path.join(REPO, "benchmarks", f"{method}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no benchmark script {path} (benchmarks run from a source checkout)")
  spec = importlib.util.spec_from_file_location(f"benchmarks_{method}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", choices=METHODS, action="append")
  ap.add_argument("--out", default=None, help="append JSONL records here")
  args, rest = ap.parse_known_args(argv)
  for method in args.only or METHODS:
    print(f"== {method}", flush=True)
    load(method).main(out=args.out, argv=[a for a in rest if a != "--"])


if __name__ == "__main__":
  sys.exit(main())
