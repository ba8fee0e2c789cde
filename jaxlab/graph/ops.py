"""Segment reductions that are safe on padded batches and under jit.

Each op takes a static ``num_segments`` and an optional boolean ``mask`` over the entries (usually
``edge_mask``). A masked entry, or one whose segment id lies outside [0, num_segments) such as the -1
fill of a neighbour search, takes part in nothing: not in a sum, a count, a max or a softmax
normaliser, and it gets no gradient. Empty segments give finite values (0, or a chosen constant for
max), never -inf or NaN.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp


def _validate(name: str, data, segment_ids, num_segments, mask):
  try:
    num_segments = operator.index(num_segments)
  except TypeError:
    raise ValueError(f"{name}: num_segments must be a static Python int, got {num_segments!r}") from None
  if num_segments < 0:
    raise ValueError(f"{name}: num_segments must be >= 0, got {num_segments}")
  data, segment_ids = jnp.asarray(data), jnp.asarray(segment_ids)
  if segment_ids.ndim != 1 or data.ndim == 0 or data.shape[0] != segment_ids.shape[0]:
    raise ValueError(f"{name}: segment_ids must be 1-D with one id per row of data, got shapes "
                     f"{segment_ids.shape} and {data.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"{name}: segment_ids must be integers, got dtype {segment_ids.dtype}")
  valid = (segment_ids >= 0) & (segment_ids < num_segments)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != segment_ids.shape or mask.dtype != jnp.bool_:
      raise ValueError(f"{name}: mask must be bool with the shape of segment_ids {segment_ids.shape}, "
                       f"got {mask.dtype}{list(mask.shape)}")
    valid = valid & mask
  # Ids of excluded entries go one past the end, where jax.ops' scatters drop them.
  drop_ids = jnp.where(valid, segment_ids, num_segments)
  return data, drop_ids, num_segments, valid


def _rows(valid: jax.Array, like: jax.Array) -> jax.Array:
  """The per-row flag reshaped to broadcast against ``like``'s trailing feature axes."""
  return valid.reshape(valid.shape + (1,) * (like.ndim - 1))


def _cleared(data: jax.Array, valid: jax.Array) -> jax.Array:
  # Padding rows may hold inf or NaN; replacing them (rather than only dropping their ids) keeps such
  # values out of both the forward pass and the gradient.
  return jnp.where(_rows(valid, data), data, jnp.zeros((), data.dtype))


def _counts(valid, drop_ids, num_segments, like):
  counts = jax.ops.segment_sum(valid.astype(like.dtype), drop_ids, num_segments)
  return counts.reshape(counts.shape + (1,) * (like.ndim - 1))


def segment_sum(data, segment_ids, num_segments: int, mask=None) -> jax.Array:
  """Sum of the rows of ``data`` per segment; empty segments are 0."""
  data, drop_ids, num_segments, valid = _validate("segment_sum", data, segment_ids, num_segments, mask)
  return jax.ops.segment_sum(_cleared(data, valid), drop_ids, num_segments)


def segment_mean(data, segment_ids, num_segments: int, mask=None) -> jax.Array:
  """Mean of the rows of ``data`` per segment; empty segments are 0."""
  data, drop_ids, num_segments, valid = _validate("segment_mean", data, segment_ids, num_segments,
                                                  mask)
  if not jnp.issubdtype(data.dtype, jnp.inexact):
    raise ValueError(f"segment_mean: data must be floating point, got dtype {data.dtype}")
  totals = jax.ops.segment_sum(_cleared(data, valid), drop_ids, num_segments)
  return totals / jnp.maximum(_counts(valid, drop_ids, num_segments, data), 1)


def _lowest(dtype):
  # The lowest finite value rather than -inf, so no intermediate trips jax_debug_infs.
  return jnp.finfo(dtype).min if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min


def _max_or_constant(data, drop_ids, num_segments, valid, empty_value):
  start = jnp.full((num_segments,) + data.shape[1:], _lowest(data.dtype), data.dtype)
  maxima = start.at[drop_ids].max(_cleared(data, valid), mode="drop")
  nonempty = _counts(valid, drop_ids, num_segments, data) > 0
  return jnp.where(nonempty, maxima, jnp.asarray(empty_value, data.dtype))


def segment_max(data, segment_ids, num_segments: int, mask=None, empty_value=0) -> jax.Array:
  """Maximum of the rows of ``data`` per segment; empty segments are ``empty_value``, never -inf."""
  data, drop_ids, num_segments, valid = _validate("segment_max", data, segment_ids, num_segments, mask)
  return _max_or_constant(data, drop_ids, num_segments, valid, empty_value)


def segment_softmax(logits, segment_ids, num_segments: int, mask=None) -> jax.Array:
  """Softmax of ``logits`` over the rows of each segment (e.g. attention over a node's in-edges).

  Numerically stable (the segment max is subtracted first). Each non-empty segment's weights sum to 1;
  excluded rows get weight 0. Trailing axes of ``logits`` (e.g. heads) are independent softmaxes.
  """
  logits, drop_ids, num_segments, valid = _validate("segment_softmax", logits, segment_ids,
                                                    num_segments, mask)
  if not jnp.issubdtype(logits.dtype, jnp.inexact):
    raise ValueError(f"segment_softmax: logits must be floating point, got dtype {logits.dtype}")
  logits = _cleared(logits, valid)
  # The shift cancels in the ratio, so it needs no gradient.
  shift = jax.lax.stop_gradient(_max_or_constant(logits, drop_ids, num_segments, valid, 0))
  gather_ids = jnp.where(valid, drop_ids, 0)
  rows = _rows(valid, logits)
  # Excluded rows see exp(0) and are zeroed after, so nothing overflows for them.
  exps = jnp.where(rows, jnp.exp(jnp.where(rows, logits - shift[gather_ids], 0)), 0)
  totals = jax.ops.segment_sum(exps, drop_ids, num_segments)
  # A valid row's own segment total is at least exp(0) = 1, so the division is safe.
  return jnp.where(rows, exps / jnp.where(rows, totals[gather_ids], 1), 0)
