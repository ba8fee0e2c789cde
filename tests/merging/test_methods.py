"""Merge kernels against independent numpy references (loops and np.sort, not the kernels)."""
import jax
import numpy as np
import pytest

from jaxlab.merging import methods

SHAPES = [(7,), (5, 6), (3, 4, 5)]
ATOL = 1e-5


def _models(shape, m=3, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape).astype(np.float32)
  tensors = (base + rng.normal(size=(m,) + shape)).astype(np.float32)
  weights = rng.uniform(0.2, 1.5, size=m).astype(np.float32)
  return base, tensors, weights


def _order(delta, descending):
  """Flat indices sorted by |delta| (descending or ascending), equal magnitudes by lower flat index first."""
  flat = np.abs(delta.ravel()).astype(np.float64)
  sign = -1 if descending else 1
  return sorted(range(flat.size), key=lambda i: (sign * flat[i], i))


def _topk_mask(delta, k):
  """Keep the k largest |delta| (ties: lower flat index first)."""
  mask = np.zeros(delta.size, bool)
  mask[_order(delta, True)[:k]] = True
  return mask.reshape(delta.shape)


def _ties_k(density, n):
  """mergekit's kept count: max(1, int(density * n)) in float64; all for density >= 1, none for density <= 0."""
  if density >= 1:
    return n
  if density <= 0:
    return 0
  return max(1, int(float(density) * n))


def _breadcrumbs_mask(delta, density, gamma):
  n = delta.size
  if density >= 1:
    return np.ones(delta.shape, bool)
  target, top = int(float(density) * n), int(float(gamma) * n)
  bot = max(0, n - target - top)
  mask = np.zeros(n, bool)
  mask[_order(delta, False)[bot:bot + target]] = True
  return mask.reshape(delta.shape)


def _l1_rescale(delta, sparse):
  before, after = np.abs(delta).sum(), np.abs(sparse).sum()
  return sparse if before < 1e-7 or after < 1e-7 else sparse * (before / after)


