import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.agnn import layers as L
from jaxlab.agnn import model as M
from jaxlab.agnn.space import ACTIVATIONS, AGGREGATORS, ATTENTIONS, LayerArch
from jaxlab.graph import edge_mask, node_mask

NUM_NODES = 7
IN_DIM = 5


def random_edges(rng, num_nodes, num_edges):
  """Distinct directed edges without self-loops."""
  pairs = [(s, r) for s in range(num_nodes) for r in range(num_nodes) if s != r]
  chosen = rng.choice(len(pairs), num_edges, replace=False)
  senders, receivers = np.array([pairs[c] for c in chosen]).T
  return senders, receivers


@pytest.fixture(scope="module")
def small():
  rng = np.random.default_rng(0)
  senders, receivers = random_edges(rng, NUM_NODES, 15)
  graph = M.prepare_graph(senders, receivers, NUM_NODES, edge_multiple=8)
  x = rng.normal(size=(NUM_NODES, IN_DIM)).astype(np.float32)
  loops = np.arange(NUM_NODES)
  return dict(graph=graph, x=x, x_padded=M.pad_node_array(x, graph),
              senders=np.concatenate([senders, loops]), receivers=np.concatenate([receivers, loops]))


def perturbed_params(layer, in_dim, concat, seed=1):
  """Initial parameters plus noise, so that zero-initialised biases also take part in the comparison."""
  params = L.init_layer(jax.random.key(seed), in_dim, layer, concat=concat)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (np.asarray(p) + 0.3 * rng.normal(size=p.shape)).astype(np.float32), params)


# ----- the plain numpy reference: explicit loops over nodes, edges and heads -----

def _np_act(name, x):
  return {"sigmoid": lambda: 1 / (1 + np.exp(-x)), "tanh": lambda: np.tanh(x), "relu": lambda: np.maximum(x, 0),
          "linear": lambda: x, "softplus": lambda: np.log1p(np.exp(x)),
          "leaky_relu": lambda: np.where(x > 0, x, 0.01 * x), "relu6": lambda: np.clip(x, 0, 6),
          "elu": lambda: np.where(x > 0, x, np.expm1(np.minimum(x, 0)))}[name]()


def _np_mlp(p, v):
  return np.maximum(v @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]


def _lrelu(v):
  return v if v > 0 else 0.2 * v


def reference_layer(params, layer, senders, receivers, num_nodes, h, concat, graphnas_compat=False):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(h, np.float64)
  heads, hidden = layer.heads, layer.hidden
  z = (h @ p["weight"]).reshape(num_nodes, heads, hidden)
  edges = list(zip(senders, receivers))
  degree = [sum(1 for _, r in edges if r == i) for i in range(num_nodes)]
  score = np.zeros((len(edges), heads))
  for e, (j, i) in enumerate(edges):
    for k in range(heads):
      zi, zj = z[i, k], z[j, k]
      if layer.attention == "const":
        score[e, k] = 1.0
      elif layer.attention == "gcn":
        score[e, k] = 1.0 / np.sqrt(degree[i] * degree[j])
      else:
        al, ar = p["att_l"][k], p["att_r"][k]
        if layer.attention == "gat":
          score[e, k] = _lrelu(al @ zi + ar @ zj)
        elif layer.attention == "gat_sym":
          score[e, k] = _lrelu(al @ zi + ar @ zj) + _lrelu(al @ zj + ar @ zi)
        elif layer.attention == "cos":
          score[e, k] = np.sum(zi * al * zj * ar)
        elif layer.attention == "linear":
          score[e, k] = np.tanh(al @ (zj if graphnas_compat else zi) + ar @ zj)
        else:
          score[e, k] = p["att_g"] @ np.tanh(al * zi + ar * zj)
  alpha = score.copy()
  if layer.attention not in ("const", "gcn"):
    for i in range(num_nodes):
      in_edges = [e for e, (_, r) in enumerate(edges) if r == i]
      for k in range(heads):
        ex = np.exp([score[e, k] for e in in_edges])
        for e, w in zip(in_edges, ex / ex.sum()):
          alpha[e, k] = w
  agg = np.zeros((num_nodes, heads, hidden))
  for i in range(num_nodes):
    in_edges = [e for e, (_, r) in enumerate(edges) if r == i]
    for k in range(heads):
      msgs = [alpha[e, k] * z[edges[e][0], k] for e in in_edges]
      if layer.aggregator == "sum":
        agg[i, k] = np.sum(msgs, 0)
      elif layer.aggregator == "mean":
        agg[i, k] = np.mean([_np_mlp(p["pool"], m) for m in msgs], 0)
      elif layer.aggregator == "max":
        agg[i, k] = np.max([_np_mlp(p["pool"], m) for m in msgs], 0)
      else:
        agg[i, k] = _np_mlp(p["pool"], np.sum(msgs, 0))
  out = agg.reshape(num_nodes, -1) if concat else agg.mean(1)
  out = out + p["bias"]
  if layer.combine == "mlp":
    out = _np_mlp(p["combine"], out)
  if layer.skip == "identity":
    out = out + (h @ p["skip"]["weight"] if "skip" in p else h)
  return _np_act(layer.activation, out)


