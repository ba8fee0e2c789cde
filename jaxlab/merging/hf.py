"""Hugging Face-style checkpoint directories (safetensors, Llama family) without torch.

The safetensors format is read and written directly: an 8-byte little-endian header length `N`, then `N` bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets relative to
the end of the header), then the raw little-endian tensor bytes.

- `CheckpointReader` keeps one shard file open at a time and reads ONE tensor per `get` straight into a fresh
  array (positioned reads, no memory map, so file pages never count toward the process's resident memory); reading
  a model costs about one tensor of memory, however large the checkpoint.
- `write_checkpoint` streams `(name, array)` pairs into shards.  Each shard's bytes go to a scratch data file first;
  when the shard is full its header is written and the data appended behind it (`os.copy_file_range`, falling back
  to a chunked copy), so at most one tensor is held in memory.  Shards are named after the fact
  (`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`, or a single `model.safetensors`).  The
  whole directory is built in a temporary directory beside `out_dir` and renamed into place at the end, so a failure
  never leaves a partial `out_dir`.

Header layout follows the reference library: JSON keys sorted by name with `__metadata__` first, no whitespace,
padded with spaces to a multiple of 8 bytes.  Within a shard the data follows the order in which the tensors
arrived (`save_tensors` sorts names first, so in-memory saves are deterministic regardless of dict order).
"""
import difflib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = ["CheckpointReader", "MissingTensorError", "write_checkpoint", "load_tensors", "save_tensors",
           "read_safetensors_header", "SINGLE_FILE", "INDEX_FILE", "CONFIG_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_MAX_HEADER = 100 * 1024 * 1024
_PREADV = hasattr(os, "preadv")

_DTYPES = {
  "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
  "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
  "BOOL": np.dtype("bool"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}


def _dtype_code(dtype, name):
  dtype = np.dtype(dtype)
  code = _CODES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
  if code is None:
    raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors (supported: "
                     f"{', '.join(str(d) for d in _CODES)})")
  return code


# ----------------------------------------------------------------------------------------------------------------
# single files


def read_safetensors_header(path):
  """Parse a .safetensors header: returns `(tensors, metadata, data_start)`.

  `tensors` maps name -> (numpy dtype, shape tuple, begin, end) with absolute byte offsets, in data-offset order.
  Raises ValueError naming the file for any structural problem (truncation, bad JSON, unknown dtype, offsets that
  do not match the shape, overlapping or out-of-range data).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"corrupt safetensors file {path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise ValueError(f"corrupt safetensors file {path}: header length {n} does not fit the file size {size}")
    blob = f.read(n)
  try:
    header = json.loads(blob.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"corrupt safetensors file {path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
  metadata = header.pop("__metadata__", None)
  if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise ValueError(f"corrupt safetensors file {path}: __metadata__ must map strings to strings")
  start = 8 + n
  tensors = {}
  for name, info in header.items():
    try:
      code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
      raise ValueError(f"corrupt safetensors file {path}: bad entry for tensor {name!r} ({e!r})") from None
    if code not in _DTYPES:
      raise ValueError(f"safetensors file {path}: tensor {name!r} has unsupported dtype {code!r}")
    dtype = _DTYPES[code]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if any(s < 0 for s in shape) or not 0 <= begin <= end or end - begin != nbytes or start + end > size:
      raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} offsets [{begin}, {end}] do not match "
                       f"shape {list(shape)} x {code} or exceed the file")
    tensors[name] = (dtype, shape, start + begin, start + end)
  order = sorted(tensors, key=lambda k: (tensors[k][2], tensors[k][3]))
  prev = start
  for name in order:
    if tensors[name][2] < prev:
      raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} overlaps the previous tensor")
    prev = tensors[name][3]
  return {k: tensors[k] for k in order}, metadata, start


def _header_bytes(entries, metadata):
  """entries: list of (name, code, shape, begin, end) relative offsets -> padded header bytes (with length)."""
  header = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, code, shape, begin, end in sorted(entries):
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob


def _append_file(dst, src_path):
  with open(src_path, "rb") as src:
    total = os.fstat(src.fileno()).st_size
    done = 0
    try:
      while done < total:
        n = os.copy_file_range(src.fileno(), dst.fileno(), total - done)
        if n == 0:
          break
        done += n
    except (AttributeError, OSError):
      pass
    if done < total:
      src.seek(done)
      dst.seek(0, os.SEEK_END)
      shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


class _ShardWriter:
  """One safetensors shard being streamed: data to a scratch file, header + data on `close`."""

  def __init__(self, path):
    self.path = path
    self.data_path = path + ".data"
    self.data = open(self.data_path, "wb")
    self.entries = []
    self.nbytes = 0

  def add(self, name, array):
    code = _dtype_code(array.dtype, name)
    shape = tuple(array.shape)
    array = np.ascontiguousarray(array).reshape(shape)
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    raw = array.reshape(-1).view(np.uint8).data if array.size else b""
    self.data.write(raw)
    self.entries.append((name, code, shape, self.nbytes, self.nbytes + array.nbytes))
    self.nbytes += array.nbytes

  def close(self, metadata):
    self.data.close()
    with open(self.path, "wb") as out:
      out.write(_header_bytes(self.entries, metadata))
      out.flush()
      _append_file(out, self.data_path)
    os.remove(self.data_path)


def _write_single(path, tensors, metadata):
  """Write one .safetensors file (temp file beside it, then os.replace)."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".safetensors")
  os.close(fd)
  try:
    w = _ShardWriter(tmp)
    for name, arr in tensors:
      w.add(name, np.asarray(arr))
    w.close(metadata)
    os.replace(tmp, path)
  except BaseException:
    for p in (tmp, tmp + ".data"):
      if os.path.exists(p):
        os.remove(p)
    raise


# ----------------------------------------------------------------------------------------------------------------
# reader


class MissingTensorError(ValueError, KeyError):
  """A tensor name that the checkpoint does not contain (both a ValueError and a KeyError)."""

  def __str__(self):
    return ValueError.__str__(self)


def _read_into(f, buf, offset, path, name):
  """Fill the byte memoryview `buf` from the raw file `f` starting at `offset` (ValueError if the file is short)."""
  fd = f.fileno()
  done, total = 0, len(buf)
  while done < total:
    if _PREADV:
      n = os.preadv(fd, [buf[done:]], offset + done)
    else:
      f.seek(offset + done)
      n = f.readinto(buf[done:])
    if not n:
      raise ValueError(f"safetensors file {path} ended while reading tensor {name!r} ({done} of {total} bytes)")
    done += n


class CheckpointReader:
  """Read-only view of a checkpoint: a directory (single `model.safetensors` or shards + index) or one file.

  `names()` lists tensors in file order (shards in index order, data-offset order within a shard).  `get(name)`
  returns a fresh C-contiguous numpy array of one tensor, read from the file directly into it; only the shard last
  read is kept open (one file handle).
  """

  def __init__(self, path):
    self.path = os.path.abspath(os.fspath(path))
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"checkpoint not found: {self.path}")
    self._config = None
    if os.path.isfile(self.path):
      shards = [self.path]
      weight_map = None
    else:
      cfg = os.path.join(self.path, CONFIG_FILE)
      if os.path.isfile(cfg):
        try:
          with open(cfg) as f:
            self._config = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"invalid JSON in {cfg}: {e}") from None
      single = os.path.join(self.path, SINGLE_FILE)
      index = os.path.join(self.path, INDEX_FILE)
      weight_map = None
      if os.path.isfile(single):
        shards = [single]
      elif os.path.isfile(index):
        try:
          with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"invalid safetensors index {index}: {e!r}") from None
        files = list(dict.fromkeys(weight_map.values()))
        shards = [os.path.join(self.path, f) for f in sorted(files)]
        for s in shards:
          if not os.path.isfile(s):
            raise FileNotFoundError(f"index {index} refers to a missing shard: {s}")
      else:
        shards = sorted(os.path.join(self.path, f) for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not shards:
          raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {self.path}")
    self._where = {}
    self._shapes = {}
    for shard in shards:
      tensors, _, _ = read_safetensors_header(shard)
      for name, (dtype, shape, begin, end) in tensors.items():
        if weight_map is not None and os.path.basename(shard) != weight_map.get(name):
          continue
        if name in self._where:
          raise ValueError(f"tensor {name!r} appears in both {self._where[name][0]} and {shard}")
        self._where[name] = (shard, dtype, shape, begin, end)
    if weight_map is not None:
      missing = [n for n in weight_map if n not in self._where]
      if missing:
        raise ValueError(f"index {os.path.join(self.path, INDEX_FILE)}: tensor {missing[0]!r} is not in shard "
                         f"{weight_map[missing[0]]}")
    self._file_path = None
    self._file = None

  @property
  def config(self):
    """The parsed config.json of the checkpoint directory, or None."""
    return self._config

  def names(self):
    return list(self._where)

  def __contains__(self, name):
    return name in self._where

  def __len__(self):
    return len(self._where)

  def _info(self, name):
    try:
      return self._where[name]
    except KeyError:
      close = difflib.get_close_matches(name, list(self._where), n=3, cutoff=0.5)
      hint = f"; close names: {close}" if close else ""
      raise MissingTensorError(f"tensor {name!r} not in checkpoint {self.path}{hint}") from None

  def shape(self, name):
    return self._info(name)[2]

  def dtype(self, name):
    return self._info(name)[1]

  def nbytes(self, name):
    _, _, _, begin, end = self._info(name)
    return end - begin

  def get(self, name):
    shard, dtype, shape, begin, end = self._info(name)
    if end == begin:
      return np.zeros(shape, dtype)
    if self._file_path != shard:
      self.close()
      self._file = open(shard, "rb", buffering=0)
      self._file_path = shard
    out = np.empty(shape, dtype)
    _read_into(self._file, memoryview(out.reshape(-1).view(np.uint8)), begin, shard, name)
    return out

  def close(self):
    f, self._file, self._file_path = self._file, None, None
    if f is not None:
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------------------------------------------
# writer


def _prepare_out_dir(out_dir, overwrite):
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir):
      raise FileExistsError(f"output path exists and is not a directory: {out_dir}")
    if os.listdir(out_dir) and not overwrite:
      raise FileExistsError(f"output directory {out_dir} exists and is not empty (pass overwrite=True)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  return out_dir


def _publish(tmp_dir, out_dir):
  """Move the finished temp directory to out_dir, replacing an existing one as atomically as the OS allows."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}.old-")
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
      os.rename(tmp_dir, out_dir)
    except BaseException:
      os.rename(old, out_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp_dir, out_dir)


def _iter_items(tensors):
  if isinstance(tensors, Mapping):
    return ((k, tensors[k]) for k in sorted(tensors))
  return iter(tensors)


def write_checkpoint(out_dir, tensors: Iterable | Mapping, config: dict | None = None, *, max_shard_bytes=5e9,
                     metadata=None, overwrite=False, extra_files: Mapping | None = None):
  """Stream tensors into a Hugging Face-style checkpoint directory; returns the absolute out_dir.

  `tensors` is an iterable of `(name, array)` (written in that order) or a dict (written in sorted-name order).
  A new shard starts when the next tensor would push the current one past `max_shard_bytes` (a tensor larger than
  the limit gets a shard of its own).  `config` is written as config.json; `extra_files` maps file names inside
  the output to source paths to copy (e.g. tokenizer files).  `metadata` defaults to `{"format": "pt"}`, which
  transformers expects.  If `out_dir` exists and is non-empty, FileExistsError unless `overwrite`.
  """
  out_dir = _prepare_out_dir(out_dir, overwrite)
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  metadata = {"format": "pt"} if metadata is None else metadata
  tmp_dir = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}.tmp-")
  writer = None
  try:
    shards = []
    seen = set()
    for name, arr in _iter_items(tensors):
      if not isinstance(name, str):
        raise ValueError(f"tensor names must be strings, got {name!r}")
      if name in seen:
        raise ValueError(f"duplicate tensor name {name!r}")
      seen.add(name)
      arr = np.asarray(arr)
      if writer is not None and writer.entries and writer.nbytes + arr.nbytes > max_shard_bytes:
        writer.close(metadata)
        writer = None
      if writer is None:
        writer = _ShardWriter(os.path.join(tmp_dir, f".shard-{len(shards):05d}.tmp"))
        shards.append(writer)
      writer.add(name, arr)
    if writer is None:
      writer = _ShardWriter(os.path.join(tmp_dir, ".shard-00000.tmp"))
      shards.append(writer)
    writer.close(metadata)
    if len(shards) == 1:
      os.rename(shards[0].path, os.path.join(tmp_dir, SINGLE_FILE))
    else:
      n = len(shards)
      weight_map = {}
      total = 0
      for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(s.path, os.path.join(tmp_dir, fname))
        for e in s.entries:
          weight_map[e[0]] = fname
        total += s.nbytes
      index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
      with open(os.path.join(tmp_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    if config is not None:
      with open(os.path.join(tmp_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    for fname, src in (extra_files or {}).items():
      shutil.copyfile(src, os.path.join(tmp_dir, fname))
    _publish(tmp_dir, out_dir)
  except BaseException:
    if writer is not None and not writer.data.closed:
      writer.data.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return out_dir


def load_tensors(path) -> dict:
  """All tensors of a checkpoint directory or .safetensors file as a dict of numpy arrays (file order)."""
  with CheckpointReader(path) as r:
    return {n: r.get(n) for n in r.names()}


def save_tensors(path, tensors: Mapping, config: dict | None = None, *, metadata=None, max_shard_bytes=5e9,
                 overwrite=False):
  """Save a dict of arrays.  A path ending in `.safetensors` is written as one file (atomically, names sorted);
  any other path is written as a checkpoint directory with `write_checkpoint`."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    if config is not None:
      raise ValueError("config can only be saved with a checkpoint directory, not a single .safetensors file")
    if os.path.exists(path) and not overwrite:
      raise FileExistsError(f"{path} exists (pass overwrite=True)")
    _write_single(path, ((k, tensors[k]) for k in sorted(tensors)), metadata)
    return os.path.abspath(path)
  return write_checkpoint(path, tensors, config, metadata=metadata, max_shard_bytes=max_shard_bytes,
                          overwrite=overwrite)
