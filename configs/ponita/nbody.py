"""PONITA on the charged N-body task (5 particles, predict positions 1000 steps ahead).

Default: the paper's setting (GPU/TPU; 10000 epochs over the first 3000 training simulations).
  python -m jaxlab.train --config configs/ponita/nbody.py --workdir runs/ponita_nbody
About ten minutes on 2 CPU cores (smaller model and fewer epochs):
  python -m jaxlab.train --config configs/ponita/nbody.py:cpu --workdir runs/ponita_nbody_cpu
Seconds, for tests:
  python -m jaxlab.train --config configs/ponita/nbody.py:smoke --workdir /tmp/ponita_smoke
The data set is generated (seed 43, bit-exact with the reference generator) on first use.
"""
import ml_collections

from configs.ponita.common import model_config, train_config


def get_config(arg=None):
  variant = arg or "paper"
  c = ml_collections.ConfigDict()
  c.method = "ponita"
  c.task = "nbody"
  c.variant = variant
  c.data_dir = ""
  c.data = ml_collections.ConfigDict(dict(
      nbody_dir="", suffix="small", seed=43, num_train_sims=10000, num_eval_sims=2000, num_steps=5000,
      max_train=3000, max_eval=2000))
  c.model = model_config(num_ori=16, layer_scale=1e-6)
  c.train = train_config(batch_size=100, eval_batch_size=200, num_epochs=10000, learning_rate=1e-3,
                         warmup_epochs=10, weight_decay=1e-10, eval_every_steps=150, checkpoint_every_steps=600)
  if variant == "cpu":
    c.model.update(num_ori=8, hidden=64, basis_dim=64, num_layers=4)
    c.train.update(num_epochs=100, warmup_epochs=2, eval_every_steps=600, checkpoint_every_steps=600,
                   log_every_steps=50)
  elif variant == "smoke":
    c.data.update(num_train_sims=40, num_eval_sims=16, num_steps=5000, max_train=40, max_eval=16)
    c.model.update(num_ori=4, hidden=16, basis_dim=16, num_layers=2)
    c.train.update(batch_size=8, eval_batch_size=8, num_epochs=3, warmup_epochs=1, eval_every_steps=5,
                   checkpoint_every_steps=5, log_every_steps=1)
  elif variant != "paper":
    raise ValueError(f"unknown variant {variant!r} of configs/ponita/nbody.py; expected paper, cpu or smoke")
  c.train.select_metric = "mse"
  c.lock()
  return c
