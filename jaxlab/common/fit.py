"""Whole-run training in one compiled call: every epoch of a full-batch problem inside ``lax.scan``.

``loop.Trainer`` streams batches through one jitted step and checkpoints between steps; that is the right
shape for data sets that do not fit one batch. Transductive problems (a citation graph, a small regression)
see the whole data set every step, and a run of a few hundred steps takes milliseconds per step: the host
round trip per step would dominate. ``fit`` runs the whole schedule as one ``lax.scan`` and keeps the
parameters of the best evaluated epoch, so it is a pure function of ``(params, key)`` that ``jax.vmap``
turns into many runs at once (seeds, or same-shaped models).

Model selection follows the early-stopping protocol of GCN/GAT with restoring: the reported epoch is the
one with the best ``select`` metric (ties go to the lower ``tie_break`` metric), which gives the same
result as stopping with any patience and restoring the best epoch, since the scan sees every epoch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class FitResult(NamedTuple):
  best_params: Any         # the parameters after the selected epoch
  best_metrics: dict       # eval metrics of the selected epoch, plus "epoch" (0-based)
  history: dict            # per-epoch "loss" and eval metrics, each [epochs]


def _fold_in(key, data):
  if jnp.ndim(key) == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)


def fit(loss_fn: Callable, eval_fn: Callable, optimizer: optax.GradientTransformation, params, key: jax.Array,
        epochs: int, *, select: str, tie_break: str | None = None, maximize: bool = True) -> FitResult:
  """Train ``params`` for ``epochs`` full-batch steps and keep the best epoch by ``eval_fn(params)[select]``.

  ``loss_fn(params, key) -> scalar`` is the training loss with a fresh key per epoch
  (``fold_in(key, epoch)``, for dropout); ``eval_fn(params) -> dict`` of metrics is evaluated after every
  update. Call it under ``jax.jit`` (``epochs`` static); it is ``vmap``-able over ``params`` and ``key``.

  Several models stacked along a leading axis of every leaf can also be trained natively: ``loss_fn`` returns
  the sum of their losses (with an elementwise optimizer such as Adam each model then gets exactly its own
  update) and ``eval_fn`` metrics of shape [models]; each model keeps its own best epoch. ``key`` may then be
  one key per model, and every epoch folds its index into each of them.
  """
  if epochs < 1:
    raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
  sign = 1.0 if maximize else -1.0
  metrics0 = jax.eval_shape(eval_fn, params)
  if select not in metrics0 or (tie_break is not None and tie_break not in metrics0):
    raise ValueError(f"fit: eval_fn returns {sorted(metrics0)}, which lacks select={select!r} or "
                     f"tie_break={tie_break!r}")

  def better(new, old):
    gain = sign * (new[select] - old[select])
    if tie_break is None:
      return gain > 0
    return (gain > 0) | ((gain == 0) & (new[tie_break] < old[tie_break]))

  def epoch(carry, index):
    params, opt_state, best_params, best = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, _fold_in(key, index))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = eval_fn(params)
    metrics = dict(metrics, epoch=jnp.broadcast_to(index, jnp.shape(metrics[select])))
    take = better(metrics, best) | (index == 0)
    pick = lambda n, o: jnp.where(take.reshape(take.shape + (1,) * (n.ndim - take.ndim)), n, o)
    best_params = jax.tree.map(pick, params, best_params)
    best = jax.tree.map(pick, metrics, best)
    return (params, opt_state, best_params, best), dict(metrics, loss=loss)

  best0 = dict(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0),
               epoch=jnp.zeros(metrics0[select].shape, jnp.int32))
  carry = (params, optimizer.init(params), params, best0)
  (_, _, best_params, best), history = jax.lax.scan(epoch, carry, jnp.arange(epochs, dtype=jnp.int32))
  history.pop("epoch")
  return FitResult(best_params, best, history)