def run_layer(params, layer, graph, x, concat, **kwargs):
  fn = jax.jit(functools.partial(L.apply_layer, layer=layer, concat=concat, **kwargs))
  return np.asarray(fn(params, graph=graph, h=x))


def check_against_reference(small, layer, concat, in_dim=IN_DIM, x=None, graphnas_compat=False):
  x = small["x"] if x is None else x
  params = perturbed_params(layer, in_dim, concat)
  got = run_layer(params, layer, small["graph"], M.pad_node_array(x, small["graph"]), concat,
                  graphnas_compat=graphnas_compat)
  assert got.shape == (NUM_NODES + 1, L.output_dim(layer, concat=concat))
  want = reference_layer(params, layer, small["senders"], small["receivers"], NUM_NODES, x, concat,
                         graphnas_compat)
  np.testing.assert_allclose(got[:NUM_NODES], want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("attention,aggregator", list(itertools.product(ATTENTIONS, AGGREGATORS)))
def test_layer_matches_numpy_reference(small, attention, aggregator):
  for concat in (True, False):
    check_against_reference(small, LayerArch(attention, aggregator, "linear", heads=2, hidden=3), concat)


def test_graphnas_compat_linear(small):
  layer = LayerArch("linear", "sum", "linear", heads=2, hidden=3)
  check_against_reference(small, layer, True, graphnas_compat=True)
  params = perturbed_params(layer, IN_DIM, True)
  intended = run_layer(params, layer, small["graph"], small["x_padded"], True)
  compat = run_layer(params, layer, small["graph"], small["x_padded"], True, graphnas_compat=True)
  assert not np.allclose(intended, compat)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(small, activation):
  check_against_reference(small, LayerArch("gat", "sum", activation, heads=2, hidden=3), True)


def test_combine_mlp_and_skips(small):
  check_against_reference(small, LayerArch("gat_sym", "mean", "elu", heads=2, hidden=4, combine="mlp"), True)
  check_against_reference(small, LayerArch("cos", "max", "tanh", heads=4, hidden=3, combine="mlp",
                                           skip="identity"), False)
  # The same width: a plain residual, no skip parameters.
  same = LayerArch("gcn", "sum", "relu", heads=1, hidden=IN_DIM, skip="identity")
  assert "skip" not in L.init_layer(jax.random.key(0), IN_DIM, same, concat=True)
  check_against_reference(small, same, True)
  # Different widths: a projection.
  wide = LayerArch("generalized_linear", "mlp", "softplus", heads=6, hidden=2, skip="identity")
  assert L.init_layer(jax.random.key(0), IN_DIM, wide, concat=True)["skip"]["weight"].shape == (IN_DIM, 12)
  check_against_reference(small, wide, True)


def test_parameter_layout():
  expect_att = {"const": set(), "gcn": set(), "gat": {"att_l", "att_r"}, "gat_sym": {"att_l", "att_r"},
                "cos": {"att_l", "att_r"}, "linear": {"att_l", "att_r"},
                "generalized_linear": {"att_l", "att_r", "att_g"}}
  for attention, att_keys in expect_att.items():
    params = L.init_layer(jax.random.key(0), 10, LayerArch(attention, "sum", heads=4, hidden=6), concat=True)
    assert set(params) == {"weight", "bias"} | att_keys
    assert params["weight"].shape == (10, 24) and params["bias"].shape == (24,)
    assert not np.any(np.asarray(params["bias"]))
    for name in att_keys - {"att_g"}:
      assert params[name].shape == (4, 6)
  params = L.init_layer(jax.random.key(0), 10, LayerArch("gat", "max", heads=4, hidden=6, combine="mlp",
                                                         skip="identity"), concat=False)
  assert set(params) == {"weight", "bias", "att_l", "att_r", "pool", "combine", "skip"}
  assert jax.tree.map(jnp.shape, params["pool"]) == {"w1": (6, 128), "b1": (128,), "w2": (128, 6), "b2": (6,)}
  assert jax.tree.map(jnp.shape, params["combine"]) == {"w1": (6, 6), "b1": (6,), "w2": (6, 6), "b2": (6,)}
  # The classic GAT on Cora has 92,373 parameters; its weights are Glorot-uniform.
  gat = (LayerArch("gat", "sum", "elu", 8, 8), LayerArch("gat", "sum", "linear", 1, 7))
  params = gnn_init(gat, 1433)(jax.random.key(0))
  assert M.num_params(params) == 92373
  weight, limit = np.asarray(params[0]["weight"]), np.sqrt(6 / (1433 + 64))
  assert np.abs(weight).max() <= limit and abs(weight.std() - limit / np.sqrt(3)) < 0.02 * limit
  assert abs(weight.mean()) < 0.01 * limit


# ----- graph preparation and padding -----

def test_prepare_graph_adds_one_self_loop_per_node():
  graph = M.prepare_graph([0, 1, 2, 2], [1, 0, 2, 0], 4, edge_multiple=16, node_multiple=8)
  assert graph.senders.shape == (16,) and M.padded_num_nodes(graph) == 8
  real = np.asarray(edge_mask(graph))
  pairs = sorted(zip(graph.senders[real].tolist(), graph.receivers[real].tolist()))
  assert pairs == sorted([(0, 1), (1, 0), (2, 0), (0, 0), (1, 1), (2, 2), (3, 3)])
  mask = M.pad_node_array(np.ones(4, bool), graph)
  assert mask.dtype == bool and mask.tolist() == [True] * 4 + [False] * 4
  np.testing.assert_array_equal(mask, np.asarray(node_mask(graph, 8)))
  with pytest.raises(ValueError, match="one row per real node"):
    M.pad_node_array(np.ones(5), graph)
  with pytest.raises(ValueError, match="receivers must lie in"):
    M.prepare_graph([0], [4], 4)
  with pytest.raises(ValueError, match="padded nodes"):
    L.apply_layer(L.init_layer(jax.random.key(0), 3, LayerArch(), concat=True), LayerArch(), graph,
                  jnp.ones((4, 3)), concat=True)


GNN = (LayerArch("gat_sym", "mean", "elu", heads=2, hidden=4, combine="mlp"),
       LayerArch("gcn", "max", "relu", heads=2, hidden=4, skip="identity"),
       LayerArch("cos", "sum", "tanh", heads=4, hidden=5, skip="identity"),
       LayerArch("generalized_linear", "mlp", "linear", heads=2, hidden=3))


@functools.cache
def gnn_fn(layers=GNN, **kwargs):
  """A jitted forward, one per configuration, so that tests share compilations."""
  return jax.jit(functools.partial(M.apply_gnn, layers=layers, **kwargs))


@functools.cache
def gnn_init(layers=GNN, in_dim=IN_DIM):
  return jax.jit(functools.partial(M.init_gnn, layers=layers, in_dim=in_dim))


def test_permutation_equivariance():
  rng = np.random.default_rng(3)
  n = 9
  senders, receivers = random_edges(rng, n, 25)
  x = rng.normal(size=(n, IN_DIM)).astype(np.float32)
  params = gnn_init()(jax.random.key(4))
  graph = M.prepare_graph(senders, receivers, n, edge_multiple=16)
  out = np.asarray(gnn_fn()(params, graph=graph, x=M.pad_node_array(x, graph)))[:n]
  perm = rng.permutation(n)  # new node k is old node perm[k]
  new_index = np.argsort(perm)
  order = rng.permutation(len(senders))  # the edge order must not matter either
  graph_p = M.prepare_graph(new_index[senders][order], new_index[receivers][order], n, edge_multiple=16)
  out_p = np.asarray(gnn_fn()(params, graph=graph_p, x=M.pad_node_array(x[perm], graph_p)))[:n]
  np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-5)


