"""PONITA data: the charged N-body generator against its reference loop, and the rMD17 / QM9 loaders on
fixtures written here (plus the real files, under the ``data`` marker)."""

import numpy as np
import pytest

from jaxlab.ponita import data, nbody

# ----------------------------------------------------------------------------------------------------------
# N-body


def test_fast_generator_is_bitwise_equal_to_reference_loop():
  slow_rng, fast_rng = np.random.RandomState(43), np.random.RandomState(43)
  slow = data.simulate_charged_reference(slow_rng, 12)
  fast = data.simulate_charged(fast_rng, 12, chunk_size=5)
  for name, a, b in zip(("loc", "vel", "edges", "charges"), slow, fast):
    assert a.dtype == b.dtype == np.float64, name
    assert np.array_equal(a, b), name
  assert slow[0].shape == (12, 49, 3, 5) and slow[2].shape == (12, 5, 5) and slow[3].shape == (12, 5, 1)
  # Both consumed the stream identically, so the next simulation would start from the same state.
  assert np.array_equal(slow_rng.randn(8), fast_rng.randn(8))


def test_fast_generator_matches_reference_when_walls_reflect():
  loc_std = 3.0  # wide enough that several initial coordinates start beyond the +-5 walls
  _, loc0, _, _ = nbody._draw_chunk(np.random.RandomState(5), 10, 9, loc_std)
  assert np.any(loc0 > 5.0) and np.any(loc0 < -5.0)
  slow = data.simulate_charged_reference(np.random.RandomState(5), 10, num_steps=1000, loc_std=loc_std)
  fast = data.simulate_charged(np.random.RandomState(5), 10, num_steps=1000, loc_std=loc_std, chunk_size=4)
  for a, b in zip(slow, fast):
    assert np.array_equal(a, b)


def test_charges_follow_the_legacy_global_stream_draw_order():
  # The reference seeds the global legacy stream; a RandomState with the same seed is the same stream.
  saved = np.random.get_state()
  try:
    np.random.seed(43)
    expected_first = np.random.choice([-1.0, 0.0, 1.0], size=(5, 1), p=[0.5, 0.0, 0.5])
    np.random.randn(3, 5), np.random.randn(3, 5), np.random.randn(49, 3, 5), np.random.randn(49, 3, 5)
    expected_second = np.random.choice([-1.0, 0.0, 1.0], size=(5, 1), p=[0.5, 0.0, 0.5])
  finally:
    np.random.set_state(saved)
  _, _, edges, charges = data.simulate_charged(np.random.RandomState(43), 2)
  assert np.array_equal(charges[0], expected_first)
  assert np.array_equal(charges[1], expected_second)
  assert set(np.unique(charges)) <= {-1.0, 1.0}
  assert np.array_equal(edges, charges @ charges.transpose(0, 2, 1))


def test_generate_then_load_round_trip(tmp_path):
  written = data.generate_nbody(tmp_path, num_train=4, num_valid=3, num_test=2, seed=43, num_steps=500, sample_freq=10)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == sorted(f"{k}_{s}_charged5_initvel1small.npy" for k in ("loc", "vel", "edges", "charges")
                         for s in ("train", "valid", "test"))
  assert sorted(written) == sorted(
      f"{k}_{s}" for k in ("loc", "vel", "edges", "charges") for s in ("train", "valid", "test"))
  loc = np.load(tmp_path / "loc_train_charged5_initvel1small.npy")
  vel = np.load(tmp_path / "vel_train_charged5_initvel1small.npy")
  assert loc.shape == (4, 49, 3, 5) and loc.dtype == np.float64

  train = data.load_nbody(tmp_path, "train")
  assert set(train) == {"pos", "vel", "charges", "target"}
  assert all(a.dtype == np.float32 for a in train.values())
  assert train["pos"].shape == train["vel"].shape == train["target"].shape == (4, 5, 3)
  np.testing.assert_array_equal(train["pos"], loc[:, 30].transpose(0, 2, 1).astype(np.float32))
  np.testing.assert_array_equal(train["vel"], vel[:, 30].transpose(0, 2, 1).astype(np.float32))
  np.testing.assert_array_equal(train["target"], loc[:, 40].transpose(0, 2, 1).astype(np.float32))
  assert data.load_nbody(tmp_path, "train", max_samples=3)["pos"].shape == (3, 5, 3)
  assert data.load_nbody(tmp_path, "test")["charges"].shape == (2, 5, 1)

  # The streams continue across splits: valid starts where train ended.
  rng = np.random.RandomState(43)
  data.simulate_charged(rng, 4, num_steps=500, sample_freq=10)
  valid_loc = data.simulate_charged(rng, 3, num_steps=500, sample_freq=10)[0]
  np.testing.assert_array_equal(np.load(tmp_path / "loc_valid_charged5_initvel1small.npy"), valid_loc)


