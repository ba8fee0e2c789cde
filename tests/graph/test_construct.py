import jax
import numpy as np
import pytest

from jaxlab import graph as jg
from tests.graph.graphs import random_graphs


def fully_connected_reference(n_node, self_loops):
  senders, receivers, n_edge, offset = [], [], [], 0
  for n in n_node:
    count = 0
    for i in range(n):
      for j in range(n):
        if i != j or self_loops:
          senders.append(offset + i)
          receivers.append(offset + j)
          count += 1
    n_edge.append(count)
    offset += n
  return np.array(senders), np.array(receivers), np.array(n_edge)


@pytest.mark.parametrize("self_loops", [True, False])
def test_fully_connected_graph_matches_double_loop(self_loops):
  n_node = np.array([3, 0, 1, 4, 2, 1])
  got = jg.fully_connected_graph(n_node, self_loops=self_loops)
  for g, want in zip(got, fully_connected_reference(n_node, self_loops), strict=True):
    assert g.dtype == np.int32
    np.testing.assert_array_equal(g, want)


def test_fully_connected_graph_pads_and_rejects_bad_sizes():
  n_node = np.array([3, 2], np.int32)
  senders, receivers, n_edge = jg.fully_connected_graph(n_node)
  graph = jg.GraphsTuple(nodes=np.zeros((5, 1), np.float32), edges=None, globals=None,
                         senders=senders, receivers=receivers, n_node=n_node, n_edge=n_edge)
  padded = jg.pad_graphs([graph], jg.Budget(nodes=8, edges=16, graphs=4))
  assert int(np.sum(jg.edge_mask(padded))) == 13
  with pytest.raises(ValueError, match="non-negative"):
    jg.fully_connected_graph(np.array([2, -1]))
  with pytest.raises(ValueError, match="1-D integer"):
    jg.fully_connected_graph(np.array([[2]]))


def radius_reference(positions, graph_ids, real, cutoff, self_loops):
  pairs = set()
  for i in range(len(positions)):
    for j in range(len(positions)):
      if (real[i] and real[j] and graph_ids[i] == graph_ids[j] and (i != j or self_loops)
          and np.sum((positions[i] - positions[j]) ** 2) < cutoff ** 2):
        pairs.add((j, i))
  return pairs


@pytest.mark.parametrize("self_loops", [False, True])
def test_radius_graph_matches_brute_force_on_a_padded_batch(self_loops):
  graphs = random_graphs(20, 5, max_nodes=9, allow_empty=False)
  padded = jg.pad_graphs(graphs, jg.Budget(nodes=48, edges=64, graphs=8))
  positions = np.asarray(padded.nodes["x"])
  positions[3] = positions[2]  # coincident distinct points are still neighbours
  result = jax.jit(lambda p, g: jg.radius_graph(p, 1.2, 200, graph=g, self_loops=self_loops))(
      positions, padded)
  mask = np.asarray(result.edge_mask)
  want = radius_reference(positions, np.repeat(np.arange(8), padded.n_node),
                          np.asarray(jg.node_mask(padded)), 1.2, self_loops)
  got = set(zip(np.asarray(result.senders)[mask].tolist(), np.asarray(result.receivers)[mask].tolist()))
  assert got == want and int(result.num_pairs) == len(want) == mask.sum()
  assert np.all(np.diff(np.asarray(result.receivers)[mask]) >= 0)
  # Unused slots point at the last node, a padding node.
  assert np.all(np.asarray(result.senders)[~mask] == 47)
  assert np.all(np.asarray(result.receivers)[~mask] == 47)


def test_radius_graph_reports_truncation():
  positions = np.zeros((4, 3), np.float32)
  result = jax.jit(jg.radius_graph, static_argnums=2)(positions, 1.0, 5)
  assert int(result.num_pairs) == 12 and bool(np.all(result.edge_mask))
  with pytest.raises(ValueError, match="positions must be"):
    jg.radius_graph(np.zeros(4, np.float32), 1.0, 5)
