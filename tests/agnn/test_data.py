"""The Planetoid loader against a hand-built 12-node fixture and gcn's load_data, and the synthetic CSBM."""
import collections
import pickle
import pickletools
import warnings

import numpy as np
import pytest

from jaxlab.agnn import data

# ----------------------------------------------------------------------------------------------------------
# The 12-node fixture: 5 features, 3 classes, nodes 0-7 in allx (0-2 labelled), test nodes 8-11 listed
# unsorted as 10, 8, 11, 9, so row i of tx/ty belongs to node TEST_INDEX[i].

NUM_NODES = 12
TEST_INDEX = [10, 8, 11, 9]
# Every node's features and label as the loader must return them (before row normalisation).
TRUE_FEATURES = np.array([[(node + 1) * (j + 1) % 7 for j in range(5)] for node in range(NUM_NODES)], np.float32)
TRUE_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], np.int32)
# A ring 0-1-...-11-0 with the chord 0-5, each edge listed from one side only, plus a self-loop (3), a repeated
# neighbour (2 -> 3 twice) and a node (11) that is no key of the dict.
GRAPH = {0: [1, 11], 1: [2], 2: [3, 3], 3: [4, 3], 4: [5], 5: [6, 0], 6: [7], 7: [8], 8: [9], 9: [10], 10: [11]}
RING_EDGES = {(i, (i + 1) % NUM_NODES) for i in range(NUM_NODES)} | {(0, 5)}


def _one_hot(labels, classes=3):
  return np.eye(classes, dtype=np.int32)[labels]


def _fixture_parts(test_index=TEST_INDEX):
  ids = list(test_index)
  return dict(x=TRUE_FEATURES[:3], y=_one_hot(TRUE_LABELS[:3]), allx=TRUE_FEATURES[:8],
              ally=_one_hot(TRUE_LABELS[:8]), tx=TRUE_FEATURES[ids], ty=_one_hot(TRUE_LABELS[ids]),
              graph=GRAPH, test_index=ids)


def _write(folder, name="cora", **overrides):
  parts = _fixture_parts()
  parts.update(overrides)
  data.write_planetoid(folder, name, **parts)
  return folder


def _globals_in(path):
  return {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}


