"""AGNN on Pubmed (Planetoid public split). Needs ind.pubmed.allx, which ../shared/data lacks: the loader stops
with a message naming it until the file is there.
  python -m jaxlab.train --config configs/agnn/pubmed.py --workdir runs/agnn_pubmed
Variants as in cora.py (":paper", ":sharing", ":random", ":smoke").
"""
from configs.agnn.common import planetoid_config


def get_config(arg=None):
  c = planetoid_config("pubmed", arg)
  # GAT's Pubmed settings (Velickovic et al.): 8 averaged output heads, lr 0.01, L2 0.001
  c.baselines.update(gat_output_heads=8, gat_learning_rate=0.01, gat_weight_decay=0.001)
  return c
