"""The charged N-body data set: the reference generator reproduced bit for bit, vectorised, and its loader.

Host-side numpy only. ``python -m jaxlab.ponita.data nbody --out DIR`` writes the standard files.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxlab.ponita._io import _atomic_save_npy, _is_float, _require

# ----------------------------------------------------------------------------------------------------------
# Charged N-body (EGNN's ChargedParticlesSim with generate_dataset.py's settings)

NBODY_PARTICLES = 5
NBODY_DIM = 3
NBODY_SPLITS = ("train", "valid", "test")
_CHARGE_TYPES = np.array([-1.0, 0.0, 1.0])
_CHARGE_PROB = [0.5, 0.0, 0.5]
_BOX_SIZE = 5.0
_DT = 0.001
_MAX_F = 0.1 / _DT  # written as the reference writes it, so the clip bound has the same rounding
_STRENGTH = 1.0


def _num_saved_frames(num_steps: int, sample_freq: int) -> int:
  if num_steps <= 0 or sample_freq <= 0 or num_steps % sample_freq:
    raise ValueError(f"num_steps ({num_steps}) must be a positive multiple of sample_freq ({sample_freq})")
  return num_steps // sample_freq - 1


def _reflect_into_box(loc: np.ndarray, vel: np.ndarray) -> None:
  """The reference's wall, in place and elementwise (any shape); it acts only on the initial state."""
  # The reference aborts here: a reflection from beyond three box widths would still land outside the box.
  if not (np.all(loc < 3 * _BOX_SIZE) and np.all(loc > -3 * _BOX_SIZE)):
    raise RuntimeError(f"initial positions beyond +-{3 * _BOX_SIZE}: the reference generator rejects them")
  over = loc > _BOX_SIZE
  loc[over] = 2 * _BOX_SIZE - loc[over]
  vel[over] = -np.abs(vel[over])
  # Tested after the first reflection, as the reference does.
  under = loc < -_BOX_SIZE
  loc[under] = -2 * _BOX_SIZE - loc[under]
  vel[under] = np.abs(vel[under])


def _reference_forces(loc: np.ndarray, edges: np.ndarray) -> np.ndarray:
  n = loc.shape[1]
  pts = loc.transpose()
  sq_norm = (pts**2).sum(axis=1).reshape(n, 1)
  # Same data on both sides makes numpy call BLAS syrk, whose fused multiply-adds the fast path must match.
  dist2 = sq_norm + sq_norm.reshape(1, n) - 2 * pts.dot(pts.transpose())
  with np.errstate(divide="ignore", invalid="ignore"):
    # The diagonal of dist2 can be a tiny negative number (NaN) or zero (inf); both are overwritten below.
    magnitude = _STRENGTH * edges / np.power(dist2, 3.0 / 2.0)
  np.fill_diagonal(magnitude, 0)
  offsets = np.concatenate([np.subtract.outer(loc[d], loc[d]).reshape(1, n, n) for d in range(NBODY_DIM)])
  force = (magnitude.reshape(1, n, n) * offsets).sum(axis=-1)
  force[force > _MAX_F] = _MAX_F
  force[force < -_MAX_F] = -_MAX_F
  return force


def _reference_one(rng, num_steps, sample_freq, loc_std, vel_norm, noise_var):
  n, num_saved = NBODY_PARTICLES, _num_saved_frames(num_steps, sample_freq)
  charges = rng.choice(_CHARGE_TYPES, size=(n, 1), p=_CHARGE_PROB)
  edges = charges.dot(charges.transpose())
  loc_next = rng.randn(NBODY_DIM, n) * loc_std
  vel_next = rng.randn(NBODY_DIM, n)
  speed = np.sqrt((vel_next**2).sum(axis=0)).reshape(1, -1)
  vel_next = vel_next * vel_norm / speed

  _reflect_into_box(loc_next, vel_next)

  loc = np.zeros((num_saved, NBODY_DIM, n))
  vel = np.zeros((num_saved, NBODY_DIM, n))
  counter = 0
  vel_next += _DT * _reference_forces(loc_next, edges)
  for step in range(1, num_steps):
    loc_next += _DT * vel_next
    if step % sample_freq == 0:
      loc[counter], vel[counter] = loc_next, vel_next
      counter += 1
    vel_next += _DT * _reference_forces(loc_next, edges)
  # Zero noise still advances the random stream, and every later simulation depends on that.
  loc += rng.randn(num_saved, NBODY_DIM, n) * noise_var
  vel += rng.randn(num_saved, NBODY_DIM, n) * noise_var
  return loc, vel, edges, charges


