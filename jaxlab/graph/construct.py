"""Building edge sets: all pairs within each graph (host) and neighbours within a cutoff (jit-able)."""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from jaxlab.graph import masks

GraphsTuple = jraph.GraphsTuple


def fully_connected_graph(n_node, self_loops: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Edges joining every ordered pair of nodes within each graph of a batch (host-side numpy).

  Nodes are numbered consecutively across graphs, as in a batched ``GraphsTuple``. Within a graph the
  edges run sender-major: (0, 0), (0, 1), ..., (1, 0), ...

  Args:
    n_node: int array [graphs], nodes per graph.
    self_loops: include the edge from each node to itself.

  Returns:
    ``(senders, receivers, n_edge)`` as int32 arrays, ready for ``GraphsTuple``.
  """
  n_node = np.asarray(n_node)
  if n_node.ndim != 1 or (n_node.size and not np.issubdtype(n_node.dtype, np.integer)):
    raise ValueError(f"n_node must be a 1-D integer array, got shape {n_node.shape}, dtype {n_node.dtype}")
  if np.any(n_node < 0):
    raise ValueError(f"n_node must be non-negative, got {n_node}")
  n_node = n_node.astype(np.int64)
  partners = n_node if self_loops else np.maximum(n_node - 1, 0)
  n_edge = n_node * partners
  # Each edge's position k within its graph encodes (sender, receiver) as (k // partners, k % partners).
  edge_graph = np.repeat(np.arange(n_node.shape[0]), n_edge)
  k = np.arange(int(n_edge.sum())) - (np.cumsum(n_edge) - n_edge)[edge_graph]
  width = np.maximum(partners, 1)[edge_graph]
  senders, receivers = k // width, k % width
  if not self_loops:
    # Receivers skip over the sender itself.
    receivers = receivers + (receivers >= senders)
  first_node = (np.cumsum(n_node) - n_node)[edge_graph]
  return ((senders + first_node).astype(np.int32), (receivers + first_node).astype(np.int32),
          n_edge.astype(np.int32))


class RadiusGraph(NamedTuple):
  """Edges found by ``radius_graph``; entries past ``num_pairs`` are padding."""

  senders: jax.Array     # int32 [max_edges]
  receivers: jax.Array   # int32 [max_edges]
  edge_mask: jax.Array   # bool [max_edges], True for real edges
  num_pairs: jax.Array   # int32 scalar, pairs found; above max_edges means edges were cut off


def radius_graph(positions, cutoff: float, max_edges: int, *, graph: GraphsTuple | None = None,
                 self_loops: bool = False) -> RadiusGraph:
  """Directed edges between nodes closer than ``cutoff``, padded to ``max_edges``; jit-able.

  e3nn_jax.radius_graph fills unused slots with -1, which ``e3nn.scatter_sum`` wraps onto the last
  node, loses its static size when restricted to same-graph pairs, and drops coincident distinct points
  (it tests distance > 0 rather than i != j). This version keeps a static size, pairs only nodes of the
  same real graph, and points unused slots at the last node, which in a ``pad_graphs`` batch is a
  padding node. Pass ``edge_mask`` to the segment ops as well. It compares all pairs, O(nodes²) in
  time and memory: meant for batches of up to a few thousand nodes.

  Args:
    positions: float [nodes, dims].
    cutoff: pairs with distance strictly below this are joined.
    max_edges: static number of edge slots.
    graph: the padded batch the nodes belong to; None treats all nodes as one real graph, in which
      case unused slots point at a real node and ``edge_mask`` must be used.
    self_loops: include (i, i).

  Returns:
    ``RadiusGraph``, edges sorted by receiver. If ``num_pairs > max_edges`` the excess was dropped:
    check it on the host and raise the budget.
  """
  positions = jnp.asarray(positions)
  if positions.ndim != 2:
    raise ValueError(f"radius_graph: positions must be [nodes, dims], got shape {positions.shape}")
  try:
    max_edges = operator.index(max_edges)
  except TypeError:
    raise ValueError(f"radius_graph: max_edges must be a static int, got {max_edges!r}") from None
  num_nodes = positions.shape[0]
  if graph is None:
    same_graph = jnp.ones((num_nodes, num_nodes), bool)
  else:
    for leaf in jax.tree.leaves(graph.nodes):
      if leaf.shape[0] != num_nodes:
        raise ValueError(f"radius_graph: positions has {num_nodes} rows but the graph's node "
                         f"features have {leaf.shape[0]}")
    ids = masks.node_graph_ids(graph, num_nodes)
    real = masks.node_mask(graph, num_nodes)
    same_graph = (ids[:, None] == ids[None, :]) & real[:, None] & real[None, :]
  offsets = positions[:, None, :] - positions[None, :, :]
  # Squared distances: a comparison needs no square root (whose gradient is NaN at zero).
  close = jnp.sum(offsets * offsets, axis=-1) < cutoff * cutoff
  pairs = close & same_graph
  if not self_loops:
    pairs = pairs & ~jnp.eye(num_nodes, dtype=bool)
  receivers, senders = jnp.nonzero(pairs, size=max_edges, fill_value=num_nodes - 1)
  num_pairs = jnp.sum(pairs, dtype=jnp.int32)
  return RadiusGraph(senders.astype(jnp.int32), receivers.astype(jnp.int32),
                     jnp.arange(max_edges) < num_pairs, num_pairs)
