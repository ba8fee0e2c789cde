"""Optimizer and learning-rate schedule shared by the methods."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cosine_warmup_per_epoch(base_lr: float, steps_per_epoch: int, num_epochs: float, warmup_epochs: float):
  """``lr·½(1+cos(π e/E))``, times ``e/warmup`` while ``e <= warmup``, with the epoch ``e`` stepped per epoch.

  This is the schedule of the PONITA reference (a per-epoch LambdaLR), so epoch 0 runs at learning rate 0.
  """
  def schedule(step):
    epoch = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
    factor = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
    if warmup_epochs > 0:
      factor = jnp.where(epoch <= warmup_epochs, factor * epoch / warmup_epochs, factor)
    return base_lr * factor
  return schedule


def decay_mask(params):
  """True for weights that take weight decay: matrices and kernels, not biases, norms or layer scales."""
  def is_decayed(path, leaf):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if any(n in ("bias", "scale", "layer_scale", "gamma") for n in names):
      return False
    return getattr(leaf, "ndim", 0) >= 2
  return jax.tree.map_with_path(is_decayed, params)


def make_optimizer(cfg, schedule, params) -> optax.GradientTransformation:
  """Global-norm clipping, then L2 weight decay coupled to the gradient (as torch's Adam), then Adam."""
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)))
  parts += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts)
