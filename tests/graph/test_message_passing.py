"""A small gather/scatter network must give the same real-node outputs on a padded batch as on the same
graphs without padding: the property every padded model in jaxlab relies on."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import graph as jg
from tests.graph.graphs import random_graphs

HIDDEN = 8


def init_params(seed):
  keys = jax.random.split(jax.random.key(seed), 5)
  return {"embed": jax.random.normal(keys[0], (3, HIDDEN)) * 0.5,
          "message": jax.random.normal(keys[1], (HIDDEN + 2, HIDDEN)) * 0.5,
          "attend": jax.random.normal(keys[2], (HIDDEN, 2)),
          "update": jax.random.normal(keys[3], (4 * HIDDEN, HIDDEN)) * 0.3,
          "readout": jax.random.normal(keys[4], (HIDDEN, 1))}


def network(params, graph, num_nodes, num_graphs, edge_mask=None, node_mask=None):
  """Two message-passing layers using every segment op, then a mean readout per graph."""
  h = jnp.tanh(graph.nodes["x"] @ params["embed"])
  n = num_nodes
  for _ in range(2):
    messages = jnp.tanh(jnp.concatenate([h[graph.senders], graph.edges], axis=-1) @ params["message"])
    weights = jg.segment_softmax(messages @ params["attend"], graph.receivers, n, edge_mask)  # 2 heads
    attended = jg.segment_sum(messages * weights[:, :1] + messages * weights[:, 1:], graph.receivers, n,
                              edge_mask)
    pooled = [jg.segment_sum(messages, graph.receivers, n, edge_mask),
              jg.segment_mean(messages, graph.receivers, n, edge_mask),
              jg.segment_max(messages, graph.receivers, n, edge_mask), attended]
    h = jnp.tanh(jnp.concatenate(pooled, axis=-1) @ params["update"]) + h
  ids = jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_node, total_repeat_length=n)
  per_graph = jg.segment_mean(h, ids, num_graphs, node_mask) @ params["readout"]
  return h, per_graph


def padded_network(params, padded):
  return network(params, padded, padded.nodes["x"].shape[0], padded.n_node.shape[0],
                 jg.edge_mask(padded), jg.node_mask(padded))


def test_padded_batch_matches_the_unpadded_graphs():
  graphs = random_graphs(30, 7, max_nodes=9, max_edges=20)
  params = init_params(0)
  budget = jg.Budget(nodes=64, edges=128, graphs=10)
  padded = jg.pad_graphs(graphs, budget)
  # Padding nodes start huge, so any leak into real nodes would show.
  real = np.asarray(jg.node_mask(padded))
  padded = padded._replace(nodes={**padded.nodes,
                                  "x": np.where(real[:, None], padded.nodes["x"], np.float32(1e4))})
  # The reference sees the graphs concatenated with no padding and no masks at all.
  unpadded = jg.batch(graphs)
  num_real = int(np.sum(unpadded.n_node))
  want_nodes, want_graphs = jax.jit(network, static_argnums=(2, 3))(params, unpadded, num_real,
                                                                   len(graphs))
  nodes, per_graph = jax.jit(padded_network)(params, padded)
  np.testing.assert_allclose(nodes[:num_real], want_nodes, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_graph[:len(graphs)], want_graphs, rtol=1e-5, atol=1e-5)
  # One graph alone, as a model would see it at inference.
  first = graphs[0]
  alone_nodes, _ = jax.jit(network, static_argnums=(2, 3))(params, first, int(first.n_node[0]), 1)
  np.testing.assert_allclose(nodes[:int(first.n_node[0])], alone_nodes, rtol=1e-5, atol=1e-5)


def test_vmapped_over_stacked_device_batches_matches_each_batch():
  graphs = random_graphs(31, 12, max_nodes=9, max_edges=20)
  params = init_params(1)
  budget = jg.estimate_budget(graphs, 4, multiple=16)
  batches = list(jg.batch_iterator(graphs, 4, budget))
  stacked = jg.stack_device_batches(batches)
  nodes, per_graph = jax.jit(jax.vmap(padded_network, in_axes=(None, 0)))(params, stacked)
  single = jax.jit(padded_network)
  for d, b in enumerate(batches):
    want_nodes, want_graph = single(params, b)
    real = np.asarray(jg.node_mask(b))
    np.testing.assert_allclose(nodes[d][real], want_nodes[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_graph[d][:4], want_graph[:4], rtol=1e-5, atol=1e-5)