def simulate_charged_reference(rng: np.random.RandomState,
                               num_sims: int = 1,
                               *,
                               num_steps: int = 5000,
                               sample_freq: int = 100,
                               loc_std: float = 1.0,
                               vel_norm: float = 0.5,
                               noise_var: float = 0.0):
  """One simulation at a time, in the reference's order of operations (slow; the oracle for the fast path).

    Returns ``loc, vel`` [S, T, 3, 5] with T = num_steps // sample_freq - 1 (frame k is the state after step
    sample_freq * (k + 1); the initial state is not kept), ``edges`` [S, 5, 5] and ``charges`` [S, 5, 1], all
    float64, and advances ``rng`` exactly as the reference advances the global legacy stream.
    """
  sims = [_reference_one(rng, num_steps, sample_freq, loc_std, vel_norm, noise_var) for _ in range(num_sims)]
  return tuple(np.stack(parts) for parts in zip(*sims))


def _draw_chunk(rng, count, num_saved, loc_std):
  n = NBODY_PARTICLES
  charges = np.empty((count, n, 1))
  loc = np.empty((count, NBODY_DIM, n))
  vel = np.empty((count, NBODY_DIM, n))
  noise = np.empty((count, 2, num_saved, NBODY_DIM, n))
  for s in range(count):
    charges[s] = rng.choice(_CHARGE_TYPES, size=(n, 1), p=_CHARGE_PROB)
    loc[s] = rng.randn(NBODY_DIM, n) * loc_std
    vel[s] = rng.randn(NBODY_DIM, n)
    noise[s, 0] = rng.randn(num_saved, NBODY_DIM, n)
    noise[s, 1] = rng.randn(num_saved, NBODY_DIM, n)
  return charges, loc, vel, noise


class _BatchedForces:
  """Forces for ``count`` simulations at once, with loc laid out [3, n, count] (simulations last, so each
    elementwise op runs over contiguous memory). Every buffer is allocated once: fresh large temporaries per
    step cost more in page faults than the arithmetic itself.

    Each float operation repeats one in _reference_forces element by element and in the same order. The
    reference's pair quantities are exactly symmetric (syrk mirrors its upper triangle; sums commute), and
    m_ji (x_j - x_i) is exactly -(m_ij (x_i - x_j)) in IEEE arithmetic, so each of the n(n-1)/2 pairs is
    computed once. ``self.summand[j]`` picks the j-th term of every particle's force from ``self.signed`` =
    [0, +pair terms, -pair terms]; adding them in j order repeats the reference's sequential sum over j, with
    its zero self term.
    """

  def __init__(self, count: int, n: int, strength_edges: np.ndarray):
    self.first, self.second = np.triu_indices(n, 1)
    num_pairs = len(self.first)
    self.flat = self.first * n + self.second
    pair_id = np.zeros((n, n), dtype=np.int64)
    pair_id[self.first, self.second] = np.arange(num_pairs)
    self.summand = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
      for j in range(n):
        if j > i:
          self.summand[j, i] = 1 + pair_id[i, j]
        elif j < i:
          self.summand[j, i] = 1 + num_pairs + pair_id[j, i]
    # strength_edges [count, n, n] -> [pairs, count]
    self.strength = np.ascontiguousarray(strength_edges.reshape(count, n * n)[:, self.flat].T)
    self.sq = np.empty((NBODY_DIM, n, count))
    self.sq_norm = np.empty((n, count))
    self.per_sim = np.empty((count, NBODY_DIM, n))
    self.gram = np.empty((count, n, n))
    self.pair = np.empty((num_pairs, count))
    self.pair_tmp = np.empty((num_pairs, count))
    self.offset = np.empty((NBODY_DIM, num_pairs, count))
    self.offset_tmp = np.empty((NBODY_DIM, num_pairs, count))
    self.signed = np.zeros((NBODY_DIM, 1 + 2 * num_pairs, count))
    self.term = np.empty((NBODY_DIM, n, count))
    self.force = np.empty((NBODY_DIM, n, count))

  def __call__(self, loc: np.ndarray) -> np.ndarray:
    # take(mode="clip") writes straight into ``out`` (mode="raise" buffers); indices are in range anyway.
    np.multiply(loc, loc, out=self.sq)
    np.add(self.sq[0], self.sq[1], out=self.sq_norm)
    np.add(self.sq_norm, self.sq[2], out=self.sq_norm)
    # Batched matmul of a matrix with its own transpose calls the same BLAS syrk per simulation as the
    # reference's 2-D dot, so the fused multiply-adds inside BLAS match too.
    self.per_sim[...] = loc.transpose(2, 0, 1)
    np.matmul(self.per_sim.transpose(0, 2, 1), self.per_sim, out=self.gram)
    gram_pairs = np.take(self.gram.reshape(len(self.gram), -1).T, self.flat, axis=0, out=self.pair_tmp, mode="clip")
    np.multiply(gram_pairs, 2, out=gram_pairs)
    dist2 = np.take(self.sq_norm, self.first, axis=0, out=self.pair, mode="clip")
    dist2 += np.take(self.sq_norm, self.second, axis=0, out=self.offset_tmp[0], mode="clip")
    dist2 -= gram_pairs
    magnitude = np.divide(self.strength, np.power(dist2, 3.0 / 2.0, out=dist2), out=dist2)
    offset = np.take(loc, self.first, axis=1, out=self.offset, mode="clip")
    offset -= np.take(loc, self.second, axis=1, out=self.offset_tmp, mode="clip")
    num_pairs = len(self.first)
    positive = self.signed[:, 1:1 + num_pairs]
    np.multiply(magnitude, offset, out=positive)
    np.negative(positive, out=self.signed[:, 1 + num_pairs:])
    force = np.take(self.signed, self.summand[0], axis=1, out=self.force, mode="clip")
    for j in range(1, len(self.summand)):
      force += np.take(self.signed, self.summand[j], axis=1, out=self.term, mode="clip")
    # Same bounds as the reference's two masked assignments (NaN passes through both unchanged).
    return np.clip(force, -_MAX_F, _MAX_F, out=force)


