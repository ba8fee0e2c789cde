"""Planetoid citation graphs (Cora, Citeseer, Pubmed) in their raw format, and a seeded synthetic stand-in.

Host-side numpy only. ``load_planetoid`` reads the eight ``ind.<name>.*`` files of kimiyoung/planetoid as
distributed with tkipf/gcn and follows the semantics of tkipf/gcn's ``load_data``, so that splits and node order
match the published GCN/GAT/AGNN numbers. The feature and label files are Python-2 pickles; they are read with a
restricted unpickler that resolves only the handful of numpy/scipy/builtin globals these files use, and maps
scipy's ``csr_matrix`` to a local stand-in, so loading neither imports scipy nor breaks when scipy moves its
modules again. Malformed content raises one ``ValueError`` and an absent file one ``FileNotFoundError``, each
naming the file and what was expected.

``write_planetoid`` writes the same format (tests build fixtures with it) and ``contextual_sbm`` draws a
seeded contextual stochastic block model with Planetoid-style splits, for benchmarks at sizes the real data
sets do not offer.
"""
from __future__ import annotations

import collections
import copyreg
import dataclasses
import io
import operator
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxlab.common.data import DATA_ENV_VAR, default_data_dir  # noqa: F401  (re-exported)

PLANETOID_NAMES = ("cora", "citeseer", "pubmed")
PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
# tkipf/gcn: the validation nodes are the 500 allx rows that follow the labelled training rows.
NUM_VAL = 500


@dataclasses.dataclass(frozen=True, eq=False)
class Planetoid:
  """One transductive node-classification graph: dense features, integer labels, split masks, directed edges.

  ``senders``/``receivers`` hold every undirected edge in both directions, without self-loops or duplicates,
  sorted by (sender, receiver). Nodes that carry no label (Citeseer's 15 test-range ids missing from ``tx``)
  have label 0 and an all-zero feature row, and lie in no split.
  """

  name: str
  features: np.ndarray  # float32 [N, F]
  labels: np.ndarray  # int32 [N]
  train_mask: np.ndarray  # bool [N]
  val_mask: np.ndarray  # bool [N]
  test_mask: np.ndarray  # bool [N]
  senders: np.ndarray  # int32 [E]
  receivers: np.ndarray  # int32 [E]
  num_classes: int

  def __post_init__(self):
    n = self.features.shape[0]
    for field in ("labels", "train_mask", "val_mask", "test_mask"):
      if getattr(self, field).shape != (n,):
        raise ValueError(f"{self.name}: {field} has shape {getattr(self, field).shape}, expected ({n},)")
    if self.senders.shape != self.receivers.shape or self.senders.ndim != 1:
      raise ValueError(f"{self.name}: senders {self.senders.shape} and receivers {self.receivers.shape} "
                       "must be equal-length vectors")

  @property
  def num_nodes(self) -> int:
    return int(self.features.shape[0])

  @property
  def num_features(self) -> int:
    return int(self.features.shape[1])

  @property
  def num_edges(self) -> int:
    return int(self.senders.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling


class _PickledCSR:
  """What a pickled ``scipy.sparse.csr_matrix`` holds (its ``__dict__``), captured without importing scipy.

  Old scipy stored ``_shape``, ``indptr``, ``indices``, ``data``, ``format``, ``maxprint`` and a name-mangled
  sorted-indices flag; current scipy stores a subset. Only the four arrays and the shape are used.
  """

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"csr_matrix state must be a dict, got {type(state).__name__}")
    self.state = state


def _latin1_encode(text, encoding="latin1"):
  # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); other codecs are never needed.
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin1 text, got encoding {encoding!r}")
  return text.encode("latin1")


def _empty_bytes(*args):
  # Protocol-2 pickles spell b"" (an empty array's buffer) as bytes(); refuse anything that could allocate.
  if args:
    raise pickle.UnpicklingError("bytes(...) is only allowed without arguments")
  return b""


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever numpy keeps it

