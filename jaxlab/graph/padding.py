"""Host-side batching of graphs into fixed padding budgets.

Everything here runs in numpy on the host. A jitted step sees every batch with the same shapes, so it
compiles once per budget; the padding itself (jraph's ``pad_with_graphs``) cannot run under jit anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jraph
import numpy as np

GraphsTuple = jraph.GraphsTuple


@dataclasses.dataclass(frozen=True)
class Budget:
  """Padded sizes of one batch: total nodes, edges and graphs, padding included."""

  nodes: int
  edges: int
  graphs: int

  def __post_init__(self):
    for name in ("nodes", "edges", "graphs"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"Budget.{name} must be an int, got {value!r}")
      object.__setattr__(self, name, int(value))
    # pad_with_graphs always appends one padding graph holding at least one padding node.
    if self.nodes < 1 or self.graphs < 2 or self.edges < 0:
      raise ValueError(
          f"{self} cannot hold any graph: need nodes >= 1, edges >= 0 and graphs >= 2 "
          "(one node and one graph are reserved for padding)")

  def fits(self, nodes: int, edges: int, graphs: int) -> bool:
    """Whether a batch of these real sizes can be padded to this budget."""
    return nodes + 1 <= self.nodes and edges <= self.edges and graphs + 1 <= self.graphs


def _round_up(value: int, multiple: int) -> int:
  return int(math.ceil(value / multiple) * multiple)


def _sizes_of(graphs_or_sizes) -> np.ndarray:
  """Per-item (nodes, edges, graphs) as an int array of shape [items, 3]."""
  if len(graphs_or_sizes) == 0:
    raise ValueError("estimate_budget needs at least one graph")
  if isinstance(graphs_or_sizes[0], GraphsTuple):
    return np.array(
        [(int(np.sum(g.n_node)), int(np.sum(g.n_edge)), int(np.shape(g.n_node)[0]))
         for g in graphs_or_sizes], dtype=np.int64)
  sizes = np.asarray(graphs_or_sizes)
  if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.integer):
    raise ValueError(
        "estimate_budget takes a list of GraphsTuple or integer sizes of shape [num_graphs, 2] "
        f"holding (nodes, edges) per graph; got an array of shape {sizes.shape}, dtype {sizes.dtype}")
  if np.any(sizes < 0):
    raise ValueError("estimate_budget: node and edge counts must be non-negative")
  return np.concatenate([sizes, np.ones((len(sizes), 1), sizes.dtype)], axis=1).astype(np.int64)


def estimate_budget(graphs_or_sizes, batch_size: int, multiple: int = 64, *,
                    ordered: bool = False) -> Budget:
  """Picks a budget large enough for every batch of ``batch_size`` items of a data set.

  Args:
    graphs_or_sizes: the data set, as a list of ``GraphsTuple`` (one item each) or an int array of shape
      [num_graphs, 2] with (nodes, edges) per graph.
    batch_size: items per batch.
    multiple: nodes and edges are rounded up to a multiple of this, so that nearby data sets share a
      compiled step.
    ordered: if True the batches are the consecutive chunks of the data in the given order (an
      unshuffled ``batch_iterator``) and the budget covers exactly those; otherwise it covers any batch
      of ``batch_size`` items (the sum of the largest ``batch_size`` sizes), which is what shuffling needs.

  Returns:
    A ``Budget`` with one spare node and one spare graph for jraph's padding graph.
  """
  if batch_size < 1 or multiple < 1:
    raise ValueError(f"batch_size and multiple must be >= 1, got {batch_size} and {multiple}")
  sizes = _sizes_of(graphs_or_sizes)
  if ordered:
    starts = np.arange(0, len(sizes), batch_size)
    need = np.add.reduceat(sizes, starts, axis=0).max(axis=0)
  else:
    # Sorting each column on its own may combine sizes of different graphs: a bound, never short.
    largest = -np.sort(-sizes, axis=0)[:batch_size]
    need = largest.sum(axis=0)
  nodes, edges, graphs = (int(v) for v in need)
  return Budget(nodes=_round_up(nodes + 1, multiple), edges=_round_up(edges, multiple),
                graphs=graphs + 1)


def _leaves_with_names(tree, field: str):
  return [(f"{field}{jax.tree_util.keystr(path)}", np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_graph(graph: GraphsTuple, where: str = "graph") -> GraphsTuple:
  """Validates one (possibly batched) host graph and returns it as numpy with int32 index arrays.

  Raises ValueError naming ``where`` and the field when lengths disagree or an edge points outside
  its own graph's nodes.
  """
  if not isinstance(graph, GraphsTuple):
    raise ValueError(f"{where}: expected a GraphsTuple, got {type(graph).__name__}")
  graph = jax.device_get(graph)
  n_node, n_edge = np.asarray(graph.n_node), np.asarray(graph.n_edge)
  if n_node.ndim != 1 or n_edge.shape != n_node.shape:
    raise ValueError(f"{where}: n_node and n_edge must be 1-D of equal length, "
                     f"got shapes {n_node.shape} and {n_edge.shape}")
  for name, counts in (("n_node", n_node), ("n_edge", n_edge)):
    if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
      raise ValueError(f"{where}: {name} must hold non-negative integers, got {counts}")
  num_nodes, num_edges, num_graphs = int(n_node.sum()), int(n_edge.sum()), n_node.shape[0]
  senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
  for name, index in (("senders", senders), ("receivers", receivers)):
    if index.shape != (num_edges,):
      raise ValueError(f"{where}: {name} has shape {index.shape} but n_edge sums to {num_edges}")
    if num_edges and not np.issubdtype(index.dtype, np.integer):
      raise ValueError(f"{where}: {name} must be integers, got dtype {index.dtype}")
  expected = {"nodes": num_nodes, "edges": num_edges, "globals": num_graphs}
  for field, length in expected.items():
    for name, leaf in _leaves_with_names(getattr(graph, field), field):
      if leaf.ndim == 0 or leaf.shape[0] != length:
        raise ValueError(f"{where}: {name} has shape {leaf.shape}, expected leading size {length}")
  if num_edges:
    # Each edge must stay inside its own graph, else batching would silently wire graphs together.
    edge_graph = np.repeat(np.arange(num_graphs), n_edge)
    first = (np.cumsum(n_node) - n_node)[edge_graph]
    last = first + n_node[edge_graph]
    for name, index in (("senders", senders), ("receivers", receivers)):
      bad = np.flatnonzero((index < first) | (index >= last))
      if bad.size:
        e = bad[0]
        raise ValueError(
            f"{where}: {name}[{e}] = {index[e]} is out of range: edge {e} belongs to graph "
            f"{edge_graph[e]} whose nodes are [{first[e]}, {last[e]})")
  return graph._replace(n_node=n_node.astype(np.int32), n_edge=n_edge.astype(np.int32),
                        senders=senders.astype(np.int32), receivers=receivers.astype(np.int32))


def _feature_signature(graph: GraphsTuple):
  """What must agree between graphs for them to be batched: structure, trailing shapes, dtypes."""
  return tuple(
      (jax.tree.structure(getattr(graph, field)),
       tuple((leaf.shape[1:], leaf.dtype) for _, leaf in _leaves_with_names(getattr(graph, field), field)))
      for field in ("nodes", "edges", "globals"))


def _check_compatible(graphs: Sequence[GraphsTuple]) -> None:
  reference = _feature_signature(graphs[0])
  for i, graph in enumerate(graphs[1:], start=1):
    signature = _feature_signature(graph)
    for field, got, want in zip(("nodes", "edges", "globals"), signature, reference):
      if got != want:
        raise ValueError(f"graphs[{i}].{field} does not match graphs[0].{field} in structure, "
                         f"trailing shape or dtype: {got} vs {want}")


def pad_graphs(graphs: Sequence[GraphsTuple], budget: Budget, *, check: bool = True) -> GraphsTuple:
  """Batches host graphs and pads them to ``budget`` with jraph's padding graph.

  The real graphs come first, then one padding graph holding every padding node and edge (padding
  edges point at its first node), then empty graphs. Masks from ``node_mask`` and friends recover the
  real entries; ``unpad`` removes the padding.

  Args:
    graphs: one or more ``GraphsTuple``, each possibly holding several graphs.
    budget: the padded sizes.
    check: validate every graph (``check_graph``) and their mutual compatibility; turn off only for
      graphs that were already checked.

  Raises:
    ValueError: the list is empty, a graph is malformed, the graphs disagree in features, or the batch
      does not fit the budget.
  """
  if not isinstance(budget, Budget):
    raise ValueError(f"pad_graphs: budget must be a Budget, got {type(budget).__name__}")
  if isinstance(graphs, GraphsTuple):
    graphs = [graphs]
  if len(graphs) == 0:
    raise ValueError("pad_graphs needs at least one graph")
  if check:
    graphs = [check_graph(g, f"graphs[{i}]") for i, g in enumerate(graphs)]
    _check_compatible(graphs)
  nodes = sum(int(np.sum(g.n_node)) for g in graphs)
  edges = sum(int(np.sum(g.n_edge)) for g in graphs)
  num_graphs = sum(int(np.shape(g.n_node)[0]) for g in graphs)
  if not budget.fits(nodes, edges, num_graphs):
    raise ValueError(
        f"a batch of {num_graphs} graphs with {nodes} nodes and {edges} edges does not fit {budget}: "
        f"it needs nodes >= {nodes + 1}, edges >= {edges}, graphs >= {num_graphs + 1} "
        "(one node and one graph are reserved for padding); see estimate_budget")
  batched = jraph.batch_np(graphs)
  return jraph.pad_with_graphs(batched, n_node=budget.nodes, n_edge=budget.edges,
                               n_graph=budget.graphs)


def batch_iterator(graphs: Sequence[GraphsTuple], batch_size: int, budget: Budget,
                   shuffle_rng: np.random.Generator | int | None = None, *,
                   drop_remainder: bool = False) -> Iterator[GraphsTuple]:
  """Yields padded batches of ``batch_size`` graphs, all with the shapes of ``budget``.

  Every graph is validated before the first batch is built, so a bad data set fails at once rather than
  part-way through an epoch.

  Args:
    graphs: the data set, one ``GraphsTuple`` per item.
    batch_size: items per batch; the last batch may be smaller unless ``drop_remainder``.
    budget: padded sizes shared by every batch (``estimate_budget``).
    shuffle_rng: shuffles the order: a numpy Generator (advanced by each call, so every epoch gets a
      new order) or an int seed (the same order every call). None keeps the data order.
    drop_remainder: skip a final incomplete batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  checked = [check_graph(g, f"graphs[{i}]") for i, g in enumerate(graphs)]
  if not checked:
    raise ValueError("batch_iterator needs at least one graph")
  _check_compatible(checked)
  graphs_per_item = sorted((int(np.shape(g.n_node)[0]) for g in checked), reverse=True)
  graphs_needed = sum(graphs_per_item[:batch_size]) + 1
  if graphs_needed > budget.graphs:
    raise ValueError(f"batch_size {batch_size} needs a graph budget of at least {graphs_needed} "
                     f"(one spare for padding), got {budget}")
  order = np.arange(len(checked))
  if shuffle_rng is not None:
    order = np.random.default_rng(shuffle_rng).permutation(order)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)

  def batches():
    for start in range(0, stop, batch_size):
      chunk = [checked[i] for i in order[start:start + batch_size]]
      yield pad_graphs(chunk, budget, check=False)

  return batches()