def _integrate_chunk(loc0, vel0, charges, num_steps, sample_freq, vel_norm):
  count, n = loc0.shape[0], NBODY_PARTICLES
  num_saved = _num_saved_frames(num_steps, sample_freq)
  sq = vel0 * vel0
  speed = np.sqrt((sq[:, 0] + sq[:, 1]) + sq[:, 2])
  vel_start = vel0 * vel_norm / speed[:, None, :]
  loc_start = loc0.copy()

  _reflect_into_box(loc_start, vel_start)

  edges = np.matmul(charges, charges.transpose(0, 2, 1))
  forces = _BatchedForces(count, n, _STRENGTH * edges)
  loc_next = np.ascontiguousarray(loc_start.transpose(1, 2, 0))
  vel_next = np.ascontiguousarray(vel_start.transpose(1, 2, 0))
  kick = np.empty_like(vel_next)
  loc = np.empty((count, num_saved, NBODY_DIM, n))
  vel = np.empty((count, num_saved, NBODY_DIM, n))
  counter = 0
  with np.errstate(divide="ignore", invalid="ignore"):
    vel_next += np.multiply(_DT, forces(loc_next), out=kick)
    for step in range(1, num_steps):
      loc_next += np.multiply(_DT, vel_next, out=kick)
      if step % sample_freq == 0:
        loc[:, counter] = loc_next.transpose(2, 0, 1)
        vel[:, counter] = vel_next.transpose(2, 0, 1)
        counter += 1
      vel_next += np.multiply(_DT, forces(loc_next), out=kick)
  return loc, vel, edges


def simulate_charged(rng: np.random.RandomState,
                     num_sims: int,
                     *,
                     num_steps: int = 5000,
                     sample_freq: int = 100,
                     loc_std: float = 1.0,
                     vel_norm: float = 0.5,
                     noise_var: float = 0.0,
                     chunk_size: int = 500,
                     progress=None):
  """Vectorised twin of :func:`simulate_charged_reference`: same outputs bit for bit, same ``rng`` advance.

    The random draws do not depend on the dynamics, so each chunk's draws are taken first, in the reference
    order, and the chunk is then integrated as one batch; ``chunk_size`` bounds the working memory.
    ``progress(done, total)`` is called after each chunk.
    """
  num_saved = _num_saved_frames(num_steps, sample_freq)
  n = NBODY_PARTICLES
  loc = np.empty((num_sims, num_saved, NBODY_DIM, n))
  vel = np.empty_like(loc)
  edges = np.empty((num_sims, n, n))
  charges = np.empty((num_sims, n, 1))
  for start in range(0, num_sims, chunk_size):
    stop = min(start + chunk_size, num_sims)
    charges[start:stop], loc0, vel0, noise = _draw_chunk(rng, stop - start, num_saved, loc_std)
    loc_c, vel_c, edges[start:stop] = _integrate_chunk(loc0, vel0, charges[start:stop], num_steps, sample_freq,
                                                       vel_norm)
    loc[start:stop] = loc_c + noise[:, 0] * noise_var
    vel[start:stop] = vel_c + noise[:, 1] * noise_var
    if progress is not None:
      progress(stop, num_sims)
  return loc, vel, edges, charges


def nbody_file(data_dir, kind: str, split: str, suffix: str = "small") -> Path:
  """Path of one generated file; ``kind`` is loc, vel, edges or charges (the reference's file naming)."""
  return Path(data_dir) / f"{kind}_{split}_charged{NBODY_PARTICLES}_initvel1{suffix}.npy"


