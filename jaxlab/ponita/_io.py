"""File helpers shared by the PONITA data modules: the data folder, validation with clear errors, atomic writes."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

DATA_ENV_VAR = "JAXLAB_DATA"


def default_data_dir() -> Path:
  """``$JAXLAB_DATA`` if set, else ``<repo>/../shared/data``; FileNotFoundError when neither exists."""
  env = os.environ.get(DATA_ENV_VAR)
  if env:
    path = Path(env).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"${DATA_ENV_VAR} is set to {env!r}, which is not a directory")
    return path
  path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
  if not path.is_dir():
    raise FileNotFoundError(f"no data directory: set ${DATA_ENV_VAR} or put the data sets in {path}")
  return path


# ----------------------------------------------------------------------------------------------------------
# Shared validation helpers


def _find_file(candidates: Sequence[Path]) -> Path:
  for path in candidates:
    if path.is_file():
      return path
  looked = ", ".join(str(p) for p in candidates)
  raise FileNotFoundError(f"{candidates[0].name}: file not found (looked in: {looked})")


def _open_npz(path: Path):
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    raise ValueError(f"{path}: not a readable .npz archive ({err})") from err


def _npz_get(npz, path: Path, key: str) -> np.ndarray:
  if key not in npz.files:
    raise ValueError(f"{path}: missing key '{key}' (keys present: {sorted(npz.files)})")
  try:
    return npz[key]
  except ValueError as err:  # object arrays would need pickle, which we never enable
    raise ValueError(f"{path}: key '{key}' could not be read without pickle ({err})") from err


def _require(ok: bool, path: Path, key: str, expected: str, arr: np.ndarray | None = None) -> None:
  if not ok:
    got = f"; got shape {arr.shape} dtype {arr.dtype}" if arr is not None else ""
    raise ValueError(f"{path}: key '{key}' expected {expected}{got}")


def _is_float(arr: np.ndarray) -> bool:
  return np.issubdtype(arr.dtype, np.floating)


def _is_int(arr: np.ndarray) -> bool:
  return np.issubdtype(arr.dtype, np.integer)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
  # A crash mid-write must never leave a truncated file under the final name that a later run would trust.
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as handle:
      np.save(handle, array, allow_pickle=False)
      handle.flush()
      os.fsync(handle.fileno())
    # mkstemp creates owner-only files; give the result the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
