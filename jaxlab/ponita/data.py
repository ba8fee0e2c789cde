"""Data for PONITA: the charged N-body generator, and loaders for rMD17 and QM9.

Host-side numpy only. Every loader validates what it reads and raises one ``ValueError`` (malformed content)
or ``FileNotFoundError`` (absent file) whose message names the file, the key and what was expected.

Command line::

    python -m jaxlab.ponita.data nbody --out DIR [--num-train 10000 --num-valid 2000 --num-test 2000 --seed 43]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
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


def simulate_charged_reference(rng: np.random.RandomState, num_sims: int = 1, *, num_steps: int = 5000,
                               sample_freq: int = 100, loc_std: float = 1.0, vel_norm: float = 0.5,
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
        gram_pairs = np.take(self.gram.reshape(len(self.gram), -1).T, self.flat, axis=0, out=self.pair_tmp,
                             mode="clip")
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


def simulate_charged(rng: np.random.RandomState, num_sims: int, *, num_steps: int = 5000, sample_freq: int = 100,
                     loc_std: float = 1.0, vel_norm: float = 0.5, noise_var: float = 0.0, chunk_size: int = 500,
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
        loc_c, vel_c, edges[start:stop] = _integrate_chunk(loc0, vel0, charges[start:stop], num_steps,
                                                           sample_freq, vel_norm)
        loc[start:stop] = loc_c + noise[:, 0] * noise_var
        vel[start:stop] = vel_c + noise[:, 1] * noise_var
        if progress is not None:
            progress(stop, num_sims)
    return loc, vel, edges, charges


def nbody_file(data_dir, kind: str, split: str, suffix: str = "small") -> Path:
    """Path of one generated file; ``kind`` is loc, vel, edges or charges (the reference's file naming)."""
    return Path(data_dir) / f"{kind}_{split}_charged{NBODY_PARTICLES}_initvel1{suffix}.npy"


def generate_nbody(out_dir, num_train: int = 10000, num_valid: int = 2000, num_test: int = 2000, seed: int = 43,
                   suffix: str = "small", *, num_steps: int = 5000, sample_freq: int = 100,
                   chunk_size: int = 500, verbose: bool = False) -> dict[str, Path]:
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

        loc, vel, edges, charges = simulate_charged(rng, count, num_steps=num_steps, sample_freq=sample_freq,
                                                    chunk_size=chunk_size, progress=report)
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


def load_nbody(data_dir, split: str, suffix: str = "small", max_samples: int | None = None, frame_in: int = 30,
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
        _require(0 <= frame < num_frames, paths["loc"], "loc", f"at least {frame + 1} frames for {name}={frame}",
                 loc)
    if max_samples is not None:
        _require(0 < max_samples <= num_sims, paths["loc"], "loc", f"at least max_samples={max_samples} sims",
                 loc)
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
        per_sample = ((guess - target) ** 2).reshape(len(target), -1).mean(axis=1)
        out[name] = float(per_sample.mean())
        out[f"{name}_sem"] = float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1 else 0.0
    return out


# ----------------------------------------------------------------------------------------------------------
# rMD17

KCAL_TO_MEV = 43.3634  # 1 kcal/mol in meV, the factor PONITA reports with
RMD17_STYLES = ("official_files", "ponita", "official_index")
_RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")


def _read_rmd17(path: Path) -> dict[str, np.ndarray]:
    with _open_npz(path) as npz:
        raw = {key: _npz_get(npz, path, key) for key in _RMD17_KEYS}
    z, coords, energies, forces = (raw[k] for k in _RMD17_KEYS)
    _require(z.ndim == 1 and z.size > 0 and _is_int(z) and np.all(z > 0), path, "nuclear_charges",
             "positive integers of shape (N,)", z)
    n = z.shape[0]
    _require(coords.ndim == 3 and coords.shape[1:] == (n, 3) and _is_float(coords), path, "coords",
             f"a float array (M, {n}, 3) matching {n} nuclear_charges", coords)
    m = coords.shape[0]
    _require(energies.shape == (m,) and _is_float(energies), path, "energies", f"a float array ({m},)", energies)
    _require(forces.shape == (m, n, 3) and _is_float(forces), path, "forces", f"a float array ({m}, {n}, 3)",
             forces)
    for key in _RMD17_KEYS[1:]:
        _require(bool(np.all(np.isfinite(raw[key]))), path, key, "finite values only")
    return raw


def _read_index_csv(path: Path, num_frames: int, data_path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    values = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                values.append(int(line.strip()))
            except ValueError:
                raise ValueError(f"{path}: line {line_no} expected one integer frame index, got {line!r}") from None
    index = np.asarray(values, dtype=np.int64)
    if index.size == 0 or index.min() < 0 or index.max() >= num_frames:
        raise ValueError(f"{path}: expected frame indices in [0, {num_frames}) for the {num_frames} frames of "
                         f"{data_path}")
    if np.unique(index).size != index.size:
        raise ValueError(f"{path}: frame indices must not repeat")
    return index


def _take_every(index: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    # PONITA holds out ``idx[::step]`` and deletes those entries from ``idx``: (kept, held_out).
    return np.delete(index, np.s_[::step]), index[::step]


def _rmd17_split(raw, index):
    return {
        "coords": raw["coords"][index].astype(np.float32),
        # Float64 on purpose: total energies are ~1e5 kcal/mol, where float32 steps are ~0.03 kcal/mol (1.4 meV).
        "energies": raw["energies"][index].astype(np.float64),
        "forces": raw["forces"][index].astype(np.float32),
        "index": np.asarray(index, dtype=np.int64),
    }


def load_rmd17(data_dir, molecule: str, split_style: str = "official_files", split_index: int = 1) -> dict:
    """rMD17 frames for one molecule split into train/val/test (val = every 20th training frame, held out).

    ``split_style``:
      * ``"official_files"``: ``rmd17_<mol>_{train,test}_0<k>.npz`` (1000 frames each) -> 950 / 50 / 1000.
      * ``"ponita"``: full trajectory ``rmd17_<mol>.npz``; test = range(min(M, 100000)), train = test[::100]
        removed from test -> 950 / 50 / ~99000.
      * ``"official_index"``: full trajectory plus ``splits/index_{train,test}_0<k>.csv`` -> 950 / 50 / 1000.

    Files are looked up in ``data_dir`` and ``data_dir/rmd17`` (full trajectories also under ``npz_data/``).
    Returns ``{"molecule", "nuclear_charges" [N] int32, "train"|"val"|"test": {"coords" [M, N, 3] float32 Å,
    "energies" [M] float64 kcal/mol, "forces" [M, N, 3] float32 kcal/mol/Å, "index" [M] frame in the source file}}``.
    """
    if split_style not in RMD17_STYLES:
        raise ValueError(f"split_style must be one of {RMD17_STYLES}, got {split_style!r}")
    roots = [Path(data_dir), Path(data_dir) / "rmd17"]
    if split_style == "official_files":
        train_path = _find_file([r / f"rmd17_{molecule}_train_{split_index:02d}.npz" for r in roots])
        test_path = _find_file([r / f"rmd17_{molecule}_test_{split_index:02d}.npz" for r in roots])
        train_raw, test_raw = _read_rmd17(train_path), _read_rmd17(test_path)
        if not np.array_equal(train_raw["nuclear_charges"], test_raw["nuclear_charges"]):
            raise ValueError(f"{test_path}: key 'nuclear_charges' expected the same atoms as {train_path}")
        train, val = _take_every(np.arange(len(train_raw["energies"])), 20)
        splits = {"train": _rmd17_split(train_raw, train), "val": _rmd17_split(train_raw, val),
                  "test": _rmd17_split(test_raw, np.arange(len(test_raw["energies"])))}
        z = train_raw["nuclear_charges"]
    else:
        name = f"rmd17_{molecule}.npz"
        path = _find_file([r / sub / name for r in roots for sub in (".", "npz_data")])
        raw = _read_rmd17(path)
        num_frames = len(raw["energies"])
        if split_style == "ponita":
            test, train = _take_every(np.arange(min(num_frames, 100000)), 100)
        else:
            split_dirs = [path.parent / "splits", path.parent.parent / "splits"]
            train_csv = _find_file([d / f"index_train_{split_index:02d}.csv" for d in split_dirs])
            test_csv = _find_file([d / f"index_test_{split_index:02d}.csv" for d in split_dirs])
            train = _read_index_csv(train_csv, num_frames, path)
            test = _read_index_csv(test_csv, num_frames, path)
            if np.intersect1d(train, test).size:
                raise ValueError(f"{test_csv}: expected no frame shared with {train_csv}")
        train, val = _take_every(train, 20)
        splits = {"train": _rmd17_split(raw, train), "val": _rmd17_split(raw, val), "test": _rmd17_split(raw, test)}
        z = raw["nuclear_charges"]
    return {"molecule": molecule, "nuclear_charges": z.astype(np.int32), **splits}


def rmd17_stats(train: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean energy and RMS force component of a split; training uses E' = (E - mean)/rms, F' = F/rms."""
    energies = np.asarray(train["energies"], dtype=np.float64)
    forces = np.asarray(train["forces"], dtype=np.float64)
    return {"energy_mean": float(energies.mean()), "force_rms": float(np.sqrt(np.mean(forces**2)))}


# ----------------------------------------------------------------------------------------------------------
# QM9 (the qm9pack-derived npz: id, N, Z, R, targets, target_names, smiles)

QM9_FILE = "qm9_qm9pack_130831.npz"
QM9_MAX_ATOMS = 29
HARTREE_TO_EV = 27.211386246

# B3LYP/6-31G(2df,p) isolated-atom energies in Hartree (the QM9 atomref table) for U0, U, H, G.
QM9_ATOMREF_HARTREE = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063162, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}

# name -> (column in the file's target_names, factor to the paper's unit, paper unit, atomref slot or None).
# U0/U/H/G are atomisation energies (total minus atomrefs), the quantities PONITA regresses (PyG's *_atom);
# *_total keep the total energy. Results tables report the eV energies in meV.
QM9_TARGETS = {
    "mu": ("Dipole_debye", 1.0, "D", None),
    "alpha": ("Polarizability_bohr3", 1.0, "a0^3", None),
    "homo": ("HOMO_au", HARTREE_TO_EV, "eV", None),
    "lumo": ("LUMO_au", HARTREE_TO_EV, "eV", None),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV, "eV", None),
    "r2": ("R2_bohr2", 1.0, "a0^2", None),
    "zpve": ("ZPVE_au", HARTREE_TO_EV, "eV", None),
    "U0": ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV", 0),
    "U": ("InternalEnergy_298K_au", HARTREE_TO_EV, "eV", 1),
    "H": ("Enthalphy_298K_au", HARTREE_TO_EV, "eV", 2),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV, "eV", 3),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/mol/K", None),
    "U0_total": ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV", None),
    "U_total": ("InternalEnergy_298K_au", HARTREE_TO_EV, "eV", None),
    "H_total": ("Enthalphy_298K_au", HARTREE_TO_EV, "eV", None),
    "G_total": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV, "eV", None),
    "A": ("RotA_GHz", 1.0, "GHz", None),
    "B": ("RotB_GHz", 1.0, "GHz", None),
    "C": ("RotC_GHz", 1.0, "GHz", None),
}
# The twelve targets of PONITA's QM9 table, in its order.
PONITA_QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")


def _read_qm9(path: Path, max_atoms: int) -> dict[str, np.ndarray]:
    with _open_npz(path) as npz:
        raw = {key: _npz_get(npz, path, key) for key in ("N", "Z", "R", "targets", "target_names")}
    counts, z, r, targets, names = (raw[k] for k in ("N", "Z", "R", "targets", "target_names"))
    _require(counts.ndim == 1 and counts.size > 0 and _is_int(counts), path, "N", "integers of shape (M,)", counts)
    _require(bool(np.all((counts > 0) & (counts <= max_atoms))), path, "N", f"atom counts in [1, {max_atoms}]")
    total = int(counts.sum())
    _require(z.shape == (total,) and _is_int(z), path, "Z", f"integers of shape ({total},) = (sum N,)", z)
    _require(r.shape == (total, 3) and _is_float(r), path, "R", f"a float array ({total}, 3) = (sum N, 3)", r)
    _require(names.ndim == 1 and names.dtype.kind == "U", path, "target_names", "a string array (T,)", names)
    m = counts.shape[0]
    _require(targets.shape == (m, names.shape[0]) and _is_float(targets), path, "targets",
             f"a float array ({m}, {names.shape[0]}) = (M, len(target_names))", targets)
    return raw


def _qm9_target_values(raw, path: Path, names: Sequence[str]) -> np.ndarray:
    columns = [str(c) for c in raw["target_names"]]
    z, counts = raw["Z"], raw["N"]
    molecule_of_atom = np.repeat(np.arange(len(counts)), counts)
    out = []
    for name in names:
        column, factor, _, atomref_slot = QM9_TARGETS[name]
        _require(column in columns, path, "target_names", f"a column named {column!r} for target {name!r}")
        value = raw["targets"][:, columns.index(column)].astype(np.float64)
        if atomref_slot is not None:
            known = np.isin(z, list(QM9_ATOMREF_HARTREE))
            _require(bool(known.all()), path, "Z", f"elements in {sorted(QM9_ATOMREF_HARTREE)} (atomrefs exist "
                     f"only for these), found {sorted(set(np.unique(z[~known]).tolist()))}")
            table = np.zeros(max(QM9_ATOMREF_HARTREE) + 1)
            for element, refs in QM9_ATOMREF_HARTREE.items():
                table[element] = refs[atomref_slot]
            value = value - np.bincount(molecule_of_atom, weights=table[z], minlength=len(counts))
        out.append(value * factor)
    return np.stack(out, axis=1)


def load_qm9(data_dir, target: str | Sequence[str] = "U0", *, num_train: int = 110000, num_val: int = 10000,
             split_seed: int = 42, max_molecules: int | None = None, max_atoms: int = QM9_MAX_ATOMS) -> dict:
    """QM9 padded to ``max_atoms`` with the DimeNet split: RandomState(split_seed).permutation(M) -> train
    ``num_train``, val ``num_val``, test the rest.

    ``target`` names come from :data:`QM9_TARGETS`: energies in eV (Hartree x 27.211386246); U0/U/H/G are
    atomisation energies (the file's total energy minus the B3LYP atomrefs in :data:`QM9_ATOMREF_HARTREE`),
    ``*_total`` the totals. ``max_molecules`` keeps the first that many of each split (for quick runs; the
    split itself is always drawn over the whole file). The file is looked up in ``data_dir`` and ``data_dir/qm9``.

    Returns ``{"target_names", "target_units", "train"|"val"|"test": {"charges" [S, max_atoms] int32 (0 = pad),
    "positions" [S, max_atoms, 3] float32 Å (0 at pads), "num_atoms" [S] int32, "targets" [S, T] float32,
    "index" [S] molecule row in the file}}``.
    """
    names = (target,) if isinstance(target, str) else tuple(target)
    unknown = [n for n in names if n not in QM9_TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown QM9 target(s) {unknown or names}; expected names from {list(QM9_TARGETS)}")
    path = _find_file([Path(data_dir) / QM9_FILE, Path(data_dir) / "qm9" / QM9_FILE])
    raw = _read_qm9(path, max_atoms)
    counts = raw["N"].astype(np.int64)
    m = counts.shape[0]
    _require(num_train > 0 and num_val > 0 and num_train + num_val < m, path, "N",
             f"more than num_train + num_val = {num_train + num_val} molecules, found {m}")
    values = _qm9_target_values(raw, path, names)
    first_atom = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.random.RandomState(split_seed).permutation(m)
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val), "test": (num_train + num_val, m)}
    out = {"target_names": names, "target_units": tuple(QM9_TARGETS[n][2] for n in names)}
    slot = np.arange(max_atoms)
    for split, (lo, hi) in bounds.items():
        index = order[lo:hi] if max_molecules is None else order[lo:hi][:max_molecules]
        num_atoms = counts[index]
        real = slot[None, :] < num_atoms[:, None]
        # Row-major order of the mask walks each molecule's atoms in file order, matching the flat Z/R layout.
        atom = (first_atom[index][:, None] + slot[None, :])[real]
        charges = np.zeros((len(index), max_atoms), dtype=np.int32)
        positions = np.zeros((len(index), max_atoms, 3), dtype=np.float32)
        charges[real] = raw["Z"][atom]
        positions[real] = raw["R"][atom]
        out[split] = {"charges": charges, "positions": positions, "num_atoms": num_atoms.astype(np.int32),
                      "targets": values[index].astype(np.float32), "index": index.astype(np.int64)}
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxlab.ponita.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    nbody = commands.add_parser("nbody", help="generate the charged N-body files (EGNN nbody_small)")
    nbody.add_argument("--out", required=True, help="output folder")
    nbody.add_argument("--num-train", type=int, default=10000)
    nbody.add_argument("--num-valid", type=int, default=2000)
    nbody.add_argument("--num-test", type=int, default=2000)
    nbody.add_argument("--seed", type=int, default=43)
    nbody.add_argument("--suffix", default="small")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    generate_nbody(args.out, args.num_train, args.num_valid, args.num_test, args.seed, args.suffix,
                   verbose=True)
    print(f"done in {time.perf_counter() - began:.1f}s")
    if args.num_test == 0:
        return
    test = load_nbody(args.out, "test", args.suffix)
    scores = nbody_baselines(test)
    print(f"test zero-motion MSE {scores['zero_motion']:.4f} +- {scores['zero_motion_sem']:.4f}, "
          f"constant-velocity MSE {scores['constant_velocity']:.4f} +- {scores['constant_velocity_sem']:.4f}")


if __name__ == "__main__":
    main()