def test_cli_writes_the_standard_files(tmp_path, capsys):
  data.main(["nbody", "--out", str(tmp_path), "--num-train", "2", "--num-valid", "1", "--num-test", "1"])
  assert (tmp_path / "charges_test_charged5_initvel1small.npy").is_file()
  assert "constant-velocity MSE" in capsys.readouterr().out


def test_baselines_follow_the_mse_definition():
  rng = np.random.RandomState(0)
  split = {k: rng.randn(3, 5, 3) for k in ("pos", "vel", "target")}
  expected_zero = np.mean([np.mean((split["pos"][s] - split["target"][s])**2) for s in range(3)])
  moved = split["pos"] + split["vel"]
  expected_cv = np.mean([np.mean((moved[s] - split["target"][s])**2) for s in range(3)])
  scores = data.nbody_baselines(split)
  assert isinstance(scores["zero_motion"], float)
  assert scores["zero_motion"] == pytest.approx(expected_zero, rel=1e-12)
  assert scores["constant_velocity"] == pytest.approx(expected_cv, rel=1e-12)
  # A target reached exactly by constant velocity scores zero.
  exact = dict(split, target=split["pos"] + split["vel"])
  assert data.nbody_baselines(exact)["constant_velocity"] == pytest.approx(0.0, abs=1e-12)


def test_load_nbody_rejects_malformed_files(tmp_path):
  data.generate_nbody(tmp_path, 2, 2, 2, num_steps=500, sample_freq=10)
  charges = tmp_path / "charges_train_charged5_initvel1small.npy"
  np.save(charges, np.zeros((2, 4, 1)))
  with pytest.raises(ValueError, match=r"charges_train_charged5_initvel1small\.npy.*'charges'.*\(2, 5, 1\)"):
    data.load_nbody(tmp_path, "train")
  with pytest.raises(ValueError, match=r"loc_valid.*'loc'.*frame_out=60"):
    data.load_nbody(tmp_path, "valid", frame_out=60)
  with pytest.raises(ValueError, match=r"loc_valid.*max_samples=5"):
    data.load_nbody(tmp_path, "valid", max_samples=5)
  (tmp_path / "vel_test_charged5_initvel1small.npy").unlink()
  with pytest.raises(FileNotFoundError, match=r"vel_test_charged5_initvel1small\.npy"):
    data.load_nbody(tmp_path, "test")


# ----------------------------------------------------------------------------------------------------------
# rMD17 fixture: a harmonic pair potential, E = sum_{i<j} k/2 (r_ij - r0)^2, with analytic F = -dE/dx

_K, _R0 = 3.0, 1.5
_MOLECULE = "toy"


def _harmonic(coords):
  rel = coords[:, :, None, :] - coords[:, None, :, :]
  dist = np.sqrt((rel**2).sum(-1) + np.eye(coords.shape[1]))  # eye keeps the diagonal away from zero
  stretch = (dist - _R0) * (1 - np.eye(coords.shape[1]))
  energies = 0.25 * _K * (stretch**2).sum(axis=(1, 2))  # each pair counted twice
  forces = -(_K * (stretch / dist)[..., None] * rel).sum(axis=2)
  return energies, forces


def _rmd17_arrays(num_frames, seed, num_atoms=9):
  rng = np.random.RandomState(seed)
  coords = rng.randn(num_frames, num_atoms, 3) * 1.2
  energies, forces = _harmonic(coords)
  return {
      "nuclear_charges": np.array([6, 6, 8, 1, 1, 1, 1, 1, 1][:num_atoms], dtype=np.uint8),
      "coords": coords,
      "energies": energies - 1000.0,
      "forces": forces,
      "old_indices": np.arange(num_frames),
      "old_energies": energies,
      "old_forces": forces
  }


