"""ICGNN-style (reconstructed) MU-MISO precoding: i.i.d. Rayleigh, one BS, SNR 10 dB, unsupervised sum-SE.

Training draws fresh channels every step with K in [4, 8] users and N in [K, 2K] antennas (padded to 8 x 16),
so both the loaded regime (K = N) and N = 2K are in the training distribution. Test sets of 1000 channels at
the training sizes and at sizes never seen in training (2x users and 2x antennas).
Default (a few CPU-hours; minutes on a GPU):
  python -m jaxlab.train --config configs/icgnn/precoding.py --workdir runs/icgnn_precoding
About ten minutes on 2 CPU cores:
  python -m jaxlab.train --config configs/icgnn/precoding.py:cpu --workdir runs/icgnn_precoding_cpu
Seconds, for tests:
  python -m jaxlab.train --config configs/icgnn/precoding.py:smoke --workdir /tmp/icgnn_smoke
"""
import ml_collections

from configs.loop import loop_config


def get_config(arg=None):
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.method = "icgnn"
  c.task = "precoding"
  c.variant = variant
  c.system = ml_collections.ConfigDict(dict(snr_db=10.0, sigma2=1.0))
  c.data = ml_collections.ConfigDict(dict(
      train_users=(4, 8), train_antennas=(4, 16), antennas_per_user=(1.0, 2.0), steps_per_epoch=100,
      num_val=500, num_test=1000, test_seed=2024,
      test_sizes=((8, 8), (7, 8), (8, 16), (16, 16), (14, 16), (16, 32))))
  c.model = ml_collections.ConfigDict(dict(hidden=64, num_layers=3, shared=False, aggregation="max_mean",
                                           cg_iters=0, precoder_stats=True, rounds=2, message_layers=1))
  # cg_iters 0: K iterations (exact in exact arithmetic); precoder_stats: the graph carries the link gains of the
  # current precoder (RZF first), and each of the rounds refines it with the same network; message_layers 1: φ_m is
  # one linear layer and ReLU (2-layer messages reach the same sum-SE at three times the cost)
  c.eval = ml_collections.ConfigDict(dict(wmmse_iters=200, wmmse_tol=1e-4, baseline_cg_iters=4))
  c.train = loop_config(batch_size=256, eval_batch_size=500, num_epochs=200, learning_rate=5e-4, warmup_epochs=0,
                        ema_decay=0.995, grad_clip=1.0, eval_every_steps=500, log_every_steps=50,
                        checkpoint_every_steps=1000, select_metric="neg_sum_se")
  if variant == "cpu":
    c.train.update(num_epochs=40, batch_size=128)
  elif variant == "smoke":
    c.data.update(num_val=16, num_test=16, test_sizes=((8, 8), (16, 16)), steps_per_epoch=5)
    c.model.update(hidden=16, num_layers=2)
    c.eval.update(wmmse_iters=20)
    c.train.update(batch_size=8, eval_batch_size=8, num_epochs=2, warmup_epochs=1, eval_every_steps=5,
                   checkpoint_every_steps=5, log_every_steps=1)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r} of configs/icgnn/precoding.py; expected default, cpu or smoke")
  c.lock()
  return c