def test_padding_changes_nothing(small):
  params = gnn_init()(jax.random.key(5))
  senders, receivers = small["senders"][:-NUM_NODES], small["receivers"][:-NUM_NODES]
  outputs = []
  for edge_multiple, node_multiple, fill in ((1, 1, np.nan), (64, 16, 1e30)):
    graph = M.prepare_graph(senders, receivers, NUM_NODES, edge_multiple=edge_multiple, node_multiple=node_multiple)
    x = M.pad_node_array(small["x"], graph)
    x[NUM_NODES:] = fill  # padded rows must not reach the real nodes
    out = np.asarray(gnn_fn()(params, graph=graph, x=x))
    assert np.all(np.isfinite(out))  # including the isolated padding nodes of the larger budget
    outputs.append(out[:NUM_NODES])
  assert M.padded_num_nodes(graph) == 16 and graph.senders.shape == (64,)
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["gat", "gat_sym", "cos", "linear", "generalized_linear"])
def test_softmax_sums_to_one_per_receiver(attention):
  rng = np.random.default_rng(6)
  senders, receivers = random_edges(rng, 6, 12)
  graph = M.prepare_graph(senders, receivers, 6, edge_multiple=32, node_multiple=4)
  layer = LayerArch(attention, "sum", heads=2, hidden=4)
  params = perturbed_params(layer, IN_DIM, True)
  z = jnp.asarray(rng.normal(size=(8, 2, 4)), jnp.float32)
  alpha = np.asarray(L.edge_coefficients(params, layer, graph, z))
  real = np.asarray(edge_mask(graph))
  assert np.all(alpha[~real] == 0) and np.all(alpha[real] > 0)
  totals = np.zeros((8, 2))
  np.add.at(totals, np.asarray(graph.receivers)[real], alpha[real])
  np.testing.assert_allclose(totals[:6], 1.0, rtol=1e-5)
  np.testing.assert_array_equal(totals[6:], 0.0)


