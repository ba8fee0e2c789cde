"""ICGNN model and precoding pipeline: permutation and phase symmetry, exact power, padding, no inverse, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.icgnn import precoding as precoding_config
from jaxlab.icgnn import metrics
from jaxlab.icgnn.model import ICGNN, cellfree_powers, user_feature_dims
from jaxlab.icgnn.train import host_channels, icgnn_precoder, precoding_task

P, SIGMA2 = 10.0, 1.0


def model_for(precoder_stats=True, **kw):
  return ICGNN(*user_feature_dims(precoder_stats), 2, hidden=16, num_layers=2, rngs=nnx.Rngs(0), **kw)


def channels(b=4, k=6, n=8, seed=0):
  return {key: jnp.asarray(v) for key, v in host_channels(np.random.default_rng(seed), b, (k, k), (n, n), k, n).items()}


def forward(model, batch, cg_iters=8, **kw):
  return icgnn_precoder(model, batch, P, SIGMA2, cg_iters, rounds=kw.pop("rounds", 2),
                        precoder_stats=kw.pop("precoder_stats", True))


def sum_se(batch, W):
  return metrics.sum_se(batch["H"], W, SIGMA2, batch["user_mask"])


@pytest.mark.parametrize("aggregation", ["max", "max_mean"])
def test_permuting_users_permutes_the_precoder(aggregation):
  model = model_for(aggregation=aggregation)
  batch = channels()
  perm = np.random.default_rng(1).permutation(6)
  W = forward(model, batch)
  W_perm = forward(model, dict(batch, H=batch["H"][:, perm]))
  np.testing.assert_allclose(np.asarray(W_perm), np.asarray(W[:, :, perm]), atol=2e-5)


def test_permuting_antennas_and_user_phases_leaves_the_sum_rate_unchanged():
  model = model_for()
  batch = channels()
  base = sum_se(batch, forward(model, batch))
  perm = np.random.default_rng(2).permutation(8)
  phase = jnp.exp(1j * jnp.asarray(np.random.default_rng(3).uniform(0, 2 * np.pi, (4, 6, 1)), jnp.float32))
  moved = dict(batch, H=(batch["H"] * phase)[:, :, perm])
  np.testing.assert_allclose(np.asarray(sum_se(moved, forward(model, moved))), np.asarray(base), rtol=2e-5)


def test_total_power_is_exactly_p():
  batch = channels(k=5, n=5)
  W = forward(model_for(), batch)
  np.testing.assert_allclose(np.asarray(jnp.sum(jnp.abs(W)**2, axis=(1, 2))), P, rtol=1e-5)


def test_padded_users_and_antennas_change_nothing():
  model = model_for()
  small = channels(b=3, k=5, n=7, seed=4)
  padded = {"H": jnp.zeros((3, 8, 12), jnp.complex64).at[:, :5, :7].set(small["H"]),
            "user_mask": jnp.arange(8)[None].repeat(3, 0) < 5, "antenna_mask": jnp.arange(12)[None].repeat(3, 0) < 7}
  W_small = forward(model, small, cg_iters=5)
  W_pad = forward(model, padded, cg_iters=5)
  np.testing.assert_allclose(np.asarray(W_pad[:, :7, :5]), np.asarray(W_small), atol=2e-5)
  assert float(jnp.max(jnp.abs(W_pad[:, 7:]))) == 0.0 and float(jnp.max(jnp.abs(W_pad[:, :, 5:]))) == 0.0
  np.testing.assert_allclose(np.asarray(sum_se(padded, W_pad)), np.asarray(sum_se(small, W_small)), rtol=1e-5)


def primitives(jaxpr) -> set[str]:
  """Every primitive in a jaxpr, including those inside scans, jits and custom derivatives."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= primitives(inner)
  return names


def test_forward_pass_has_no_matrix_inverse_or_factorisation():
  model = model_for()
  batch = channels()
  graphdef, state = nnx.split(model)
  found = primitives(jax.make_jaxpr(lambda s, b: forward(nnx.merge(graphdef, s), b))(state, batch).jaxpr)
  assert "dot_general" in found and "scan" in found  # the walk sees the CG loop's body
  banned = {"lu", "cholesky", "triangular_solve", "qr", "eig", "eigh", "svd", "custom_linear_solve"}
  assert not found & banned, found & banned


