"""Data for PONITA: loaders for rMD17 and QM9, and (re-exported from ``nbody``) the charged N-body generator.

Host-side numpy only. Every loader validates what it reads and raises one ``ValueError`` (malformed content)
or ``FileNotFoundError`` (absent file) whose message names the file, the key and what was expected.

Command line::

    python -m jaxlab.ponita.data nbody --out DIR [--num-train 10000 --num-valid 2000 --num-test 2000 --seed 43]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlab.ponita._io import _find_file, _is_float, _is_int, _npz_get, _open_npz, _require
# Re-exported, so that data.py is the one entry point for PONITA's data sets.
from jaxlab.ponita._io import DATA_ENV_VAR, default_data_dir  # noqa: F401
from jaxlab.ponita.nbody import (  # noqa: F401
    NBODY_DIM, NBODY_PARTICLES, NBODY_SPLITS, generate_nbody, load_nbody, nbody_baselines, nbody_file,
    simulate_charged, simulate_charged_reference)

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
  _require(forces.shape == (m, n, 3) and _is_float(forces), path, "forces", f"a float array ({m}, {n}, 3)", forces)
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
    splits = {
        "train": _rmd17_split(train_raw, train),
        "val": _rmd17_split(train_raw, val),
        "test": _rmd17_split(test_raw, np.arange(len(test_raw["energies"])))
    }
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
      _require(
          bool(known.all()), path, "Z", f"elements in {sorted(QM9_ATOMREF_HARTREE)} (atomrefs exist "
          f"only for these), found {sorted(set(np.unique(z[~known]).tolist()))}")
      table = np.zeros(max(QM9_ATOMREF_HARTREE) + 1)
      for element, refs in QM9_ATOMREF_HARTREE.items():
        table[element] = refs[atomref_slot]
      value = value - np.bincount(molecule_of_atom, weights=table[z], minlength=len(counts))
    out.append(value * factor)
  return np.stack(out, axis=1)


def load_qm9(data_dir,
             target: str | Sequence[str] = "U0",
             *,
             num_train: int = 110000,
             num_val: int = 10000,
             split_seed: int = 42,
             max_molecules: int | None = None,
             max_atoms: int = QM9_MAX_ATOMS) -> dict:
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
    out[split] = {
        "charges": charges,
        "positions": positions,
        "num_atoms": num_atoms.astype(np.int32),
        "targets": values[index].astype(np.float32),
        "index": index.astype(np.int64)
    }
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
  generate_nbody(args.out, args.num_train, args.num_valid, args.num_test, args.seed, args.suffix, verbose=True)
  print(f"done in {time.perf_counter() - began:.1f}s")
  if args.num_test == 0:
    return
  test = load_nbody(args.out, "test", args.suffix)
  scores = nbody_baselines(test)
  print(f"test zero-motion MSE {scores['zero_motion']:.4f} +- {scores['zero_motion_sem']:.4f}, "
        f"constant-velocity MSE {scores['constant_velocity']:.4f} +- {scores['constant_velocity_sem']:.4f}")


if __name__ == "__main__":
  main()
