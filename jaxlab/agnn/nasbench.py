"""NAS-Bench-Graph as an offline test bed for the architecture-search controllers.

NAS-Bench-Graph (Qin et al., NeurIPS 2022 datasets track; PyPI ``nas-bench-graph``) trained every architecture of
a small macro space on nine datasets and ships the results as tables ("light" release: one number per metric, no
weights and no training curves). A controller can therefore be run here for thousands of steps on a CPU, with
the same results for everyone, which makes it a test bed for search behaviour rather than for GNN training.

The space: four computing nodes. Node t takes its input from the raw input or from an earlier node (1, 2, 3 and
4 options), and applies one of nine operations (five on ogbn-proteins). Nodes that feed no other node are
combined into the output. In ``nasbench_space`` a node's two decisions are adjacent positions, node by node:
``link0, op0, link1, op1, link2, op2, link3, op3``. A controller RNN then reads the architecture the way the
network is built (each node's input, then what it does), and the two action classes ``links`` and ``ops`` are
interleaved. A link choice is the benchmark's own encoding: 0 is the raw input, j >= 1 is node j (1-based).

Rewards: search with ``BenchEntry.valid`` (validation accuracy) only; ``test`` is reported, never optimised.
AutoGL's NAS-Bench-Graph example uses the test accuracy as its reward, which leaks the test set into the search
(``shared/methods/agnn.md``, pitfall 1); we do not follow it.

The table keys are the benchmark's own canonical hash, which merges architectures it treats as equivalent
(26,206 keys for the 157,440 raw sequences other than all-skip). ``arch_key`` computes it here rather than
calling the wheel's ``Arch.valid_hash``, so that this module needs only the wheel's data files; the test suite
checks the two against each other. The tables are pickles; they are read with an unpickler that admits only the
two numpy globals they contain, so a tampered file cannot run code.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import itertools
import math
import numbers
import os
import pathlib
import pickle
import statistics
from collections.abc import Sequence

from jaxlab.agnn.space import Position, SearchSpace

DATASETS = ("cora", "citeseer", "pubmed", "cs", "physics", "photo", "computers", "arxiv", "proteins")
# The wheel's operation names in the wheel's order; the order matters, because it defines both the digits of
# the table keys and the order used to sort interchangeable nodes.
OPS = ("gat", "gcn", "gin", "cheb", "sage", "arma", "graph", "fc", "skip")
# ogbn-proteins was run on a reduced list; its keys still use the digits of OPS.
PROTEINS_OPS = ("gcn", "sage", "arma", "fc", "skip")
NUM_NODES = 4

# The nine canonical link vectors (one per rooted tree shape of four nodes under the input), in the order that
# gives the leading digit of a key.
_CANONICAL_LINKS = ((0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 1, 2), (0, 0, 1, 3),
                    (0, 1, 1, 1), (0, 1, 1, 2), (0, 1, 2, 2), (0, 1, 2, 3))
_OP_INDEX = {name: i for i, name in enumerate(OPS)}
_KEY_BASE = len(OPS) + 1  # the benchmark writes keys in base 10 with 9 op digits


def _relabellings() -> dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
  """For each of the 24 link vectors: its canonical vector and the node order that produces it.

  ``order[i]`` is the old node that becomes node i. Several orders can give the canonical vector when the tree
  has symmetric parts; the benchmark takes the lexicographically first one, so we do too (trying permutations in
  itertools' lexicographic order). The symmetric ambiguity left over is removed later by ``_sort_symmetric``.
  """
  table = {}
  canonical = set(_CANONICAL_LINKS)
  for links in itertools.product(*(range(t + 1) for t in range(NUM_NODES))):
    for order in itertools.permutations(range(NUM_NODES)):
      new_index = {old: new for new, old in enumerate(order)}
      relabelled = tuple(0 if links[old] == 0 else new_index[links[old] - 1] + 1 for old in order)
      if relabelled in canonical:
        table[links] = (relabelled, order)
        break
  return table


_RELABEL = _relabellings()


def _canonical_order(links: Sequence[int], ops: Sequence[str]) -> tuple[list[int], list[str]]:
  links, order = _RELABEL[tuple(links)]
  return list(links), [ops[old] for old in order]


def _passes_input_through(node: int, links: Sequence[int], ops: Sequence[str]) -> bool:
  """Whether ``node`` and every node above it are skips, i.e. the node outputs the raw input unchanged."""
  while node >= 0:
    if ops[node] != "skip":
      return False
    node = links[node] - 1
  return True


def _hoist(node: int, links: list[int], ops: list[str]) -> tuple[list[int], list[str]]:
  """Move a skip ``node`` to the front, fed by the raw input, relabelling the others.

  Its children take the skip's own parent instead, and every node that read the raw input or a node before
  ``node`` now reads one position later (the hoisted skip, which passes the raw input, takes slot 1). This is the
  benchmark's rule, reproduced as it is, since the keys depend on it.
  """
  new_links = [0]
  for i, parent in enumerate(links):
    if i == node:
      continue
    if parent == node + 1:
      new_links.append(links[node] + 1)
    elif parent <= node:
      new_links.append(parent + 1)
    else:
      new_links.append(parent)
  return new_links, [ops[node]] + [op for i, op in enumerate(ops) if i != node]


def _absorb_skips(links: list[int], ops: list[str]) -> tuple[list[int], list[str]]:
  """The benchmark's skip rule: move skips that can be re-wired without changing the tree shape to the front.

  The nodes are visited by position, once each, on the current (already re-wired) architecture; a skip is moved
  when it has a child, when it has no sibling (another node with the same parent), or when it passes the raw input
  through. Afterwards the link vector is brought back to canonical form.
  """
  for i in range(NUM_NODES):
    if ops[i] != "skip":
      continue
    has_child = (i + 1) in links
    has_sibling = any(j != i and parent == links[i] for j, parent in enumerate(links))
    if has_child or not has_sibling or _passes_input_through(i, links, ops):
      links, ops = _hoist(i, links, ops)
  return _canonical_order(links, ops)


# Interchangeable positions of each canonical tree: leaves with the same parent. Their ops are sorted by OPS
# order, so that e.g. (gcn, gat) and (gat, gcn) on two sibling leaves give one key.
_SIBLING_LEAVES = {(0, 0, 0, 0): (0, 1, 2, 3), (0, 0, 0, 1): (1, 2), (0, 0, 1, 1): (2, 3), (0, 1, 1, 1): (1, 2, 3),
                   (0, 1, 2, 2): (2, 3)}
# (0, 0, 1, 2) holds two identical chains, input -> node 1 -> node 3 and input -> node 2 -> node 4; the chain
# whose (first, second) op pair comes first in OPS order is put first.
_TWO_CHAINS = (0, 0, 1, 2)


def _sort_symmetric(links: Sequence[int], ops: list[str]) -> list[str]:
  links = tuple(links)
  ops = list(ops)
  if links in _SIBLING_LEAVES:
    positions = _SIBLING_LEAVES[links]
    for pos, op in zip(positions, sorted((ops[p] for p in positions), key=_OP_INDEX.__getitem__)):
      ops[pos] = op
  elif links == _TWO_CHAINS:
    first = (_OP_INDEX[ops[0]], _OP_INDEX[ops[2]])
    second = (_OP_INDEX[ops[1]], _OP_INDEX[ops[3]])
    if second < first:
      ops = [ops[1], ops[0], ops[3], ops[2]]
  return ops


def _check_links_ops(links: Sequence[int], ops: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
  links, ops = tuple(links), tuple(ops)
  if len(links) != NUM_NODES or len(ops) != NUM_NODES:
    raise ValueError(f"an architecture has {NUM_NODES} links and {NUM_NODES} ops, got {links} and {ops}")
  for t, link in enumerate(links):
    if isinstance(link, bool) or not isinstance(link, int) or not 0 <= link <= t:
      raise ValueError(f"link {t} must be an int in 0..{t} (0 = raw input, j = node j), got {link!r}")
  for op in ops:
    if op not in _OP_INDEX:
      raise ValueError(f"unknown op {op!r}; the benchmark's ops are {OPS}")
  return links, ops


def arch_key(links: Sequence[int], ops: Sequence[str]) -> int:
  """The table key of an architecture: the benchmark's canonical hash (``Arch.valid_hash`` in the wheel).

  The steps are the benchmark's: relabel the nodes so the link vector is one of nine canonical trees, apply the
  skip rule, sort the ops of interchangeable nodes, then write (tree index, op indices) as base-10 digits. The
  all-skip architecture gets 88888, which is not in any table (it would be the identity map).
  """
  links, ops = _check_links_ops(links, ops)
  canon_links, canon_ops = _canonical_order(links, ops)
  canon_links, canon_ops = _absorb_skips(canon_links, canon_ops)
  canon_ops = _sort_symmetric(canon_links, canon_ops)
  key = _CANONICAL_LINKS.index(tuple(canon_links))
  for op in canon_ops:
    key = key * _KEY_BASE + _OP_INDEX[op]
  return key


ALL_SKIP_KEY = arch_key((0, 0, 0, 0), ("skip",) * NUM_NODES)


def _check_dataset(dataset: str) -> str:
  if dataset not in DATASETS:
    raise ValueError(f"unknown NAS-Bench-Graph dataset {dataset!r}; choose one of {DATASETS}")
  return dataset


def nasbench_space(dataset: str = "cora") -> SearchSpace:
  """The benchmark's space as positions ``link0, op0, ..., link3, op3`` (classes ``links`` and ``ops``)."""
  ops = PROTEINS_OPS if _check_dataset(dataset) == "proteins" else OPS
  positions = []
  for t in range(NUM_NODES):
    positions.append(Position(f"link{t}", "links", tuple(range(t + 1))))
    positions.append(Position(f"op{t}", "ops", ops))
  return SearchSpace(tuple(positions))


@dataclasses.dataclass(frozen=True)
class BenchEntry:
  """One table row. ``valid``/``test``: validation and test accuracy (ROC-AUC on proteins), averaged over the
  benchmark's runs; ``latency``: seconds, as the benchmark measured it; ``params``: millions of parameters."""

  valid: float
  test: float
  latency: float
  params: float


_ZERO_ENTRY = BenchEntry(valid=0.0, test=0.0, latency=0.0, params=0.0)
_FIELDS = {"valid_perf": "valid", "perf": "test", "latency": "latency", "para": "params"}


def _numpy_scalar():
  # numpy 2 moved numpy.core to numpy._core (numpy.core remains as a deprecated alias); the files name the old
  # module, so resolve the function from whichever module this numpy has, without touching the deprecated one.
  try:
    from numpy._core import multiarray
  except ImportError:  # numpy < 2 without the forward-compatible alias
    from numpy.core import multiarray
  return multiarray.scalar


class _ForbiddenGlobal(Exception):
  """Raised inside the unpickler; re-raised by ``load_bench`` as a ValueError naming the file and global."""


class _BenchUnpickler(pickle.Unpickler):
  """Admits only what the .bench files contain: numpy scalars (from raw bytes) and their dtypes."""

  _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise _ForbiddenGlobal(f"{self._source}: refusing to load global {module}.{name}; a NAS-Bench-Graph table "
                             f"only needs numpy scalars and dtypes")
    if name == "dtype":
      import numpy
      return numpy.dtype
    return _numpy_scalar()


def _default_path(dataset: str):
  return importlib.resources.files("nas_bench_graph").joinpath("light", f"{dataset}.bench")


def load_bench(dataset: str, path: str | os.PathLike | None = None) -> dict[int, BenchEntry]:
  """The table of ``dataset``: canonical key (``arch_key``) -> ``BenchEntry``.

  Reads the wheel's ``light/<dataset>.bench`` unless ``path`` is given. Raises FileNotFoundError for a missing
  file and ValueError for a file that is not a valid table (unreadable, a forbidden global, or wrong contents).
  """
  _check_dataset(dataset)
  source = _default_path(dataset) if path is None else pathlib.Path(path)
  try:
    data = source.read_bytes()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"NAS-Bench-Graph table for {dataset!r} not found at {source}") from e
  try:
    raw = _BenchUnpickler(io.BytesIO(data), str(source)).load()
  except _ForbiddenGlobal as e:
    raise ValueError(str(e)) from None
  except Exception as e:  # any decoding failure (truncation, bad opcode, bad protocol) means it is not a table
    raise ValueError(f"{source}: not a readable NAS-Bench-Graph table ({type(e).__name__}: {e})") from e
  if not isinstance(raw, dict) or not raw:
    raise ValueError(f"{source}: expected a non-empty dict of architectures, got {type(raw).__name__}")
  table = {}
  for key, row in raw.items():
    if not isinstance(key, int) or not isinstance(row, dict) or set(row) != set(_FIELDS):
      raise ValueError(f"{source}: malformed entry {key!r}: expected int -> dict with keys {sorted(_FIELDS)}")
    if not all(isinstance(row[name], numbers.Real) for name in _FIELDS):
      raise ValueError(f"{source}: non-numeric value in entry {key}: {row}")
    values = {field: float(row[name]) for name, field in _FIELDS.items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise ValueError(f"{source}: non-finite value in entry {key}: {values}")
    table[key] = BenchEntry(**values)
  return table


class NasBenchGraph:
  """Look-ups of one dataset's table by index tuples of ``nasbench_space(dataset)``.

  Every architecture of the space is in the table except the all-skip one, which the benchmark left out; it gets
  an all-zero entry so that a controller can sample it and learn to avoid it.
  """

  def __init__(self, dataset: str = "cora", path: str | os.PathLike | None = None):
    self.dataset = _check_dataset(dataset)
    self.space = nasbench_space(dataset)
    self.table = load_bench(dataset, path)

  def decode(self, arch: Sequence[int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The (links, ops) of an index tuple of ``space``."""
    values = self.space.values(arch)
    links = tuple(values[f"link{t}"] for t in range(NUM_NODES))
    ops = tuple(values[f"op{t}"] for t in range(NUM_NODES))
    return links, ops

  def encode(self, links: Sequence[int], ops: Sequence[str]) -> tuple[int, ...]:
    """The index tuple of (links, ops): the inverse of ``decode``."""
    values = {f"link{t}": link for t, link in enumerate(links)}
    values.update({f"op{t}": op for t, op in enumerate(ops)})
    return self.space.index(values)

  def key(self, arch: Sequence[int]) -> int:
    return arch_key(*self.decode(arch))

  def exists(self, arch: Sequence[int]) -> bool:
    """Whether the table has ``arch`` (False only for the all-skip architecture)."""
    return self.key(arch) in self.table

  def query(self, arch: Sequence[int]) -> BenchEntry:
    """The table entry of ``arch``; the all-skip architecture gets zeros. Search on ``.valid`` only."""
    key = self.key(arch)
    if key == ALL_SKIP_KEY:
      return _ZERO_ENTRY
    try:
      return self.table[key]
    except KeyError:
      links, ops = self.decode(arch)
      raise KeyError(f"architecture {tuple(arch)} (links {links}, ops {ops}) has key {key}, which is not in the "
                     f"{self.dataset} table ({len(self.table)} entries)") from None

  def optimum(self) -> dict:
    """Reference numbers for reports: the best-valid entry (what a perfect search on validation finds) with its
    test accuracy, the best test accuracy (an oracle bound, not reachable without leakage) and the median test.
    Ties in validation accuracy go to the smallest key."""
    best_valid_key = min(self.table, key=lambda k: (-self.table[k].valid, k))
    best = self.table[best_valid_key]
    tests = [entry.test for entry in self.table.values()]
    return {"best_valid": best.valid, "best_valid_test": best.test, "best_valid_key": best_valid_key,
            "best_test": max(tests), "median_test": statistics.median(tests), "num_entries": len(self.table)}
