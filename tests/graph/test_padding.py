import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from jaxlab import graph as jg
from tests.graph.graphs import random_graph, random_graphs


def assert_graphs_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pad_then_unpad_gives_back_the_originals():
  graphs = random_graphs(0, 9)
  budget = jg.estimate_budget(graphs, batch_size=9, multiple=16)
  padded = jg.pad_graphs(graphs, budget)
  assert padded.senders.shape == (budget.edges,)
  assert padded.n_node.shape == (budget.graphs,)
  assert padded.nodes["x"].shape == (budget.nodes, 3)
  for got, want in zip(jg.unbatch(jg.unpad(padded)), graphs, strict=True):
    assert_graphs_equal(got, want)


def test_padding_edges_point_at_a_padding_node():
  graphs = random_graphs(1, 4, allow_empty=False)
  padded = jg.pad_graphs(graphs, jg.Budget(nodes=64, edges=128, graphs=8))
  real_nodes = sum(int(g.n_node[0]) for g in graphs)
  mask = np.asarray(jg.edge_mask(padded))
  assert np.all(padded.senders[~mask] >= real_nodes)
  assert np.all(padded.receivers[~mask] >= real_nodes)


def test_masks_count_real_entries_under_jit():
  # Empty real graphs (no nodes, no edges) must still count as real graphs.
  rng = np.random.default_rng(2)
  graphs = [random_graph(rng, index=i) for i in range(6)]
  graphs[2] = random_graph(rng, max_nodes=0)
  graphs[-1] = random_graph(rng, max_nodes=0)
  budget = jg.Budget(nodes=80, edges=96, graphs=11)
  padded = jg.pad_graphs(graphs, budget)

  masks = jax.jit(lambda g: (jg.node_mask(g), jg.edge_mask(g), jg.graph_mask(g)))(padded)
  nodes, edges, graph_count = (np.asarray(m) for m in masks)
  assert nodes.sum() == sum(int(g.n_node[0]) for g in graphs)
  assert edges.sum() == sum(int(g.n_edge[0]) for g in graphs)
  assert graph_count.sum() == len(graphs)
  # Real entries come first.
  for mask in (nodes, edges, graph_count):
    assert np.all(mask[:mask.sum()])
  np.testing.assert_array_equal(nodes, jraph.get_node_padding_mask(padded))
  np.testing.assert_array_equal(edges, jraph.get_edge_padding_mask(padded))
  np.testing.assert_array_equal(graph_count, jraph.get_graph_padding_mask(padded))


def test_masks_with_exactly_full_graph_budget():
  graphs = random_graphs(3, 3, allow_empty=False)
  padded = jg.pad_graphs(graphs, jg.Budget(nodes=64, edges=64, graphs=4))
  assert int(jnp.sum(jg.graph_mask(padded))) == 3


def test_node_mask_without_node_features_needs_num_nodes():
  padded = jg.pad_graphs([g._replace(nodes=None) for g in random_graphs(4, 3)],
                         jg.Budget(nodes=32, edges=64, graphs=4))
  with pytest.raises(ValueError, match="num_nodes"):
    jg.node_mask(padded)
  assert int(jnp.sum(jg.node_mask(padded, num_nodes=32))) == int(padded.n_node[:3].sum())


def test_node_and_edge_graph_ids():
  graphs = random_graphs(5, 4)
  padded = jg.pad_graphs(graphs, jg.Budget(nodes=64, edges=64, graphs=6))
  np.testing.assert_array_equal(jax.jit(jg.node_graph_ids)(padded),
                                np.repeat(np.arange(6), padded.n_node))
  np.testing.assert_array_equal(jax.jit(jg.edge_graph_ids)(padded),
                                np.repeat(np.arange(6), padded.n_edge))


