"""Homogeneous model-merging kernels (mergekit semantics), one tensor at a time.

A merge tool streams tensor by tensor, so every kernel takes the stacked versions of ONE tensor: `base` with shape
`S` and `tensors` with shape `[M, *S]` (M source models).  Arithmetic runs in (at least) float32 because fine-tuning
deltas are tiny relative to the weights and a bf16 subtraction destroys them; the result is cast back to the input
dtype.

Weights, densities, `lambda_`, `t` and `gamma` are traced arguments, so an evolutionary search that changes them per
candidate reuses the compiled kernel; only the flags (`majority`, `normalize`, `rescale`, `then`) are static.  The
public functions validate shapes and, when the values are concrete (not traced), their ranges, then call the jitted
kernels.

Deterministic tie-breaking (shared by TIES and breadcrumbs):
- Magnitude ranking uses a stable sort of |delta| in descending order over the flattened tensor, so among equal
  magnitudes the element with the lower flat index ranks first.  "Keep the top k" therefore keeps EXACTLY k entries,
  even when several entries tie at the threshold.
- The kept count is `k = round(density * n)` (round half to even, computed in float32), clipped to [0, n].
- Sign election: an elected sign of 0 (the weighted sum is exactly 0 for "sum", or as many positive as negative
  entries for "count") selects no source, and that entry keeps the base value (no division by zero, no NaN).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "linear", "task_arithmetic", "ties", "dare", "dare_mask", "slerp", "breadcrumbs", "model_stock",
  "magnitude_rank", "interpolate_layer_values",
]


# ----------------------------------------------------------------------------------------------------------------
# validation helpers (run outside jit)


def _concrete(x):
  """The value as a numpy array, or None when it is a tracer (validation is then skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _stack(tensors):
  if isinstance(tensors, (list, tuple)):
    if len(tensors) == 0:
      raise ValueError("need at least one model tensor, got an empty list")
    shapes = {tuple(jnp.shape(t)) for t in tensors}
    if len(shapes) != 1:
      raise ValueError(f"model tensors have mismatched shapes: {sorted(shapes)}")
    return jnp.stack([jnp.asarray(t) for t in tensors])
  tensors = jnp.asarray(tensors)
  if tensors.ndim == 0 or tensors.shape[0] == 0:
    raise ValueError(f"need a stacked [M, ...] array with M >= 1, got shape {tensors.shape}")
  return tensors


def _check_base(base, tensors):
  base = jnp.asarray(base)
  if tuple(tensors.shape[1:]) != tuple(base.shape):
    raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs model tensors {tuple(tensors.shape[1:])}")
  return base


def _per_model(value, m, name):
  """Broadcast a scalar or [M] parameter to shape [M]."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (m,))
  if value.shape != (m,):
    raise ValueError(f"{name} must be a scalar or have shape ({m},), got {value.shape}")
  return value


def _check_density(density):
  d = _concrete(density)
  if d is not None and (not np.all(np.isfinite(d)) or np.any(d <= 0) or np.any(d > 1)):
    raise ValueError(f"density must lie in (0, 1], got {d}")


def _compute_dtype(*arrays):
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _out_dtype(*arrays):
  dtype = jnp.result_type(*arrays)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


# ----------------------------------------------------------------------------------------------------------------
# shared pieces (traced)


@jax.jit
def magnitude_rank(deltas):
  """Per model, the rank of each element's |delta| in descending order (0 = largest), shape [M, *S].

  A stable sort breaks ties by flat index (lower index ranks first), which makes top-k selections exact and
  deterministic.
  """
  m = deltas.shape[0]
  flat = jnp.abs(deltas.reshape(m, -1))
  order = jnp.argsort(-flat, axis=-1, stable=True)
  n = flat.shape[1]
  ranks = jnp.zeros((m, n), jnp.int32)
  ranks = jax.vmap(lambda r, o: r.at[o].set(jnp.arange(n, dtype=jnp.int32)))(ranks, order)
  return ranks.reshape(deltas.shape)


def _count(fraction, n):
  """round(fraction * n) clipped to [0, n], per model, broadcastable against [M, *S]."""
  return jnp.clip(jnp.round(fraction.astype(jnp.float32) * n), 0, n).astype(jnp.int32)


def _expand(v, ndim):
  return v.reshape(v.shape + (1,) * (ndim - 1))


def _safe_divide(num, den):
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _sign_consensus(deltas, weights, majority, normalize):
  """TIES disjoint merge of already-sparsified deltas [M, *S] -> merged delta [*S]."""
  w = _expand(weights.astype(deltas.dtype), deltas.ndim)
  weighted = w * deltas
  if majority == "sum":
    elected = jnp.sign(weighted.sum(0))
  else:
    elected = jnp.sign(jnp.sign(weighted).sum(0))
  mask = (jnp.sign(weighted) == elected) & (elected != 0)
  num = jnp.where(mask, weighted, 0).sum(0)
  if not normalize:
    return num
  den = jnp.where(mask, w, 0).sum(0)
  return _safe_divide(num, den)


# ----------------------------------------------------------------------------------------------------------------
# kernels


@jax.jit(static_argnames=("normalize",))
def _linear(tensors, weights, normalize):
  ct = _compute_dtype(tensors)
  w = weights.astype(ct)
  out = jnp.tensordot(w, tensors.astype(ct), axes=1)
  if normalize:
    out = out / w.sum()
  return out.astype(_out_dtype(tensors))


def linear(tensors, weights, normalize=True):
  """Weighted average `sum_i w_i theta_i / sum_i w_i` (without the division when `normalize=False`)."""
  tensors = _stack(tensors)
  weights = _per_model(weights, tensors.shape[0], "weights")
  w = _concrete(weights)
  if normalize and w is not None and w.sum() == 0:
    raise ValueError("weights sum to zero; cannot normalize")
  return _linear(tensors, weights, normalize)


def _deltas(base, tensors):
  ct = _compute_dtype(base, tensors)
  return base.astype(ct), tensors.astype(ct) - base.astype(ct)[None]


@jax.jit(static_argnames=("normalize",))
def _task_arithmetic(base, tensors, weights, lambda_, normalize):
  b, d = _deltas(base, tensors)
  w = weights.astype(b.dtype)
  merged = jnp.tensordot(w, d, axes=1)
  if normalize:
    merged = _safe_divide(merged, w.sum())
  return (b + lambda_ * merged).astype(_out_dtype(base, tensors))


def task_arithmetic(base, tensors, weights, lambda_=1.0, *, normalize=False):
  """`theta_0 + lambda * sum_i w_i (theta_i - theta_0)` (divided by `sum_i w_i` when `normalize`)."""
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  weights = _per_model(weights, tensors.shape[0], "weights")
  return _task_arithmetic(base, tensors, weights, jnp.asarray(lambda_, jnp.float32), normalize)


def _check_majority(majority):
  if majority not in ("sum", "count"):
    raise ValueError(f"majority must be 'sum' or 'count', got {majority!r}")


@jax.jit(static_argnames=("majority", "normalize"))
def _ties(base, tensors, weights, density, lambda_, majority, normalize):
  b, d = _deltas(base, tensors)
  n = b.size
  keep = magnitude_rank(d) < _expand(_count(density, n), d.ndim)
  merged = _sign_consensus(jnp.where(keep, d, 0), weights, majority, normalize)
  return (b + lambda_ * merged).astype(_out_dtype(base, tensors))


def ties(base, tensors, weights, density, *, majority="sum", normalize=True, lambda_=1.0):
  """TIES-Merging: trim, elect sign, disjoint mean.

  Each delta keeps its `round(density * n)` largest-magnitude entries (ties at the threshold: lower flat index
  wins).  The sign is elected per element from the weighted trimmed deltas `u_i = w_i * delta_i`: `sign(sum_i u_i)`
  ("sum") or `sign(sum_i sign(u_i))` ("count").  Entries whose sign agrees are summed and, with `normalize`, divided
  by the summed weights of the agreeing entries.  Entries with no agreeing source (elected sign 0) keep the base.
  `density` is a scalar or one value per model.
  """
  _check_majority(majority)
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  m = tensors.shape[0]
  weights = _per_model(weights, m, "weights")
  density = _per_model(density, m, "density")
  _check_density(density)
  return _ties(base, tensors, weights, density, jnp.asarray(lambda_, jnp.float32), majority, normalize)


def dare_mask(key, density, shape):
  """Bernoulli keep mask [M, *S] for DARE: entry of model i kept with probability density_i.

  Model i draws from `jax.random.split(key, M)[i]`, so a model's mask does not depend on the other models' densities.
  """
  shape = tuple(shape)
  density = _per_model(density, shape[0], "density")
  _check_density(density)
  return _dare_mask(key, density, shape)


@jax.jit(static_argnames=("shape",))
def _dare_mask(key, density, shape):
  keys = jax.random.split(key, shape[0])
  return jax.vmap(lambda k, p: jax.random.bernoulli(k, p, shape[1:]))(keys, density)


@jax.jit(static_argnames=("rescale", "then", "majority", "normalize"))
def _dare(base, tensors, weights, density, key, lambda_, rescale, then, majority, normalize):
  b, d = _deltas(base, tensors)
  keep = _dare_mask(key, density, tensors.shape)
  d = jnp.where(keep, d, 0)
  if rescale:
    d = d / _expand(density.astype(d.dtype), d.ndim)
  if then == "linear":
    w = weights.astype(d.dtype)
    merged = jnp.tensordot(w, d, axes=1)
    if normalize:
      merged = _safe_divide(merged, w.sum())
  else:
    merged = _sign_consensus(d, weights, majority, normalize)
  return (b + lambda_ * merged).astype(_out_dtype(base, tensors))


def dare(base, tensors, weights, density, key, *, rescale=True, then="linear", majority="sum", normalize=None,
         lambda_=1.0):
  """DARE: drop each delta entry with probability 1 - density, rescale kept entries by 1/density.

  Then `then="linear"` is task arithmetic on the sparsified deltas (dare_linear; `normalize` defaults to False) and
  `then="ties"` is TIES sign election and disjoint mean without further trimming (dare_ties; `normalize` defaults to
  True).  The mask is exactly `dare_mask(key, density, tensors.shape)`.
  """
  if then not in ("linear", "ties"):
    raise ValueError(f"then must be 'linear' or 'ties', got {then!r}")
  _check_majority(majority)
  if normalize is None:
    normalize = then == "ties"
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  m = tensors.shape[0]
  weights = _per_model(weights, m, "weights")
  density = _per_model(density, m, "density")
  _check_density(density)
  return _dare(base, tensors, weights, density, key, jnp.asarray(lambda_, jnp.float32), rescale, then, majority,
               normalize)


@jax.jit
def _slerp(a, b, t, eps, dot_threshold):
  ct = _compute_dtype(a, b)
  va, vb = a.astype(ct).ravel(), b.astype(ct).ravel()
  na = va / jnp.maximum(jnp.linalg.norm(va), eps)
  nb = vb / jnp.maximum(jnp.linalg.norm(vb), eps)
  dot = jnp.clip(jnp.dot(na, nb), -1.0, 1.0)
  colinear = jnp.abs(dot) > dot_threshold
  omega = jnp.arccos(dot)
  sin_omega = jnp.where(colinear, 1.0, jnp.sin(omega))  # keep the unused branch finite
  t = t.astype(ct)
  spherical = (jnp.sin((1 - t) * omega) * va + jnp.sin(t * omega) * vb) / sin_omega
  lerp = (1 - t) * va + t * vb
  out = jnp.where(colinear, lerp, spherical)
  return out.reshape(a.shape).astype(_out_dtype(a, b))


def slerp(a, b, t, eps=1e-8, *, dot_threshold=0.9995):
  """Spherical interpolation between two tensors, treated as flattened vectors.

  The angle comes from unit-normalised copies (norms clamped below by `eps`), but the un-normalised tensors are
  interpolated, so t=0 gives `a` and t=1 gives `b`.  When `|cos angle| > dot_threshold` (nearly parallel or
  anti-parallel) sin(angle) is too small to divide by and the kernel falls back to `(1 - t) a + t b`.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
  return _slerp(a, b, jnp.asarray(t, jnp.float32), jnp.asarray(eps, jnp.float32),
                jnp.asarray(dot_threshold, jnp.float32))


@jax.jit(static_argnames=("normalize",))
def _breadcrumbs(base, tensors, weights, density, gamma, lambda_, normalize):
  b, d = _deltas(base, tensors)
  n = b.size
  rank = magnitude_rank(d)
  top = _expand(_count(gamma, n), d.ndim)
  keep = (rank >= top) & (rank < top + _expand(_count(density, n), d.ndim))
  w = weights.astype(d.dtype)
  merged = jnp.tensordot(w, jnp.where(keep, d, 0), axes=1)
  if normalize:
    merged = _safe_divide(merged, w.sum())
  return (b + lambda_ * merged).astype(_out_dtype(base, tensors))


def breadcrumbs(base, tensors, weights, density, gamma, *, lambda_=1.0, normalize=False):
  """Model Breadcrumbs: keep the middle magnitude band of each delta, then task arithmetic.

  Per model, ranks 0 .. round(gamma n) - 1 (the largest outliers) are dropped, the next round(density n) are kept
  and the rest (the smallest 1 - density - gamma fraction) are dropped.  Ties follow the stable magnitude rank.
  """
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  m = tensors.shape[0]
  weights = _per_model(weights, m, "weights")
  density = _per_model(density, m, "density")
  gamma = _per_model(gamma, m, "gamma")
  _check_density(density)
  g, dc = _concrete(gamma), _concrete(density)
  if g is not None and (np.any(g < 0) or np.any(g >= 1)):
    raise ValueError(f"gamma must lie in [0, 1), got {g}")
  if g is not None and dc is not None and np.any(dc + g > 1 + 1e-6):
    raise ValueError(f"density + gamma must not exceed 1, got {dc + g}")
  return _breadcrumbs(base, tensors, weights, density, gamma, jnp.asarray(lambda_, jnp.float32), normalize)


@jax.jit
def _model_stock(base, tensors, eps):
  b, d = _deltas(base, tensors)
  k = d.shape[0]
  flat = d.reshape(k, -1)
  unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), eps)
  gram = unit @ unit.T
  cos = (gram.sum() - jnp.trace(gram)) / (k * (k - 1))  # mean over ordered pairs i != j = mean over i < j
  t = k * cos / ((k - 1) * cos + 1)
  mean = tensors.astype(b.dtype).mean(0)
  return (t * mean + (1 - t) * b).astype(_out_dtype(base, tensors))


def model_stock(base, tensors, eps=1e-8):
  """Model Stock: `t = k cos / ((k - 1) cos + 1)`, `theta = t mean_i theta_i + (1 - t) theta_0`.

  cos is the mean pairwise cosine between the task vectors (norms clamped below by `eps`, so a zero delta counts as
  orthogonal).  Needs at least two models.
  """
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  if tensors.shape[0] < 2:
    raise ValueError(f"model_stock needs at least 2 models, got {tensors.shape[0]}")
  return _model_stock(base, tensors, jnp.asarray(eps, jnp.float32))


def interpolate_layer_values(values: Sequence[float] | float, num_layers: int) -> np.ndarray:
  """Per-layer values from a mergekit-style gradient.

  A list's anchors are spread evenly over layer indices 0 .. num_layers - 1 (first anchor at layer 0, last at the
  last layer) and interpolated piecewise-linearly; a single number (or a one-element list) is constant.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if np.ndim(values) == 0:
    return np.full(num_layers, float(values))
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError("values must be a number or a non-empty 1-D list")
  if values.size == 1 or num_layers == 1:
    return np.full(num_layers, values[0])
  anchors = np.linspace(0, num_layers - 1, values.size)
  return np.interp(np.arange(num_layers), anchors, values)
