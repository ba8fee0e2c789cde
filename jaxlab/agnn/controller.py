"""LSTM policies over a search space, trained with REINFORCE (GraphNAS and AGNN controllers).

A policy walks the positions of a ``SearchSpace`` in order. At step ``t`` its LSTM reads an embedding of the
choice made at step ``t - 1`` (a learned start token at ``t = 0``) and a per-position linear head maps the hidden
state to one logit per choice of position ``t``. Positions have different numbers of choices, so every head is
``K = max(space.sizes)`` wide and the choices beyond a position's size get logit ``-inf``. The logits are squashed
as in ENAS/GraphNAS::

    logits = tanh_constant * tanh((h @ W_t + b_t) / temperature)        # then invalid choices -> -inf

which bounds them to ``[-tanh_constant, tanh_constant]`` (so no choice becomes certain early in the search).

Every function takes a ``resample``/``mask`` vector over positions: positions where it is True are decided by the
policy; the other positions are teacher-forced to a given context architecture and still feed the LSTM, which is
how AGNN's class controllers see the rest of the best architecture as history. Log-probabilities and entropies
sum over the masked positions only. Teacher-forcing a sampled architecture reproduces the exact distributions it
was sampled from, so REINFORCE recomputes ``log pi(child)`` from the child alone and keeps no sampling state.

The ``*_stacked`` and ``*_batch`` variants work on several policies stacked along a leading axis (AGNN keeps one
policy per action class) and on batches of children; the single-policy functions are thin wrappers.
Only ``space.sizes`` enters the compiled functions, so spaces with the same sizes share compilations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.agnn.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  """Controller hyper-parameters; the defaults are GraphNAS's and AutoGL's.

  ``guide`` is AGNN's action guider: "argmax" mutates the class whose controller is most uncertain (AutoGL
  ``guide_type=0``), "sample" draws the class from softmax(entropies) (``guide_type=1``, AutoGL's default). The
  entropies are sums over a class's positions, so they favour classes with more and wider decisions. With "argmax"
  at the default learning rate they move so slowly that the guider keeps picking the same class (on
  ``gnn_space(2)`` the two 8-way activations, on NAS-Bench-Graph the four 9-way ops) for hundreds of steps.
  """

  lstm_hidden: int = 100
  temperature: float = 5.0
  tanh_constant: float = 2.5
  learning_rate: float = 3.5e-4
  baseline_decay: float = 0.95
  entropy_coef: float = 1e-4
  guide: str = "argmax"
  init_range: float = 0.1  # parameters start uniform in [-init_range, init_range] (ENAS/GraphNAS), heads' bias 0

  def __post_init__(self):
    if self.guide not in ("argmax", "sample"):
      raise ValueError(f"ControllerConfig.guide must be 'argmax' or 'sample', got {self.guide!r}")
    if self.lstm_hidden < 1 or self.temperature <= 0 or self.tanh_constant <= 0:
      raise ValueError("lstm_hidden, temperature and tanh_constant must be positive")
    if not 0.0 <= self.baseline_decay < 1.0:
      raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")


DEFAULT_CONFIG = ControllerConfig()


def init_policy(key: jax.Array, space: SearchSpace, cfg: ControllerConfig = DEFAULT_CONFIG) -> dict:
  """The parameters of one policy: a shared LSTM cell, a start token, and per-position embeddings and heads.

  ``embed[t, a]`` is the LSTM input after position ``t`` chose ``a`` (the last position's table is never read,
  so it gets no gradient); ``head_w[t]``/``head_b[t]`` give position ``t``'s logits.
  """
  return _init(key, tuple(space.sizes), cfg.lstm_hidden, float(cfg.init_range))


@functools.partial(jax.jit, static_argnames=("sizes", "hidden", "init_range"))
def _init(key, sizes, hidden, init_range):
  num, width = len(sizes), max(sizes)
  keys = jax.random.split(key, 5)
  uniform = functools.partial(jax.random.uniform, minval=-init_range, maxval=init_range)
  return {
      "start": uniform(keys[0], (hidden,)),
      "embed": uniform(keys[1], (num, width, hidden)),
      "lstm_wx": uniform(keys[2], (hidden, 4 * hidden)),
      "lstm_wh": uniform(keys[3], (hidden, 4 * hidden)),
      "lstm_b": jnp.zeros((4 * hidden,)),
      "head_w": uniform(keys[4], (num, hidden, width)),
      "head_b": jnp.zeros((num, width)),
  }


def init_policies(key: jax.Array, space: SearchSpace, num: int, cfg: ControllerConfig = DEFAULT_CONFIG) -> dict:
  """``num`` independent policies (policy ``c`` from ``fold_in(key, c)``) stacked along a leading axis."""
  policies = [init_policy(jax.random.fold_in(key, c), space, cfg) for c in range(num)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *policies)


def make_optimizer(cfg: ControllerConfig = DEFAULT_CONFIG) -> optax.GradientTransformation:
  """Adam at ``cfg.learning_rate`` (the update functions build the same Adam with a traced learning rate)."""
  return optax.adam(cfg.learning_rate)


def init_opt_state(params: dict, cfg: ControllerConfig = DEFAULT_CONFIG, stacked: bool = False):
  """Adam's state for ``params`` (per policy, stacked like them when ``stacked``)."""
  init = make_optimizer(cfg).init
  if not stacked:
    return init(params)
  num = jax.tree.leaves(params)[0].shape[0]
  # Adam's state is zeros and a zero count: one policy's state broadcast to all of them.
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + x.shape), init(jax.tree.map(lambda p: p[0], params)))