def _gcn_load_data(folder, name):
  """tkipf/gcn's load_data, restated with dense numpy on scipy-unpickled files (an independent reference)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the old scipy/numpy module paths of the real files
    parts = {}
    for part in ("y", "tx", "ty", "allx", "ally"):
      with open(folder / f"ind.{name}.{part}", "rb") as handle:
        parts[part] = pickle.load(handle, encoding="latin1")
  tx, ty = parts["tx"].toarray(), parts["ty"]
  test_idx_reorder = [int(line) for line in (folder / f"ind.{name}.test.index").read_text().split()]
  test_idx_range = np.sort(test_idx_reorder)
  low, high = min(test_idx_reorder), max(test_idx_reorder)
  tx_extended = np.zeros((high - low + 1, tx.shape[1]), tx.dtype)
  tx_extended[test_idx_range - low] = tx
  ty_extended = np.zeros((high - low + 1, ty.shape[1]), ty.dtype)
  ty_extended[test_idx_range - low] = ty
  features = np.vstack([parts["allx"].toarray(), tx_extended])
  features[test_idx_reorder] = features[test_idx_range]
  labels = np.vstack([parts["ally"], ty_extended])
  labels[test_idx_reorder] = labels[test_idx_range]
  num_train = len(parts["y"])
  return features, labels, range(num_train), range(num_train, num_train + 500), test_idx_range


def _edge_set(ds):
  return set(zip(ds.senders.tolist(), ds.receivers.tolist()))


# ----------------------------------------------------------------------------------------------------------
# The fixture


def test_fixture_reorders_test_rows_by_test_index(tmp_path):
  ds = data.load_planetoid("cora", _write(tmp_path), normalize_features=False)
  assert (ds.num_nodes, ds.num_features, ds.num_classes) == (12, 5, 3)
  assert ds.features.dtype == np.float32 and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.features, TRUE_FEATURES)
  np.testing.assert_array_equal(ds.labels, TRUE_LABELS)
  # Spelled out: tx rows 0, 1, 2, 3 land on nodes 10, 8, 11, 9.
  tx = TRUE_FEATURES[TEST_INDEX]
  for row, node in enumerate(TEST_INDEX):
    np.testing.assert_array_equal(ds.features[node], tx[row])
  reference, labels, *_ = _gcn_load_data(tmp_path, "cora")
  np.testing.assert_array_equal(ds.features, reference)
  np.testing.assert_array_equal(ds.labels, labels.argmax(1))


def test_fixture_masks(tmp_path):
  ds = data.load_planetoid("cora", _write(tmp_path))
  np.testing.assert_array_equal(np.flatnonzero(ds.train_mask), [0, 1, 2])
  np.testing.assert_array_equal(np.flatnonzero(ds.val_mask), [3, 4, 5, 6, 7])  # the 500 after y, clipped to allx
  np.testing.assert_array_equal(np.flatnonzero(ds.test_mask), [8, 9, 10, 11])
  assert all(m.dtype == bool for m in (ds.train_mask, ds.val_mask, ds.test_mask))


def test_fixture_edges_symmetric_deduplicated_without_self_loops(tmp_path):
  ds = data.load_planetoid("cora", _write(tmp_path))
  expected = RING_EDGES | {(v, u) for u, v in RING_EDGES}
  assert _edge_set(ds) == expected
  assert ds.num_edges == len(expected) == 26  # no duplicates kept
  assert ds.senders.dtype == np.int32 and ds.receivers.dtype == np.int32
  assert not np.any(ds.senders == ds.receivers)
  keys = ds.senders.astype(np.int64) * NUM_NODES + ds.receivers
  assert np.all(np.diff(keys) > 0)  # sorted by (sender, receiver)


def test_fixture_features_row_normalised_by_default(tmp_path):
  ds = data.load_planetoid("Cora", _write(tmp_path))
  sums = TRUE_FEATURES.sum(1, keepdims=True)
  assert sums[6] == 0  # node 6 has no features and must stay all zero
  np.testing.assert_allclose(ds.features, TRUE_FEATURES / np.where(sums == 0, 1, sums), rtol=1e-6)


def test_citeseer_style_gap_is_padded_and_left_out_of_the_splits(tmp_path):
  # Node 9 is within the test range but missing from test.index, tx and ty.
  gap = [10, 8, 11]
  _write(tmp_path, "citeseer", **_fixture_parts(gap))
  ds = data.load_planetoid("citeseer", tmp_path, normalize_features=False)
  assert ds.num_nodes == 12
  np.testing.assert_array_equal(ds.features[9], np.zeros(5))
  assert ds.labels[9] == 0
  assert not (ds.train_mask[9] or ds.val_mask[9] or ds.test_mask[9])
  np.testing.assert_array_equal(np.flatnonzero(ds.test_mask), [8, 10, 11])
  others = np.arange(NUM_NODES) != 9
  np.testing.assert_array_equal(ds.features[others], TRUE_FEATURES[others])
  np.testing.assert_array_equal(ds.labels[others], TRUE_LABELS[others])
  reference, labels, *_ = _gcn_load_data(tmp_path, "citeseer")
  np.testing.assert_array_equal(ds.features, reference)
  np.testing.assert_array_equal(ds.labels, labels.argmax(1))
  assert (9, 8) in _edge_set(ds) and (9, 10) in _edge_set(ds)  # missing features, but still in the graph


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_both_pickle_spellings_load_alike(tmp_path, protocol):
  loaded = {}
  for spelling in ("old", "new"):
    folder = _write(tmp_path / spelling, scipy_spelling=spelling, protocol=protocol)
    names = _globals_in(folder / "ind.cora.x") | _globals_in(folder / "ind.cora.y")
    if spelling == "old":
      assert {"scipy.sparse.csr csr_matrix", "numpy.core.multiarray _reconstruct"} <= names
      assert not any("_csr" in n or "_core" in n for n in names)
    else:
      assert {"scipy.sparse._csr csr_matrix", "numpy._core.multiarray _reconstruct"} <= names
      assert not any(n.startswith(("scipy.sparse.csr ", "numpy.core.")) for n in names)
    assert _globals_in(folder / "ind.cora.graph") == {"collections defaultdict", "__builtin__ list"}
    loaded[spelling] = data.load_planetoid("cora", folder, normalize_features=False)
  for field in ("features", "labels", "train_mask", "val_mask", "test_mask", "senders", "receivers"):
    np.testing.assert_array_equal(getattr(loaded["old"], field), getattr(loaded["new"], field))
  np.testing.assert_array_equal(loaded["old"].features, TRUE_FEATURES)


def test_python3_protocol_pickles_load_too(tmp_path):
  scipy_sparse = pytest.importorskip("scipy.sparse")
  _write(tmp_path)
  # Protocols 3 and 4 spell globals with Python-3 names (builtins) and STACK_GLOBAL. (Protocol 5 would pickle
  # arrays through numpy's _frombuffer, which the original format never needs and the loader refuses.)
  (tmp_path / "ind.cora.tx").write_bytes(pickle.dumps(scipy_sparse.csr_matrix(TRUE_FEATURES[TEST_INDEX]), 4))
  (tmp_path / "ind.cora.ally").write_bytes(pickle.dumps(_one_hot(TRUE_LABELS[:8]), 3))
  (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps(collections.defaultdict(list, GRAPH), 4))
  ds = data.load_planetoid("cora", tmp_path, normalize_features=False)
  np.testing.assert_array_equal(ds.features, TRUE_FEATURES)
  np.testing.assert_array_equal(ds.labels, TRUE_LABELS)


def test_empty_feature_rows_round_trip(tmp_path):
  # An all-zero tx pickles an empty data buffer, which protocol 2 spells as bytes().
  features = TRUE_FEATURES.copy()
  features[8:] = 0
  _write(tmp_path, tx=features[TEST_INDEX])
  ds = data.load_planetoid("cora", tmp_path, normalize_features=True)
  np.testing.assert_array_equal(ds.features[8:], 0)


# ----------------------------------------------------------------------------------------------------------
# Security and errors


class _Exploit:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    import os
    return os.system, (self.command,)


@pytest.mark.parametrize("part", ["graph", "allx"])
def test_restricted_unpickler_refuses_foreign_globals_without_running_them(tmp_path, part):
  _write(tmp_path)
  marker = tmp_path / "ran"
  (tmp_path / f"ind.cora.{part}").write_bytes(pickle.dumps(_Exploit(f"touch {marker}"), protocol=2))
  with pytest.raises(ValueError, match=rf"ind\.cora\.{part}.*refused.*system"):
    data.load_planetoid("cora", tmp_path)
  assert not marker.exists()


def test_restricted_unpickler_refuses_builtins_eval(tmp_path):
  _write(tmp_path)
  payload = b"\x80\x02c__builtin__\neval\nX\x05\x00\x00\x001 + 1\x85R."
  (tmp_path / "ind.cora.y").write_bytes(payload)
  with pytest.raises(ValueError, match=r"ind\.cora\.y.*refused.*__builtin__\.eval"):
    data.load_planetoid("cora", tmp_path)


def test_missing_directory_and_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent"):
    data.load_planetoid("cora", tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match=r"ind\.cora\.x"):
    data.load_planetoid("cora", tmp_path)
  _write(tmp_path)
  (tmp_path / "ind.cora.ty").unlink()
  (tmp_path / "ind.cora.test.index").unlink()
  with pytest.raises(FileNotFoundError, match=r"ind\.cora\.ty.*ind\.cora\.test\.index"):
    data.load_planetoid("cora", tmp_path)


def test_files_found_under_planetoid_subfolder(tmp_path):
  _write(tmp_path / "planetoid")
  assert data.load_planetoid("cora", tmp_path).num_nodes == 12


def test_default_data_dir_from_env_var(tmp_path, monkeypatch):
  _write(tmp_path / "planetoid")
  monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  assert data.load_planetoid("cora", None).num_nodes == 12
  monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="JAXLAB_DATA"):
    data.load_planetoid("cora", "")


def test_unknown_name_lists_the_data_sets(tmp_path):
  with pytest.raises(ValueError, match="cora, citeseer, pubmed"):
    data.load_planetoid("reddit", tmp_path)


def test_truncated_and_empty_pickles(tmp_path):
  _write(tmp_path)
  path = tmp_path / "ind.cora.allx"
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  with pytest.raises(ValueError, match=r"ind\.cora\.allx: not a readable Planetoid pickle"):
    data.load_planetoid("cora", tmp_path)
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"ind\.cora\.allx: not a readable"):
    data.load_planetoid("cora", tmp_path)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(test_index=[10, 8, 11, 9, 12]), r"ind\.cora\.tx: 4 rows, expected one per test id \(5"),
    (dict(ally=_one_hot(TRUE_LABELS[:7])), r"ind\.cora\.ally: 7 label rows, expected 8"),
    (dict(ty=np.ones((4, 3), np.int32)), r"ind\.cora\.ty: labels are not one-hot"),
    (dict(y=_one_hot(TRUE_LABELS[:3]) * 2), r"ind\.cora\.y: labels are not one-hot"),
    (dict(tx=TRUE_FEATURES[TEST_INDEX][:, :4]), r"ind\.cora\.tx: 4 features, expected 5"),
    (dict(ty=np.eye(4, dtype=np.int32)), r"ind\.cora\.ty: 4 classes, expected 3"),
    (dict(test_index=[11, 9, 12, 10]), r"smallest test id is 9, expected 8"),
    (dict(graph={0: [1], 3: [12]}), r"ind\.cora\.graph: neighbour ids must lie in \[0, 12\)"),
])
def test_malformed_content_names_file_and_expectation(tmp_path, overrides, pattern):
  _write(tmp_path, **overrides)
  with pytest.raises(ValueError, match=pattern):
    data.load_planetoid("cora", tmp_path)


def test_wrong_object_kinds_are_reported(tmp_path):
  _write(tmp_path)
  (tmp_path / "ind.cora.x").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
  (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps([[1]], protocol=2))
  with pytest.raises(ValueError, match=r"ind\.cora\.x: expected a scipy csr_matrix"):
    data.load_planetoid("cora", tmp_path)
  _write(tmp_path)
  (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps([[1]], protocol=2))
  with pytest.raises(ValueError, match=r"ind\.cora\.graph: expected a dict"):
    data.load_planetoid("cora", tmp_path)


def test_write_planetoid_refuses_python3_protocols(tmp_path):
  with pytest.raises(ValueError, match="protocol"):
    _write(tmp_path, protocol=4)


# ----------------------------------------------------------------------------------------------------------
# row_normalize


def test_row_normalize():
  out = data.row_normalize(np.array([[1, 3], [0, 0], [2, 2]]))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[0.25, 0.75], [0, 0], [0.5, 0.5]])
  assert data.row_normalize(np.ones((2, 4))).dtype == np.float64
  with pytest.raises(ValueError, match="2-D"):
    data.row_normalize(np.ones(3))


# ----------------------------------------------------------------------------------------------------------
# Contextual SBM


def _csbm(**kw):
  args = dict(num_nodes=2708, num_classes=7, num_features=300, avg_degree=4.0, homophily=0.8,
              feature_signal=0.6, seed=3)
  args.update(kw)
  return data.contextual_sbm(**args)


def _homophily(ds):
  return float(np.mean(ds.labels[ds.senders] == ds.labels[ds.receivers]))


def test_csbm_is_deterministic_for_a_seed():
  a, b, c = _csbm(), _csbm(), _csbm(seed=4)
  for field in ("features", "labels", "train_mask", "val_mask", "test_mask", "senders", "receivers"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.senders, c.senders)


def test_csbm_structure_and_splits():
  ds = _csbm()
  assert (ds.num_nodes, ds.num_features, ds.num_classes, ds.name) == (2708, 300, 7, "csbm")
  assert ds.num_edges == 2 * round(4.0 * 2708 / 2)
  assert ds.features.dtype == np.float32 and set(np.unique(ds.features)) <= {0.0, 1.0}
  assert np.bincount(ds.labels).max() - np.bincount(ds.labels).min() <= 1
  edges = _edge_set(ds)
  assert len(edges) == ds.num_edges and all((v, u) in edges for u, v in edges)
  assert not np.any(ds.senders == ds.receivers)
  masks = np.stack([ds.train_mask, ds.val_mask, ds.test_mask])
  assert masks.sum(1).tolist() == [140, 500, 1000]
  assert masks.sum(0).max() == 1  # disjoint
  np.testing.assert_array_equal(np.bincount(ds.labels[ds.train_mask]), [20] * 7)


@pytest.mark.parametrize("homophily", [0.1, 0.5, 0.9])
def test_csbm_homophily_as_asked(homophily):
  assert abs(_homophily(_csbm(homophily=homophily)) - homophily) < 1e-3


def test_csbm_features_follow_the_class_topics():
  signal, words = 0.6, 18.0
  ds = _csbm(feature_signal=signal, words_per_node=words)
  assert abs(ds.features.sum(1).mean() - words) < 0.5
  # Features most frequent within a class are that class's topic block: a nearest-centroid rule works well.
  centroids = np.stack([ds.features[ds.labels == k].mean(0) for k in range(7)])
  accuracy = np.mean((ds.features @ centroids.T).argmax(1) == ds.labels)
  assert accuracy > 0.9
  noise = _csbm(feature_signal=0.0)
  centroids = np.stack([noise.features[noise.labels == k].mean(0) for k in range(7)])
  assert np.mean((noise.features @ centroids.T).argmax(1) == noise.labels) < 0.4


def test_csbm_small_graph_gets_smaller_splits():
  ds = data.contextual_sbm(30, 3, 12, avg_degree=3.0, homophily=0.7, feature_signal=0.5, seed=0)
  masks = np.stack([ds.train_mask, ds.val_mask, ds.test_mask])
  assert masks.sum(1).tolist() == [9, 10, 11]
  assert masks.sum(0).max() == 1
  np.testing.assert_array_equal(np.bincount(ds.labels[ds.train_mask]), [3, 3, 3])


def test_csbm_rejects_impossible_requests():
  with pytest.raises(ValueError, match="pairs exist"):
    data.contextual_sbm(12, 3, 5, avg_degree=6.0, homophily=1.0, feature_signal=0.5, seed=0)
  with pytest.raises(ValueError, match="homophily"):
    data.contextual_sbm(30, 3, 5, avg_degree=2.0, homophily=1.5, feature_signal=0.5, seed=0)
  with pytest.raises(ValueError, match="3 nodes per class"):
    data.contextual_sbm(5, 3, 5, avg_degree=2.0, homophily=0.5, feature_signal=0.5, seed=0)


# ----------------------------------------------------------------------------------------------------------
# The real files beside the project


def _real_planetoid_dir():
  try:
    folder = data.default_data_dir() / "planetoid"
  except FileNotFoundError:
    pytest.skip("no shared data directory")
  if not folder.is_dir():
    pytest.skip("Planetoid files absent")
  return folder


@pytest.mark.data
@pytest.mark.parametrize("name, nodes, features, classes, edges, splits", [
    ("cora", 2708, 1433, 7, 10556, [140, 500, 1000]),
    ("citeseer", 3327, 3703, 6, 9104, [120, 500, 1000]),
])
def test_real_planetoid_statistics(name, nodes, features, classes, edges, splits):
  folder = _real_planetoid_dir()
  if not (folder / f"ind.{name}.allx").is_file():
    pytest.skip(f"{name} absent")
  ds = data.load_planetoid(name, folder.parent, normalize_features=False)
  assert (ds.num_nodes, ds.num_features, ds.num_classes, ds.num_edges) == (nodes, features, classes, edges)
  masks = np.stack([ds.train_mask, ds.val_mask, ds.test_mask])
  assert masks.sum(1).tolist() == splits and masks.sum(0).max() == 1
  assert not np.any(ds.senders == ds.receivers)
  edge_set = _edge_set(ds)
  assert all((v, u) in edge_set for u, v in edge_set)
  reference, labels, train, val, test = _gcn_load_data(folder, name)
  np.testing.assert_array_equal(ds.features, reference)
  np.testing.assert_array_equal(ds.labels, labels.argmax(1))
  np.testing.assert_array_equal(np.flatnonzero(ds.train_mask), train)
  np.testing.assert_array_equal(np.flatnonzero(ds.val_mask), val)
  np.testing.assert_array_equal(np.flatnonzero(ds.test_mask), test)
  unlabelled = labels.sum(1) == 0
  assert unlabelled.sum() == (15 if name == "citeseer" else 0)
  assert not masks[:, unlabelled].any()
  normalised = data.load_planetoid(name, folder.parent)
  sums = normalised.features.sum(1)
  np.testing.assert_allclose(sums[~unlabelled & (reference.sum(1) > 0)], 1.0, rtol=1e-5)


@pytest.mark.data
def test_real_pubmed_names_the_missing_allx():
  folder = _real_planetoid_dir()
  if (folder / "ind.pubmed.allx").is_file() or not (folder / "ind.pubmed.x").is_file():
    pytest.skip("this check is for the shared Pubmed files without ind.pubmed.allx")
  with pytest.raises(FileNotFoundError, match=r"missing file\(s\): \S*ind\.pubmed\.allx$"):
    data.load_planetoid("pubmed", folder.parent)