def generate_nbody(out_dir,
                   num_train: int = 10000,
                   num_valid: int = 2000,
                   num_test: int = 2000,
                   seed: int = 43,
                   suffix: str = "small",
                   *,
                   num_steps: int = 5000,
                   sample_freq: int = 100,
                   chunk_size: int = 500,
                   verbose: bool = False) -> dict[str, Path]:
  """Writes the EGNN "nbody_small" files (train, then valid, then test from one seeded stream), atomically.

    Returns the written paths keyed ``"{kind}_{split}"``.
    """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(seed)
  written = {}
  for split, count in zip(NBODY_SPLITS, (num_train, num_valid, num_test)):
    began = time.perf_counter()

    def report(done, total, split=split, began=began):
      if verbose:
        print(f"  {split}: {done}/{total} sims, {time.perf_counter() - began:.1f}s", flush=True)

    loc, vel, edges, charges = simulate_charged(rng,
                                                count,
                                                num_steps=num_steps,
                                                sample_freq=sample_freq,
                                                chunk_size=chunk_size,
                                                progress=report)
    for kind, array in (("loc", loc), ("vel", vel), ("edges", edges), ("charges", charges)):
      path = nbody_file(out_dir, kind, split, suffix)
      _atomic_save_npy(path, array)
      written[f"{kind}_{split}"] = path
    if verbose:
      print(f"{split}: {count} sims written in {time.perf_counter() - began:.1f}s", flush=True)
  return written


def _load_npy(path: Path) -> np.ndarray:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError) as err:
    raise ValueError(f"{path}: not a readable .npy array ({err})") from err


def load_nbody(data_dir,
               split: str,
               suffix: str = "small",
               max_samples: int | None = None,
               frame_in: int = 30,
               frame_out: int = 40) -> dict[str, np.ndarray]:
  """Inputs and target for one split, particle-major, float32.

    ``pos`` [S, 5, 3] = loc[frame_in], ``vel`` [S, 5, 3] = vel[frame_in], ``charges`` [S, 5, 1],
    ``target`` [S, 5, 3] = loc[frame_out]. ``max_samples`` keeps the first S simulations.
    """
  if split not in NBODY_SPLITS:
    raise ValueError(f"split must be one of {NBODY_SPLITS}, got {split!r}")
  paths = {kind: nbody_file(data_dir, kind, split, suffix) for kind in ("loc", "vel", "charges")}
  arrays = {kind: _load_npy(path) for kind, path in paths.items()}
  loc, vel, charges = arrays["loc"], arrays["vel"], arrays["charges"]
  _require(loc.ndim == 4 and loc.shape[2] == NBODY_DIM and _is_float(loc), paths["loc"], "loc",
           "a float array [S, T, 3, P]", loc)
  num_sims, num_frames, _, n = loc.shape
  _require(vel.shape == loc.shape and _is_float(vel), paths["vel"], "vel",
           f"a float array of the loc shape {loc.shape}", vel)
  _require(charges.shape == (num_sims, n, 1), paths["charges"], "charges", f"shape {(num_sims, n, 1)}", charges)
  for name, frame in (("frame_in", frame_in), ("frame_out", frame_out)):
    _require(0 <= frame < num_frames, paths["loc"], "loc", f"at least {frame + 1} frames for {name}={frame}", loc)
  if max_samples is not None:
    _require(0 < max_samples <= num_sims, paths["loc"], "loc", f"at least max_samples={max_samples} sims", loc)
    num_sims = max_samples

  def particle_major(arr, frame):
    return np.ascontiguousarray(arr[:num_sims, frame].transpose(0, 2, 1), dtype=np.float32)

  return {
      "pos": particle_major(loc, frame_in),
      "vel": particle_major(vel, frame_in),
      "charges": np.asarray(charges[:num_sims], dtype=np.float32),
      "target": particle_major(loc, frame_out),
  }


def nbody_baselines(split: dict[str, np.ndarray], horizon: float = 1.0) -> dict[str, float]:
  """Zero-motion (x) and constant-velocity (x + horizon * v) position MSE against ``target``.

    MSE is the reference's loss: per sample the mean over particles and xyz, then the mean over samples.
    The ``*_sem`` entries are the standard errors of those means over samples.
    """
  pos = split["pos"].astype(np.float64)
  target = split["target"].astype(np.float64)
  guesses = {"zero_motion": pos, "constant_velocity": pos + horizon * split["vel"].astype(np.float64)}
  out = {}
  for name, guess in guesses.items():
    per_sample = ((guess - target)**2).reshape(len(target), -1).mean(axis=1)
    out[name] = float(per_sample.mean())
    out[f"{name}_sem"] = float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1 else 0.0
  return out