def stack_device_batches(batches: Sequence[GraphsTuple]) -> GraphsTuple:
  """Stacks per-device padded batches on a new leading axis, ready to shard over a data mesh axis.

  Each batch must have been padded to the same budget; masks and models then apply per device under
  ``jax.vmap`` or inside ``jax.shard_map``.
  """
  if len(batches) == 0:
    raise ValueError("stack_device_batches needs at least one batch")
  host = [jax.device_get(b) for b in batches]
  reference = jax.tree_util.tree_flatten_with_path(host[0])
  for i, batch in enumerate(host[1:], start=1):
    flat = jax.tree_util.tree_flatten_with_path(batch)
    if flat[1] != reference[1]:
      raise ValueError(f"batches[{i}] has a different structure from batches[0]")
    for (path, leaf), (_, ref) in zip(flat[0], reference[0]):
      if np.shape(leaf) != np.shape(ref) or np.asarray(leaf).dtype != np.asarray(ref).dtype:
        raise ValueError(
            f"batches[{i}]{jax.tree_util.keystr(path)} has shape {np.shape(leaf)} and dtype "
            f"{np.asarray(leaf).dtype}, batches[0] has {np.shape(ref)} and {np.asarray(ref).dtype}: "
            "pad every device's batch to the same budget")
  return jax.tree.map(lambda *leaves: np.stack(leaves), *host)


