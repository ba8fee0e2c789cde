import itertools
import os
import pickle
import random
import sys

import numpy as np
import pytest

from jaxlab.agnn import nasbench as nb

# Keys the benchmark could never contain: a malicious pickle records here if it ever runs.
_EXECUTED = []


def _record(message):
  _EXECUTED.append(message)
  return message


class _Payload:
  def __reduce__(self):
    return _record, ("unpickling ran code",)


class _ShellPayload:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.fixture(scope="module")
def cora():
  return nb.NasBenchGraph("cora")


@pytest.fixture(scope="module")
def proteins():
  return nb.NasBenchGraph("proteins")


def _random_sequences(ops, count, seed):
  rng = random.Random(seed)
  return [(tuple(rng.randrange(t + 1) for t in range(nb.NUM_NODES)), tuple(rng.choice(ops) for _ in range(4)))
          for _ in range(count)]


def _write_table(path, rows):
  with open(path, "wb") as f:
    pickle.dump(rows, f)
  return path


def test_space_layout():
  space = nb.nasbench_space("cora")
  assert [p.name for p in space.positions] == ["link0", "op0", "link1", "op1", "link2", "op2", "link3", "op3"]
  assert space.classes == ("links", "ops")
  assert space.sizes == (1, 9, 2, 9, 3, 9, 4, 9)
  assert space.positions[5].choices == nb.OPS
  assert nb.nasbench_space("proteins").sizes == (1, 5, 2, 5, 3, 5, 4, 5)
  assert set(nb.PROTEINS_OPS) < set(nb.OPS)


@pytest.mark.parametrize("call", [nb.nasbench_space, nb.load_bench, nb.NasBenchGraph])
def test_bad_dataset_name(call):
  with pytest.raises(ValueError, match="unknown NAS-Bench-Graph dataset 'coro'.*cora"):
    call("coro")


def test_arch_key_matches_wheel_on_sample():
  # The wheel's pure-Python reference; it must not drag in a deep-learning framework.
  from nas_bench_graph.architecture import Arch
  assert "torch" not in sys.modules
  sequences = _random_sequences(nb.OPS, 2000, seed=0) + _random_sequences(nb.PROTEINS_OPS, 200, seed=1)
  sequences.append(((0, 1, 2, 3), ("skip",) * 4))
  # Skips are where the canonicalisation is intricate: make sure the sample is rich in them.
  sequences += _random_sequences(("skip", "gcn", "gat"), 300, seed=2)
  for links, ops in sequences:
    assert nb.arch_key(links, ops) == Arch(list(links), list(ops)).valid_hash(), (links, ops)


def test_arch_key_merges_isomorphic_architectures():
  # Two leaves under the input: their order does not matter.
  assert nb.arch_key((0, 0, 0, 0), ("gcn", "gat", "sage", "fc")) == nb.arch_key((0, 0, 0, 0),
                                                                                 ("fc", "sage", "gat", "gcn"))
  # Node 2 hanging off node 1, relabelled: (0, 1, 0, 0) is (0, 0, 0, 1) with nodes renumbered.
  assert nb.arch_key((0, 1, 0, 0), ("gcn", "gin", "fc", "fc")) == nb.arch_key((0, 0, 0, 1),
                                                                               ("gcn", "fc", "fc", "gin"))
  assert nb.arch_key((0, 0, 0, 0), ("gat",) * 4) == 0
  assert nb.arch_key((0, 1, 2, 3), ("gcn", "gcn", "gcn", "gat")) == 81110
  assert nb.arch_key((0, 0, 0, 0), ("skip",) * 4) == nb.ALL_SKIP_KEY == 88888


@pytest.mark.parametrize("links, ops, match", [
    ((0, 0, 0), ("gcn",) * 4, "4 links and 4 ops"),
    ((0, 0, 3, 0), ("gcn",) * 4, "link 2 must be an int in 0..2"),
    ((0, 0, 0, 0), ("gcn", "gcn", "gcn", "transformer"), "unknown op 'transformer'"),
])
def test_arch_key_rejects_bad_input(links, ops, match):
  with pytest.raises(ValueError, match=match):
    nb.arch_key(links, ops)


def test_table_sizes(cora, proteins):
  assert len(cora.table) == 26206
  assert len(proteins.table) == 2021
  assert all(isinstance(e.valid, float) and 0 < e.valid <= 1 for e in cora.table.values())


def test_cora_statistics(cora):
  stats = cora.optimum()
  assert stats["best_valid"] == pytest.approx(0.8193, abs=5e-5)
  assert stats["best_valid_test"] == pytest.approx(0.8263, abs=5e-5)
  assert stats["best_test"] == pytest.approx(0.8313, abs=5e-5)
  assert stats["median_test"] == pytest.approx(0.785, abs=5e-4)
  assert stats["num_entries"] == 26206
  assert cora.table[stats["best_valid_key"]].valid == stats["best_valid"]


