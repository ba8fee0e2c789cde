"""AGNN, random search and a GraphNAS-style controller on NAS-Bench-Graph's Cora table (PyPI nas-bench-graph).
Reward: validation accuracy; reported: test accuracy of the best-by-validation architecture so far; 10 seeds
of 1000 queries per strategy.
  python -m jaxlab.train --config configs/agnn/nasbench.py --workdir runs/agnn_nasbench_cora
Other tables: --config.data.name=citeseer (pubmed, cs, physics, photo, computers, arxiv, proteins).
  python -m jaxlab.train --config configs/agnn/nasbench.py:smoke --workdir /tmp/agnn_nasbench_smoke
"""
import ml_collections

from configs.agnn.common import search_config


def get_config(arg=None):
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.method = "agnn"
  c.task = "nasbench"
  c.variant = variant
  c.data = ml_collections.ConfigDict(dict(name="cora"))
  c.search = search_config(batch_size=1)
  c.nasbench = ml_collections.ConfigDict(dict(strategies=("agnn", "random", "graphnas"), seeds=10, budget=1000))
  if variant == "smoke":
    c.nasbench.update(seeds=2, budget=12)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}: use default or smoke")
  return c