def test_gradients_are_finite(small):
  graph = M.prepare_graph(small["senders"][:-NUM_NODES], small["receivers"][:-NUM_NODES], NUM_NODES,
                          edge_multiple=64, node_multiple=16)
  x = M.pad_node_array(small["x"], graph)
  x[NUM_NODES:] = np.nan
  mask = jnp.asarray(M.pad_node_array(np.ones(NUM_NODES, bool), graph))
  layers = GNN + (LayerArch("linear", "max", "softplus", heads=2, hidden=3),)
  params = gnn_init(layers)(jax.random.key(7))

  def loss(params, key):
    logits = M.apply_gnn(params, layers, graph, x, key=key)
    return jnp.sum(jnp.where(mask[:, None], logits, 0) ** 2)

  # Training mode: dropout on top of everything evaluation computes.
  leaves = jax.tree.leaves(jax.jit(jax.grad(loss))(params, jax.random.key(8)))
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(np.any(g != 0) for g in leaves)


def test_dropout_modes(small):
  params = gnn_init()(jax.random.key(9))
  apply = gnn_fn()
  graph, x = small["graph"], small["x_padded"]
  eval_a, eval_b = apply(params, graph=graph, x=x), apply(params, graph=graph, x=x)
  np.testing.assert_array_equal(eval_a, eval_b)
  # A key with zero rates is evaluation too.
  np.testing.assert_allclose(gnn_fn(dropout=0.0, att_dropout=0.0)(params, graph=graph, x=x,
                                                                  key=jax.random.key(1)), eval_a, rtol=1e-6)
  train_a = apply(params, graph=graph, x=x, key=jax.random.key(1))
  np.testing.assert_array_equal(train_a, apply(params, graph=graph, x=x, key=jax.random.key(1)))
  assert not np.allclose(train_a, eval_a)
  assert not np.allclose(train_a, apply(params, graph=graph, x=x, key=jax.random.key(2)))


