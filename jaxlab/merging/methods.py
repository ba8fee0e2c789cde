"""Homogeneous model-merging kernels with mergekit 0.1.5 semantics, one tensor at a time.

A merge tool streams tensor by tensor, so every kernel takes the versions of ONE tensor: `base` with shape `S` and
`tensors`, either stacked with shape `[M, *S]` or a list of M arrays of shape `S` (M source models; a list is not
copied into a stacked buffer).  Arithmetic runs in (at least) float32 because fine-tuning
deltas are tiny relative to the weights and a bf16 subtraction destroys them; the result is cast back to the input
dtype.

Weights, densities, `lambda_`, `t` and `gamma` are traced arguments, so an evolutionary search that changes them per
candidate reuses the compiled kernel; only the flags (`majority`, `normalize`, `rescale`, `then`, `filter_wise`) are
static.  The public functions validate shapes and, when the values are concrete (not traced), their ranges, then call
the jitted kernels.

Semantics (mergekit 0.1.5, checked against its source):
- linear: `sum_i w_i theta_i / sum_i w_i` (`normalize` defaults to True; no guard for a zero weight sum).
- task arithmetic, TIES, DARE and breadcrumbs share one form.  Each delta `delta_i = theta_i - theta_0` is sparsified
  (optionally rescaled), multiplied by its weight, `u_i = w_i delta_i`, optionally sign-elected, summed and, with
  `normalize`, divided: without sign election by `sum_i w_i` (replaced by 1 when `|sum_i w_i| < 1e-8`), with sign
  election by `sum_i w_i [i agrees]` per element (replaced by 1 where it is 0).  Finally `theta_0 + lambda * merged`.
  Defaults for `normalize`: task_arithmetic False, ties True, dare_ties / dare_linear False, breadcrumbs False.
- sign election on the weighted deltas: `sum` elects +1 where `sum_i u_i >= 0`, else -1; `count` elects +1 where
  `sum_i sign(u_i) >= 0`, else -1.  An exact tie therefore elects +1; source i agrees where `sign(u_i)` equals the
  elected sign (zero entries never agree).  Where no source agrees the merged delta is 0 (base value kept).
- TIES magnitude trimming keeps `k = max(1, floor(density * n))` entries per delta (density >= 1 keeps all,
  density <= 0 keeps none); the product is taken in float64 on the host when the density is concrete.
- breadcrumbs (magnitude_outliers) sorts |delta| ascending and keeps positions `n_bot .. n_bot + target - 1` with
  `target = floor(density * n)`, `n_top = floor(gamma * n)`, `n_bot = max(0, n - target - n_top)`; so when
  `density + gamma > 1` fewer outliers are removed.  density >= 1 keeps the delta unchanged (gamma is ignored).
- rescale (`rescale=True` or "l1"; also "l2", "linf"): the sparsified delta is scaled so that its norm matches the
  dense delta's norm, unless either norm is below 1e-7.  This is mergekit's DARE rescaling (not 1/density); the DARE
  paper's `1/density` is available as `rescale="density"`.
- slerp: both tensors flattened; norms below `eps` are replaced by 1; `cos = <a/|a|, b/|b|>` clipped to [-1, 1];
  where `|cos| > dot_threshold` (0.9995) the coefficients are `1 - t`, `t`, else `sin((1-t) W)/sin W`, `sin(t W)/sin W`
  with `W = arccos(cos)`; the result is `c_a a + c_b b`.  mergekit's base model is `a` (t = 0 gives the base).
- model_stock: per pair of task vectors `cos_ij = <d_i, d_j> / max(|d_i| |d_j|, 1e-6)` clipped to [-1, 1], cos =
  mean over pairs i < j, `t = k cos / (1 + (k - 1) cos)` (t = 0 where `|1 + (k - 1) cos| < 1e-6`), result
  `t * (sum_i theta_i / k) + (1 - t) theta_0`.  `filter_wise` computes one t per row (reduction over the last axis).
- gradients (per-layer parameter lists): see `gradient_value` / `interpolate_layer_values`.

Where results are not bit-identical to mergekit:
- Ties at the magnitude threshold.  mergekit selects with torch's unstable argsort/sort, whose order among equal
  magnitudes is unspecified (it varies with the thread split).  Here the choice is deterministic: TIES keeps the
  lower flat index among equal magnitudes at the threshold, and breadcrumbs, ranking ascending, places the lower
  flat index first (so among equal magnitudes at the lower cut it drops the lower index first).  Outputs can
  differ only at entries whose |delta| equals the threshold magnitude exactly.
- Compute dtype.  mergekit computes linear and slerp in float32, but task arithmetic, TIES, DARE, breadcrumbs and
  model_stock in the inputs' (promoted) dtype, or the config's `dtype:`.  These kernels always compute in at least
  float32, so float32 inputs agree to float rounding (summation order), while bfloat16/float16 inputs are more
  accurate here than in mergekit unless the mergekit config sets `dtype: float32`.
- Traced densities/gammas (an outer jit, e.g. an evolutionary search) have their kept counts computed in float32
  inside the trace, which can differ by one element from the float64 count for tensors with more than 2^24 entries
  or densities whose float32 product lands just below an integer.
- DARE draws its Bernoulli masks from JAX's PRNG, so masks (not the semantics) differ from torch's.

Exact top-k selection is sort-free: the k-th largest key is found by a 32-step bitwise search over the float32 bit
patterns of |delta| (monotone for non-negative floats), then entries above it are kept and the remaining quota is
filled from the entries equal to it in flat-index order.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "linear", "task_arithmetic", "ties", "dare", "dare_mask", "slerp", "breadcrumbs", "model_stock",
  "magnitude_rank", "top_k_mask", "gradient_value", "interpolate_layer_values",
]

_RESCALE_EPS = 1e-7
_RESCALES = (None, "l1", "l2", "linf", "density")


# ----------------------------------------------------------------------------------------------------------------
# validation helpers (run outside jit)


def _concrete(x):
  """The value as a numpy array, or None when it is a tracer (validation is then skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _stack(tensors):
  """Model tensors as a stacked [M, *S] array, or a tuple of M arrays [*S] when given a list (never copied into one
  stacked buffer, which would cost a copy of every model's tensor)."""
  if isinstance(tensors, (list, tuple)):
    if len(tensors) == 0:
      raise ValueError("need at least one model tensor, got an empty list")
    shapes = {tuple(jnp.shape(t)) for t in tensors}
    if len(shapes) != 1:
      raise ValueError(f"model tensors have mismatched shapes: {sorted(shapes)}")
    return tuple(jnp.asarray(t) for t in tensors)
  tensors = jnp.asarray(tensors)
  if tensors.ndim == 0 or tensors.shape[0] == 0:
    raise ValueError(f"need a stacked [M, ...] array with M >= 1, got shape {tensors.shape}")
  return tensors


def _num_models(tensors):
  return len(tensors) if isinstance(tensors, tuple) else tensors.shape[0]


def _model_shape(tensors):
  return tuple(tensors[0].shape if isinstance(tensors, tuple) else tensors.shape[1:])


def _parts(tensors):
  """The M per-model arrays (traced or not)."""
  return list(tensors) if isinstance(tensors, tuple) else [tensors[i] for i in range(tensors.shape[0])]


def _task_vector_inputs(base, tensors, weights):
  """Validated (base, tensors, number of models, per-model weights) of a task-vector method."""
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  m = _num_models(tensors)
  return base, tensors, m, _per_model(weights, m, "weights")


def _check_base(base, tensors):
  base = jnp.asarray(base)
  if _model_shape(tensors) != tuple(base.shape):
    raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs model tensors {_model_shape(tensors)}")
  return base


def _per_model(value, m, name):
  """Broadcast a scalar or [M] parameter to shape [M] (float32)."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (m,))
  if value.shape != (m,):
    raise ValueError(f"{name} must be a scalar or have shape ({m},), got {value.shape}")
  return value


def _per_model_host(value, m, name):
  """The parameter as a float64 [M] numpy array when concrete, else None."""
  v = _concrete(value)
  if v is None:
    return None
  v = np.asarray(v, np.float64)
  if v.ndim == 0:
    return np.full(m, float(v))
  if v.shape != (m,):
    raise ValueError(f"{name} must be a scalar or have shape ({m},), got {v.shape}")
  return v


def _check_range(value, name, lo, hi, lo_open):
  d = _concrete(value)
  if d is None:
    return
  d = np.asarray(d, np.float64)
  below = d <= lo if lo_open else d < lo
  if not np.all(np.isfinite(d)) or np.any(below) or np.any(d > hi):
    raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {d}")


def _check_rescale(rescale):
  if rescale is True:
    return "l1"
  if rescale is False:
    return None
  if rescale not in _RESCALES:
    raise ValueError(f"rescale must be a bool or one of {_RESCALES}, got {rescale!r}")
  return rescale


def _check_majority(majority):
  if majority not in ("sum", "count"):
    raise ValueError(f"majority must be 'sum' or 'count', got {majority!r}")


def _flat_arrays(arrays):
  return [x for a in arrays for x in (a if isinstance(a, tuple) else (a,))]


def _compute_dtype(*arrays):
  return jnp.promote_types(jnp.result_type(*_flat_arrays(arrays)), jnp.float32)


def _out_dtype(*arrays):
  dtype = jnp.result_type(*_flat_arrays(arrays))
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


# ----------------------------------------------------------------------------------------------------------------
# kept counts (mergekit: Python int() of a float64 product)


def _ties_counts(density, m, n):
  """`max(1, floor(density * n))`, n for density >= 1, 0 for density <= 0; int32 [M]."""
  d = _per_model_host(density, m, "density")
  if d is not None:
    k = np.where(d >= 1, n, np.where(d <= 0, 0, np.maximum(1, np.floor(d * n))))
    return jnp.asarray(k.astype(np.int64), jnp.int32)
  d = _per_model(density, m, "density")
  k = jnp.where(d >= 1, n, jnp.where(d <= 0, 0, jnp.maximum(1, jnp.floor(d * n))))
  return k.astype(jnp.int32)


def _breadcrumb_bounds(density, gamma, m, n):
  """Ascending-rank window `[n_bot, n_bot + target)` per model (the whole tensor for density >= 1); int32 [2, M]."""
  d, g = _per_model_host(density, m, "density"), _per_model_host(gamma, m, "gamma")
  if d is not None and g is not None:
    target, top = np.floor(d * n), np.floor(g * n)
    bot = np.maximum(0, n - target - top)
    lo, hi = np.where(d >= 1, 0, bot), np.where(d >= 1, n, bot + target)
    return jnp.asarray(np.stack([lo, hi]).astype(np.int64), jnp.int32)
  d, g = _per_model(density, m, "density"), _per_model(gamma, m, "gamma")
  target, top = jnp.floor(d * n), jnp.floor(g * n)
  bot = jnp.maximum(0, n - target - top)
  lo, hi = jnp.where(d >= 1, 0, bot), jnp.where(d >= 1, n, bot + target)
  return jnp.stack([lo, hi]).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# shared pieces (traced)


@jax.jit
def magnitude_rank(deltas):
  """Per model, the rank of each element's |delta| in descending order (0 = largest), shape [M, *S].

  A stable sort breaks ties by flat index (lower index ranks first).  `top_k_mask(deltas, k)` equals
  `magnitude_rank(deltas) < k` without sorting.
  """
  m = deltas.shape[0]
  flat = jnp.abs(deltas.reshape(m, -1))
  order = jnp.argsort(-flat, axis=-1, stable=True)
  n = flat.shape[1]
  ranks = jnp.zeros((m, n), jnp.int32)
  ranks = jax.vmap(lambda r, o: r.at[o].set(jnp.arange(n, dtype=jnp.int32)))(ranks, order)
  return ranks.reshape(deltas.shape)


def _magnitude_keys(x):
  """|x| as uint32 keys whose integer order is the order of the magnitudes (float32 bit patterns)."""
  mag = jnp.abs(x.astype(jnp.float32)).ravel()
  return jax.lax.bitcast_convert_type(mag, jnp.uint32)


def _largest_k(keys, k):
  """Mask of exactly `clip(k, 0, n)` entries of the 1-D uint32 `keys`: the largest, ties by lower index first."""
  k = jnp.asarray(k, jnp.int32)

  def step(i, v):
    cand = v | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(keys >= cand, dtype=jnp.int32) >= k, cand, v)

  thr = jax.lax.fori_loop(0, 32, step, jnp.uint32(0))  # the largest v with #(keys >= v) >= k
  above = keys > thr
  equal = keys == thr
  need = k - jnp.sum(above, dtype=jnp.int32)
  n_equal = jnp.sum(equal, dtype=jnp.int32)
  take = jax.lax.cond(need >= n_equal, lambda: equal, lambda: _first_n(equal, need))
  return above | take


def _first_n(mask, count):
  """The first `count` True entries of the 1-D bool `mask` (a bitwise search over the cut index, no cumsum)."""
  n = mask.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)
  bits = max(1, int(n).bit_length())

  def step(i, v):
    cand = v | (jnp.int32(1) << (bits - 1 - i))
    return jnp.where(jnp.sum(mask & (index < cand), dtype=jnp.int32) < count, cand, v)

  cut = jax.lax.fori_loop(0, bits, step, jnp.int32(0))  # the largest v with #(mask[:v]) < count
  return mask & (index <= cut)


def top_k_mask(deltas, k):
  """Per model, keep exactly k_i largest-|delta| entries (ties at the threshold: lower flat index first).

  `deltas` has shape [M, *S], `k` is an int or [M] ints; returns a bool mask [M, *S].
  """
  deltas = jnp.asarray(deltas)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (deltas.shape[0],))
  return _top_k_mask(deltas, k)


@jax.jit
def _top_k_mask(deltas, k):
  masks = [_largest_k(_magnitude_keys(deltas[i]), k[i]) for i in range(deltas.shape[0])]
  return jnp.stack(masks).reshape(deltas.shape)


def _smallest_k(keys, k):
  """Mask of the `k` smallest keys; among equal keys the lower index counts as smaller."""
  return _largest_k(~keys, k)


def _expand(v, ndim):
  return v.reshape(v.shape + (1,) * (ndim - 1))


def _norm(x, kind):
  a = jnp.abs(x)
  if kind == "l1":
    return a.sum()
  if kind == "l2":
    return jnp.sqrt(jnp.sum(a * a))
  return a.max()


def _rescaled(delta, mask, rescale, density):
  """One model's masked delta, rescaled as selected (see the module docstring)."""
  masked = jnp.where(mask, delta, 0)
  if rescale is None:
    return masked
  if rescale == "density":
    return masked / density.astype(delta.dtype)
  before, after = _norm(delta, rescale), _norm(masked, rescale)
  ok = (before >= _RESCALE_EPS) & (after >= _RESCALE_EPS)
  return jnp.where(ok, masked * (before / jnp.where(ok, after, 1)), masked)


def _msum(xs):
  """Sum over the model axis as a chain of adds (XLA:CPU reduces a leading axis far more slowly), in model order."""
  out = xs[0]
  for x in xs[1:]:
    out = out + x
  return out


def _combine(base, deltas, weights, lambda_, majority, normalize, out_dtype):
  """mergekit's generalized task arithmetic on a list of M sparsified deltas [*S] -> merged tensor."""
  w = weights.astype(base.dtype)
  weighted = [d * w[i] for i, d in enumerate(deltas)]
  if majority is None:
    merged = _msum(weighted)
    if normalize:
      den = _msum([w[i] for i in range(len(deltas))])
      merged = merged / jnp.where(jnp.abs(den) < 1e-8, 1, den)
  else:
    signs = [jnp.sign(u) for u in weighted]
    votes = _msum(weighted) if majority == "sum" else _msum(signs)
    elected = jnp.where(votes >= 0, 1, -1).astype(base.dtype)
    masks = [s == elected for s in signs]
    merged = _msum([jnp.where(m, u, 0) for m, u in zip(masks, weighted)])
    if normalize:
      den = _msum([jnp.where(m, w[i], 0) for i, m in enumerate(masks)])
      merged = merged / jnp.where(den == 0, 1, den)
  return (base + lambda_ * merged).astype(out_dtype)


def _deltas(base, tensors):
  """The base in the compute dtype and the list of the M deltas."""
  ct = _compute_dtype(base, tensors)
  b = base.astype(ct)
  return b, [x.astype(ct) - b for x in _parts(tensors)]


# ----------------------------------------------------------------------------------------------------------------
# kernels


@jax.jit(static_argnames=("normalize",))
def _linear(tensors, weights, normalize):
  ct = _compute_dtype(tensors)
  w = weights.astype(ct)
  out = jnp.zeros(_model_shape(tensors), ct)
  for i, x in enumerate(_parts(tensors)):
    out = out + x.astype(ct) * w[i]
  if normalize:
    out = out / w.sum()
  return out.astype(_out_dtype(tensors))


def linear(tensors, weights, normalize=True):
  """Weighted average `sum_i w_i theta_i / sum_i w_i` (without the division when `normalize=False`)."""
  tensors = _stack(tensors)
  weights = _per_model(weights, _num_models(tensors), "weights")
  w = _concrete(weights)
  if normalize and w is not None and w.sum() == 0:
    raise ValueError("weights sum to zero; cannot normalize")
  return _linear(tensors, weights, normalize)


@jax.jit(static_argnames=("normalize",))
def _task_arithmetic(base, tensors, weights, lambda_, normalize):
  b, d = _deltas(base, tensors)
  return _combine(b, d, weights, lambda_.astype(b.dtype), None, normalize, _out_dtype(base, tensors))


def task_arithmetic(base, tensors, weights, lambda_=1.0, *, normalize=False):
  """`theta_0 + lambda * sum_i w_i (theta_i - theta_0)`; with `normalize` the sum is divided by `sum_i w_i`
  (by 1 when `|sum_i w_i| < 1e-8`)."""
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  weights = _per_model(weights, _num_models(tensors), "weights")
  return _task_arithmetic(base, tensors, weights, jnp.asarray(lambda_, jnp.float32), normalize)


@jax.jit(static_argnames=("majority", "normalize", "rescale"))
def _ties(base, tensors, weights, counts, density, lambda_, majority, normalize, rescale):
  b, d = _deltas(base, tensors)
  d = [_rescaled(x, _largest_k(_magnitude_keys(x), counts[i]).reshape(x.shape), rescale, density[i])
       for i, x in enumerate(d)]
  return _combine(b, d, weights, lambda_.astype(b.dtype), majority, normalize, _out_dtype(base, tensors))


def ties(base, tensors, weights, density, *, majority="sum", normalize=True, lambda_=1.0, rescale=False):
  """TIES-Merging: trim, elect sign, disjoint mean (mergekit `ties`; `majority="count"` is its `consensus: count`).

  Each delta keeps its `max(1, floor(density * n))` largest-magnitude entries (ties at the threshold: lower flat
  index first; density >= 1 keeps all, 0 keeps none).  The sign is elected per element from the weighted trimmed
  deltas `u_i = w_i * delta_i`: +1 where `sum_i u_i >= 0` ("sum") or `sum_i sign(u_i) >= 0` ("count"), else -1.
  Agreeing entries are summed and, with `normalize`, divided by the summed weights of the agreeing entries (1 where
  none agrees).  `density` is a scalar or one value per model.
  """
  _check_majority(majority)
  rescale = _check_rescale(rescale)
  base, tensors, m, weights = _task_vector_inputs(base, tensors, weights)
  _check_range(density, "density", 0, 1, lo_open=False)
  counts = _ties_counts(density, m, base.size)
  return _ties(base, tensors, weights, counts, _per_model(density, m, "density"),
               jnp.asarray(lambda_, jnp.float32), majority, normalize, rescale)


def dare_mask(key, density, shape):
  """Bernoulli keep mask [M, *S] for DARE: entry of model i kept with probability density_i.

  Model i draws from `jax.random.split(key, M)[i]`, so a model's mask does not depend on the other models' densities.
  """
  shape = tuple(shape)
  density = _per_model(density, shape[0], "density")
  _check_range(density, "density", 0, 1, lo_open=True)
  return _dare_mask(key, density, shape)


@jax.jit(static_argnames=("shape",))
def _dare_mask(key, density, shape):
  keys = jax.random.split(key, shape[0])
  return jax.vmap(lambda k, p: jax.random.bernoulli(k, p, shape[1:]))(keys, density)


@jax.jit(static_argnames=("rescale", "majority", "normalize"))
def _dare(base, tensors, weights, density, key, lambda_, rescale, majority, normalize):
  b, d = _deltas(base, tensors)
  keep = _dare_mask(key, density, (len(d),) + b.shape)
  d = [_rescaled(x, keep[i], rescale, density[i]) for i, x in enumerate(d)]
  return _combine(b, d, weights, lambda_.astype(b.dtype), majority, normalize, _out_dtype(base, tensors))


def dare(base, tensors, weights, density, key, *, rescale=True, then="linear", majority="sum", normalize=None,
         lambda_=1.0):
  """DARE: drop each delta entry with probability 1 - density, rescale, then merge (mergekit dare_linear/dare_ties).

  `rescale=True` (mergekit) scales each sparsified delta so its L1 norm matches the dense delta's; "density" divides
  kept entries by density (the DARE paper); False keeps them as they are.  Then `then="linear"` is task arithmetic
  on the sparsified deltas (dare_linear) and `then="ties"` adds sign election and the disjoint sum without further
  trimming (dare_ties).  `normalize` defaults (None) to mergekit's False for both.  The mask is exactly
  `dare_mask(key, density, (M, *S))`.
  """
  if then not in ("linear", "ties"):
    raise ValueError(f"then must be 'linear' or 'ties', got {then!r}")
  _check_majority(majority)
  rescale = _check_rescale(rescale)
  normalize = bool(normalize)
  base, tensors, m, weights = _task_vector_inputs(base, tensors, weights)
  density = _per_model(density, m, "density")
  _check_range(density, "density", 0, 1, lo_open=True)
  return _dare(base, tensors, weights, density, key, jnp.asarray(lambda_, jnp.float32), rescale,
               majority if then == "ties" else None, normalize)


@jax.jit
def _slerp(a, b, t, eps, dot_threshold):
  ct = _compute_dtype(a, b)
  va, vb = a.astype(ct).ravel(), b.astype(ct).ravel()
  na, nb = jnp.linalg.norm(va), jnp.linalg.norm(vb)
  na = jnp.where(na > eps, na, 1)
  nb = jnp.where(nb > eps, nb, 1)
  dot = jnp.clip(jnp.sum((va / na) * (vb / nb)), -1.0, 1.0)
  colinear = jnp.abs(dot) > dot_threshold
  omega = jnp.arccos(jnp.where(colinear, 0, dot))
  sin_omega = jnp.where(colinear, 1, jnp.sin(omega))  # keep the unused branch finite
  t = t.astype(ct)
  ca = jnp.where(colinear, 1 - t, jnp.sin((1 - t) * omega) / sin_omega)
  cb = jnp.where(colinear, t, jnp.sin(t * omega) / sin_omega)
  return (ca * va + cb * vb).reshape(a.shape).astype(_out_dtype(a, b))


def slerp(a, b, t, eps=1e-8, *, dot_threshold=0.9995):
  """Spherical interpolation between two tensors, treated as flattened vectors (`a` is mergekit's base model).

  The angle comes from unit-normalised copies (a norm not above `eps` is replaced by 1), but the un-normalised
  tensors are interpolated, so t=0 gives `a` and t=1 gives `b`.  When `|cos angle| > dot_threshold` (nearly parallel
  or anti-parallel) the kernel falls back to `(1 - t) a + t b`.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
  return _slerp(a, b, jnp.asarray(t, jnp.float32), jnp.asarray(eps, jnp.float32),
                jnp.asarray(dot_threshold, jnp.float32))


@jax.jit(static_argnames=("normalize", "rescale", "majority"))
def _breadcrumbs(base, tensors, weights, bounds, density, lambda_, normalize, rescale, majority):
  b, d = _deltas(base, tensors)
  kept = []
  for i, x in enumerate(d):
    keys = _magnitude_keys(x)
    keep = _smallest_k(keys, bounds[1, i]) & ~_smallest_k(keys, bounds[0, i])
    kept.append(_rescaled(x, keep.reshape(x.shape), rescale, density[i]))
  return _combine(b, kept, weights, lambda_.astype(b.dtype), majority, normalize,
                  _out_dtype(base, tensors))


def breadcrumbs(base, tensors, weights, density, gamma=0.01, *, lambda_=1.0, normalize=False, rescale=False,
                majority=None):
  """Model Breadcrumbs (mergekit `breadcrumbs`; `majority="sum"` gives `breadcrumbs_ties`).

  Per model, with `target = floor(density n)` and `n_top = floor(gamma n)`: the `n_top` largest magnitudes (the
  outliers) are dropped, the next `target` are kept and the rest dropped; when `target + n_top > n` the smallest
  `target` are kept (fewer outliers dropped).  density >= 1 keeps the whole delta.  Then task arithmetic, or the
  TIES sign election with `majority`.
  """
  if majority is not None:
    _check_majority(majority)
  rescale = _check_rescale(rescale)
  base, tensors, m, weights = _task_vector_inputs(base, tensors, weights)
  _check_range(density, "density", 0, 1, lo_open=False)
  _check_range(gamma, "gamma", 0, 1, lo_open=False)
  bounds = _breadcrumb_bounds(density, gamma, m, base.size)
  return _breadcrumbs(base, tensors, weights, bounds, _per_model(density, m, "density"),
                      jnp.asarray(lambda_, jnp.float32), normalize, rescale, majority)


@jax.jit(static_argnames=("filter_wise",))
def _model_stock(base, tensors, filter_wise):
  b, d = _deltas(base, tensors)
  k = len(d)
  if filter_wise:
    rows = [x.reshape(1, -1) if x.ndim == 1 else x for x in d]
  else:
    rows = [x.reshape(-1) for x in d]
  norms = [jnp.linalg.norm(r, axis=-1) for r in rows]
  cosines = []
  for i in range(k):
    for j in range(i + 1, k):
      dot = jnp.sum(rows[i] * rows[j], axis=-1)
      cosines.append(jnp.clip(dot / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1))
  cos = _msum(cosines) / len(cosines)
  den = 1 + (k - 1) * cos
  singular = jnp.abs(den) < 1e-6
  t = jnp.where(singular, 0, k * cos / jnp.where(singular, 1, den))
  if filter_wise and b.ndim > 1:
    t = t[..., None]
  mean = _msum([x.astype(b.dtype) for x in _parts(tensors)]) / k
  return (t * mean + (1 - t) * b).astype(_out_dtype(base, tensors))


def model_stock(base, tensors, *, filter_wise=False):
  """Model Stock: `t = k cos / (1 + (k - 1) cos)`, `theta = t mean_i theta_i + (1 - t) theta_0`.

  cos is the mean pairwise cosine between the task vectors, each `<d_i, d_j> / max(|d_i| |d_j|, 1e-6)` clipped to
  [-1, 1]; where `|1 + (k - 1) cos| < 1e-6` t is 0 (base kept).  `filter_wise` computes cos and t per row (over the
  last axis; a 1-D tensor is one row).  Needs at least two models besides the base.
  """
  tensors = _stack(tensors)
  base = _check_base(base, tensors)
  if _num_models(tensors) < 2:
    raise ValueError(f"model_stock needs at least 2 models, got {_num_models(tensors)}")
  return _model_stock(base, tensors, bool(filter_wise))


def gradient_value(values: Sequence[float] | float, t: float) -> float:
  """A mergekit gradient's value at position `t` in [0, 1].

  Anchors sit at `t = j / (L - 1)`; with `s = t (L - 1)`, `i0 = floor(s)`, `i1 = min(L - 1, i0 + 1)` the value is
  `(1 - (s - i0)) v[i0] + (s - i0) v[i1]` (float64, the same operations as mergekit).  A number is constant.
  """
  if np.ndim(values) == 0:
    return float(values)
  values = [float(v) for v in values]
  if not values:
    raise ValueError("values must be a number or a non-empty list")
  scaled = t * (len(values) - 1)
  i0 = int(scaled)
  i1 = min(len(values) - 1, i0 + 1)
  frac = scaled - i0
  return (1 - frac) * values[i0] + frac * values[i1]


def interpolate_layer_values(values: Sequence[float] | float, num_layers: int) -> np.ndarray:
  """Per-layer values of a mergekit gradient over a slice of `num_layers` layers.

  Layer `i` sits at `t = i / (num_layers - 1)` (t = 1 for a single layer, which therefore takes the LAST anchor),
  evaluated with `gradient_value`.  With `models:` the slice is the whole model; with `slices:` each output slice
  has its own 0..1 range.  Non-layer tensors (embeddings, final norm, lm_head) are evaluated at t = 0, i.e. they get
  the FIRST anchor `gradient_value(values, 0.0)`.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if np.ndim(values) != 0:
    arr = np.asarray(values, np.float64)
    if arr.ndim != 1 or arr.size == 0:
      raise ValueError("values must be a number or a non-empty 1-D list")
  if num_layers == 1:
    return np.array([gradient_value(values, 1.0)])
  return np.array([gradient_value(values, i / (num_layers - 1)) for i in range(num_layers)])