# ----------------------------------------------------------------------------------------------- core (one policy)

def _valid(sizes: tuple[int, ...]) -> np.ndarray:
  return np.arange(max(sizes))[None, :] < np.asarray(sizes)[:, None]


def _lstm(params, x, h, c):
  gates = x @ params["lstm_wx"] + h @ params["lstm_wh"] + params["lstm_b"]
  i, f, g, o = jnp.split(gates, 4)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _rollout(params, keys, context, resample, sizes, temperature, tanh_constant):
  """Walk all positions: sample where ``resample`` (with ``keys``, one per position), else take ``context``.
  With ``keys=None`` nothing is sampled (pure teacher forcing, and no random-number code to compile).

  Returns the architecture, the per-position log-probability of the taken choice, the per-position entropy and
  the (masked, squashed) logits, all unmasked; callers weight them by a mask.
  """
  valid = jnp.asarray(_valid(sizes))
  hidden = params["start"].shape[-1]

  def step(carry, xs):
    h, c, x = carry
    forced, free, valid_t, head_w, head_b, embed, key = xs
    h, c = _lstm(params, x, h, c)
    logits = tanh_constant * jnp.tanh((h @ head_w + head_b) / temperature)
    logits = jnp.where(valid_t, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits)
    # Double where: invalid entries are exactly 0 in probability; keep their -inf out of products and gradients.
    logp = jnp.where(valid_t, logp, 0.0)
    entropy = -jnp.sum(jnp.where(valid_t, jnp.exp(logp) * logp, 0.0))
    choice = forced if key is None else jnp.where(free, jax.random.categorical(key, logits), forced)
    return (h, c, embed[choice]), (choice, logp[choice], entropy, logits)

  init = (jnp.zeros((hidden,)), jnp.zeros((hidden,)), params["start"])
  xs = (context, resample, valid, params["head_w"], params["head_b"], params["embed"], keys)
  _, (arch, logp, entropy, logits) = jax.lax.scan(step, init, xs)
  return arch, logp, entropy, logits


