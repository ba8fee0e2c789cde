"""Padding masks and per-entry graph indices for batches made by ``pad_graphs``; all jit-able.

jraph's own ``get_*_padding_mask`` work under jit but read the node count from the node features; these
also take it explicitly, for graphs that carry no node array. For a batch stacked over devices, apply
them under ``jax.vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph

GraphsTuple = jraph.GraphsTuple


def _real_graph_count(n_node: jax.Array) -> jax.Array:
  # pad_with_graphs appends one padding graph with at least one node, then only empty graphs: the
  # padding is that graph plus the run of empty graphs at the end.
  empty_from_end = jnp.cumprod((n_node[::-1] == 0).astype(jnp.int32))
  return n_node.shape[0] - 1 - jnp.sum(empty_from_end)


def _static_num_nodes(graph: GraphsTuple, num_nodes: int | None) -> int:
  if num_nodes is not None:
    return int(num_nodes)
  leaves = jax.tree.leaves(graph.nodes)
  if not leaves:
    raise ValueError("the graph has no node features, so its padded node count is unknown: "
                     "pass num_nodes")
  return leaves[0].shape[0]


def _prefix_mask(length: int, counts: jax.Array, real: jax.Array) -> jax.Array:
  keep = jnp.arange(counts.shape[0]) < real
  return jnp.arange(length) < jnp.sum(jnp.where(keep, counts, 0))


def graph_mask(graph: GraphsTuple) -> jax.Array:
  """Bool [graphs]: True for real graphs, False for the padding graph and empty graphs after it."""
  n_node = jnp.asarray(graph.n_node)
  return jnp.arange(n_node.shape[0]) < _real_graph_count(n_node)


def node_mask(graph: GraphsTuple, num_nodes: int | None = None) -> jax.Array:
  """Bool [nodes]: True for nodes of real graphs. ``num_nodes`` is needed only without node features."""
  n_node = jnp.asarray(graph.n_node)
  return _prefix_mask(_static_num_nodes(graph, num_nodes), n_node, _real_graph_count(n_node))


def edge_mask(graph: GraphsTuple) -> jax.Array:
  """Bool [edges]: True for edges of real graphs."""
  n_node = jnp.asarray(graph.n_node)
  return _prefix_mask(graph.senders.shape[0], jnp.asarray(graph.n_edge), _real_graph_count(n_node))


def node_graph_ids(graph: GraphsTuple, num_nodes: int | None = None) -> jax.Array:
  """Int32 [nodes]: the graph each node belongs to, the segment ids for per-graph readouts."""
  n_node = jnp.asarray(graph.n_node)
  return jnp.repeat(jnp.arange(n_node.shape[0], dtype=jnp.int32), n_node,
                    total_repeat_length=_static_num_nodes(graph, num_nodes))


def edge_graph_ids(graph: GraphsTuple) -> jax.Array:
  """Int32 [edges]: the graph each edge belongs to."""
  n_edge = jnp.asarray(graph.n_edge)
  return jnp.repeat(jnp.arange(n_edge.shape[0], dtype=jnp.int32), n_edge,
                    total_repeat_length=graph.senders.shape[0])


def _zero_where_padding(tree, mask: jax.Array):
  def zero(x):
    keep = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    # where, not a product with the mask: padding may hold inf or NaN, and 0 * inf is NaN.
    return jnp.where(keep, x, jnp.zeros((), x.dtype))
  return jax.tree.map(zero, tree)


def zero_out_padding(graph: GraphsTuple) -> GraphsTuple:
  """Sets the node, edge and global features of padding entries to zero; jit-able.

  Between message-passing layers this keeps padding nodes, which receive every padding edge, from
  growing without bound.
  """
  num_nodes = jax.tree.leaves(graph.nodes)[0].shape[0] if jax.tree.leaves(graph.nodes) else 0
  return graph._replace(
      nodes=_zero_where_padding(graph.nodes, node_mask(graph, num_nodes)),
      edges=_zero_where_padding(graph.edges, edge_mask(graph)),
      globals=_zero_where_padding(graph.globals, graph_mask(graph)))
