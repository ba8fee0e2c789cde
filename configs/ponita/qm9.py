"""PONITA on QM9 (fibre-bundle mode, 16 orientations; DimeNet split 110000/10000/rest).

Default: the paper's setting for one target (GPU/TPU; 1000 epochs, batch 96, EMA).
  python -m jaxlab.train --config configs/ponita/qm9.py --workdir runs/ponita_qm9_u0
Choose targets with --config.data.targets='("homo",)' (names: jaxlab.ponita.data.QM9_TARGETS).
About ten minutes on 2 CPU cores (a subset of molecules, smaller model):
  python -m jaxlab.train --config configs/ponita/qm9.py:cpu --workdir runs/ponita_qm9_cpu
Seconds, for tests (needs --config.data_dir pointing at a folder with the QM9 npz):
  python -m jaxlab.train --config configs/ponita/qm9.py:smoke --workdir /tmp/ponita_qm9_smoke
Node features are the one-hot of H, C, N, O, F (the shared QM9 file carries no bond or hybridisation data).
"""
import ml_collections

from configs.ponita.common import model_config, train_config


def get_config(arg=None):
  variant = arg or "paper"
  c = ml_collections.ConfigDict()
  c.method = "ponita"
  c.task = "qm9"
  c.variant = variant
  c.data_dir = ""
  c.data = ml_collections.ConfigDict(dict(targets=("U0",), max_molecules=0))
  c.model = model_config(num_ori=16)
  c.train = train_config(batch_size=96, eval_batch_size=96, num_epochs=1000, learning_rate=5e-4,
                         warmup_epochs=10, weight_decay=1e-10, ema_decay=0.99, eval_every_steps=0,
                         checkpoint_every_steps=1145, log_every_steps=50)
  if variant == "cpu":
    c.data.max_molecules = 4000
    c.model.update(num_ori=8, hidden=64, basis_dim=64, num_layers=4)
    c.train.update(batch_size=32, eval_batch_size=100, num_epochs=8, warmup_epochs=0, eval_every_steps=250,
                   checkpoint_every_steps=250)
  elif variant == "smoke":
    c.data.max_molecules = 16
    c.model.update(num_ori=4, hidden=16, basis_dim=16, num_layers=2)
    c.train.update(batch_size=8, eval_batch_size=8, num_epochs=2, warmup_epochs=1, eval_every_steps=2,
                   checkpoint_every_steps=2, log_every_steps=1)
  elif variant != "paper":
    raise ValueError(f"unknown variant {variant!r} of configs/ponita/qm9.py; expected paper, cpu or smoke")
  c.train.select_metric = "mae_standardized"
  c.lock()
  return c