def _as_inputs(space: SearchSpace, arch, mask):
  """Host-side checks (an out-of-range context index would silently read a padded embedding), then arrays."""
  sizes = tuple(space.sizes)
  arch_np, mask_np = np.asarray(arch), np.asarray(mask, bool)
  if arch_np.shape[-1:] != (len(sizes),) or mask_np.shape[-1:] != (len(sizes),):
    raise ValueError(f"architectures and masks need {len(sizes)} positions, got {arch_np.shape} and {mask_np.shape}")
  if np.any(arch_np < 0) or np.any(arch_np >= np.asarray(sizes)):
    raise ValueError(f"architecture indices out of range for sizes {sizes}: {arch_np.tolist()}")
  return sizes, jnp.asarray(arch_np, jnp.int32), jnp.asarray(mask_np)


def _scores(params, arch, mask, sizes, temperature, tanh_constant):
  """Teacher-forced ``(sum log pi, sum entropy)`` over the masked positions of one architecture."""
  _, logp, entropy, _ = _rollout(params, None, arch, jnp.zeros_like(mask), sizes, temperature, tanh_constant)
  return jnp.sum(jnp.where(mask, logp, 0.0)), jnp.sum(jnp.where(mask, entropy, 0.0))


_STATIC = ("sizes", "temperature", "tanh_constant")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_batch(stacked, keys, which, contexts, masks, *, sizes, temperature, tanh_constant):
  def one(key, w, context, mask):
    params = jax.tree.map(lambda p: p[w], stacked)
    arch, logp, entropy, _ = _rollout(params, jax.random.split(key, len(sizes)), context, mask, sizes,
                                      temperature, tanh_constant)
    return arch, jnp.sum(jnp.where(mask, logp, 0.0)), jnp.sum(jnp.where(mask, entropy, 0.0))
  return jax.vmap(one)(keys, which, contexts, masks)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _scores_batch(stacked, which, archs, masks, *, sizes, temperature, tanh_constant):
  def one(w, arch, mask):
    return _scores(jax.tree.map(lambda p: p[w], stacked), arch, mask, sizes, temperature, tanh_constant)
  return jax.vmap(one)(which, archs, masks)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _logits(params, arch, *, sizes, temperature, tanh_constant):
  return _rollout(params, None, arch, jnp.zeros(len(sizes), bool), sizes, temperature, tanh_constant)[3]


def _pad_index(n: int) -> np.ndarray:
  """Indices that pad a batch of ``n`` to the next power of two by repeating its first element."""
  if n < 1:
    raise ValueError("a batch needs at least one child")
  size = 1 << (n - 1).bit_length()
  return np.concatenate([np.arange(n), np.zeros(size - n, int)])


def _static(space, cfg):
  return dict(sizes=tuple(space.sizes), temperature=float(cfg.temperature), tanh_constant=float(cfg.tanh_constant))


def _stack1(params):
  return jax.tree.map(lambda p: p[None], params)


# ------------------------------------------------------------------------------------------------- public, one policy

def policy_logits(params: dict, space: SearchSpace, arch: Sequence[int], cfg: ControllerConfig = DEFAULT_CONFIG):
  """The ``(num_positions, max_size)`` logits of every position with ``arch`` teacher-forced (invalid: -inf)."""
  _, arch, _ = _as_inputs(space, arch, np.ones(len(space.sizes), bool))
  return _logits(params, arch, **_static(space, cfg))


def sample(params: dict, key: jax.Array, space: SearchSpace, context_arch: Sequence[int], resample_mask,
           cfg: ControllerConfig = DEFAULT_CONFIG):
  """``(arch, log_prob, entropy)``: positions under ``resample_mask`` sampled, the others ``context_arch``'s.

  ``log_prob`` and ``entropy`` (of each sampled position's distribution) sum over the resampled positions.
  """
  _, context, mask = _as_inputs(space, context_arch, resample_mask)
  arch, logp, entropy = _sample_batch(_stack1(params), key[None], jnp.zeros((1,), jnp.int32), context[None],
                                      mask[None], **_static(space, cfg))
  return arch[0], logp[0], entropy[0]


