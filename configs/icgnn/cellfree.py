"""ICGNN-style (reconstructed) cell-free downlink power allocation with distributed MR precoding.

The system of Demir, Björnson and Sanguinetti (2021), i.i.d. Rayleigh fading, DCC user-centric clusters,
pilots assigned as in the book. Training setups have the book's densities (100 APs and 40 UEs per km²) on a
smaller area; test sets have the training size, twice the APs and UEs (on twice the area), and twice the
antennas per AP. The loss is the negative sum-SE of the closed-form MR SE; every AP's budget holds exactly.
Default:
  python -m jaxlab.train --config configs/icgnn/cellfree.py --workdir runs/icgnn_cellfree
About ten minutes on 2 CPU cores:
  python -m jaxlab.train --config configs/icgnn/cellfree.py:cpu --workdir runs/icgnn_cellfree_cpu
Seconds, for tests:
  python -m jaxlab.train --config configs/icgnn/cellfree.py:smoke --workdir /tmp/icgnn_cellfree_smoke
"""
import ml_collections

from configs.loop import loop_config


def get_config(arg=None):
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.method = "icgnn"
  c.task = "cellfree"
  c.variant = variant
  c.system = ml_collections.ConfigDict(dict(
      num_aps=25, num_ues=10, num_antennas=4, area_side_m=500.0, tau_p=5, tau_c=200, ul_power_mw=100.0,
      rho_max_mw=200.0, shadowing_std_db=4.0))
  c.data = ml_collections.ConfigDict(dict(
      num_train=2048, num_val=128, num_test=1000, seed=7,
      test_sizes=((25, 10, 4), (50, 20, 4), (25, 10, 8), (50, 20, 8))))  # (APs, UEs, antennas per AP)
  c.model = ml_collections.ConfigDict(dict(hidden=64, num_layers=3, shared=False, aggregation="max_mean",
                                           message_layers=1))
  c.train = loop_config(batch_size=16, eval_batch_size=50, num_epochs=100, learning_rate=1e-3, warmup_epochs=0,
                        grad_clip=1.0, eval_every_steps=256, log_every_steps=32, checkpoint_every_steps=512,
                        select_metric="neg_sum_se")
  if variant == "cpu":
    c.train.update(num_epochs=30)
  elif variant == "smoke":
    c.data.update(num_train=16, num_val=8, num_test=8, test_sizes=((25, 10, 4), (50, 20, 8)))
    c.model.update(hidden=16, num_layers=2)
    c.train.update(batch_size=8, eval_batch_size=8, num_epochs=3, eval_every_steps=2, checkpoint_every_steps=2,
                   log_every_steps=1)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r} of configs/icgnn/cellfree.py; expected default, cpu or smoke")
  c.lock()
  return c