# Every global the Planetoid files need, in the spelling of the original Python-2 files and in that of files
# written today (pickle protocols 0-2 write Python-2 builtin names, 3+ Python-3 ones).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("scipy.sparse.csr", "csr_matrix"): _PickledCSR,
    ("scipy.sparse._csr", "csr_matrix"): _PickledCSR,
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("collections", "defaultdict"): collections.defaultdict,
    ("__builtin__", "list"): list,
    ("builtins", "list"): list,
}


class _RefusedGlobal(ValueError):
  pass


class _PlanetoidUnpickler(pickle.Unpickler):
  """Resolves only ``_ALLOWED_GLOBALS``; anything else (``os.system``, ``builtins.eval``, ...) is refused."""

  def __init__(self, file, path: Path):
    super().__init__(file, encoding="latin1")
    self._path = path

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise _RefusedGlobal(f"{self._path}: refused to unpickle global '{module}.{name}' (only the numpy, scipy "
                           "csr_matrix and builtin globals of the Planetoid format are allowed)") from None


def _read_pickle(path: Path) -> Any:
  with open(path, "rb") as handle:
    data = handle.read()
  try:
    return _PlanetoidUnpickler(io.BytesIO(data), path).load()
  except _RefusedGlobal:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
          MemoryError, UnicodeDecodeError, OverflowError) as err:
    raise ValueError(f"{path}: not a readable Planetoid pickle, truncated or corrupt "
                     f"({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------------------------------------
# Validation of the unpickled parts


def _state_array(state: dict, key: str, path: Path) -> np.ndarray:
  value = state.get(key)
  if not isinstance(value, np.ndarray) or value.ndim != 1:
    raise ValueError(f"{path}: csr_matrix field '{key}' must be a 1-D array, got {type(value).__name__}")
  return value


def _dense_features(obj, path: Path) -> np.ndarray:
  """A float32 [rows, features] array from a pickled csr_matrix (or a plain 2-D numeric array)."""
  if isinstance(obj, np.ndarray):
    if obj.ndim != 2 or not (np.issubdtype(obj.dtype, np.number) or obj.dtype == bool):
      raise ValueError(f"{path}: expected a 2-D numeric feature matrix, got shape {obj.shape} dtype {obj.dtype}")
    return obj.astype(np.float32)
  if not isinstance(obj, _PickledCSR):
    raise ValueError(f"{path}: expected a scipy csr_matrix of features, got {type(obj).__name__}")
  state = obj.state
  if state.get("format", "csr") != "csr":
    raise ValueError(f"{path}: expected a csr_matrix, got format {state.get('format')!r}")
  shape = state.get("_shape", state.get("shape"))
  try:
    rows, cols = (operator.index(s) for s in shape)
  except (TypeError, ValueError):
    raise ValueError(f"{path}: csr_matrix shape must be two integers, got {shape!r}") from None
  data, indices, indptr = (_state_array(state, k, path) for k in ("data", "indices", "indptr"))
  if not np.issubdtype(data.dtype, np.number) or not np.issubdtype(indices.dtype, np.integer) \
      or not np.issubdtype(indptr.dtype, np.integer):
    raise ValueError(f"{path}: csr_matrix arrays have dtypes data {data.dtype}, indices {indices.dtype}, "
                     f"indptr {indptr.dtype}; expected numeric data and integer indices")
  if rows < 0 or cols < 0 or len(indptr) != rows + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
      or indptr[-1] != len(indices) or len(indices) != len(data):
    raise ValueError(f"{path}: inconsistent csr_matrix: shape ({rows}, {cols}), {len(indptr)} indptr entries "
                     f"(expected {rows + 1}, non-decreasing from 0 to nnz), {len(indices)} indices, "
                     f"{len(data)} values")
  if len(indices) and (indices.min() < 0 or indices.max() >= cols):
    raise ValueError(f"{path}: csr_matrix column indices must lie in [0, {cols})")
  dense = np.zeros((rows, cols), np.float32)
  row_ids = np.repeat(np.arange(rows), np.diff(indptr))
  np.add.at(dense, (row_ids, indices), data.astype(np.float32))  # csr sums duplicate entries
  return dense


def _one_hot_labels(obj, path: Path) -> np.ndarray:
  """Validated one-hot label rows (every row exactly one 1, as in all three real data sets)."""
  if not isinstance(obj, np.ndarray) or obj.ndim != 2 \
      or not (np.issubdtype(obj.dtype, np.number) or obj.dtype == bool):
    got = f"shape {obj.shape} dtype {obj.dtype}" if isinstance(obj, np.ndarray) else type(obj).__name__
    raise ValueError(f"{path}: expected a 2-D one-hot label array, got {got}")
  if not np.all((obj == 0) | (obj == 1)) or not np.all(obj.sum(axis=1) == 1):
    bad = np.flatnonzero(~np.all((obj == 0) | (obj == 1), axis=1) | (obj.sum(axis=1) != 1))
    raise ValueError(f"{path}: labels are not one-hot: rows {bad[:5].tolist()} (of {len(bad)}) do not hold "
                     "exactly one 1 and zeros elsewhere")
  return obj.astype(np.int32)


def _read_test_index(path: Path) -> np.ndarray:
  try:
    text = path.read_text(encoding="ascii")
    ids = [int(line) for line in text.split()]
  except (UnicodeDecodeError, ValueError) as err:
    raise ValueError(f"{path}: expected one integer node id per line ({err})") from err
  ids = np.asarray(ids, np.int64)
  if ids.size == 0:
    raise ValueError(f"{path}: no test node ids")
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"{path}: test node ids repeat")
  return ids


