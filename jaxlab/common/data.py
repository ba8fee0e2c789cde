"""Host-side batching of dense, padded data sets (a dict of numpy arrays with a leading example axis).

Training batches are a pure function of the step number (a seeded permutation per epoch), so a resumed run
sees exactly the batches an uninterrupted run would. Evaluation batches are padded to the full batch size
with ``example_mask`` marking the real rows; every metric must weight by it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

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


class ArrayDataset:

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, name: str = "data"):
    if not arrays:
      raise ValueError(f"{name}: no arrays given")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"{name}: arrays differ in their number of examples: {sizes}")
    self.arrays = arrays
    self.num_examples = next(iter(sizes.values()))
    if batch_size <= 0:
      raise ValueError(f"{name}: batch_size must be positive, got {batch_size}")
    if self.num_examples < batch_size:
      raise ValueError(f"{name}: {self.num_examples} examples are fewer than one batch of {batch_size}")
    self.batch_size = batch_size
    self.seed = seed
    self.name = name

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch; the remainder of a permutation is dropped, as in the reference loaders."""
    return self.num_examples // self.batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(step, self.steps_per_epoch)
    rows = self._permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
    batch = {k: v[rows] for k, v in self.arrays.items()}
    batch["example_mask"] = np.ones(self.batch_size, bool)
    return batch

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    n, b = self.num_examples, self.batch_size
    for start in range(0, n, b):
      rows = np.arange(start, min(start + b, n))
      pad = b - len(rows)
      mask = np.concatenate([np.ones(len(rows), bool), np.zeros(pad, bool)])
      rows = np.concatenate([rows, np.full(pad, rows[0])])
      batch = {k: v[rows] for k, v in self.arrays.items()}
      batch["example_mask"] = mask
      yield batch
