"""PONITA on revised MD17: energies and forces (F = -dE/dx), trained on one official 1000-frame split.

Default: the paper's setting (GPU/TPU; 5000 epochs, EMA, 5 test-time rotations).
  python -m jaxlab.train --config configs/ponita/rmd17.py --workdir runs/ponita_rmd17_aspirin
Pick the molecule and split with --config.data.molecule=ethanol --config.data.split_index=1.
About ten minutes on 2 CPU cores (ethanol by default; fewer epochs):
  python -m jaxlab.train --config configs/ponita/rmd17.py:cpu --workdir runs/ponita_rmd17_cpu
Seconds, for tests (needs --config.data_dir pointing at a folder with rmd17 files):
  python -m jaxlab.train --config configs/ponita/rmd17.py:smoke --workdir /tmp/ponita_rmd17_smoke
"""
import ml_collections

from configs.ponita.common import model_config, train_config


def get_config(arg=None):
  variant = arg or "paper"
  c = ml_collections.ConfigDict()
  c.method = "ponita"
  c.task = "rmd17"
  c.variant = variant
  c.data_dir = ""
  c.data = ml_collections.ConfigDict(dict(molecule="aspirin", split_style="official_files", split_index=1,
                                          max_train=0, max_eval=0))
  c.model = model_config(num_ori=20)
  c.train = train_config(batch_size=5, eval_batch_size=50, num_epochs=5000, learning_rate=5e-4, warmup_epochs=100,
                         weight_decay=1e-16, ema_decay=0.99, test_rotations=5, eval_every_steps=0,
                         checkpoint_every_steps=1900, log_every_steps=50,
                         select_metric="force_mae_mev_per_a")
  if variant == "cpu":
    c.data.molecule = "ethanol"
    c.train.update(num_epochs=10, warmup_epochs=0, test_rotations=1, eval_every_steps=380,
                   checkpoint_every_steps=380)
  elif variant == "smoke":
    c.data.update(max_train=20, max_eval=10)
    c.model.update(num_ori=4, hidden=16, basis_dim=16, num_layers=2)
    c.train.update(batch_size=5, eval_batch_size=5, num_epochs=2, warmup_epochs=1, test_rotations=2,
                   eval_every_steps=4, checkpoint_every_steps=4, log_every_steps=1)
  elif variant != "paper":
    raise ValueError(f"unknown variant {variant!r} of configs/ponita/rmd17.py; expected paper, cpu or smoke")
  c.lock()
  return c