def _write_rmd17(tmp_path, full_frames=2000):
  np.savez(tmp_path / f"rmd17_{_MOLECULE}_train_01.npz", **_rmd17_arrays(100, 1))
  np.savez(tmp_path / f"rmd17_{_MOLECULE}_test_01.npz", **_rmd17_arrays(100, 2))
  np.savez(tmp_path / f"rmd17_{_MOLECULE}.npz", **_rmd17_arrays(full_frames, 3))
  order = np.random.RandomState(4).permutation(full_frames)
  (tmp_path / "splits").mkdir()
  (tmp_path / "splits" / "index_train_01.csv").write_text("\n".join(map(str, order[:60])) + "\n")
  (tmp_path / "splits" / "index_test_01.csv").write_text("\n".join(map(str, order[60:100])) + "\n")
  return order


def test_fixture_forces_are_minus_energy_gradient():
  coords = np.random.RandomState(0).randn(1, 5, 3)
  _, forces = _harmonic(coords)
  eps = 1e-6
  for atom in range(5):
    for axis in range(3):
      step = np.zeros_like(coords)
      step[0, atom, axis] = eps
      slope = (_harmonic(coords + step)[0] - _harmonic(coords - step)[0]) / (2 * eps)
      assert forces[0, atom, axis] == pytest.approx(-slope[0], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("style, sizes", [("official_files", (95, 5, 100)), ("ponita", (19, 1, 1980)),
                                          ("official_index", (57, 3, 40))])
def test_rmd17_split_sizes_and_disjointness(tmp_path, style, sizes):
  order = _write_rmd17(tmp_path)
  ds = data.load_rmd17(tmp_path, _MOLECULE, split_style=style)
  assert tuple(len(ds[s]["energies"]) for s in ("train", "val", "test")) == sizes
  assert ds["nuclear_charges"].dtype == np.int32 and ds["nuclear_charges"].shape == (9,)
  for split in ("train", "val", "test"):
    part = ds[split]
    m = len(part["energies"])
    assert part["coords"].shape == part["forces"].shape == (m, 9, 3)
    assert part["coords"].dtype == part["forces"].dtype == np.float32
    assert part["energies"].dtype == np.float64
    # Forces still match the potential, so no frame, atom or sign was scrambled on the way.
    energies, forces = _harmonic(part["coords"].astype(np.float64))
    np.testing.assert_allclose(part["forces"], forces, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(part["energies"], energies - 1000.0, rtol=1e-5)
  train, val, test = (set(ds[s]["index"].tolist()) for s in ("train", "val", "test"))
  assert not train & val
  if style != "official_files":  # there the test frames come from a different file
    assert not (train | val) & test
  if style == "ponita":
    np.testing.assert_array_equal(ds["val"]["index"], [0])
    assert set(range(2000)) == train | val | test
  if style == "official_index":
    np.testing.assert_array_equal(ds["val"]["index"], order[:60:20])
    np.testing.assert_array_equal(ds["test"]["index"], order[60:100])
  if style == "official_files":
    np.testing.assert_array_equal(ds["val"]["index"], np.arange(0, 100, 20))


def test_rmd17_finds_files_in_an_rmd17_subfolder_and_stats(tmp_path):
  (tmp_path / "rmd17").mkdir()
  _write_rmd17(tmp_path / "rmd17")
  train = data.load_rmd17(tmp_path, _MOLECULE)["train"]
  stats = data.rmd17_stats(train)
  assert stats["energy_mean"] == pytest.approx(train["energies"].mean())
  assert stats["force_rms"] == pytest.approx(np.sqrt(np.mean(train["forces"].astype(np.float64)**2)))
  assert data.KCAL_TO_MEV == 43.3634


def test_rmd17_rejects_malformed_files(tmp_path):
  _write_rmd17(tmp_path)
  train_path = tmp_path / f"rmd17_{_MOLECULE}_train_01.npz"
  arrays = _rmd17_arrays(100, 1)
  np.savez(train_path, **{k: v for k, v in arrays.items() if k != "forces"})
  with pytest.raises(ValueError, match=r"rmd17_toy_train_01\.npz.*missing key 'forces'"):
    data.load_rmd17(tmp_path, _MOLECULE)
  np.savez(train_path, **dict(arrays, forces=arrays["forces"][:, :, :2]))
  with pytest.raises(ValueError, match=r"rmd17_toy_train_01\.npz.*'forces'.*\(100, 9, 3\)"):
    data.load_rmd17(tmp_path, _MOLECULE)
  np.savez(train_path, **dict(arrays, coords=arrays["coords"][:, :8]))
  with pytest.raises(ValueError, match=r"rmd17_toy_train_01\.npz.*'coords'.*9 nuclear_charges"):
    data.load_rmd17(tmp_path, _MOLECULE)
  np.savez(train_path, **dict(arrays, nuclear_charges=arrays["nuclear_charges"][::-1].copy()))
  with pytest.raises(ValueError, match=r"rmd17_toy_test_01\.npz.*'nuclear_charges'.*rmd17_toy_train_01\.npz"):
    data.load_rmd17(tmp_path, _MOLECULE)
  with pytest.raises(FileNotFoundError, match=r"rmd17_toy_train_02\.npz"):
    data.load_rmd17(tmp_path, _MOLECULE, split_index=2)
  (tmp_path / "splits" / "index_test_01.csv").write_text("3\n999999\n")
  with pytest.raises(ValueError, match=r"index_test_01\.csv.*\[0, 2000\)"):
    data.load_rmd17(tmp_path, _MOLECULE, split_style="official_index")


# ----------------------------------------------------------------------------------------------------------
# QM9 fixture in the qm9pack layout

_QM9_NAMES = [
    "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3", "HOMO_au", "LUMO_au",
    "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K"
]


def _write_qm9(folder, num_molecules=12):
  rng = np.random.RandomState(0)
  counts = rng.randint(1, 8, size=num_molecules)
  counts[0], counts[1] = 5, 29  # methane first; one molecule fills the whole padding budget
  z = rng.choice([1, 6, 7, 8, 9], size=counts.sum()).astype(np.uint8)
  z[:5] = [6, 1, 1, 1, 1]
  targets = rng.randn(num_molecules, 15)
  targets[0, 10] = -40.47893  # methane U0 in Hartree
  arrays = {
      "id": np.arange(1, num_molecules + 1, dtype=np.int32),
      "N": counts.astype(np.int32),
      "Z": z,
      "R": rng.randn(counts.sum(), 3).astype(np.float32),
      "targets": targets,
      "target_names": np.array(_QM9_NAMES),
      "smiles": np.array(["C"] * num_molecules)
  }
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / data.QM9_FILE, **arrays)
  return arrays


def test_qm9_padding_split_and_units(tmp_path):
  raw = _write_qm9(tmp_path / "qm9")
  ds = data.load_qm9(tmp_path, target=("U0", "mu", "homo", "U0_total"), num_train=6, num_val=3)
  perm = np.random.RandomState(42).permutation(12)
  for split, idx in (("train", perm[:6]), ("val", perm[6:9]), ("test", perm[9:])):
    np.testing.assert_array_equal(ds[split]["index"], idx)
  assert ds["target_names"] == ("U0", "mu", "homo", "U0_total")
  assert ds["target_units"] == ("eV", "D", "eV", "eV")
  every = {k: np.concatenate([ds[s][k] for s in ("train", "val", "test")]) for k in ds["train"]}
  order = np.argsort(every["index"])
  charges, positions, num_atoms = every["charges"][order], every["positions"][order], every["num_atoms"][order]
  assert charges.shape == (12, 29) and charges.dtype == np.int32 and positions.shape == (12, 29, 3)
  np.testing.assert_array_equal(num_atoms, raw["N"])
  starts = np.concatenate([[0], np.cumsum(raw["N"])[:-1]])
  for m in range(12):
    n, s = raw["N"][m], starts[m]
    np.testing.assert_array_equal(charges[m, :n], raw["Z"][s:s + n])
    np.testing.assert_array_equal(positions[m, :n], raw["R"][s:s + n])
    assert not charges[m, n:].any() and not positions[m, n:].any()
  targets = every["targets"][order]
  assert targets.dtype == np.float32
  methane_atomisation = (-40.47893 - (-37.846772 - 4 * 0.500273)) * 27.211386246
  assert targets[0, 0] == pytest.approx(methane_atomisation, rel=1e-6)
  assert targets[0, 0] == pytest.approx(-17.1723, abs=1e-3)
  np.testing.assert_allclose(targets[:, 1], raw["targets"][:, 3], rtol=1e-6)
  np.testing.assert_allclose(targets[:, 2], raw["targets"][:, 5] * data.HARTREE_TO_EV, rtol=1e-6)
  np.testing.assert_allclose(targets[:, 3], raw["targets"][:, 10] * data.HARTREE_TO_EV, rtol=1e-6)

  small = data.load_qm9(tmp_path, num_train=6, num_val=3, max_molecules=2)
  assert [len(small[s]["index"]) for s in ("train", "val", "test")] == [2, 2, 2]
  np.testing.assert_array_equal(small["test"]["index"], perm[9:11])


def test_qm9_rejects_malformed_files(tmp_path):
  raw = _write_qm9(tmp_path)
  path = tmp_path / data.QM9_FILE
  np.savez(path, **{k: v for k, v in raw.items() if k != "R"})
  with pytest.raises(ValueError, match=r"qm9_qm9pack_130831\.npz.*missing key 'R'"):
    data.load_qm9(tmp_path, num_train=6, num_val=3)
  np.savez(path, **dict(raw, Z=raw["Z"][:-1]))
  with pytest.raises(ValueError, match=r"qm9_qm9pack_130831\.npz.*'Z'.*sum N"):
    data.load_qm9(tmp_path, num_train=6, num_val=3)
  np.savez(path, **dict(raw, targets=raw["targets"][:, :14]))
  with pytest.raises(ValueError, match=r"qm9_qm9pack_130831\.npz.*'targets'"):
    data.load_qm9(tmp_path, num_train=6, num_val=3)
  np.savez(path, **raw)
  with pytest.raises(ValueError, match=r"qm9_qm9pack_130831\.npz.*'N'.*more than"):
    data.load_qm9(tmp_path)
  with pytest.raises(ValueError, match="unknown QM9 target"):
    data.load_qm9(tmp_path, target="U0_atom", num_train=6, num_val=3)
  path.unlink()
  with pytest.raises(FileNotFoundError, match=r"qm9_qm9pack_130831\.npz"):
    data.load_qm9(tmp_path)


def test_default_data_dir_follows_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="JAXLAB_DATA"):
    data.default_data_dir()