def test_zero_out_padding_under_jit():
  graphs = random_graphs(6, 5, allow_empty=False)
  padded = jg.pad_graphs(graphs, jg.Budget(nodes=48, edges=80, graphs=8))
  nodes_mask, edges_mask, graphs_mask = (np.asarray(m) for m in (
      jg.node_mask(padded), jg.edge_mask(padded), jg.graph_mask(padded)))
  # Padding that overflowed in an earlier layer: a product with the mask would turn it into NaN.
  dirty = padded._replace(
      nodes={"x": np.where(nodes_mask[:, None], padded.nodes["x"], np.float32(np.inf)),
             "kind": np.where(nodes_mask, padded.nodes["kind"], 7).astype(np.int32)},
      edges=np.where(edges_mask[:, None], padded.edges, np.float32(1e30)),
      globals=np.where(graphs_mask[:, None], padded.globals, np.float32(-5.0)))
  clean = jax.jit(jg.zero_out_padding)(dirty)
  np.testing.assert_array_equal(clean.nodes["x"][nodes_mask], padded.nodes["x"][nodes_mask])
  np.testing.assert_array_equal(clean.nodes["x"][~nodes_mask], 0)
  np.testing.assert_array_equal(clean.nodes["kind"][~nodes_mask], 0)
  np.testing.assert_array_equal(clean.nodes["kind"][nodes_mask], padded.nodes["kind"][nodes_mask])
  np.testing.assert_array_equal(clean.edges[~edges_mask], 0)
  np.testing.assert_array_equal(clean.edges[edges_mask], padded.edges[edges_mask])
  np.testing.assert_array_equal(clean.globals[~graphs_mask], 0)
  np.testing.assert_array_equal(clean.globals[graphs_mask], padded.globals[graphs_mask])


@pytest.mark.parametrize("ordered", [False, True])
def test_estimated_budget_covers_every_batch(ordered):
  graphs = random_graphs(7, 53, max_nodes=20, max_edges=40)
  budget = jg.estimate_budget(graphs, batch_size=8, multiple=64, ordered=ordered)
  assert budget.nodes % 64 == 0 and budget.edges % 64 == 0 and budget.graphs == 9
  seeds = [None] if ordered else [None, 0, 1, 2, 3]
  for seed in seeds:
    batches = list(jg.batch_iterator(graphs, 8, budget, shuffle_rng=seed))
    assert len(batches) == 7
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(b)) for b in batches}
    assert len(shapes) == 1


def test_ordered_budget_is_the_tightest_for_fixed_order():
  graphs = random_graphs(8, 40, max_nodes=30, max_edges=60)
  budget = jg.estimate_budget(graphs, batch_size=5, multiple=1, ordered=True)
  chunks = [graphs[i:i + 5] for i in range(0, 40, 5)]
  assert budget.nodes == max(sum(int(g.n_node[0]) for g in c) for c in chunks) + 1
  assert budget.edges == max(sum(int(g.n_edge[0]) for g in c) for c in chunks)
  any_order = jg.estimate_budget(graphs, batch_size=5, multiple=1)
  assert any_order.nodes >= budget.nodes and any_order.edges >= budget.edges
  assert any_order.nodes == sum(sorted((int(g.n_node[0]) for g in graphs), reverse=True)[:5]) + 1


def test_estimate_budget_from_sizes_matches_graphs():
  graphs = random_graphs(9, 30)
  sizes = np.array([(g.n_node[0], g.n_edge[0]) for g in graphs])
  assert jg.estimate_budget(sizes, 4) == jg.estimate_budget(graphs, 4)
  with pytest.raises(ValueError, match="shape"):
    jg.estimate_budget(np.ones((3, 3), int), 4)


def test_too_small_budget_raises_a_clear_error():
  graphs = random_graphs(10, 4, allow_empty=False)
  nodes = sum(int(g.n_node[0]) for g in graphs)
  with pytest.raises(ValueError, match=f"needs nodes >= {nodes + 1}"):
    jg.pad_graphs(graphs, jg.Budget(nodes=nodes, edges=1000, graphs=10))
  with pytest.raises(ValueError, match="graphs >= 5"):
    jg.pad_graphs(graphs, jg.Budget(nodes=1000, edges=1000, graphs=4))
  with pytest.raises(ValueError, match="graph budget of at least 9"):
    jg.batch_iterator(graphs * 3, 8, jg.Budget(nodes=1000, edges=1000, graphs=5))
  with pytest.raises(ValueError, match="reserved for padding"):
    jg.Budget(nodes=10, edges=10, graphs=1)