def _graph_edges(graph, path: Path, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetrised, deduplicated directed edges without self-loops, sorted by (sender, receiver)."""
  if not isinstance(graph, dict):
    raise ValueError(f"{path}: expected a dict of neighbour lists, got {type(graph).__name__}")
  try:
    heads = [operator.index(node) for node, nbrs in graph.items() for _ in nbrs]
    tails = [operator.index(nbr) for nbrs in graph.values() for nbr in nbrs]
  except TypeError as err:
    raise ValueError(f"{path}: node ids and neighbour lists must be integers and lists ({err})") from err
  u = np.asarray(heads, np.int64)
  v = np.asarray(tails, np.int64)
  keys = np.asarray([operator.index(k) for k in graph], np.int64)
  for what, ids in (("node", keys), ("neighbour", v)):
    if ids.size and (ids.min() < 0 or ids.max() >= num_nodes):
      raise ValueError(f"{path}: {what} ids must lie in [0, {num_nodes}) (the nodes of allx and tx), "
                       f"got range [{ids.min()}, {ids.max()}]")
  return _symmetric_edges(u, v, num_nodes)


def _symmetric_edges(u: np.ndarray, v: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  s = np.concatenate([u, v])
  r = np.concatenate([v, u])
  keep = s != r
  key = np.unique(s[keep] * num_nodes + r[keep])
  return (key // num_nodes).astype(np.int32), (key % num_nodes).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _planetoid_files(name: str, data_dir) -> dict[str, Path]:
  root = Path(data_dir) if data_dir not in (None, "") else default_data_dir()
  if not root.is_dir():
    raise FileNotFoundError(f"Planetoid data directory not found: {root}")
  # The files may sit in data_dir itself or in its planetoid/ folder (the layout of ../shared/data).
  folders = [root, root / "planetoid"]
  folder = next((f for f in folders if any((f / f"ind.{name}.{p}").is_file() for p in PLANETOID_PARTS)), None)
  if folder is None:
    raise FileNotFoundError(f"no Planetoid files for '{name}': ind.{name}.x not found in "
                            + " or ".join(str(f) for f in folders))
  files = {part: folder / f"ind.{name}.{part}" for part in PLANETOID_PARTS}
  missing = [str(p) for p in files.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"Planetoid '{name}' is incomplete, missing file(s): {', '.join(missing)}")
  return files


def load_planetoid(name: str, data_dir: str | os.PathLike | None, *, normalize_features: bool = True) -> Planetoid:
  """Cora, Citeseer or Pubmed with the public split of tkipf/gcn.

  Node order and splits follow ``load_data`` of tkipf/gcn: nodes ``0 .. len(allx)-1`` are the allx rows, the
  test nodes are the ids in ``test.index``, and row ``i`` of ``tx``/``ty`` belongs to the ``i``-th id of that
  (unsorted) file -- which is what gcn's ``features[test_idx_reorder] = features[test_idx_range]`` amounts to.
  train = ``range(len(y))``, val = the next 500 allx rows (fewer when allx is shorter, as in small fixtures),
  test = the ids in ``test.index``.

  Citeseer: its ``test.index`` lists 1000 ids spread over ``range(2312, 3327)``; the 15 ids of that range not
  listed (2407, 2489, ..., 3309) are missing from ``tx``/``ty``. As in gcn they get zero features and an
  all-zero label row (label 0 here) and are in no split, so the test set is the standard 1000 nodes. They are
  not isolated in the graph: each has one or two neighbours. The real graph also lists 124 self-loops and a
  few repeated neighbours, which are dropped, giving 9104 directed edges (PyG's count); Cora has 10556.

  Args:
    name: ``cora``, ``citeseer`` or ``pubmed`` (any case).
    data_dir: folder holding the ``ind.<name>.*`` files, directly or under ``planetoid/``; None or "" uses
      ``default_data_dir()``.
    normalize_features: divide each feature row by its sum, the GCN/GAT preprocessing.

  Raises:
    FileNotFoundError: the folder or any of the eight files is absent (all missing files are named).
    ValueError: unknown name, a refused pickle global, or content that does not fit the format.
  """
  key = str(name).lower()
  if key not in PLANETOID_NAMES:
    raise ValueError(f"unknown Planetoid data set {name!r}; expected one of {', '.join(PLANETOID_NAMES)}")
  files = _planetoid_files(key, data_dir)
  x, tx, allx = (_dense_features(_read_pickle(files[p]), files[p]) for p in ("x", "tx", "allx"))
  y, ty, ally = (_one_hot_labels(_read_pickle(files[p]), files[p]) for p in ("y", "ty", "ally"))
  test_ids = _read_test_index(files["test.index"])
  graph = _read_pickle(files["graph"])

  for feats, labs, fp, lp in ((x, y, "x", "y"), (tx, ty, "tx", "ty"), (allx, ally, "allx", "ally")):
    if feats.shape[0] != labs.shape[0]:
      raise ValueError(f"{files[lp]}: {labs.shape[0]} label rows, expected {feats.shape[0]} (the rows of "
                       f"{files[fp].name})")
  for part, arr, width, what in (("tx", tx, allx.shape[1], "features"), ("x", x, allx.shape[1], "features"),
                                 ("ty", ty, ally.shape[1], "classes"), ("y", y, ally.shape[1], "classes")):
    if arr.shape[1] != width:
      raise ValueError(f"{files[part]}: {arr.shape[1]} {what}, expected {width} as in ind.{key}.all{part[-1]}")
  num_train = y.shape[0]
  num_allx = allx.shape[0]
  if num_train > num_allx:
    raise ValueError(f"{files['y']}: {num_train} labelled training rows, expected at most the {num_allx} rows "
                     "of allx")
  if len(test_ids) != tx.shape[0]:
    raise ValueError(f"{files['tx']}: {tx.shape[0]} rows, expected one per test id ({len(test_ids)} ids in "
                     f"{files['test.index'].name})")
  if test_ids.min() != num_allx:
    raise ValueError(f"{files['test.index']}: the smallest test id is {test_ids.min()}, expected {num_allx} "
                     "(test nodes follow the allx rows)")

  num_nodes = int(test_ids.max()) + 1
  features = np.zeros((num_nodes, allx.shape[1]), np.float32)
  features[:num_allx] = allx
  features[test_ids] = tx
  one_hot = np.zeros((num_nodes, ally.shape[1]), np.int32)
  one_hot[:num_allx] = ally
  one_hot[test_ids] = ty
  labels = one_hot.argmax(axis=1).astype(np.int32)

  masks = np.zeros((3, num_nodes), bool)
  masks[0, :num_train] = True
  masks[1, num_train:min(num_train + NUM_VAL, num_allx)] = True
  masks[2, test_ids] = True
  senders, receivers = _graph_edges(graph, files["graph"], num_nodes)
  if normalize_features:
    features = row_normalize(features)
  return Planetoid(name=key, features=features, labels=labels, train_mask=masks[0], val_mask=masks[1],
                   test_mask=masks[2], senders=senders, receivers=receivers, num_classes=int(ally.shape[1]))


def row_normalize(features) -> np.ndarray:
  """Each row divided by its sum (GCN/GAT preprocessing); rows summing to zero stay as they are.

  Floating inputs keep their dtype, others become float32.
  """
  arr = np.asarray(features)
  if arr.ndim != 2:
    raise ValueError(f"row_normalize expects a 2-D [nodes, features] array, got shape {arr.shape}")
  dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
  sums = arr.sum(axis=1, dtype=np.float64, keepdims=True)
  scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums != 0)
  return (arr * scale).astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# Writing the raw format

# GLOBAL opcodes rewritten so that the files spell numpy/scipy like the original Python-2 files ("old") or like
# numpy >= 2 and scipy >= 1.8 ("new"), whichever versions are installed.
_SPELLINGS = {
    "old": {"scipy.sparse._csr csr_matrix": "scipy.sparse.csr csr_matrix",
            "numpy._core.multiarray _reconstruct": "numpy.core.multiarray _reconstruct"},
    "new": {"scipy.sparse.csr csr_matrix": "scipy.sparse._csr csr_matrix",
            "numpy.core.multiarray _reconstruct": "numpy._core.multiarray _reconstruct"},
}


def _respell(data: bytes, mapping: Mapping[str, str]) -> bytes:
  # Protocols 0-2 name globals with the text opcode GLOBAL ("c" module "\n" name "\n") and refer to memoised
  # objects by index, never by byte offset, so replacing whole GLOBAL opcodes keeps the stream valid.
  out, last = [], 0
  for op, arg, pos in pickletools.genops(data):
    if op.name == "GLOBAL" and arg in mapping:
      module, name = mapping[arg].split(" ")
      old_module, old_name = arg.split(" ")
      end = pos + 1 + len(old_module) + len(old_name) + 2
      out += [data[last:pos], b"c", module.encode("ascii"), b"\n", name.encode("ascii"), b"\n"]
      last = end
  out.append(data[last:])
  return b"".join(out)


def write_planetoid(directory: str | os.PathLike, name: str, *, x, y, tx, ty, allx, ally,
                    graph: Mapping[int, Sequence[int]], test_index: Sequence[int], protocol: int = 2,
                    scipy_spelling: str = "old") -> dict[str, Path]:
  """Writes ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` in the raw Planetoid format.

  Features become ``scipy.sparse.csr_matrix`` pickles, labels plain ndarray pickles (dtypes as given), the graph
  a ``collections.defaultdict(list)`` and ``test.index`` one id per line, in the given (unsorted) order. Nothing
  is validated, so tests can write malformed sets too.

  Args:
    protocol: pickle protocol, 0-2 (the Python-2 protocols of the original files).
    scipy_spelling: ``"old"`` names ``scipy.sparse.csr.csr_matrix`` and ``numpy.core.multiarray._reconstruct``
      as the original files do; ``"new"`` names ``scipy.sparse._csr`` and ``numpy._core.multiarray``.

  Returns:
    The written paths by part name.
  """
  import scipy.sparse  # only writing needs scipy; loading reads the pickled arrays directly

  if protocol not in (0, 1, 2):
    raise ValueError(f"protocol must be 0, 1 or 2 (the Python-2 pickle protocols), got {protocol!r}")
  if scipy_spelling not in _SPELLINGS:
    raise ValueError(f"scipy_spelling must be 'old' or 'new', got {scipy_spelling!r}")
  if not name or os.sep in name or "/" in name:
    raise ValueError(f"name must be a plain file-name part, got {name!r}")
  folder = Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  objects = {part: scipy.sparse.csr_matrix(value) for part, value in (("x", x), ("tx", tx), ("allx", allx))}
  objects.update({part: np.asarray(value) for part, value in (("y", y), ("ty", ty), ("ally", ally))})
  objects["graph"] = collections.defaultdict(list, {int(k): [int(v) for v in nbrs] for k, nbrs in graph.items()})
  paths = {}
  for part, obj in objects.items():
    paths[part] = folder / f"ind.{name}.{part}"
    paths[part].write_bytes(_respell(pickle.dumps(obj, protocol=protocol), _SPELLINGS[scipy_spelling]))
  paths["test.index"] = folder / f"ind.{name}.test.index"
  paths["test.index"].write_text("".join(f"{int(i)}\n" for i in test_index), encoding="ascii")
  return paths


# ----------------------------------------------------------------------------------------------------------
# Contextual stochastic block model


def _distinct_pairs(rng: np.random.Generator, count: int, num_nodes: int, sample, what: str) -> np.ndarray:
  """``count`` distinct undirected pairs (as keys lo * N + hi) drawn by ``sample`` in order of first draw."""
  keys = np.zeros(0, np.int64)
  for _ in range(100):
    need = count - len(keys)
    if need <= 0:
      break
    u, v = sample(2 * need + 16)
    new = (np.minimum(u, v) * num_nodes + np.maximum(u, v))[u != v]
    pool = np.concatenate([keys, new])
    _, first = np.unique(pool, return_index=True)
    keys = pool[np.sort(first)][:count]
  if len(keys) < count:
    raise ValueError(f"contextual_sbm: could not draw {count} distinct {what} edges; lower avg_degree")
  return keys


def _split_sizes(class_sizes: np.ndarray) -> tuple[int, int, int]:
  per_class_train = int(min(20, class_sizes.min() // 3))
  rest = int(class_sizes.sum()) - per_class_train * len(class_sizes)
  num_val = min(NUM_VAL, rest // 2)
  return per_class_train, num_val, min(1000, rest - num_val)


def contextual_sbm(num_nodes: int, num_classes: int, num_features: int, *, avg_degree: float, homophily: float,
                   feature_signal: float, seed: int, name: str = "csbm",
                   words_per_node: float | None = None) -> Planetoid:
  """A seeded contextual stochastic block model with Planetoid-style splits and bag-of-words features.

  Classes are balanced (sizes differ by at most one) and assigned in a seeded random order. The graph has
  exactly ``round(avg_degree * N / 2)`` undirected edges, of which ``round(homophily * M)`` join two nodes of
  the same class: each edge picks a uniform node and a uniform partner from its own class (intra) or from the
  other classes (inter), and repeats are redrawn. So ``homophily`` is the edge homophily up to rounding.

  Features are sparse Bernoulli "words": the features are split into ``num_classes`` equal topic blocks and a
  node of class c draws feature f with probability ``rho * ((1 - s) + s * C * [f in block c])`` (capped at 1),
  with ``rho = words_per_node / F`` (default min(18, F / 2); Cora averages about 18 words) and
  ``s = feature_signal``; every node thus expects ``words_per_node`` words, of which a fraction
  ``s + (1 - s) / C`` comes from its own topic.

  Splits: 20 training nodes per class, then 500 validation and 1000 test nodes from the rest, all in a seeded
  random order; on small graphs min(20, smallest class // 3) per class, half the rest (at most 500) for
  validation and the remainder (at most 1000) for test. Features are left unnormalised (``row_normalize``).
  """
  n, c, f = (operator.index(v) for v in (num_nodes, num_classes, num_features))
  if c < 2 or f < 1:
    raise ValueError(f"contextual_sbm needs num_classes >= 2 and num_features >= 1, got {c} and {f}")
  if n < 3 * c:
    raise ValueError(f"contextual_sbm needs at least 3 nodes per class, got {n} nodes for {c} classes")
  if not 0.0 <= homophily <= 1.0 or not 0.0 <= feature_signal <= 1.0:
    raise ValueError(f"homophily and feature_signal must lie in [0, 1], got {homophily} and {feature_signal}")
  words_per_node = min(18.0, f / 2) if words_per_node is None else float(words_per_node)
  if not 0.0 <= words_per_node <= f or avg_degree < 0:
    raise ValueError(f"need avg_degree >= 0 and 0 <= words_per_node <= num_features, got {avg_degree} and "
                     f"{words_per_node}")
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % c).astype(np.int32)
  sizes = np.bincount(labels, minlength=c)
  order = np.argsort(labels, kind="stable")  # node ids grouped by class
  start = np.concatenate([[0], np.cumsum(sizes)[:-1]])

  num_edges = int(round(avg_degree * n / 2))
  num_intra = int(round(homophily * num_edges))
  capacity_intra = int((sizes * (sizes - 1) // 2).sum())
  capacity_inter = n * (n - 1) // 2 - capacity_intra
  if num_intra > capacity_intra or num_edges - num_intra > capacity_inter:
    raise ValueError(f"contextual_sbm: {num_intra} intra- and {num_edges - num_intra} inter-class edges asked, "
                     f"but only {capacity_intra} and {capacity_inter} node pairs exist")

  def intra(size):
    u = rng.integers(0, n, size)
    cu = labels[u]
    return u, order[start[cu] + (rng.random(size) * sizes[cu]).astype(np.int64)]

  def inter(size):
    u = rng.integers(0, n, size)
    cu = labels[u]
    r = (rng.random(size) * (n - sizes[cu])).astype(np.int64)  # a position outside u's class block
    return u, order[np.where(r < start[cu], r, r + sizes[cu])]

  keys = np.concatenate([_distinct_pairs(rng, num_intra, n, intra, "intra-class"),
                         _distinct_pairs(rng, num_edges - num_intra, n, inter, "inter-class")])
  senders, receivers = _symmetric_edges(keys // n, keys % n, n)

  rho = words_per_node / f
  topic = np.zeros((c, f), bool)
  for k, block in enumerate(np.array_split(rng.permutation(f), c)):
    topic[k, block] = True
  prob = np.minimum(1.0, rho * ((1.0 - feature_signal) + feature_signal * c * topic))
  features = np.empty((n, f), np.float32)
  for lo in range(0, n, 4096):  # bounded temporary memory at Pubmed sizes
    hi = min(n, lo + 4096)
    features[lo:hi] = rng.random((hi - lo, f)) < prob[labels[lo:hi]]

  per_class, num_val, num_test = _split_sizes(sizes)
  visit = rng.permutation(n)
  rank = np.empty(n, np.int64)  # position of each node within its class in the visiting order
  by_class = labels[visit]
  for k in range(c):
    rank[visit[by_class == k]] = np.arange(sizes[k])
  train = rank < per_class
  rest = visit[~train[visit]]
  masks = np.zeros((3, n), bool)
  masks[0] = train
  masks[1, rest[:num_val]] = True
  masks[2, rest[num_val:num_val + num_test]] = True
  return Planetoid(name=name, features=features, labels=labels, train_mask=masks[0], val_mask=masks[1],
                   test_mask=masks[2], senders=senders, receivers=receivers, num_classes=c)
