"""A GNN of ``layers.py`` layers for full-graph (transductive) node classification.

A model is a tuple of ``LayerArch`` and a list with one parameter dict per layer. Every layer but the last
concatenates its heads; the last averages them and gives the logits. The functions are pure, so a search can
``jax.jit`` them with the layers static. To train many seeds of one architecture at once, ``apply_gnn_multi``
runs M models stacked on a leading parameter axis (``jax.vmap(init_gnn)``): it computes what ``jax.vmap`` of
``apply_gnn`` computes, but passes messages with the model axis inside each node's row (see
``layers.apply_layer_multi``) where ``jax.vmap`` hands the graph gathers and scatters strided per-model slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Graph preparation lives beside the layers; it is re-exported here for callers that only import the model.
from jaxlab.agnn.layers import (SparseFeatures, apply_layer, apply_layer_multi, init_layer,  # noqa: F401
                                output_dim, pad_node_array, padded_num_nodes, prepare_graph)
from jaxlab.agnn.space import LayerArch
from jaxlab.graph import GraphsTuple


def init_gnn(key, layers: Sequence[LayerArch], in_dim: int) -> list[dict]:
  """One parameter dict per layer; each layer reads the previous layer's output width."""
  layers = tuple(layers)
  if not layers:
    raise ValueError("init_gnn: a GNN needs at least one layer")
  params = []
  for i, (layer, layer_key) in enumerate(zip(layers, jax.random.split(key, len(layers)))):
    concat = i < len(layers) - 1
    params.append(init_layer(layer_key, in_dim, layer, concat=concat))
    in_dim = output_dim(layer, concat=concat)
  return params


def apply_gnn(params, layers: Sequence[LayerArch], graph: GraphsTuple, x, *, key=None, dropout=0.6,
              att_dropout=0.6, graphnas_compat: bool = False) -> jax.Array:
  """Logits [padded nodes, classes] of the GNN; ``key=None`` is evaluation mode (no dropout).

  Under ``jax.jit`` pass ``layers`` as a static argument (a tuple: LayerArch is hashable) or close over it.
  """
  layers = tuple(layers)
  if len(params) != len(layers):
    raise ValueError(f"apply_gnn: {len(params)} parameter dicts for {len(layers)} layers")
  # One model is a stack of one: the same code as the multi-model path, whose layout is then the plain one.
  stacked = jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params)
  return apply_gnn_multi(stacked, layers, graph, x, keys=None if key is None else key[None], dropout=dropout,
                         att_dropout=att_dropout, graphnas_compat=graphnas_compat)[0]


def apply_gnn_multi(params, layers: Sequence[LayerArch], graph: GraphsTuple, x, *, keys=None, dropout=0.6,
                    att_dropout=0.6, graphnas_compat: bool = False) -> jax.Array:
  """Logits [M, padded nodes, classes] of M models of one architecture on one graph and input.

  Equal, up to float rounding, to ``jax.vmap(apply_gnn)`` over ``params`` and ``keys``: model m gets the
  dropout masks that ``apply_gnn(params[m], ..., key=keys[m])`` draws.

  Args:
    params: ``init_gnn`` parameters whose every leaf has a leading model axis M (``jax.vmap(init_gnn)``).
    layers, graph, dropout, att_dropout, graphnas_compat: as in ``apply_gnn``.
    x: the input node features shared by the models, dense [padded nodes, F] or ``SparseFeatures``.
    keys: None (evaluation) or a key array [M], one dropout key per model.
  """
  layers = tuple(layers)
  if len(params) != len(layers):
    raise ValueError(f"apply_gnn_multi: {len(params)} parameter dicts for {len(layers)} layers")
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"apply_gnn_multi: every parameter leaf needs the same leading model axis, got sizes {sizes}")
  (models,) = sizes
  if keys is None:
    layer_keys = [None] * len(layers)
  else:
    if jnp.ndim(keys) == 0 or keys.shape[0] != models:
      raise ValueError(f"apply_gnn_multi: need one key per model ({models}), got keys of shape {jnp.shape(keys)}")
    # The per-model split that apply_gnn makes, so each model's layer keys are the ones it would get alone.
    split = jax.vmap(lambda k: jax.random.split(k, len(layers)))(keys)
    layer_keys = [split[:, i] for i in range(len(layers))]
  h = x
  for i, (layer_params, layer, layer_key) in enumerate(zip(params, layers, layer_keys)):
    h = apply_layer_multi(layer_params, layer, graph, h, concat=i < len(layers) - 1, keys=layer_key,
                          dropout=dropout, att_dropout=att_dropout, graphnas_compat=graphnas_compat)
  return h


def num_params(params) -> int:
  """The number of scalar parameters in a parameter pytree."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