def _gta_ref(base, deltas, weights, majority, normalize, lambda_=1.0):
  """Generalized task arithmetic per element: weighted deltas, optional sign election (+1 on ties), normalisation."""
  deltas = np.asarray(deltas, np.float64)
  weights = np.asarray(weights, np.float64)
  out = np.zeros(base.shape)
  for idx in np.ndindex(base.shape):
    u = [weights[i] * deltas[(i,) + idx] for i in range(len(weights))]
    if majority is None:
      num, den = sum(u), sum(weights)
      den = 1.0 if abs(den) < 1e-8 else den
    else:
      votes = sum(u) if majority == "sum" else sum(np.sign(x) for x in u)
      s = 1.0 if votes >= 0 else -1.0
      agree = [i for i, x in enumerate(u) if np.sign(x) == s]
      num = sum(u[i] for i in agree)
      den = sum(weights[i] for i in agree) or 1.0
    out[idx] = num / den if normalize else num
  return base + lambda_ * out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
  _, tensors, w = _models(shape)
  ref = sum(w[i] * tensors[i].astype(np.float64) for i in range(len(w)))
  if normalize:
    ref = ref / w.astype(np.float64).sum()
  np.testing.assert_allclose(methods.linear(tensors, w, normalize=normalize), ref, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(shape, normalize):
  base, tensors, w = _models(shape, seed=1)
  ref = _gta_ref(base, tensors - base, w, None, normalize, lambda_=0.7)
  out = methods.task_arithmetic(base, tensors, w, lambda_=0.7, normalize=normalize)
  np.testing.assert_allclose(out, ref, atol=ATOL)
  # weights summing to (nearly) zero: the division is skipped
  w0 = np.array([1.0, -1.0, 0.0], np.float32)
  ref0 = _gta_ref(base, tensors - base, w0, None, True)
  np.testing.assert_allclose(methods.task_arithmetic(base, tensors, w0, normalize=True), ref0, atol=ATOL)


def test_list_input_equals_stacked():
  base, tensors, w = _models((5, 6), seed=11)
  as_list = [tensors[i] for i in range(3)]
  np.testing.assert_allclose(methods.ties(base, as_list, w, 0.4), methods.ties(base, tensors, w, 0.4), atol=1e-6)
  np.testing.assert_allclose(methods.linear(as_list, w), methods.linear(tensors, w), atol=1e-6)
  np.testing.assert_allclose(methods.model_stock(base, as_list), methods.model_stock(base, tensors), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("majority", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties(shape, majority, normalize):
  base, tensors, w = _models(shape, m=4, seed=2)
  density = np.array([0.3, 0.55, 0.8, 1.0], np.float32)
  n = base.size
  deltas = tensors - base
  trimmed = np.stack([np.where(_topk_mask(deltas[i], _ties_k(density[i], n)), deltas[i], 0) for i in range(4)])
  ref = _gta_ref(base, trimmed, w, majority, normalize)
  out = methods.ties(base, tensors, w, density, majority=majority, normalize=normalize)
  np.testing.assert_allclose(out, ref, atol=ATOL)


def test_ties_counts_truncate():
  # k = max(1, int(density * n)): 0.55 * 7 = 3.85 keeps 3 (not round's 4); 0.01 * 7 keeps 1; 0 keeps none
  base = np.zeros(7, np.float32)
  t = np.array([[7, -6, 5, -4, 3, 2, 1]], np.float32)
  np.testing.assert_array_equal(methods.ties(base, t, [1.0], 0.55), [7, -6, 5, 0, 0, 0, 0])
  np.testing.assert_array_equal(methods.ties(base, t, [1.0], 0.01), [7, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(methods.ties(base, t, [1.0], 0.0), base)
  # 0.7 * 10 is 7.0 in float64 but 6.9999995 in float32: the concrete path keeps 7
  t10 = np.arange(10, 0, -1, dtype=np.float32)[None]
  assert np.count_nonzero(methods.ties(np.zeros(10, np.float32), t10, [1.0], 0.7)) == 7


def test_ties_rescale_and_negative_weight():
  base, tensors, _ = _models((6, 5), m=3, seed=12)
  w = np.array([0.7, -1.3, 0.4], np.float32)
  n = base.size
  deltas = (tensors - base).astype(np.float64)
  sparse = np.stack([_l1_rescale(deltas[i], np.where(_topk_mask(deltas[i], _ties_k(0.35, n)), deltas[i], 0))
                     for i in range(3)])
  ref = _gta_ref(base, sparse, w, "sum", False, lambda_=1.2)
  out = methods.ties(base, tensors, w, 0.35, normalize=False, rescale=True, lambda_=1.2)
  np.testing.assert_allclose(out, ref, atol=ATOL)


def test_ties_threshold_ties_and_sign_ties():
  base = np.zeros(6, np.float32)
  # equal magnitudes: top-2 keeps the two lowest indices
  tensors = np.array([[1, -1, 1, -1, 1, 1]], np.float32)
  np.testing.assert_array_equal(methods.ties(base, tensors, [1.0], 2 / 6), [1, -1, 0, 0, 0, 0])
  # an exact tie in the vote elects +1: only the positive deltas are kept (no NaN)
  opposite = np.array([[2.0, 1.0, 0.0], [-2.0, -3.0, 0.0]], np.float32)
  np.testing.assert_array_equal(methods.ties(np.zeros(3, np.float32), opposite, [1.0, 1.0], 1.0), [2.0, -3.0, 0.0])
  out = methods.ties(np.zeros(3, np.float32), opposite, [1.0, 1.0], 1.0, majority="count")
  np.testing.assert_array_equal(out, [2.0, 1.0, 0.0])


def test_top_k_mask():
  rng = np.random.default_rng(13)
  d = np.round(rng.normal(size=(2, 9, 8)), 1).astype(np.float32)  # many equal magnitudes
  for k in (0, 1, 5, 30, 71, 72):
    ref = np.stack([_topk_mask(d[i], k) for i in range(2)])
    np.testing.assert_array_equal(methods.top_k_mask(d, k), ref)
    np.testing.assert_array_equal(methods.magnitude_rank(d) < k, ref)


def test_traced_coefficients_match_concrete():
  base, tensors, w = _models((8, 9), m=3, seed=14)
  dens = np.array([0.25, 0.5, 0.75], np.float32)
  fn = jax.jit(lambda w, d: methods.ties(base, tensors, w, d))
  np.testing.assert_array_equal(fn(w, dens), methods.ties(base, tensors, w, dens))
  fb = jax.jit(lambda w, d, g: methods.breadcrumbs(base, tensors, w, d, g))
  np.testing.assert_array_equal(fb(w, dens, 0.125), methods.breadcrumbs(base, tensors, w, dens, 0.125))


@pytest.mark.parametrize("then", ["linear", "ties"])
@pytest.mark.parametrize("rescale", [True, "density", False])
def test_dare(then, rescale):
  shape = (40, 50)
  base, tensors, w = _models(shape, m=3, seed=3)
  density = np.array([0.2, 0.5, 0.9], np.float32)
  key = jax.random.key(123)
  mask = np.asarray(methods.dare_mask(key, density, tensors.shape))
  for i, p in enumerate(density):
    assert abs(mask[i].mean() - p) < 0.05
  deltas = (tensors - base).astype(np.float64)
  sparse = np.where(mask, deltas, 0)
  if rescale is True:
    sparse = np.stack([_l1_rescale(deltas[i], sparse[i]) for i in range(3)])
  elif rescale == "density":
    sparse = sparse / density[:, None, None]
  out = np.asarray(methods.dare(base, tensors, w, density, key, then=then, rescale=rescale))
  ref = _gta_ref(base, sparse, w, None if then == "linear" else "sum", False)
  np.testing.assert_allclose(out, ref, atol=1e-4)
  normed = np.asarray(methods.dare(base, tensors, w, density, key, then=then, rescale=rescale, normalize=True))
  ref = _gta_ref(base, sparse, w, None if then == "linear" else "sum", True)
  np.testing.assert_allclose(normed, ref, atol=1e-4)


def test_dare_single_model_rescale():
  base, tensors, _ = _models((30, 20), m=1, seed=15)
  key = jax.random.key(5)
  mask0 = np.asarray(methods.dare_mask(key, [0.3], tensors.shape))[0]
  deltas = (tensors[0] - base).astype(np.float64)
  one = np.asarray(methods.dare(base, tensors, [1.0], 0.3, key))
  factor = np.abs(deltas).sum() / np.abs(deltas[mask0]).sum()
  np.testing.assert_allclose(one[mask0], (base + deltas * factor)[mask0], atol=1e-4)
  np.testing.assert_array_equal(one[~mask0], base[~mask0])
  no_rescale = np.asarray(methods.dare(base, tensors, [1.0], 0.3, key, rescale=False))
  np.testing.assert_allclose(no_rescale[mask0], tensors[0][mask0], atol=1e-5)


def _slerp_ref(a, b, t, eps=1e-8, threshold=0.9995):
  va, vb = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
  na, nb = np.linalg.norm(va), np.linalg.norm(vb)
  na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
  dot = np.clip(np.dot(va / na, vb / nb), -1, 1)
  if abs(dot) > threshold:
    return ((1 - t) * va + t * vb).reshape(a.shape)
  omega = np.arccos(dot)
  ca, cb = np.sin((1 - t) * omega) / np.sin(omega), np.sin(t * omega) / np.sin(omega)
  return (ca * va + cb * vb).reshape(a.shape)


def test_slerp():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(2, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(methods.slerp(a, b, 0.0), a, atol=ATOL)
  np.testing.assert_allclose(methods.slerp(a, b, 1.0), b, atol=ATOL)
  for t in (0.3, 0.8):
    np.testing.assert_allclose(methods.slerp(a, b, t), _slerp_ref(a, b, t), atol=ATOL)
  # colinear: b = 2a has sin(angle) = 0, the fallback is linear interpolation
  np.testing.assert_allclose(methods.slerp(a, 2 * a, 0.3), _slerp_ref(a, 2 * a, 0.3), atol=ATOL)
  assert np.all(np.isfinite(methods.slerp(a, -a, 0.3)))
  # a zero tensor has its norm replaced by 1 (cos = 0, spherical branch)
  zero = np.zeros_like(a)
  np.testing.assert_allclose(methods.slerp(zero, b, 0.3), _slerp_ref(zero, b, 0.3), atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,gamma", [(0.6, 0.15), (0.9, 0.2), (1.0, 0.3), (0.3, 0.0)])
def test_breadcrumbs(shape, density, gamma):
  base, tensors, w = _models(shape, seed=5)
  deltas = tensors - base
  sparse = np.stack([np.where(_breadcrumbs_mask(deltas[i], density, gamma), deltas[i], 0) for i in range(3)])
  ref = _gta_ref(base, sparse, w, None, False)
  np.testing.assert_allclose(methods.breadcrumbs(base, tensors, w, density, gamma), ref, atol=ATOL)
  ref = _gta_ref(base, sparse, w, "sum", False)
  np.testing.assert_allclose(methods.breadcrumbs(base, tensors, w, density, gamma, majority="sum"), ref, atol=ATOL)


def test_breadcrumbs_band():
  base = np.zeros(10, np.float32)
  t = np.arange(10, 0, -1, dtype=np.float32)[None]  # |delta| 10 .. 1
  # target 5, n_top 2: drop the two largest and the three smallest
  np.testing.assert_array_equal(methods.breadcrumbs(base, t, [1.0], 0.5, 0.2), [0, 0, 8, 7, 6, 5, 4, 0, 0, 0])
  # target 9 + n_top 3 > 10: the 9 smallest are kept
  np.testing.assert_array_equal(methods.breadcrumbs(base, t, [1.0], 0.9, 0.3), [0, 9, 8, 7, 6, 5, 4, 3, 2, 1])


def _model_stock_ref(base, tensors, rows=None):
  """rows: None for whole tensors, else the per-row reduction over the last axis."""
  k = len(tensors)
  e = [(t - base).astype(np.float64) for t in tensors]
  if rows is None:
    e = [x.reshape(1, -1) for x in e]
  else:
    e = [x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1) for x in e]
  cos = np.mean([np.clip(np.sum(e[i] * e[j], -1) / np.maximum(np.linalg.norm(e[i], axis=-1)
                                                                * np.linalg.norm(e[j], axis=-1), 1e-6), -1, 1)
                 for i in range(k) for j in range(i + 1, k)], axis=0)
  den = 1 + (k - 1) * cos
  t = np.where(np.abs(den) < 1e-6, 0, k * cos / np.where(np.abs(den) < 1e-6, 1, den))
  mean = tensors.astype(np.float64).mean(0)
  if rows is None or base.ndim == 1:
    return t[0] * mean + (1 - t[0]) * base
  t = t.reshape(base.shape[:-1] + (1,))
  return t * mean + (1 - t) * base


def test_model_stock_two_models():
  rng = np.random.default_rng(6)
  base = rng.normal(size=(4, 5)).astype(np.float32)
  d1, d2 = rng.normal(size=(2, 4, 5))
  d2 = 0.5 * d1 + d2  # positive correlation
  tensors = np.stack([base + d1, base + d2]).astype(np.float32)
  e1, e2 = (tensors - base).reshape(2, -1).astype(np.float64)
  cos = e1 @ e2 / np.linalg.norm(e1) / np.linalg.norm(e2)
  t = 2 * cos / (1 + cos)
  ref = t * tensors.astype(np.float64).mean(0) + (1 - t) * base
  np.testing.assert_allclose(methods.model_stock(base, tensors), ref, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_three_models(shape):
  base, tensors, _ = _models(shape, m=3, seed=7)
  np.testing.assert_allclose(methods.model_stock(base, tensors), _model_stock_ref(base, tensors), atol=ATOL)
  np.testing.assert_allclose(methods.model_stock(base, tensors, filter_wise=True),
                             _model_stock_ref(base, tensors, rows=True), atol=ATOL)


def test_model_stock_singular_keeps_base():
  base = np.zeros(4, np.float32)
  d = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
  tensors = np.stack([base + d, base - d])  # cos = -1: 1 + (k - 1) cos = 0
  np.testing.assert_array_equal(methods.model_stock(base, tensors), base)


def test_gradients():
  np.testing.assert_allclose(methods.interpolate_layer_values(0.4, 3), [0.4, 0.4, 0.4])
  np.testing.assert_allclose(methods.interpolate_layer_values([0.0, 1.0], 5), [0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(methods.interpolate_layer_values([0, 1, 0], 5), [0, 0.5, 1, 0.5, 0])
  np.testing.assert_allclose(methods.interpolate_layer_values([0.2], 2), [0.2, 0.2])
  np.testing.assert_allclose(methods.interpolate_layer_values([0, 0.5, 0.3, 0.7, 1], 5), [0, 0.5, 0.3, 0.7, 1])
  np.testing.assert_allclose(methods.interpolate_layer_values([0, 1], 4), [0, 1 / 3, 2 / 3, 1])
  # a one-layer slice sits at t = 1 and takes the last anchor; non-layer tensors sit at t = 0
  np.testing.assert_allclose(methods.interpolate_layer_values([0.1, 0.9], 1), [0.9])
  assert methods.gradient_value([0.1, 0.5, 0.9], 0.0) == 0.1
  assert methods.gradient_value([0.1, 0.5, 0.9], 0.75) == pytest.approx(0.7)
  assert methods.gradient_value(0.3, 0.5) == 0.3
  with pytest.raises(ValueError):
    methods.interpolate_layer_values([], 4)


def test_errors():
  base, tensors, w = _models((3, 4))
  with pytest.raises(ValueError, match="shape"):
    methods.task_arithmetic(base[:2], tensors, w)
  with pytest.raises(ValueError, match="mismatched"):
    methods.linear([tensors[0], tensors[0][:2]], [1.0, 1.0])
  with pytest.raises(ValueError, match="empty"):
    methods.linear([], [])
  with pytest.raises(ValueError, match="empty"):
    methods.model_stock(base, [])
  with pytest.raises(ValueError, match="weights"):
    methods.linear(tensors, [1.0, 2.0])
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="density"):
      methods.ties(base, tensors, w, bad)
    with pytest.raises(ValueError, match="density"):
      methods.breadcrumbs(base, tensors, w, bad, 0.0)
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="density"):
      methods.dare(base, tensors, w, bad, jax.random.key(0))
  with pytest.raises(ValueError, match="density"):
    methods.ties(base, tensors, w, [0.5, 0.5, 1.2])
  with pytest.raises(ValueError, match="gamma"):
    methods.breadcrumbs(base, tensors, w, 0.8, -0.3)
  with pytest.raises(ValueError, match="shape"):
    methods.slerp(base, base[:2], 0.5)
  with pytest.raises(ValueError, match="at least 2"):
    methods.model_stock(base, tensors[:1])
  with pytest.raises(ValueError, match="majority"):
    methods.ties(base, tensors, w, 0.5, majority="max")
  with pytest.raises(ValueError, match="rescale"):
    methods.ties(base, tensors, w, 0.5, rescale="l3")