def test_every_cora_architecture_is_in_the_table(cora):
  rng = random.Random(3)
  space = cora.space
  archs = [tuple(rng.randrange(size) for size in space.sizes) for _ in range(3000)]
  skip = space.positions[1].choices.index("skip")
  archs += [(0, skip, l1, skip, l2, skip, l3, skip) for l1, l2, l3 in itertools.product(range(2), range(3), range(4))]
  for arch in archs:
    all_skip = all(arch[i] == skip for i in (1, 3, 5, 7))
    assert cora.exists(arch) == (not all_skip), arch
    entry = cora.query(arch)
    assert (entry == nb.BenchEntry(0.0, 0.0, 0.0, 0.0)) == all_skip, arch


def test_proteins_space_covers_its_table_exactly(proteins):
  keys = set()
  for arch in itertools.product(*(range(size) for size in proteins.space.sizes)):
    if proteins.exists(arch):
      keys.add(proteins.key(arch))
      proteins.query(arch)
  assert keys == set(proteins.table)


def test_decode_encode_round_trip(cora):
  arch = (0, 1, 1, 8, 0, 3, 2, 7)
  links, ops = cora.decode(arch)
  assert links == (0, 1, 0, 2) and ops == ("gcn", "skip", "cheb", "fc")
  assert cora.encode(links, ops) == arch
  with pytest.raises(ValueError, match="out of range"):
    cora.query((0, 1, 2, 0, 0, 0, 0, 0))


def test_missing_entry_is_a_clear_key_error(tmp_path):
  key = nb.arch_key((0, 0, 0, 0), ("gcn",) * 4)
  path = _write_table(tmp_path / "one.bench", {key: {"valid_perf": 0.5, "perf": 0.4, "latency": 0.01,
                                                     "para": np.float64(0.2)}})
  bench = nb.NasBenchGraph("cora", path=path)
  assert bench.query(bench.encode((0, 0, 0, 0), ("gcn",) * 4)) == nb.BenchEntry(0.5, 0.4, 0.01, 0.2)
  with pytest.raises(KeyError, match=r"links \(0, 0, 0, 0\), ops \('gat',.*not in the cora table \(1 entries\)"):
    bench.query(bench.encode((0, 0, 0, 0), ("gat",) * 4))


def test_refuses_malicious_pickle_without_running_it(tmp_path):
  path = _write_table(tmp_path / "evil.bench", {0: _Payload()})
  with pytest.raises(ValueError, match=r"evil\.bench.*refusing to load global .*test_nasbench\._record"):
    nb.load_bench("cora", path)
  assert _EXECUTED == []

  marker = tmp_path / "marker"
  path = _write_table(tmp_path / "shell.bench", {0: _ShellPayload(f"touch {marker}")})
  with pytest.raises(ValueError, match=r"shell\.bench.*refusing to load global (posix|os|nt)\.system"):
    nb.load_bench("cora", path)
  assert not marker.exists()


def test_accepts_both_numpy_module_spellings(tmp_path):
  # The shipped files name numpy.core.multiarray.scalar; a file re-written under numpy 2 names numpy._core.
  row = {"valid_perf": np.float64(0.7), "perf": np.float64(0.6), "latency": np.float32(0.5), "para": 1.0}
  data = pickle.dumps({7: row}, protocol=3)  # GLOBAL opcodes: module names are plain text lines
  assert b"multiarray" in data
  path = tmp_path / "fresh.bench"
  path.write_bytes(data)
  assert nb.load_bench("cora", path) == {7: nb.BenchEntry(0.7, 0.6, 0.5, 1.0)}
  other = b"numpy.core.multiarray" if b"numpy._core.multiarray" in data else b"numpy._core.multiarray"
  path.write_bytes(data.replace(b"numpy._core.multiarray", other).replace(b"numpy.core.multiarray", other))
  assert nb.load_bench("cora", path) == {7: nb.BenchEntry(0.7, 0.6, 0.5, 1.0)}


def test_missing_corrupt_and_malformed_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="table for 'cora' not found at .*nope.bench"):
    nb.load_bench("cora", tmp_path / "nope.bench")
  good = nb._default_path("proteins").read_bytes()
  (tmp_path / "cut.bench").write_bytes(good[:1000])
  with pytest.raises(ValueError, match=r"cut\.bench: not a readable NAS-Bench-Graph table"):
    nb.load_bench("proteins", tmp_path / "cut.bench")
  _write_table(tmp_path / "list.bench", [1, 2, 3])
  with pytest.raises(ValueError, match=r"list\.bench: expected a non-empty dict"):
    nb.load_bench("cora", tmp_path / "list.bench")
  _write_table(tmp_path / "text.bench", {1: {"valid_perf": "0.5", "perf": 0.4, "latency": 0.1, "para": 1.0}})
  with pytest.raises(ValueError, match=r"text\.bench: non-numeric value in entry 1"):
    nb.load_bench("cora", tmp_path / "text.bench")
  _write_table(tmp_path / "fields.bench", {1: {"valid_perf": 0.5}})
  with pytest.raises(ValueError, match=r"fields\.bench: malformed entry 1"):
    nb.load_bench("cora", tmp_path / "fields.bench")
