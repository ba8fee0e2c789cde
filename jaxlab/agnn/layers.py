"""The GraphNAS/AGNN layer zoo as pure functions over jraph graphs and dict-of-arrays parameters.

The search trains many children at once (``jax.vmap`` over parameters and seeds) and hands parameters from a
parent to a child leaf by leaf, so a layer is a pair of plain functions, ``init_layer`` and ``apply_layer``,
over a parameter dict whose keys and shapes depend only on the layer's choices and its input width.

Graphs come from ``prepare_graph`` (host side: self-loops added, padded with ``jaxlab.graph``'s one scheme;
node arrays padded with ``pad_node_array``): the message on edge (s -> r) goes from sender s to receiver r,
node i aggregates over the senders of the edges whose receiver is i, and padded edges and nodes are masked
out of every reduction. Node features may be dense or ``SparseFeatures`` (bag-of-words inputs).

One layer, in order (``h`` is the layer input, [nodes, in_dim]):

1. padded node rows of ``h`` are set to zero, so whatever the caller left there cannot reach real nodes or
   turn a gradient into NaN;
2. input dropout (rate ``dropout``, only when a key is given) on ``h``;
3. ``z = h @ weight``, viewed as [nodes, heads, hidden];
4. one attention coefficient per edge and head (i the receiver, j the sender):
   const 1; gcn 1/sqrt(d_i d_j) with in-degrees over real edges (self-loops included);
   gat LeakyReLU_0.2(a_l.z_i + a_r.z_j); gat_sym LeakyReLU_0.2(a_l.z_i + a_r.z_j) + LeakyReLU_0.2(a_l.z_j +
   a_r.z_i); cos sum(z_i * a_l * z_j * a_r), an unnormalised product kept under GraphNAS's name (it is not a
   cosine: neither z is normalised); linear tanh(a_l.z_i + a_r.z_j) (with ``graphnas_compat`` GraphNAS's
   tanh(a_l.z_j + a_r.z_j), which ignores the receiver); generalized_linear w_g.tanh(a_l * z_i + a_r * z_j);
5. all but const and gcn are softmax-normalised over each receiver's in-edges, then get attention dropout
   (rate ``att_dropout``, only when a key is given); const and gcn are fixed weights and get no dropout, as in
   GraphNAS;
6. messages alpha_ij * z_j, aggregated per receiver and head: sum; mean or max of the messages after the
   two-layer "pool" MLP (hidden -> 128 -> hidden, ReLU between, shared by the heads); mlp: the sum, then that
   MLP;
7. heads concatenated (``concat``, hidden layers) or averaged (output layer);
8. ``+ bias``;
9. combine "mlp": a two-layer MLP of the output width with ReLU between;
10. skip "identity": ``+ h`` (the input of step 1, before dropout), through ``skip.weight`` when the widths
    differ;
11. the activation (leaky_relu with slope 0.01, PyTorch's default that GraphNAS uses; elu with alpha 1).

Several models at once (``apply_layer_multi``; a search trains one architecture from several seeds): the
parameters carry a leading model axis M. Node-level arrays are model-major, [M, nodes, ...], so that the
per-model weight maps are batched products with the model axis leading; the message passing (steps 4-6) is
node-major, [nodes, M * heads, hidden] and [edges, M * heads], so that each gather by sender and each reduction
over receivers moves one contiguous row per edge for all models. Model m draws its dropout masks from its own
key exactly as ``apply_layer`` does, so the result equals ``jax.vmap(apply_layer)`` up to float rounding.
``apply_layer`` is this path with M = 1.

Parameter layout (``init_layer``): "weight" [in_dim, heads * hidden], "bias" [out]; "att_l", "att_r"
[heads, hidden] for gat, gat_sym, cos, linear and generalized_linear; "att_g" [hidden] for generalized_linear
(one vector shared by the heads, as GraphNAS's single linear map); "pool" {"w1", "b1", "w2", "b2"} for the
mean, max and mlp aggregators; "combine" {"w1", "b1", "w2", "b2"} for combine "mlp"; "skip" {"weight"} only
for a skip between different widths. ``out`` is heads * hidden with ``concat``, else hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.agnn.space import LayerArch
from jaxlab.graph import (Budget, GraphsTuple, edge_mask, node_mask, pad_graphs, segment_max, segment_mean,
                          segment_softmax, segment_sum)

POOL_HIDDEN = 128  # GraphNAS's pool_dim for the mean, max and mlp aggregators
GAT_SLOPE = 0.2  # LeakyReLU slope inside gat and gat_sym attention
LEAKY_RELU_SLOPE = 0.01  # the leaky_relu activation's slope

_LEARNED_ATTENTIONS = ("gat", "gat_sym", "cos", "linear", "generalized_linear")

ACTIVATION_FNS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "linear": lambda x: x,
    "softplus": jax.nn.softplus,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, LEAKY_RELU_SLOPE),
    "relu6": jax.nn.relu6,
    "elu": jax.nn.elu,
}


def prepare_graph(senders, receivers, num_nodes: int, *, edge_multiple: int = 1024,
                  node_multiple: int = 1) -> GraphsTuple:
  """The padded graph a GNN runs on: the edges plus one self-loop per node (host side, numpy).

  Args:
    senders, receivers: a directed edge list over ``num_nodes`` nodes; a message goes from sender to receiver.
      Self-loops already in the list are dropped, so each node ends up with exactly one (GraphNAS adds them;
      a doubled self-loop would change gcn degrees and attention).
    num_nodes: the number of real nodes.
    edge_multiple: the edge budget is the edge count rounded up to this, so that graphs of similar size share
      compiled steps.
    node_multiple: the node budget is num_nodes + 1 (one spare for jraph's padding graph) rounded up to this.

  Returns:
    A ``GraphsTuple`` padded with ``jaxlab.graph.pad_graphs``. Its ``nodes`` is a [padded nodes, 0] array that
    only carries the padded node count; features go separately, padded with ``pad_node_array``.
  """
  if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
    raise ValueError(f"prepare_graph: num_nodes must be a positive int, got {num_nodes!r}")
  for name, multiple in (("edge_multiple", edge_multiple), ("node_multiple", node_multiple)):
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
      raise ValueError(f"prepare_graph: {name} must be a positive int, got {multiple!r}")
  senders, receivers = np.asarray(senders), np.asarray(receivers)
  if senders.ndim != 1 or senders.shape != receivers.shape:
    raise ValueError(f"prepare_graph: senders and receivers must be 1-D of equal length, got shapes "
                     f"{senders.shape} and {receivers.shape}")
  if senders.size and not (np.issubdtype(senders.dtype, np.integer) and np.issubdtype(receivers.dtype, np.integer)):
    raise ValueError(f"prepare_graph: senders and receivers must be integers, got {senders.dtype} and "
                     f"{receivers.dtype}")
  for name, index in (("senders", senders), ("receivers", receivers)):
    if index.size and (index.min() < 0 or index.max() >= num_nodes):
      raise ValueError(f"prepare_graph: {name} must lie in [0, {num_nodes}), got values in "
                       f"[{index.min()}, {index.max()}]")
  keep = senders != receivers
  loops = np.arange(num_nodes)
  senders = np.concatenate([senders[keep], loops]).astype(np.int32)
  receivers = np.concatenate([receivers[keep], loops]).astype(np.int32)
  num_edges = senders.shape[0]
  graph = GraphsTuple(nodes=np.zeros((num_nodes, 0), np.float32), edges=None, globals=None,
                      senders=senders, receivers=receivers, n_node=np.array([num_nodes], np.int32),
                      n_edge=np.array([num_edges], np.int32))
  budget = Budget(nodes=node_multiple * math.ceil((num_nodes + 1) / node_multiple),
                  edges=edge_multiple * math.ceil(num_edges / edge_multiple), graphs=2)
  return pad_graphs([graph], budget)


def padded_num_nodes(graph: GraphsTuple) -> int:
  """The node count of a padded graph, padding included (host side)."""
  return int(np.sum(np.asarray(graph.n_node)))


def pad_node_array(x, graph: GraphsTuple) -> np.ndarray:
  """Node features, labels or masks of the real nodes, padded with zeros (False for masks) to the graph."""
  x = np.asarray(x)
  total = padded_num_nodes(graph)
  real = int(np.sum(np.asarray(node_mask(graph, total))))
  if x.ndim == 0 or x.shape[0] != real:
    raise ValueError(f"pad_node_array: expected one row per real node ({real}), got shape {x.shape}")
  return np.concatenate([x, np.zeros((total - real,) + x.shape[1:], x.dtype)])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rows", "cols", "values"],
                   meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class SparseFeatures:
  """Node features [nodes, features] kept as their non-zero entries (COO).

  Citation data sets have bag-of-words features with about 1% non-zeros: the first layer's projection then
  costs non-zeros x width instead of nodes x features, and input dropout draws one random number per non-zero
  (dropping a zero changes nothing, so this is the same dropout as on the dense array). A pytree whose
  ``shape`` is static, so it passes through ``jax.jit`` and ``jax.vmap`` like an array.
  """

  rows: jax.Array    # int32 [nnz]
  cols: jax.Array    # int32 [nnz]
  values: jax.Array  # [nnz]
  shape: tuple[int, int]

  @classmethod
  def from_dense(cls, x) -> SparseFeatures:
    """The non-zero entries of a host array [nodes, features] (e.g. after ``pad_node_array``)."""
    x = np.asarray(x)
    if x.ndim != 2:
      raise ValueError(f"SparseFeatures.from_dense: expected [nodes, features], got shape {x.shape}")
    rows, cols = np.nonzero(x)
    return cls(rows.astype(np.int32), cols.astype(np.int32), x[rows, cols], tuple(int(d) for d in x.shape))

  @property
  def ndim(self) -> int:
    return 2

  def todense(self) -> jax.Array:
    return jnp.zeros(self.shape, jnp.asarray(self.values).dtype).at[self.rows, self.cols].add(self.values)


def output_dim(layer: LayerArch, *, concat: bool) -> int:
  """Width of the layer output: heads * hidden when the heads are concatenated, else hidden."""
  return layer.heads * layer.hidden if concat else layer.hidden


def init_layer(key, in_dim: int, layer: LayerArch, *, concat: bool) -> dict:
  """Parameters of one layer reading ``in_dim`` features: Glorot-uniform weights, zero biases."""
  if not isinstance(layer, LayerArch):
    raise ValueError(f"init_layer: layer must be a LayerArch, got {type(layer).__name__}")
  if isinstance(in_dim, bool) or not isinstance(in_dim, numbers.Integral) or in_dim < 1:
    raise ValueError(f"init_layer: in_dim must be a positive int, got {in_dim!r}")
  heads, hidden, out = layer.heads, layer.hidden, output_dim(layer, concat=concat)
  # (path, shape, fan_in, fan_out) of every Glorot-initialised leaf; biases start at zero.
  weights = [(("weight",), (in_dim, heads * hidden), in_dim, heads * hidden)]
  if layer.attention in _LEARNED_ATTENTIONS:
    # Fans as PyG/GraphNAS count them for their [1, heads, channels] attention tensors: heads and hidden.
    weights += [(("att_l",), (heads, hidden), heads, hidden), (("att_r",), (heads, hidden), heads, hidden)]
  if layer.attention == "generalized_linear":
    weights.append((("att_g",), (hidden,), hidden, 1))  # a [hidden, 1] linear map kept as a vector
  mlps = {}
  if layer.aggregator != "sum":
    mlps["pool"] = (hidden, POOL_HIDDEN, hidden)
  if layer.combine == "mlp":
    mlps["combine"] = (out, out, out)
  for name, (a, b, c) in mlps.items():
    weights += [((name, "w1"), (a, b), a, b), ((name, "w2"), (b, c), b, c)]
  if layer.skip == "identity" and in_dim != out:
    weights.append((("skip", "weight"), (in_dim, out), in_dim, out))

  # One uniform draw for the whole layer, sliced into leaves: each separate draw is a threefry instance that
  # XLA compiles on its own, and a search compiles an init per architecture.
  sizes = [math.prod(shape) for _, shape, _, _ in weights]
  uniform = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  params = {"bias": jnp.zeros((out,), jnp.float32)}
  for name, (a, b, c) in mlps.items():
    params[name] = {"b1": jnp.zeros((b,), jnp.float32), "b2": jnp.zeros((c,), jnp.float32)}
  offset = 0
  for (path, shape, fan_in, fan_out), size in zip(weights, sizes):
    leaf = uniform[offset:offset + size].reshape(shape) * math.sqrt(6.0 / (fan_in + fan_out))
    offset += size
    parent = params
    for part in path[:-1]:
      parent = parent.setdefault(part, {})
    parent[path[-1]] = leaf
  return params


def _model_matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
  """``x[m] @ weight[m]`` for every model m: x [models, ..., in], weight [models, in, out].

  The model axis leads, as XLA:CPU's batched products want it; with it anywhere else XLA transposes both sides
  around the product (measured about 2x slower with 8 models).
  """
  if weight.shape[0] == 1:
    return (x[0] @ weight[0])[None]  # one model: a plain product, without a size-1 batch axis
  return jnp.einsum("m...i,mio->m...o", x, weight)


def _mlp(params: dict, x: jax.Array) -> jax.Array:
  """Two dense layers with ReLU between, per model: x [models, ..., in], weights [models, in, out]."""
  def bias(b):  # [models, out] against [models, ..., out]
    return b.reshape(b.shape[:1] + (1,) * (x.ndim - 2) + b.shape[1:])
  hidden = jax.nn.relu(_model_matmul(x, params["w1"]) + bias(params["b1"]))
  return _model_matmul(hidden, params["w2"]) + bias(params["b2"])


def _project(h, weight: jax.Array) -> jax.Array:
  """``h @ weight[m]`` for every model m: [models, nodes, out] for weight [models, in, out].

  ``h`` is dense [nodes, in] or ``SparseFeatures`` shared by the models, dense [models, nodes, in], or
  ``SparseFeatures`` whose values are [models, nnz] (after per-model dropout).
  """
  models, in_dim, out = weight.shape
  if isinstance(h, SparseFeatures):
    values = h.values

    def one_model(w, v):
      # Padded rows' values are already zero and the weights finite, so the plain segment sum needs no masking.
      return jax.ops.segment_sum(v[:, None] * w[h.cols], h.rows, h.shape[0])

    if models == 1:
      return one_model(weight[0], values if values.ndim == 1 else values[0])[None]
    # One model at a time: one model's [nnz, out] products stay in cache where all models' together do not
    # (Cora: 12.6 MB against 100 MB for 8 models of width 64), and the loop boundary keeps XLA from fusing the
    # producers of the gathered rows into the gather, which recomputes them for every non-zero. Measured about
    # 4x faster than one batched gather over all models, in either layout.
    if values.ndim == 1:
      return jax.lax.map(lambda w: one_model(w, values), weight)
    return jax.lax.map(lambda args: one_model(*args), (weight, values))
  if h.ndim == 2:
    if models == 1:
      return (h @ weight[0])[None]
    side_by_side = jnp.moveaxis(weight, 0, 1).reshape(in_dim, models * out)  # one product for all models
    return jnp.moveaxis((h @ side_by_side).reshape(-1, models, out), 1, 0)
  return _model_matmul(h, weight)


def _keep_rows(h, keep: jax.Array):
  """``h`` with the node rows where ``keep`` is False set to zero (where, not a product: padding may hold NaN)."""
  if isinstance(h, SparseFeatures):
    return dataclasses.replace(h, values=jnp.where(keep[h.rows], h.values, jnp.zeros((), h.values.dtype)))
  return jnp.where(keep[:, None], h, jnp.zeros((), h.dtype))


def _keep_masks(keys, rate, shape: tuple[int, ...]) -> jax.Array:
  """Dropout keep-masks [models, *shape]: model m's is ``bernoulli(keys[m], 1 - rate, shape)``.

  This is the draw ``apply_layer`` makes from that model's key, so every model drops what it would drop alone.
  """
  if isinstance(rate, numbers.Number) and not 0 <= rate < 1:
    raise ValueError(f"dropout rates must lie in [0, 1), got {rate}")
  return jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, shape))(keys)


def _no_dropout(keys, rate) -> bool:
  return keys is None or (isinstance(rate, numbers.Number) and rate == 0)


def _dropout(keys, x: jax.Array, rate, shape: tuple[int, ...]) -> jax.Array:
  """Inverted dropout per model of x [models, *shape], or of x [*shape] shared by the models (then the result
  gets the model axis); a no-op without keys or at a (static) rate of 0. ``rate`` may be traced."""
  if _no_dropout(keys, rate):
    return x
  keep = _keep_masks(keys, rate, shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _num_nodes(graph: GraphsTuple, h, node_axis: int) -> int:
  """The padded node count, checked against the graph's node-count holder when it has one."""
  leaves = jax.tree.leaves(graph.nodes)
  if leaves and leaves[0].shape[0] != h.shape[node_axis]:
    raise ValueError(f"node features have {h.shape[node_axis]} rows but the graph has {leaves[0].shape[0]} "
                     "padded nodes: pad them with pad_node_array")
  return h.shape[node_axis]


def _attention_logits(params, attention: str, z, z_j, senders, receivers, graphnas_compat: bool) -> jax.Array:
  """Unnormalised scores [edges, models * heads] of the learned attentions; z [nodes, models * heads, hidden]."""
  groups, hidden = z.shape[1], z.shape[2]
  a_l, a_r = params["att_l"].reshape(groups, hidden), params["att_r"].reshape(groups, hidden)
  if attention in ("gat", "gat_sym", "linear"):
    # These scores are sums of node-level terms: take each node's dot products with a_l and a_r once and
    # gather one scalar per edge and head, rather than two [hidden] vectors per edge and head.
    s_l, s_r = jnp.sum(z * a_l, -1), jnp.sum(z * a_r, -1)  # [nodes, models * heads]
    if attention == "gat":
      return jax.nn.leaky_relu(s_l[receivers] + s_r[senders], GAT_SLOPE)
    if attention == "gat_sym":
      s = jnp.stack([s_l, s_r], -1)  # both terms are needed on both sides: one gather per side
      s_i, s_j = s[receivers], s[senders]
      return (jax.nn.leaky_relu(s_i[..., 0] + s_j[..., 1], GAT_SLOPE)
              + jax.nn.leaky_relu(s_j[..., 0] + s_i[..., 1], GAT_SLOPE))
    if graphnas_compat:
      return jnp.tanh((s_l + s_r)[senders])
    return jnp.tanh(s_l[receivers] + s_r[senders])
  # cos and generalized_linear mix the two sides elementwise before reducing: they need the edge vectors.
  z_i = z[receivers]
  if attention == "cos":
    return jnp.sum(z_i * a_l * z_j * a_r, -1)
  if attention == "generalized_linear":
    # One vector per model, shared by its heads.
    att_g = jnp.repeat(params["att_g"], groups // params["att_g"].shape[0], axis=0)
    return jnp.sum(jnp.tanh(a_l * z_i + a_r * z_j) * att_g, -1)
  raise ValueError(f"unknown attention {attention!r}")


def _edge_coefficients(params, layer: LayerArch, graph: GraphsTuple, z, z_j, *, keys, att_dropout,
                       graphnas_compat: bool) -> jax.Array:
  """Steps 4-5 for z [nodes, models * heads, hidden] and z_j = z[senders].

  Returns alpha [edges, models * heads]; const and gcn, the same for every model and head, as [edges, 1].
  """
  num_nodes = z.shape[0]
  senders, receivers = jnp.asarray(graph.senders), jnp.asarray(graph.receivers)
  real_edges = edge_mask(graph)
  if layer.attention == "const":
    return real_edges.astype(z.dtype)[:, None]
  if layer.attention == "gcn":
    degree = segment_sum(real_edges.astype(z.dtype), receivers, num_nodes)
    inv_sqrt = jax.lax.rsqrt(jnp.maximum(degree, 1.0))  # padded nodes have degree 0
    return jnp.where(real_edges, inv_sqrt[senders] * inv_sqrt[receivers], 0.0)[:, None]
  logits = _attention_logits(params, layer.attention, z, z_j, senders, receivers, graphnas_compat)
  alpha = segment_softmax(logits, receivers, num_nodes, mask=real_edges)
  if _no_dropout(keys, att_dropout):
    return alpha
  # The boolean masks, [models, edges, heads] as drawn, are what moves to the edge-major layout.
  keep = jnp.moveaxis(_keep_masks(keys, att_dropout, (alpha.shape[0], layer.heads)), 0, 1)
  return jnp.where(keep.reshape(alpha.shape), alpha / (1.0 - att_dropout), jnp.zeros((), alpha.dtype))


def _one_model(params):
  """A single model's parameters as a stack of one (leading model axis of size 1)."""
  return jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params)


def edge_coefficients(params, layer: LayerArch, graph: GraphsTuple, z, *, key=None, att_dropout=0.0,
                      graphnas_compat: bool = False) -> jax.Array:
  """The attention coefficients alpha [edges, heads] of steps 4-5 for projected features z [nodes, heads, hidden].

  Padded edges get 0. For the learned attentions each real receiver's coefficients sum to 1 per head (before
  dropout, which rescales the kept ones by 1 / (1 - att_dropout)).
  """
  z = jnp.asarray(z)
  z_j = z[jnp.asarray(graph.senders)]
  alpha = _edge_coefficients(_one_model(params), layer, graph, z, z_j, keys=None if key is None else key[None],
                             att_dropout=att_dropout, graphnas_compat=graphnas_compat)
  return jnp.broadcast_to(alpha, (z_j.shape[0], z.shape[1]))


def apply_layer_multi(params, layer: LayerArch, graph: GraphsTuple, h, *, concat: bool, keys=None, dropout=0.0,
                      att_dropout=0.0, graphnas_compat: bool = False) -> jax.Array:
  """One layer of M models at once: ``apply_layer`` for each model, as [M, padded nodes, out].

  Node-level arrays are model-major ([M, nodes, ...]), where the per-model weight maps are batched products
  with the model axis leading. The message passing is node-major: projected features are viewed as
  [nodes, M * heads, hidden] and attention scores and coefficients are [edges, M * heads], so each gather by
  sender and each reduction over receivers moves one contiguous row per edge holding every model and head,
  with no per-model slicing around it. The layout changes twice per layer, on node arrays (not edge arrays),
  in blocks of heads * hidden contiguous values.

  Args:
    params: ``init_layer`` parameters stacked on a leading model axis M (as ``jax.vmap(init_layer)`` gives).
    layer, graph, concat, dropout, att_dropout, graphnas_compat: as in ``apply_layer``.
    h: node features shared by the models, dense [padded nodes, in_dim] or ``SparseFeatures`` (the network
      input), or per model, [M, padded nodes, in_dim] (a previous layer's output).
    keys: None (evaluation) or M dropout keys; model m drops exactly what ``apply_layer`` drops with key
      ``keys[m]``.

  Returns:
    [M, padded nodes, heads * hidden] with ``concat``, else [M, padded nodes, hidden].
  """
  weight = params["weight"]
  if weight.ndim != 3:
    raise ValueError(f"apply_layer_multi: parameters need a leading model axis, got weight shape {weight.shape}")
  models, in_dim = weight.shape[0], weight.shape[1]
  if h.ndim not in (2, 3):
    raise ValueError(f"node features must be [nodes, features] or [models, nodes, features], got shape {h.shape}")
  num_nodes = _num_nodes(graph, h, h.ndim - 2)
  if h.shape[-1] != in_dim:
    raise ValueError(f"node features have {h.shape[-1]} channels but the layer's weight expects {in_dim}")
  if h.ndim == 3 and h.shape[0] != models:
    raise ValueError(f"node features are for {h.shape[0]} models but the parameters for {models}")
  if keys is not None and (jnp.ndim(keys) == 0 or keys.shape[0] != models):
    raise ValueError(f"need one dropout key per model ({models}), got keys of shape {jnp.shape(keys)}")
  heads, hidden = layer.heads, layer.hidden
  senders, receivers = jnp.asarray(graph.senders), jnp.asarray(graph.receivers)
  real_edges = edge_mask(graph)
  if h.ndim == 3:
    h = jnp.where(node_mask(graph, num_nodes)[:, None], h, jnp.zeros((), h.dtype))
  else:
    h = _keep_rows(h, node_mask(graph, num_nodes))
  key_in = key_att = None
  if keys is not None:
    split = jax.vmap(jax.random.split)(keys)
    key_in, key_att = split[:, 0], split[:, 1]

  if isinstance(h, SparseFeatures):
    dropped = dataclasses.replace(h, values=_dropout(key_in, h.values, dropout, h.values.shape))
  else:
    dropped = _dropout(key_in, h, dropout, h.shape[-2:])
  z = jnp.moveaxis(_project(dropped, weight), 0, 1).reshape(num_nodes, models * heads, hidden)
  z_j = z[senders]
  alpha = _edge_coefficients(params, layer, graph, z, z_j, keys=key_att, att_dropout=att_dropout,
                             graphnas_compat=graphnas_compat)
  messages = alpha[..., None] * z_j  # [edges, models * heads, hidden]

  def pooled(x):  # the pool MLP per model, on [rows, models * heads, hidden]
    by_model = jnp.moveaxis(x.reshape(x.shape[0], models, heads, hidden), 1, 0)
    return jnp.moveaxis(_mlp(params["pool"], by_model), 0, 1).reshape(x.shape)

  if layer.aggregator == "sum":
    agg = segment_sum(messages, receivers, num_nodes, mask=real_edges)
  elif layer.aggregator == "mean":
    agg = segment_mean(pooled(messages), receivers, num_nodes, mask=real_edges)
  elif layer.aggregator == "max":
    agg = segment_max(pooled(messages), receivers, num_nodes, mask=real_edges)
  else:  # mlp
    agg = pooled(segment_sum(messages, receivers, num_nodes, mask=real_edges))

  if concat:
    out = agg.reshape(num_nodes, models, heads * hidden)
  else:
    out = jnp.mean(agg.reshape(num_nodes * models, heads, hidden), axis=1).reshape(num_nodes, models, hidden)
  out = jnp.moveaxis(out, 1, 0) + params["bias"][:, None]  # back to model-major
  if layer.combine == "mlp":
    out = _mlp(params["combine"], out)
  if layer.skip == "identity":
    if "skip" in params:
      out = out + _project(h, params["skip"]["weight"])
    else:
      out = out + (h.todense() if isinstance(h, SparseFeatures) else h)  # [nodes, in] broadcasts over models
  return ACTIVATION_FNS[layer.activation](out)


def apply_layer(params, layer: LayerArch, graph: GraphsTuple, h, *, concat: bool, key=None, dropout=0.0,
                att_dropout=0.0, graphnas_compat: bool = False) -> jax.Array:
  """One layer on a padded graph (see the module docstring for the order of operations).

  Args:
    params: from ``init_layer`` with the same ``layer`` and ``concat``.
    layer: the layer's choices (static).
    graph: a padded graph with self-loops (``prepare_graph``).
    h: node features [padded nodes, in_dim], dense or ``SparseFeatures``.
    concat: concatenate the heads (hidden layers) or average them (output layer).
    key: dropout key; None means evaluation (no dropout).
    dropout, att_dropout: rates of the input dropout and of the dropout on attention coefficients.
    graphnas_compat: "linear" attention as GraphNAS computes it (the sender on both sides).

  Returns:
    [padded nodes, heads * hidden] with ``concat``, else [padded nodes, hidden].
  """
  if h.ndim != 2:
    raise ValueError(f"node features must be [nodes, features], got shape {h.shape}")
  # One model is the multi-model path with M = 1: the same code, and with a model axis of size 1 both layouts
  # are the plain [nodes, heads, hidden] one.
  out = apply_layer_multi(_one_model(params), layer, graph, h, concat=concat,
                          keys=None if key is None else key[None], dropout=dropout, att_dropout=att_dropout,
                          graphnas_compat=graphnas_compat)
  return out[0]