def test_vmap_over_seeds(small):
  layers = GNN[:1] + GNN[-1:]
  keys = jax.random.split(jax.random.key(10), 3)
  init = gnn_init(layers)
  stacked = jax.jit(jax.vmap(init))(keys)
  separate = [init(k) for k in keys]
  for i in range(3):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), stacked, separate[i])
  graph, x = small["graph"], small["x_padded"]
  drop_keys = jax.random.split(jax.random.key(11), 3)
  batched = jax.jit(jax.vmap(lambda p, k: M.apply_gnn(p, layers, graph, x, key=k)))(stacked, drop_keys)
  for i in range(3):
    one = gnn_fn(layers)(separate[i], graph=graph, x=x, key=drop_keys[i])
    np.testing.assert_allclose(batched[i], one, rtol=1e-5, atol=1e-6)


def test_sparse_features_match_dense(small):
  # Bag-of-words-like inputs: mostly zeros, NaN in the padded rows.
  rng = np.random.default_rng(12)
  dense = M.pad_node_array(np.where(rng.random((NUM_NODES, IN_DIM)) < 0.4, small["x"], 0), small["graph"])
  dense[NUM_NODES:] = np.nan
  sparse = L.SparseFeatures.from_dense(dense)
  assert sparse.shape == dense.shape and sparse.values.shape[0] < dense.size
  clean = np.where(np.isnan(dense), 0, dense)
  np.testing.assert_array_equal(np.asarray(L.SparseFeatures.from_dense(clean).todense()), clean)
  for layers in (GNN, (LayerArch("gcn", "sum", "relu", 1, IN_DIM, skip="identity"),
                       LayerArch("gat", "sum", "linear", 2, 3))):
    params = gnn_init(layers)(jax.random.key(13))
    apply = gnn_fn(layers)
    want = np.asarray(apply(params, graph=small["graph"], x=clean))
    np.testing.assert_allclose(np.asarray(apply(params, graph=small["graph"], x=sparse)), want,
                               rtol=1e-5, atol=1e-6)
  train = lambda key: np.asarray(apply(params, graph=small["graph"], x=sparse, key=key))
  np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
  assert np.all(np.isfinite(train(jax.random.key(1))))
  loss = lambda p: jnp.sum(M.apply_gnn(p, layers, small["graph"], sparse, key=jax.random.key(2))[:NUM_NODES])
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ----- several models at once: apply_gnn_multi against jax.vmap(apply_gnn) -----

# Together these cover every attention, aggregator and combine, skips with and without a projection (from the
# shared input, dense or sparse, and from a previous layer), concatenating and output layers.
MULTI_ARCHS = {
    "mixed": GNN,
    "residual_input": (LayerArch("const", "sum", "relu", heads=1, hidden=IN_DIM, skip="identity"),
                       LayerArch("linear", "max", "softplus", heads=2, hidden=3, combine="mlp"),
                       LayerArch("gat", "mean", "sigmoid", heads=4, hidden=2, combine="mlp", skip="identity")),
    "projected_input": (LayerArch("gcn", "sum", "leaky_relu", heads=2, hidden=4, skip="identity"),
                        LayerArch("gat", "sum", "relu6", heads=2, hidden=3),
                        LayerArch("linear", "mlp", "linear", heads=2, hidden=3)),
}


@functools.cache
def multi_fns(layers, graphnas_compat=False):
  """Jitted (apply_gnn_multi, vmap of apply_gnn) for ``layers``, each taking (params, graph, x, keys)."""
  multi = jax.jit(lambda p, g, x, k: M.apply_gnn_multi(p, layers, g, x, keys=k, graphnas_compat=graphnas_compat))
  single = lambda p, g, x, k: M.apply_gnn(p, layers, g, x, key=k, graphnas_compat=graphnas_compat)
  vmapped = jax.jit(lambda p, g, x, k: jax.vmap(single, in_axes=(0, None, None, None if k is None else 0))(
      p, g, x, k))
  return multi, vmapped


