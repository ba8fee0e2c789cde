"""safetensors reader/writer against the reference `safetensors` package and plain numpy."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlab.merging import hf

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for i, dt in enumerate(DTYPES):
    shape = [(3, 5), (7,), (2, 3, 2), ()][i % 4]
    if dt == np.bool_:
      a = rng.random(shape) > 0.5
    elif np.dtype(dt).kind in "iu":
      a = rng.integers(0, 100, size=shape).astype(dt)
    else:
      a = rng.normal(size=shape).astype(dt)
    out[f"t{i}.{np.dtype(dt).name}"] = np.asarray(a, dtype=dt)
  out["empty"] = np.zeros((0, 4), np.float32)
  return out


def _same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  assert a.tobytes() == b.tobytes()


def test_roundtrip_every_dtype_single_file(tmp_path):
  t = _tensors()
  p = tmp_path / "x.safetensors"
  hf.save_tensors(p, t)
  back = hf.load_tensors(p)
  assert set(back) == set(t)
  for k in t:
    _same(back[k], t[k])
    assert back[k].flags.c_contiguous


def test_written_files_load_with_reference(tmp_path):
  t = _tensors(1)
  p = tmp_path / "x.safetensors"
  hf.save_tensors(p, t)
  ref = load_file(str(p))
  for k in t:
    _same(ref[k], t[k])
  n = struct.unpack("<Q", p.read_bytes()[:8])[0]
  assert n % 8 == 0


def test_reference_files_load_with_reader(tmp_path):
  t = _tensors(2)
  p = tmp_path / "ref.safetensors"
  save_file(t, str(p), metadata={"format": "pt"})
  r = hf.CheckpointReader(p)
  assert sorted(r.names()) == sorted(t)
  for k in t:
    assert r.shape(k) == t[k].shape and r.dtype(k) == t[k].dtype
    _same(r.get(k), t[k])


def test_header_matches_reference_bytes(tmp_path):
  t = {"b": np.arange(4, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
  hf.save_tensors(tmp_path / "mine.safetensors", t)
  save_file(t, str(tmp_path / "ref.safetensors"))
  assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_sharded_write_index_and_read_back(tmp_path):
  rng = np.random.default_rng(3)
  t = [(f"w{i}", rng.normal(size=(10, 10)).astype(np.float32)) for i in range(5)]  # 400 bytes each
  out = hf.write_checkpoint(tmp_path / "ck", iter(t), {"hidden_size": 10}, max_shard_bytes=900)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  idx = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  assert idx["metadata"]["total_size"] == 5 * 400
  assert idx["weight_map"]["w0"] == shards[0] and idx["weight_map"]["w4"] == shards[2]
  for s in shards:  # every shard is a valid file for the reference loader
    load_file(os.path.join(out, s))
  r = hf.CheckpointReader(out)
  assert r.names() == [n for n, _ in t]
  assert r.config == {"hidden_size": 10}
  for n, a in t:
    _same(r.get(n), a)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_reader_reads_fresh_arrays_and_reopens(tmp_path):
  rng = np.random.default_rng(4)
  t = [(f"w{i}", rng.normal(size=(6, 5)).astype(np.float32)) for i in range(4)]
  out = hf.write_checkpoint(tmp_path / "ck", iter(t), None, max_shard_bytes=250)
  r = hf.CheckpointReader(out)
  for n, a in t[::-1] + t:  # back and forth across shards
    got = r.get(n)
    _same(got, a)
    assert got.flags.writeable and got.flags.owndata
  got[...] = 0
  _same(r.get(t[-1][0]), t[-1][1])
  r.close()
  r.close()
  _same(r.get(t[0][0]), t[0][1])
  with r:
    _same(r.get(t[1][0]), t[1][1])
  assert r._file is None


def test_reader_truncated_after_open(tmp_path):
  p = tmp_path / "x.safetensors"
  hf.save_tensors(p, {"a": np.arange(8, dtype=np.float32), "b": np.arange(8, dtype=np.float32)})
  r = hf.CheckpointReader(p)
  size = os.path.getsize(p)
  with open(p, "r+b") as f:
    f.truncate(size - 12)
  _same(r.get("a"), np.arange(8, dtype=np.float32))
  with pytest.raises(ValueError, match="ended while reading tensor 'b'"):
    r.get("b")


def test_single_shard_directory(tmp_path):
  out = hf.write_checkpoint(tmp_path / "ck", {"x": np.ones(3, np.float16)}, None)
  assert sorted(os.listdir(out)) == ["model.safetensors"]
  assert load_file(os.path.join(out, "model.safetensors"))["x"].dtype == np.float16


def test_failure_mid_write_leaves_no_output(tmp_path):
  def gen():
    yield "a", np.ones(4, np.float32)
    yield "b", np.ones(4, np.float32)
    raise RuntimeError("boom")
  with pytest.raises(RuntimeError, match="boom"):
    hf.write_checkpoint(tmp_path / "out", gen(), {}, max_shard_bytes=16)
  assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
  out = tmp_path / "out"
  hf.write_checkpoint(out, {"a": np.zeros(2, np.float32)})
  with pytest.raises(FileExistsError, match="not empty"):
    hf.write_checkpoint(out, {"a": np.ones(2, np.float32)})
  hf.write_checkpoint(out, {"b": np.ones(2, np.float32)}, overwrite=True)
  assert list(hf.load_tensors(out)) == ["b"]
  assert os.listdir(tmp_path) == ["out"]


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere"):
    hf.CheckpointReader(tmp_path / "nothere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.CheckpointReader(tmp_path / "empty")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
  with pytest.raises(ValueError, match="not valid JSON"):
    hf.CheckpointReader(bad)
  bad.write_bytes(struct.pack("<Q", 1000) + b"{}")
  with pytest.raises(ValueError, match="header length"):
    hf.CheckpointReader(bad)
  hdr = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
  bad.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 12)
  with pytest.raises(ValueError, match="'x' offsets"):
    hf.CheckpointReader(bad)
  out = hf.write_checkpoint(tmp_path / "ck", iter([("model.norm.weight", np.ones(4, np.float32)),
                                                   ("lm_head.weight", np.ones(4, np.float32))]), max_shard_bytes=16)
  r = hf.CheckpointReader(out)
  with pytest.raises(KeyError, match="close names.*model.norm.weight"):
    r.get("model.norm.weigth")
  os.remove(os.path.join(out, "model-00002-of-00002.safetensors"))
  with pytest.raises(FileNotFoundError, match="missing shard.*model-00002-of-00002"):
    hf.CheckpointReader(out)
