"""File helpers shared by the PONITA data modules: the data folder, validation with clear errors, atomic writes."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlab.common.data import DATA_ENV_VAR, default_data_dir  # noqa: F401  (re-exported)


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