def test_equal_outputs_give_rzf():
  """Zero network outputs give p = λ = P/K, the structure of RZF; with exact CG (T = K) that is RZF itself."""
  from jaxlab.icgnn import precoding
  batch = channels(k=6, n=8)
  model = model_for(precoder_stats=False)
  head = model.head.linear_2
  head.kernel[...] = jnp.zeros_like(head.kernel[...])
  head.bias[...] = jnp.zeros_like(head.bias[...])
  W = forward(model, batch, cg_iters=6, rounds=1, precoder_stats=False)
  W_rzf = precoding.rzf(batch["H"], P, SIGMA2, normalization="per_column")
  np.testing.assert_allclose(np.asarray(sum_se(batch, W)), np.asarray(sum_se(batch, W_rzf)), rtol=1e-4)


def test_training_raises_the_sum_rate_on_a_fixed_seed():
  """Loaded channels (K = N = 6), where RZF is far from optimal: 60 Adam steps must gain at least 10 %."""
  config = precoding_config.get_config("smoke")
  task, _ = precoding_task(config)
  model = task.init_model(jax.random.key(0))
  batch = channels(b=16, k=6, n=6)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: task.loss_fn(m, batch, jax.random.key(0))[0])(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(60)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 1.1 * losses[0], (losses[0], losses[-1])


def test_bad_system_config_is_a_clear_error():
  config = precoding_config.get_config("smoke")
  config.unlock()
  config.system.sigma2 = -1.0
  with pytest.raises(ValueError, match="sigma2"):
    precoding_task(config)


def test_cellfree_head_meets_every_ap_power_budget_exactly():
  from jaxlab import graph as jgraph
  rng = np.random.default_rng(0)
  graphs = []
  for n in (5, 7):
    nodes = {"x": rng.normal(size=(n, 3)).astype(np.float32), "ap": rng.integers(0, 3, n).astype(np.int32),
             "ue": np.arange(n, dtype=np.int32)}
    graphs.append(jgraph.GraphsTuple(nodes=nodes, edges={"x": np.zeros((0, 2), np.float32)},
                                     senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
                                     globals=None, n_node=np.array([n]), n_edge=np.array([0])))
  g = jgraph.pad_graphs(graphs, jgraph.Budget(nodes=16, edges=4, graphs=4))
  mask = jgraph.node_mask(g)
  out = jnp.asarray(rng.normal(size=(16, 2)) * 3, jnp.float32)
  rho = cellfree_powers(out, g, mask, num_aps=3, rho_max=200.0)
  ids = np.asarray(jgraph.node_graph_ids(g)) * 3 + np.asarray(g.nodes["ap"])
  totals = np.bincount(ids[np.asarray(mask)], weights=np.asarray(rho)[np.asarray(mask)], minlength=12)
  assert (totals <= 200.0 * (1 + 1e-6)).all() and (np.asarray(rho) >= 0).all()
  assert float(jnp.max(jnp.abs(rho[~mask]))) == 0.0
  # the per-AP share is a softmax: within one AP, the powers are proportional to exp(output 0)
  first = ids == ids[0]
  first &= np.asarray(mask)
  r = np.asarray(rho)[first]
  e = np.exp(np.asarray(out)[first, 0])
  np.testing.assert_allclose(r / r.sum(), e / e.sum(), rtol=1e-5)


@pytest.mark.parametrize("message_layers", [1, 2])
def test_fixed_degree_aggregation_equals_the_segment_ops(message_layers):
  from jaxlab.icgnn.model import user_graph
  model = model_for(precoder_stats=False, message_layers=message_layers, aggregation="max_mean")
  batch = channels(b=3, k=6, n=8)
  batch["user_mask"] = batch["user_mask"].at[1, 4:].set(False)  # a sample with padded users
  graph, node_mask, edge_mask = user_graph(batch["H"], P, SIGMA2, batch["user_mask"], batch["antenna_mask"])
  generic = model(graph, node_mask, edge_mask)
  fast = model(graph, node_mask, edge_mask, in_degree=5)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(generic), rtol=1e-5, atol=1e-6)
