import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import graph as jg

NUM_SEGMENTS = 6


def reference(op, data, ids, valid, num_segments, empty_value=0.0):
  """Plain per-segment loops over the valid rows."""
  out = np.full((num_segments,) + data.shape[1:], empty_value, np.float64)
  for s in range(num_segments):
    rows = data[(ids == s) & valid].astype(np.float64)
    if len(rows):
      out[s] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0)}[op]
    elif op != "max":
      out[s] = 0.0
  return out


def reference_softmax(logits, ids, valid, num_segments):
  out = np.zeros(logits.shape, np.float64)
  for s in range(num_segments):
    rows = (ids == s) & valid
    if rows.any():
      z = logits[rows].astype(np.float64)
      z = np.exp(z - z.max(0))
      out[rows] = z / z.sum(0)
  return out


@pytest.fixture
def padded_edges():
  """Edges into 6 segments: 4 and 5 get no valid entry; excluded rows are huge, or point at a real
  segment while masked, or carry the -1 / out-of-range ids of a neighbour search."""
  rng = np.random.default_rng(0)
  ids = np.array([0, 0, 1, 2, 2, 2, 3, 0, 4, -1, 6, 1, 5], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0], bool)
  data = rng.normal(size=(13, 3)).astype(np.float32)
  data[~mask | (ids < 0) | (ids >= NUM_SEGMENTS)] = 3e38
  valid = mask & (ids >= 0) & (ids < NUM_SEGMENTS)
  return data, ids, mask, valid


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_segment_reduction_matches_numpy(padded_edges, op):
  data, ids, mask, valid = padded_edges
  fn = {"sum": jg.segment_sum, "mean": jg.segment_mean, "max": jg.segment_max}[op]
  got = jax.jit(fn, static_argnums=2)(data, ids, NUM_SEGMENTS, mask)
  np.testing.assert_allclose(got, reference(op, data, ids, valid, NUM_SEGMENTS), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got)[4:], 0.0)


def test_segment_max_empty_value_and_all_negative_segments():
  data = np.array([-5.0, -7.0, -1.0], np.float32)
  segment_max = jax.jit(jg.segment_max, static_argnums=(2, 4))
  got = segment_max(data, np.array([0, 0, 2], np.int32), 4, None, -1.5)
  np.testing.assert_array_equal(got, [-5.0, -1.5, -1.0, -1.5])
  ints = segment_max(np.array([3, -9], np.int32), np.array([1, 1], np.int32), 3, None, 0)
  np.testing.assert_array_equal(ints, [0, 3, 0])


def test_segment_ops_without_mask_drop_only_out_of_range_ids():
  data = np.arange(1.0, 6.0, dtype=np.float32)
  ids = np.array([0, 1, -1, 1, 3], np.int32)
  both = jax.jit(lambda x, i: (jg.segment_sum(x, i, 3), jg.segment_mean(x, i, 3)))(data, ids)
  np.testing.assert_array_equal(both[0], [1.0, 6.0, 0.0])
  np.testing.assert_array_equal(both[1], [1.0, 3.0, 0.0])


def test_segment_softmax_matches_numpy_and_sums_to_one(padded_edges):
  data, ids, mask, valid = padded_edges
  logits = data * np.where(valid, np.float32(50.0), np.float32(1.0))[:, None]  # large but finite
  got = np.asarray(jax.jit(jg.segment_softmax, static_argnums=2)(logits, ids, NUM_SEGMENTS, mask))
  np.testing.assert_allclose(got, reference_softmax(logits, ids, valid, NUM_SEGMENTS), atol=1e-6)
  assert np.all(got[~valid] == 0)
  totals = reference("sum", got, ids, valid, NUM_SEGMENTS)
  nonempty = np.isin(np.arange(NUM_SEGMENTS), ids[valid])
  np.testing.assert_allclose(totals[nonempty], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(totals[~nonempty], 0.0)


def test_segment_softmax_is_stable_for_extreme_logits():
  logits = np.array([1e4, 1e4 - 1, -1e4, -1e4 - 2], np.float32)
  got = jax.jit(jg.segment_softmax, static_argnums=2)(logits, np.array([0, 0, 1, 1], np.int32), 2)
  e1, e2 = 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-2.0))
  np.testing.assert_allclose(got, [e1, 1 - e1, e2, 1 - e2], rtol=1e-5)


def test_gradients_are_finite_and_skip_excluded_rows(padded_edges):
  data, ids, mask, valid = padded_edges
  data = np.where(valid[:, None], data, np.float32(1e30))
  weights = np.random.default_rng(1).normal(size=(NUM_SEGMENTS, 3)).astype(np.float32)

  def loss(x):
    total = jnp.sum(jg.segment_sum(x, ids, NUM_SEGMENTS, mask) * weights)
    total += jnp.sum(jg.segment_mean(x, ids, NUM_SEGMENTS, mask) * weights)
    total += jnp.sum(jg.segment_max(x, ids, NUM_SEGMENTS, mask) * weights)
    soft = jg.segment_softmax(x, ids, NUM_SEGMENTS, mask)
    return total + jnp.sum(jg.segment_sum(soft * x, ids, NUM_SEGMENTS, mask))

  grads = np.asarray(jax.jit(jax.grad(loss))(data))
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[~valid], 0.0)


def test_segment_ops_reject_bad_inputs():
  data = jnp.ones((4, 2))
  ids = jnp.array([0, 1, 1, 2])
  with pytest.raises(ValueError, match="one id per row"):
    jg.segment_sum(data, ids[:3], 3)
  with pytest.raises(ValueError, match="mask must be bool"):
    jg.segment_sum(data, ids, 3, mask=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="integers"):
    jg.segment_sum(data, ids.astype(jnp.float32), 3)
  with pytest.raises(ValueError, match="static Python int"):
    jax.jit(lambda n: jg.segment_sum(data, ids, n))(3)