# ----------------------------------------------------------------------------------------------------------
# The real data sets beside the project


def _real_data_dir():
  try:
    return data.default_data_dir()
  except FileNotFoundError:
    pytest.skip("no shared data directory")


@pytest.mark.data
def test_real_rmd17_aspirin_split_01():
  root = _real_data_dir()
  if not (root / "rmd17" / "rmd17_aspirin_train_01.npz").is_file():
    pytest.skip("rMD17 aspirin split 01 absent")
  ds = data.load_rmd17(root, "aspirin", split_style="official_files", split_index=1)
  assert [len(ds[s]["energies"]) for s in ("train", "val", "test")] == [950, 50, 1000]
  np.testing.assert_array_equal(np.bincount(ds["nuclear_charges"])[[1, 6, 8]], [8, 9, 4])
  stats = data.rmd17_stats(ds["train"])
  assert -407000 < stats["energy_mean"] < -406000 and 10 < stats["force_rms"] < 60


@pytest.mark.data
def test_real_qm9():
  root = _real_data_dir()
  if not (root / "qm9" / data.QM9_FILE).is_file():
    pytest.skip("QM9 file absent")
  ds = data.load_qm9(root, target=data.PONITA_QM9_TARGETS)
  assert [len(ds[s]["index"]) for s in ("train", "val", "test")] == [110000, 10000, 10831]
  every = np.concatenate([ds[s]["index"] for s in ("train", "val", "test")])
  assert np.array_equal(np.sort(every), np.arange(130831))
  targets = ds["train"]["targets"]
  assert np.isfinite(targets).all()
  u0 = targets[:, data.PONITA_QM9_TARGETS.index("U0")]
  assert -80 < u0.mean() < -72 and u0.max() < 0  # atomisation energies in eV
  assert ds["train"]["num_atoms"].max() == 29
