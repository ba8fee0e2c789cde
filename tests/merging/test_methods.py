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


def _topk_mask(delta, k, skip=0):
  """Keep ranks skip .. skip+k-1 of |delta| (descending; ties: lower flat index first)."""
  flat = np.abs(delta.ravel()).astype(np.float64)
  order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
  mask = np.zeros(flat.size, bool)
  mask[order[skip:skip + k]] = True
  return mask.reshape(delta.shape)


def _ties_ref(base, deltas, weights, majority, normalize):
  deltas = deltas.astype(np.float64)
  out = np.zeros(base.shape)
  for idx in np.ndindex(base.shape):
    u = [weights[i] * deltas[(i,) + idx] for i in range(len(weights))]
    if majority == "sum":
      s = np.sign(sum(u))
    else:
      s = np.sign(sum(np.sign(x) for x in u))
    num = den = 0.0
    for i, x in enumerate(u):
      if s != 0 and np.sign(x) == s:
        num += x
        den += weights[i]
    out[idx] = (num / den if den else 0.0) if normalize else num
  return base + out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
  _, tensors, w = _models(shape)
  ref = sum(w[i] * tensors[i].astype(np.float64) for i in range(len(w)))
  if normalize:
    ref = ref / w.astype(np.float64).sum()
  np.testing.assert_allclose(methods.linear(tensors, w, normalize=normalize), ref, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(shape):
  base, tensors, w = _models(shape, seed=1)
  ref = base + 0.7 * sum(w[i] * (tensors[i] - base) for i in range(len(w)))
  np.testing.assert_allclose(methods.task_arithmetic(base, tensors, w, lambda_=0.7), ref, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("majority", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties(shape, majority, normalize):
  base, tensors, w = _models(shape, m=4, seed=2)
  density = np.array([0.3, 0.55, 0.8, 1.0], np.float32)
  n = base.size
  deltas = tensors - base
  trimmed = np.stack([np.where(_topk_mask(deltas[i], int(np.round(density[i] * n))), deltas[i], 0)
                      for i in range(4)])
  ref = _ties_ref(base, trimmed, w, majority, normalize)
  out = methods.ties(base, tensors, w, density, majority=majority, normalize=normalize)
  np.testing.assert_allclose(out, ref, atol=ATOL)


def test_ties_threshold_ties_and_zero_sign():
  base = np.zeros(6, np.float32)
  # equal magnitudes: top-2 keeps the two lowest indices
  tensors = np.array([[1, -1, 1, -1, 1, 1]], np.float32)
  np.testing.assert_array_equal(methods.ties(base, tensors, [1.0], 2 / 6), [1, -1, 0, 0, 0, 0])
  # opposite deltas with equal weights cancel: elected sign 0 keeps the base value (no NaN)
  opposite = np.array([[2.0, 1.0], [-2.0, -3.0]], np.float32)
  out = methods.ties(np.zeros(2, np.float32), opposite, [1.0, 1.0], 1.0, majority="count")
  np.testing.assert_array_equal(out, [0.0, 0.0])


@pytest.mark.parametrize("then", ["linear", "ties"])
def test_dare(then):
  shape = (40, 50)
  base, tensors, w = _models(shape, m=3, seed=3)
  density = np.array([0.2, 0.5, 0.9], np.float32)
  key = jax.random.key(123)
  mask = np.asarray(methods.dare_mask(key, density, tensors.shape))
  for i, p in enumerate(density):
    assert abs(mask[i].mean() - p) < 0.05
  deltas = (tensors - base).astype(np.float64)
  sparse = np.where(mask, deltas, 0) / density[:, None, None]
  out = np.asarray(methods.dare(base, tensors, w, density, key, then=then))
  if then == "linear":
    ref = base + sum(w[i] * sparse[i] for i in range(3))
  else:
    ref = _ties_ref(base, sparse, w, "sum", True)
  np.testing.assert_allclose(out, ref, atol=1e-4)
  # rescaling: a single model with unit weight keeps exactly delta / density on kept entries, base elsewhere
  one = np.asarray(methods.dare(base, tensors[:1], [1.0], density[:1], key))
  mask0 = np.asarray(methods.dare_mask(key, density[:1], tensors[:1].shape))[0]
  np.testing.assert_allclose(one[mask0], (base + deltas[0] / density[0])[mask0], atol=1e-4)
  np.testing.assert_array_equal(one[~mask0], base[~mask0])
  no_rescale = np.asarray(methods.dare(base, tensors[:1], [1.0], density[:1], key, rescale=False))
  np.testing.assert_allclose(no_rescale[mask0], tensors[0][mask0], atol=1e-5)


def test_slerp():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(2, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(methods.slerp(a, b, 0.0), a, atol=ATOL)
  np.testing.assert_allclose(methods.slerp(a, b, 1.0), b, atol=ATOL)
  va, vb = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
  omega = np.arccos(np.dot(va / np.linalg.norm(va), vb / np.linalg.norm(vb)))
  t = 0.3
  ref = (np.sin((1 - t) * omega) * va + np.sin(t * omega) * vb) / np.sin(omega)
  np.testing.assert_allclose(np.asarray(methods.slerp(a, b, t)).ravel(), ref, atol=ATOL)
  # colinear: b = 2a has sin(angle) = 0, the fallback is linear interpolation
  np.testing.assert_allclose(methods.slerp(a, 2 * a, t), (1 - t) * a + t * 2 * a, atol=ATOL)
  assert np.all(np.isfinite(methods.slerp(a, -a, t)))


@pytest.mark.parametrize("shape", SHAPES)
def test_breadcrumbs(shape):
  base, tensors, w = _models(shape, seed=5)
  density, gamma = 0.6, 0.15
  n = base.size
  deltas = tensors - base
  ref = base.astype(np.float64)
  for i in range(len(w)):
    keep = _topk_mask(deltas[i], int(np.round(density * n)), skip=int(np.round(gamma * n)))
    ref = ref + w[i] * np.where(keep, deltas[i], 0)
  np.testing.assert_allclose(methods.breadcrumbs(base, tensors, w, density, gamma), ref, atol=ATOL)


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


def test_model_stock_three_models():
  base, tensors, _ = _models((6, 3), m=3, seed=7)
  e = (tensors - base).reshape(3, -1).astype(np.float64)
  cosines = [e[i] @ e[j] / np.linalg.norm(e[i]) / np.linalg.norm(e[j]) for i in range(3) for j in range(i + 1, 3)]
  cos = np.mean(cosines)
  t = 3 * cos / (2 * cos + 1)
  ref = t * tensors.astype(np.float64).mean(0) + (1 - t) * base
  np.testing.assert_allclose(methods.model_stock(base, tensors), ref, atol=ATOL)


def test_interpolate_layer_values():
  np.testing.assert_allclose(methods.interpolate_layer_values(0.4, 3), [0.4, 0.4, 0.4])
  np.testing.assert_allclose(methods.interpolate_layer_values([0.0, 1.0], 5), [0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(methods.interpolate_layer_values([0, 1, 0], 5), [0, 0.5, 1, 0.5, 0])
  np.testing.assert_allclose(methods.interpolate_layer_values([0.2], 2), [0.2, 0.2])
  np.testing.assert_allclose(methods.interpolate_layer_values([0, 0.5, 0.3, 0.7, 1], 5), [0, 0.5, 0.3, 0.7, 1])
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
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="density"):
      methods.ties(base, tensors, w, bad)
    with pytest.raises(ValueError, match="density"):
      methods.dare(base, tensors, w, bad, jax.random.key(0))
    with pytest.raises(ValueError, match="density"):
      methods.breadcrumbs(base, tensors, w, bad, 0.0)
  with pytest.raises(ValueError, match="density"):
    methods.ties(base, tensors, w, [0.5, 0.5, 1.2])
  with pytest.raises(ValueError, match="gamma"):
    methods.breadcrumbs(base, tensors, w, 0.8, 0.3)
  with pytest.raises(ValueError, match="shape"):
    methods.slerp(base, base[:2], 0.5)
  with pytest.raises(ValueError, match="at least 2"):
    methods.model_stock(base, tensors[:1])
  with pytest.raises(ValueError, match="majority"):
    methods.ties(base, tensors, w, 0.5, majority="max")