@functools.cache
def stacked_init(layers, models, seed=20):
  return jax.jit(jax.vmap(functools.partial(M.init_gnn, layers=layers, in_dim=IN_DIM)))(
      jax.random.split(jax.random.key(seed), models))


def sparse_input(small):
  rng = np.random.default_rng(21)
  dense = M.pad_node_array(np.where(rng.random((NUM_NODES, IN_DIM)) < 0.4, small["x"], 0), small["graph"])
  return L.SparseFeatures.from_dense(dense)


# Every architecture runs on dense and on sparse input, with one and with three models, in evaluation and in
# training mode (dropout on the shared input, on per-model hidden features and on attention coefficients);
# training-mode compilations are slow (one random draw per dropout site), hence a list rather than a product.
MULTI_CASES = [("mixed", "dense", 3), ("mixed", "sparse", 1), ("residual_input", "sparse", 3),
               ("residual_input", "dense", 1), ("projected_input", "dense", 1), ("projected_input", "sparse", 3)]


@pytest.mark.parametrize("arch,features,models", MULTI_CASES)
def test_multi_matches_vmap(small, arch, features, models):
  layers = MULTI_ARCHS[arch]
  graph = small["graph"]
  x = sparse_input(small) if features == "sparse" else small["x_padded"]
  multi, vmapped = multi_fns(layers, graphnas_compat=arch == "projected_input")
  params = stacked_init(layers, models)
  keys = jax.random.split(jax.random.key(22), models)
  outputs = {}
  for mode, mode_keys in (("eval", None), ("train", keys)):
    got = outputs[mode] = np.asarray(multi(params, graph, x, mode_keys))
    assert got.shape == (models, NUM_NODES + 1, layers[-1].hidden)
    np.testing.assert_allclose(got, np.asarray(vmapped(params, graph, x, mode_keys)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs["train"], outputs["eval"])  # training mode really drops
  if models > 1:  # and each model draws its own masks: equal parameters, different outputs
    same = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf[:1], leaf.shape), params)
    train = np.asarray(multi(same, graph, x, keys))
    assert not np.allclose(train[0], train[1]) and not np.allclose(train[1], train[2])


def test_multi_gradients_match_vmap(small):
  layers = MULTI_ARCHS["mixed"]
  graph, x = small["graph"], sparse_input(small)
  mask = jnp.asarray(M.pad_node_array(np.ones(NUM_NODES, bool), graph))
  params = stacked_init(layers, 3)
  keys = jax.random.split(jax.random.key(24), 3)

  def total(logits):  # a per-model loss, summed over the models
    return jnp.sum(jnp.where(mask[None, :, None], jnp.tanh(logits), 0.0) * jnp.arange(1.0, 4.0)[:, None, None])

  multi = jax.jit(jax.grad(lambda p: total(M.apply_gnn_multi(p, layers, graph, x, keys=keys))))(params)
  vmapped = jax.jit(jax.grad(lambda p: total(jax.vmap(lambda q, k: M.apply_gnn(q, layers, graph, x, key=k))(
      p, keys))))(params)
  leaves = jax.tree.leaves(multi)
  assert all(np.all(np.isfinite(g)) for g in leaves) and all(np.any(g != 0) for g in leaves)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), multi, vmapped)


def test_multi_checks_its_arguments(small):
  layers = MULTI_ARCHS["mixed"]
  params = stacked_init(layers, 3)
  graph, x = small["graph"], small["x_padded"]
  with pytest.raises(ValueError, match="leading model axis"):
    M.apply_gnn_multi(gnn_init(layers)(jax.random.key(0)), layers, graph, x)
  with pytest.raises(ValueError, match="one key per model"):
    M.apply_gnn_multi(params, layers, graph, x, keys=jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="parameter dicts"):
    M.apply_gnn_multi(params[:2], layers, graph, x)