def _num_padding_graphs(n_node) -> int:
  """How many trailing graphs of a ``pad_graphs`` batch are padding (host-side).

  The padding graph is the last graph with nodes (it always holds at least one); only empty graphs
  follow it.
  """
  n_node = np.asarray(n_node)
  nonempty = np.flatnonzero(n_node)
  if nonempty.size == 0:
    raise ValueError("n_node has no graph with nodes, so it does not come from pad_graphs")
  return int(n_node.shape[0] - nonempty[-1])


def unpad(padded: GraphsTuple) -> GraphsTuple:
  """Removes the padding graph and the empty graphs added by ``pad_graphs`` (host-side)."""
  padded = jax.device_get(padded)
  real_graphs = padded.n_node.shape[0] - _num_padding_graphs(padded.n_node)
  real_nodes = int(np.sum(padded.n_node[:real_graphs]))
  real_edges = int(np.sum(padded.n_edge[:real_graphs]))
  return GraphsTuple(
      nodes=jax.tree.map(lambda x: x[:real_nodes], padded.nodes),
      edges=jax.tree.map(lambda x: x[:real_edges], padded.edges),
      globals=jax.tree.map(lambda x: x[:real_graphs], padded.globals),
      senders=padded.senders[:real_edges], receivers=padded.receivers[:real_edges],
      n_node=padded.n_node[:real_graphs], n_edge=padded.n_edge[:real_graphs])


def unbatch(graph: GraphsTuple) -> list[GraphsTuple]:
  """Splits a batched host graph into one ``GraphsTuple`` per graph."""
  return jraph.unbatch_np(jax.device_get(graph))


def batch(graphs: Sequence[GraphsTuple]) -> GraphsTuple:
  """Concatenates host graphs into one batched ``GraphsTuple`` without padding."""
  return jraph.batch_np(list(graphs))