def log_prob(params: dict, space: SearchSpace, arch: Sequence[int], mask, cfg: ControllerConfig = DEFAULT_CONFIG):
  """``sum_t mask_t log pi(arch_t | arch_<t)``."""
  _, arch, mask = _as_inputs(space, arch, mask)
  return _scores_batch(_stack1(params), jnp.zeros((1,), jnp.int32), arch[None], mask[None],
                       **_static(space, cfg))[0][0]


def decision_entropy(params: dict, space: SearchSpace, context_arch: Sequence[int], mask,
                     cfg: ControllerConfig = DEFAULT_CONFIG):
  """Sum of the entropies of the policy's decisions at the masked positions, with ``context_arch`` teacher-forced.

  This is AGNN's action-guider signal: how uncertain a class controller is about its class given the rest of the
  best architecture.
  """
  _, context, mask = _as_inputs(space, context_arch, mask)
  return _scores_batch(_stack1(params), jnp.zeros((1,), jnp.int32), context[None], mask[None],
                       **_static(space, cfg))[1][0]


# ------------------------------------------------------------------------------------ public, stacked and batched

def sample_batch(stacked: dict, keys: jax.Array, space: SearchSpace, which, contexts, masks,
                 cfg: ControllerConfig = DEFAULT_CONFIG):
  """Child ``i`` is sampled by policy ``which[i]`` from ``contexts[i]`` at ``masks[i]`` with ``keys[i]``.

  Returns ``(archs, log_probs, entropies)``. The batch is padded to a power of two (repeating its first child)
  so that varying batch sizes reuse a few compilations; the padding is cut off again.
  """
  _, contexts, masks = _as_inputs(space, contexts, masks)
  n = contexts.shape[0]
  idx = _pad_index(n)
  out = _sample_batch(stacked, keys[idx], jnp.asarray(which, jnp.int32)[idx], contexts[idx], masks[idx],
                      **_static(space, cfg))
  return tuple(o[:n] for o in out)


def decision_entropies(stacked: dict, space: SearchSpace, context_arch: Sequence[int], masks,
                       cfg: ControllerConfig = DEFAULT_CONFIG):
  """``decision_entropy`` of policy ``c`` at ``masks[c]`` for every stacked policy ``c``, one shared context."""
  _, context, masks = _as_inputs(space, context_arch, masks)
  num = masks.shape[0]
  contexts = jnp.broadcast_to(context, masks.shape)
  return _scores_batch(stacked, jnp.arange(num, dtype=jnp.int32), contexts, masks, **_static(space, cfg))[1]


# -------------------------------------------------------------------------------------------------------- REINFORCE

def _child_losses(stacked, which, archs, masks, advantages, entropy_coef, sizes, temperature, tanh_constant):
  """``-(R - b) log pi(child) - entropy_coef * H(child)`` per child, each scored by its own policy ``which[i]``
  (a gather, whose gradient scatters back into that policy only)."""
  def child(w, arch, mask):
    return _scores(jax.tree.map(lambda p: p[w], stacked), arch, mask, sizes, temperature, tanh_constant)
  logp, entropy = jax.vmap(child)(which, archs, masks)
  return -advantages * logp - entropy_coef * entropy


