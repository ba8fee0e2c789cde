import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.common.fit import fit


def _problem(seed=0, n=64, d=5):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  w_true = rng.standard_normal(d).astype(np.float32)
  y = x @ w_true + 0.1 * rng.standard_normal(n).astype(np.float32)
  x_val = rng.standard_normal((n, d)).astype(np.float32)
  y_val = x_val @ w_true
  loss_fn = lambda w, key: jnp.mean((x @ w - y) ** 2)
  eval_fn = lambda w: {"val_mse": jnp.mean((x_val @ w - y_val) ** 2), "neg": -jnp.sum(w)}
  return x, y, loss_fn, eval_fn


def test_fit_reaches_least_squares_and_keeps_the_best_epoch():
  x, y, loss_fn, eval_fn = _problem()
  run = jax.jit(lambda w, k: fit(loss_fn, eval_fn, optax.adam(0.05), w, k, 300, select="val_mse", maximize=False))
  result = run(jnp.zeros(5), jax.random.key(0))
  w_ls = np.linalg.lstsq(x, y, rcond=None)[0]
  np.testing.assert_allclose(result.best_params, w_ls, atol=2e-2)
  history = np.asarray(result.history["val_mse"])
  best = int(np.argmin(history))
  assert int(result.best_metrics["epoch"]) == best
  assert float(result.best_metrics["val_mse"]) == pytest.approx(history[best])
  assert result.history["loss"][-1] < 0.1 * result.history["loss"][0]


def test_fit_under_vmap_equals_separate_runs():
  _, _, loss_fn, eval_fn = _problem(1)
  noisy = lambda w, key: loss_fn(w, key) + 0.1 * jnp.sum(w * jax.random.normal(key, w.shape))
  run = lambda w, k: fit(noisy, eval_fn, optax.sgd(0.05), w, k, 40, select="val_mse", maximize=False)
  inits = jax.random.normal(jax.random.key(1), (3, 5))
  keys = jax.random.split(jax.random.key(2), 3)
  batched = jax.jit(jax.vmap(run))(inits, keys)
  for i in range(3):
    single = jax.jit(run)(inits[i], keys[i])
    np.testing.assert_allclose(batched.best_params[i], single.best_params, rtol=1e-5, atol=1e-6)
    assert int(batched.best_metrics["epoch"][i]) == int(single.best_metrics["epoch"])


def test_fit_rejects_an_unknown_select_metric():
  _, _, loss_fn, eval_fn = _problem()
  with pytest.raises(ValueError, match="select='accuracy'"):
    fit(loss_fn, eval_fn, optax.sgd(0.1), jnp.zeros(5), jax.random.key(0), 3, select="accuracy")


def test_models_stacked_on_a_leading_axis_keep_their_own_best_epoch():
  _, _, loss_fn, eval_fn = _problem(2)
  noisy = lambda w, key: loss_fn(w, key) + 0.3 * jnp.sum(w * jax.random.normal(key, w.shape))
  run = lambda w, k, n: fit(noisy, eval_fn, optax.adam(0.05), w, k, n, select="val_mse", maximize=False)
  inits = jax.random.normal(jax.random.key(3), (3, 5))
  keys = jax.random.split(jax.random.key(4), 3)
  # three models as one stacked problem: summed losses, per-model metrics, one key per model
  stacked_loss = lambda ws, key: sum(noisy(ws[i], jax.random.fold_in(key, i)) for i in range(3))
  stacked_eval = lambda ws: jax.vmap(eval_fn)(ws)
  stacked = jax.jit(lambda w, k: fit(stacked_loss, stacked_eval, optax.adam(0.05), w, k, 60, select="val_mse",
                                     maximize=False))(inits, keys[0])
  epochs = np.asarray(stacked.best_metrics["epoch"])
  history = np.asarray(stacked.history["val_mse"])  # [epochs, models]
  np.testing.assert_array_equal(epochs, np.argmin(history, axis=0))
  for i in range(3):
    assert float(stacked.best_metrics["val_mse"][i]) == pytest.approx(history[epochs[i], i])
  assert len(set(epochs.tolist())) > 1 or np.ptp(history[-1]) > 0
