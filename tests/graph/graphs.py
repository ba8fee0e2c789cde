"""Seeded random graphs shared by the graph tests."""

import numpy as np

from jaxlab.graph import GraphsTuple


def random_graph(rng: np.random.Generator, max_nodes: int = 7, max_edges: int = 12,
                 index: int = 0, allow_empty: bool = True) -> GraphsTuple:
  """One graph with dict node features, edge features and a global that records ``index``."""
  n = int(rng.integers(0 if allow_empty else 1, max_nodes + 1))
  e = int(rng.integers(0, max_edges + 1)) if n else 0
  return GraphsTuple(
      nodes={"x": rng.normal(size=(n, 3)).astype(np.float32),
             "kind": rng.integers(0, 5, size=(n,)).astype(np.int32)},
      edges=rng.normal(size=(e, 2)).astype(np.float32),
      senders=rng.integers(0, max(n, 1), size=e).astype(np.int32),
      receivers=rng.integers(0, max(n, 1), size=e).astype(np.int32),
      n_node=np.array([n], np.int32), n_edge=np.array([e], np.int32),
      globals=np.array([[index]], np.float32))


def random_graphs(seed: int, count: int, **kwargs) -> list[GraphsTuple]:
  rng = np.random.default_rng(seed)
  return [random_graph(rng, index=i, **kwargs) for i in range(count)]
