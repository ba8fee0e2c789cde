"""Settings of the shared training loop (``jaxlab.common.loop``), the same keys for every method."""
import ml_collections


def loop_config(**overrides) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 100
  t.eval_batch_size = 100
  t.num_epochs = 100
  t.num_steps = 0           # > 0 overrides num_epochs
  t.learning_rate = 1e-3
  t.warmup_epochs = 10
  t.weight_decay = 0.0
  t.grad_clip = 0.5         # global norm
  t.ema_decay = 0.0         # 0 = no EMA
  t.eval_every_steps = 0    # 0 = once per epoch
  t.log_every_steps = 10
  t.checkpoint_every_steps = 500
  t.keep_checkpoints = 2
  t.seed = 0
  t.select_metric = ""
  t.update(overrides)
  return t