def reinforce_loss(params: dict, space: SearchSpace, archs, masks, advantages, cfg: ControllerConfig = DEFAULT_CONFIG):
  """Mean over children of ``-(R - b) log pi(child) - entropy_coef * H(child)``; minimising it maximises reward.

  ``H(child)`` sums the entropies of the distributions the masked positions were drawn from (ENAS's bonus).
  """
  _, archs, masks = _as_inputs(space, archs, masks)
  which = jnp.zeros((archs.shape[0],), jnp.int32)
  return jnp.mean(_child_losses(_stack1(params), which, archs, masks, jnp.asarray(advantages, jnp.float32),
                                cfg.entropy_coef, **_static(space, cfg)))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _update_stacked(stacked, opt_state, which, archs, masks, advantages, weights, learning_rate, entropy_coef, *,
                    sizes, temperature, tanh_constant):
  """One Adam step per policy on the children it produced; policies without children are left exactly as they are
  (an Adam step with a zero gradient would still move them by their momentum and advance their step count).

  Weighting child ``i`` by ``1 / #children of which[i]`` makes the total the sum over policies of their mean
  losses. The learning rate and entropy coefficient are traced, so configurations share one compilation.
  """
  tx = optax.adam(learning_rate)
  num = jax.tree.leaves(stacked)[0].shape[0]
  counts = jax.ops.segment_sum(weights, which, num_segments=num)

  def total(stacked):
    per_child = _child_losses(stacked, which, archs, masks, advantages, entropy_coef, sizes, temperature,
                              tanh_constant)
    losses = jax.ops.segment_sum(weights * per_child, which, num_segments=num) / jnp.maximum(counts, 1.0)
    return jnp.sum(losses), losses

  grads, losses = jax.grad(total, has_aux=True)(stacked)

  def step(params, state, grad, used):
    updates, new_state = tx.update(grad, state, params)
    new_params = optax.apply_updates(params, updates)
    new_params = jax.tree.map(functools.partial(jnp.where, used), new_params, params)
    new_state = jax.tree.map(functools.partial(jnp.where, used), new_state, state)
    return new_params, new_state

  new_params, new_state = jax.vmap(step)(stacked, opt_state, grads, counts > 0)
  return new_params, new_state, losses


def reinforce_update_stacked(stacked: dict, opt_state, space: SearchSpace, which, archs, masks, advantages,
                             cfg: ControllerConfig = DEFAULT_CONFIG):
  """``(stacked, opt_state, losses)`` after one REINFORCE step of each policy ``c`` on the children with
  ``which == c`` (mean of their losses). Padded like ``sample_batch``; padding children get weight 0."""
  _, archs, masks = _as_inputs(space, archs, masks)
  n = archs.shape[0]
  idx = _pad_index(n)
  weights = (np.arange(idx.size) < n).astype(np.float32)
  return _update_stacked(stacked, opt_state, jnp.asarray(which, jnp.int32)[idx], archs[idx], masks[idx],
                         jnp.asarray(advantages, jnp.float32)[idx], jnp.asarray(weights),
                         jnp.float32(cfg.learning_rate), jnp.float32(cfg.entropy_coef), **_static(space, cfg))


def reinforce_update(params: dict, opt_state, space: SearchSpace, archs, masks, advantages,
                     cfg: ControllerConfig = DEFAULT_CONFIG):
  """``(params, opt_state, loss)`` after one REINFORCE step of a single policy on a batch of children."""
  archs, masks = np.atleast_2d(np.asarray(archs)), np.atleast_2d(np.asarray(masks))
  stacked, state, loss = reinforce_update_stacked(_stack1(params), _stack1(opt_state), space,
                                                  np.zeros(len(archs), np.int32), archs, masks,
                                                  np.atleast_1d(np.asarray(advantages, np.float32)), cfg)
  return _first(stacked), _first(state), loss[0]


def _first(tree):
  return jax.tree.map(lambda p: p[0], tree)


def ema_advantages(baseline: float | None, rewards: Sequence[float], decay: float) -> tuple[np.ndarray, float]:
  """``(R_i - b, new b)`` for a batch of rewards.

  Every child of a batch is compared with the baseline from before the batch (the first batch's mean when there
  is none yet, so the first advantages are deviations from that mean). The baseline then absorbs the rewards one
  child at a time, ``b <- decay * b + (1 - decay) * R_i``, so its memory counts evaluated architectures whatever the
  batch size.
  """
  rewards = np.asarray(rewards, np.float64)
  b = float(np.mean(rewards)) if baseline is None else float(baseline)
  advantages = rewards - b
  for r in rewards:
    b = decay * b + (1.0 - decay) * float(r)
  return advantages.astype(np.float32), b