def test_malformed_graphs_raise_clear_errors():
  good = random_graphs(11, 1, allow_empty=False, max_edges=0)[0]
  two_nodes = good._replace(nodes={"x": np.zeros((2, 3), np.float32), "kind": np.zeros(2, np.int32)},
                            n_node=np.array([2], np.int32))
  budget = jg.Budget(nodes=64, edges=64, graphs=4)
  wired = two_nodes._replace(senders=np.array([0, 1], np.int32), receivers=np.array([1, 2], np.int32),
                             edges=np.zeros((2, 2), np.float32), n_edge=np.array([2], np.int32))
  with pytest.raises(ValueError, match=r"graphs\[0\]: receivers\[1\] = 2 is out of range"):
    jg.pad_graphs([wired], budget)
  short = wired._replace(senders=np.array([0], np.int32))
  with pytest.raises(ValueError, match="senders has shape"):
    jg.pad_graphs([short], budget)
  bad_nodes = two_nodes._replace(nodes={"x": np.zeros((3, 3), np.float32), "kind": np.zeros(2, np.int32)})
  with pytest.raises(ValueError, match=r"nodes\['x'\] has shape \(3, 3\)"):
    jg.pad_graphs([bad_nodes], budget)
  other_dtype = two_nodes._replace(edges=np.zeros((0, 2), np.float64))
  with pytest.raises(ValueError, match=r"graphs\[1\].edges does not match"):
    jg.pad_graphs([two_nodes, other_dtype], budget)
  with pytest.raises(ValueError, match="at least one graph"):
    jg.pad_graphs([], budget)


def test_batch_iterator_visits_each_graph_once():
  graphs = random_graphs(12, 23)
  budget = jg.estimate_budget(graphs, 4)
  seen = []
  for padded in jg.batch_iterator(graphs, 4, budget, shuffle_rng=np.random.default_rng(0)):
    seen += [int(i) for i in np.asarray(padded.globals)[np.asarray(jg.graph_mask(padded)), 0]]
  assert sorted(seen) == list(range(23)) and seen != list(range(23))
  kept = list(jg.batch_iterator(graphs, 4, budget, drop_remainder=True))
  assert len(kept) == 5 and all(int(jnp.sum(jg.graph_mask(b))) == 4 for b in kept)


def test_stack_device_batches_adds_a_leading_device_axis():
  graphs = random_graphs(13, 16)
  budget = jg.estimate_budget(graphs, 4, multiple=32)
  batches = list(jg.batch_iterator(graphs, 4, budget))
  stacked = jg.stack_device_batches(batches)
  assert stacked.nodes["x"].shape == (4, budget.nodes, 3)
  assert stacked.nodes["kind"].shape == (4, budget.nodes)
  assert stacked.edges.shape == (4, budget.edges, 2)
  assert stacked.senders.shape == stacked.receivers.shape == (4, budget.edges)
  assert stacked.n_node.shape == stacked.n_edge.shape == (4, budget.graphs)
  assert stacked.globals.shape == (4, budget.graphs, 1)
  per_device = np.asarray(jax.jit(jax.vmap(jg.node_mask))(stacked)).sum(axis=1)
  np.testing.assert_array_equal(per_device, [int(np.sum(jg.node_mask(b))) for b in batches])
  bigger = jg.pad_graphs(graphs[:4], jg.Budget(budget.nodes + 32, budget.edges, budget.graphs))
  with pytest.raises(ValueError, match=r"batches\[1\].*same budget"):
    jg.stack_device_batches([batches[0], bigger])
