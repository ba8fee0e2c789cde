"""AGNN on Citeseer (Planetoid public split): GCN/GAT baselines over 10 seeds, a 200-architecture AGNN search
(reward: mean validation accuracy over 2 seeds), and the best architecture retrained over 10 seeds.
  python -m jaxlab.train --config configs/agnn/citeseer.py --workdir runs/agnn_citeseer
Variants: ":paper" (1000 architectures), ":sharing" (constrained parameter sharing), ":random" (random search),
":smoke" (seconds):
  python -m jaxlab.train --config configs/agnn/citeseer.py:smoke --workdir /tmp/agnn_citeseer_smoke
"""
from configs.agnn.common import planetoid_config


def get_config(arg=None):
  return planetoid_config("citeseer", arg)
