"""Cell-free setups, distributed-MR SE and power baselines against plain numpy written here, plus the
properties the GNN relies on: padding is inert, UE order does not matter, powers are feasible."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.graph import check_graph
from jaxlab.icgnn import cellfree as cf

# Small enough for numpy loops; tau_p = 5 puts four UEs on each pilot so that contamination matters.
SMALL = cf.CellFreeSetup(num_aps=16, num_ues=20, tau_p=5)
RHO_MAX = SMALL.rho_max_mw


@pytest.fixture(scope="module")
def small():
  return jax.tree.map(np.asarray, cf.generate(jax.random.key(7), SMALL, 4))


def _np(data):
  return {k: np.asarray(v) for k, v in data.items()}


# ----------------------------------------------------------------------------------------------------------
# numpy references (loops, float64)

def np_pilots(beta, tau_p):
  num_aps, num_ues = beta.shape
  master = np.argmax(beta, axis=0)
  pilot = np.zeros(num_ues, int)
  for k in range(num_ues):
    if k < tau_p:
      pilot[k] = k
    else:
      load = [sum(beta[master[k], i] for i in range(k) if pilot[i] == t) for t in range(tau_p)]
      pilot[k] = int(np.argmin(load))
  return pilot, master


def np_dcc(beta, pilot, master, tau_p):
  num_aps, num_ues = beta.shape
  serve = np.zeros((num_aps, num_ues), bool)
  for k in range(num_ues):
    serve[master[k], k] = True
  for l in range(num_aps):
    for t in range(tau_p):
      users = [k for k in range(num_ues) if pilot[k] == t]
      if users:
        serve[l, users[int(np.argmax([beta[l, k] for k in users]))]] = True
  return serve


def np_gamma(beta, pilot, p, tau_p):
  gamma = np.zeros_like(beta, dtype=np.float64)
  for l, k in itertools.product(*map(range, beta.shape)):
    load = sum(beta[l, i] for i in range(beta.shape[1]) if pilot[i] == pilot[k])
    gamma[l, k] = p * tau_p * beta[l, k]**2 / (p * tau_p * load + 1)
  return gamma


def np_sinr_general(rho, beta, serve, pilot, n_l, p, tau_p):
  """The book's distributed-MR closed form with explicit correlation and estimate matrices (R = beta I)."""
  num_aps, num_ues = beta.shape
  rho = np.where(serve, rho, 0.0)
  R = [[beta[l, k] * np.eye(n_l[l]) for k in range(num_ues)] for l in range(num_aps)]
  B = [[None] * num_ues for _ in range(num_aps)]
  for l, k in itertools.product(range(num_aps), range(num_ues)):
    psi = np.eye(n_l[l]) + sum(tau_p * p * R[l][i] for i in range(num_ues) if pilot[i] == pilot[k])
    B[l][k] = p * tau_p * R[l][k] @ np.linalg.inv(psi) @ R[l][k]
  sinr = np.zeros(num_ues)
  for k in range(num_ues):
    signal = sum(np.sqrt(rho[l, k] * np.trace(B[l][k])) for l in range(num_aps))
    interf = sum(rho[l, i] * np.trace(B[l][i] @ R[l][k]) / np.trace(B[l][i])
                 for l in range(num_aps) for i in range(num_ues) if serve[l, i])
    contamination = 0.0
    for i in range(num_ues):
      if pilot[i] == pilot[k]:
        cont = sum(np.sqrt(rho[l, i]) * np.trace(B[l][i] @ np.linalg.inv(R[l][i]) @ R[l][k])
                   / np.sqrt(np.trace(B[l][i]))
                   for l in range(num_aps) if serve[l, i])
        contamination += cont**2
    sinr[k] = signal**2 / (interf + contamination - signal**2 + 1)
  return sinr


def np_max_min(beta, gamma, serve, pilot, n, rho_max, tol, cap):
  num_aps, num_ues = beta.shape
  b = np.array([sum(np.sqrt(n * gamma[l, k]) for l in range(num_aps) if serve[l, k])**2 for k in range(num_ues)])
  c = np.zeros((num_ues, num_ues))
  for k, i in itertools.product(range(num_ues), range(num_ues)):
    c[k, i] = sum(beta[l, k] for l in range(num_aps) if serve[l, i])
    if i != k and pilot[i] == pilot[k]:
      c[k, i] += sum(np.sqrt(n * gamma[l, i]) * beta[l, k] / beta[l, i] for l in range(num_aps) if serve[l, i])**2
  load = serve.astype(float)
  eta = np.ones(num_ues)
  eta = eta * rho_max / np.max(load @ eta)
  for _ in range(cap):
    sinr = b * eta / (c @ eta + 1)
    if sinr.max() - sinr.min() < tol:
      break
    eta = (c @ eta + 1) / b
    eta = eta * rho_max / np.max(load @ eta)
  return load * eta[None, :], b, c


def _per_ap_power(rho, serve):
  return np.sum(np.where(serve, np.asarray(rho, np.float64), 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Setup and generator

@pytest.mark.parametrize("field, value, message", [
    ("rho_max_mw", -1.0, "rho_max_mw must be > 0"),
    ("ul_power_mw", 0.0, "ul_power_mw must be > 0"),
    ("num_ues", 0, "num_ues must be an int >= 1"),
    ("num_aps", 2.5, "num_aps must be an int >= 1"),
    ("tau_p", 300, "tau_p (300) must not exceed tau_c"),
    ("shadowing_std_db", -4.0, "shadowing_std_db must be >= 0"),
    ("bandwidth_hz", float("nan"), "bandwidth_hz must be finite"),
    ("wrap_around", 1, "wrap_around must be a bool"),
])
def test_setup_rejects_bad_fields_by_name(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    cf.CellFreeSetup(**{field: value})


def test_bad_calls_raise_clear_errors(small):
  with pytest.raises(ValueError, match="num_ues must lie in"):
    cf.generate(jax.random.key(0), SMALL, 2, num_ues=[5, 21])
  with pytest.raises(ValueError, match="rho_max must be > 0"):
    cf.equal_power(small, rho_max=-3.0)
  with pytest.raises(ValueError, match="lacks"):
    cf.mr_sinr(np.zeros((4, 16, 20)), {"beta_SxLxK": small["beta_SxLxK"]}, 4)
  with pytest.raises(ValueError, match="num_antennas"):
    cf.mr_sinr(np.zeros((4, 16, 20)), small, np.ones(7))
  with pytest.raises(ValueError, match="rho_SxLxK has shape"):
    cf.mr_sinr(np.zeros((4, 16, 19)), small, 4)


def test_generator_is_seeded_and_follows_the_path_loss_model(small):
  again = cf.generate(jax.random.key(7), SMALL, 4)
  for name, value in small.items():
    np.testing.assert_array_equal(np.asarray(again[name]), value, err_msg=name)
  other = cf.generate(jax.random.key(8), SMALL, 4)
  assert not np.allclose(np.asarray(other["beta_SxLxK"]), small["beta_SxLxK"])

  ap, ue = small["ap_pos_SxLx2"].astype(np.float64), small["ue_pos_SxKx2"].astype(np.float64)
  assert ap.shape == (4, 16, 2) and ue.shape == (4, 20, 2)
  assert 0 <= ap.min() and ap.max() <= 1000 and 0 <= ue.min() and ue.max() <= 1000
  # Wrap-around distance: the nearest of the 9 shifted copies of each AP.
  shifts = np.array(list(itertools.product([-1000, 0, 1000], repeat=2)), np.float64)
  copies = ap[:, :, None, :] + shifts[None, None, :, :]
  horizontal = np.min(np.linalg.norm(copies[:, :, None] - ue[:, None, :, None], axis=-1), axis=-1)
  distance = np.sqrt(horizontal**2 + 10.0**2)
  noise_dbm = -174 + 10 * np.log10(20e6) + 7
  beta_db = -30.5 - 36.7 * np.log10(distance) + small["shadowing_db_SxLxK"] - noise_dbm
  np.testing.assert_allclose(small["beta_SxLxK"], 10**(beta_db / 10), rtol=2e-4)
  assert np.all(small["ap_mask_SxL"]) and np.all(small["ue_mask_SxK"])


def test_shadowing_covariance_matches_the_model():
  # Five UEs at fixed separations; 20000 APs are 20000 independent draws of the UE vector. The standard
  # error of each covariance entry is about 16 * sqrt(2 / 20000) = 0.16 dB^2; the tolerance is 0.6 dB^2.
  ue = jnp.array([[0.0, 0.0], [3.0, 0.0], [9.0, 0.0], [0.0, 30.0], [995.0, 0.0]])
  shadow = np.asarray(cf.sample_shadowing_db(jax.random.key(3), ue, 20000, SMALL), np.float64)
  empirical = np.cov(shadow, rowvar=False)
  delta = np.array([[np.hypot(*np.minimum(np.abs(a - b), 1000 - np.abs(a - b))) for b in np.asarray(ue)]
                    for a in np.asarray(ue)])
  expected = 16.0 * 2.0**(-delta / 9.0)
  assert abs(expected[0, 2] - 8.0) < 1e-9 and expected[0, 4] > 8.0  # 9 m halves it; 995 m wraps to 5 m
  np.testing.assert_allclose(empirical, expected, atol=0.6)
  np.testing.assert_allclose(shadow.mean(axis=0), 0.0, atol=0.15)


def test_pilots_dcc_and_gamma_match_numpy(small):
  for s in range(4):
    beta = small["beta_SxLxK"][s].astype(np.float64)
    pilot, master = np_pilots(beta, SMALL.tau_p)
    np.testing.assert_array_equal(small["pilot_SxK"][s], pilot)
    np.testing.assert_array_equal(small["master_SxK"][s], master)
    serve = np_dcc(beta, pilot, master, SMALL.tau_p)
    np.testing.assert_array_equal(small["serve_SxLxK"][s], serve)
    gamma = np_gamma(beta, pilot, SMALL.ul_power_mw, SMALL.tau_p)
    np.testing.assert_allclose(small["gamma_SxLxK"][s], gamma, rtol=1e-5)
  # The DCC rule serves one UE per pilot and AP, plus master links.
  assert small["serve_SxLxK"].sum(axis=-1).min() >= SMALL.tau_p


def test_mr_sinr_matches_the_general_closed_form(small):
  rng = np.random.default_rng(0)
  rho = rng.uniform(0, 40, small["beta_SxLxK"].shape) * small["serve_SxLxK"]
  n_sxl = rng.integers(1, 7, size=(4, 16))  # antennas differ per AP
  got = np.asarray(cf.mr_sinr(rho, small, n_sxl))
  for s in range(2):
    want = np_sinr_general(rho[s], small["beta_SxLxK"][s].astype(np.float64), small["serve_SxLxK"][s],
                           small["pilot_SxK"][s], n_sxl[s], SMALL.ul_power_mw, SMALL.tau_p)
    np.testing.assert_allclose(got[s], want, rtol=2e-4)
  # Power on links outside the DCC is ignored.
  off_links = rho + 50.0 * ~small["serve_SxLxK"]
  np.testing.assert_allclose(np.asarray(cf.mr_sinr(off_links, small, n_sxl)), got, rtol=1e-6)
  se = np.asarray(cf.mr_se(rho, small, n_sxl, tau_p=5, tau_c=200))
  np.testing.assert_allclose(se, 0.975 * np.log2(1 + got), rtol=1e-6)


def test_mr_sinr_matches_monte_carlo_use_and_then_forget_bound():
  # Simulate MMSE channel estimates and MR precoding on a tiny setup and evaluate the use-and-then-forget
  # bound from sample means; 20000 draws leave 1-2 % sampling error, the tolerance is 5 %.
  setup = cf.CellFreeSetup(num_aps=5, num_ues=6, num_antennas=3, tau_p=3, area_side_m=400.0)
  data = _np(cf.generate(jax.random.key(11), setup, 1))
  beta, serve, pilot = data["beta_SxLxK"][0].astype(np.float64), data["serve_SxLxK"][0], data["pilot_SxK"][0]
  gamma = data["gamma_SxLxK"][0].astype(np.float64)
  n, p, tau_p, draws = 3, setup.ul_power_mw, 3, 20000
  rng = np.random.default_rng(1)
  rho = rng.uniform(1, 5, beta.shape) * serve

  def cn(*shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
  h = np.sqrt(beta)[None, :, :, None] * cn(draws, 5, 6, n)
  onehot = np.eye(tau_p)[pilot]
  y = np.sqrt(tau_p * p) * np.einsum("rlkn,kt->rltn", h, onehot) + cn(draws, 5, tau_p, n)
  psi = p * tau_p * (beta @ onehot) + 1
  hhat = (np.sqrt(p * tau_p) * beta / psi[:, pilot])[None, :, :, None] * y[:, :, pilot]
  np.testing.assert_allclose(np.mean(np.abs(hhat)**2, axis=(0, 3)), gamma, rtol=0.05)
  w = np.where(serve, np.sqrt(rho / (n * np.where(serve, gamma, 1))), 0)[None, :, :, None] * hhat
  g = np.einsum("rlkn,rlin->rki", h.conj(), w)  # g[k, i] = sum_l h_lk^H w_li
  signal = np.abs(np.mean(np.diagonal(g, axis1=1, axis2=2), axis=0))**2
  sinr_mc = signal / (np.sum(np.mean(np.abs(g)**2, axis=0), axis=1) - signal + 1)
  sinr = np.asarray(cf.mr_sinr(rho[None], data, n))[0]
  np.testing.assert_allclose(sinr, sinr_mc, rtol=0.05)


def test_sum_and_percentile_se(small):
  rng = np.random.default_rng(2)
  se = rng.uniform(0, 3, (4, 20))
  mask = small["ue_mask_SxK"].copy()
  mask[1, 15:] = False
  np.testing.assert_allclose(cf.sum_se(se, mask), np.sum(se * mask, axis=1), rtol=1e-6)
  for q in (5.0, 50.0, 95.0):
    np.testing.assert_allclose(cf.percentile_se(se, mask, q), np.percentile(se[mask], q), rtol=1e-5)


def test_se_is_differentiable_in_rho_including_switched_off_links(small):
  rho = cf.equal_power(small, rho_max=RHO_MAX, tau_p=5)
  rho = rho.at[:, 0, :].set(0.0)  # AP 0 silent: its links sit at rho = 0

  def loss(r):
    return -jnp.sum(cf.sum_se(cf.mr_se(r, small, 4, tau_p=5, tau_c=200), small["ue_mask_SxK"]))
  grad = np.asarray(jax.jit(jax.grad(loss))(rho))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~small["serve_SxLxK"]] == 0) and np.any(grad[small["serve_SxLxK"]] != 0)


# ----------------------------------------------------------------------------------------------------------
# Power baselines

def test_equal_and_fractional_power_match_numpy_and_fill_each_ap(small):
  serve, beta = small["serve_SxLxK"], small["beta_SxLxK"].astype(np.float64)
  served = serve.sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(cf.equal_power(small, rho_max=RHO_MAX, tau_p=5),
                             serve * RHO_MAX / np.maximum(served, 5), rtol=1e-6)
  np.testing.assert_allclose(cf.equal_power(small, rho_max=RHO_MAX), serve * RHO_MAX / served, rtol=1e-6)
  for upsilon in (0.5, -0.5):
    want = np.zeros_like(beta)
    for s, l in itertools.product(range(4), range(16)):
      users = np.flatnonzero(serve[s, l])
      want[s, l, users] = RHO_MAX * beta[s, l, users]**upsilon / np.sum(beta[s, l, users]**upsilon)
    got = cf.fractional_power(small, rho_max=RHO_MAX, upsilon=upsilon)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(_per_ap_power(got, serve), RHO_MAX, rtol=1e-6)
  # Equal power with tau_p never exceeds rho_max, also where an AP serves more than tau_p UEs.
  crowded = dict(small, serve_SxLxK=small["serve_SxLxK"].copy())
  crowded["serve_SxLxK"][0, 0, :] = True
  assert _per_ap_power(cf.equal_power(crowded, rho_max=RHO_MAX, tau_p=5), crowded["serve_SxLxK"]).max() \
      <= RHO_MAX * (1 + 1e-6)


def test_max_min_matches_numpy_fixed_point(small):
  rho, info = cf.max_min_power(small, 4, rho_max=RHO_MAX, tol=1e-4)
  rho = np.asarray(rho)
  for s in range(4):
    want, b, c = np_max_min(small["beta_SxLxK"][s].astype(np.float64), small["gamma_SxLxK"][s].astype(np.float64),
                            small["serve_SxLxK"][s], small["pilot_SxK"][s], 4, RHO_MAX, 1e-4, 2000)
    np.testing.assert_allclose(rho[s], want, rtol=2e-3, atol=1e-6)
    got_b, got_c = cf.max_min_coefficients(jax.tree.map(lambda x: x[s:s + 1], small), 4)
    np.testing.assert_allclose(got_b[0], b, rtol=1e-5)
    np.testing.assert_allclose(got_c[0], c, rtol=1e-5)
  sinr = np.asarray(cf.mr_sinr(rho, small, 4))
  assert np.all(sinr.max(axis=1) - sinr.min(axis=1) < 1e-4 * 1.01)
  assert np.all(np.asarray(info["iterations"]) < 2000)
  power = _per_ap_power(rho, small["serve_SxLxK"])
  assert power.max() <= RHO_MAX * (1 + 1e-5)
  np.testing.assert_allclose(power.max(axis=1), RHO_MAX, rtol=1e-5)  # the most loaded AP is at full power


@pytest.fixture(scope="module")
def compared():
  data = _np(cf.generate(jax.random.key(21), SMALL, 8))
  powers = cf.baseline_powers(data, SMALL)
  _, info = cf.wmmse_power(data, 4, rho_max=RHO_MAX, tau_p=5, tau_c=200, chunk_size=8)
  se = {name: np.asarray(cf.mr_se(rho, data, 4, tau_p=5, tau_c=200)) for name, rho in powers.items()}
  return data, powers, se, info


def test_every_baseline_respects_the_per_ap_power(compared):
  data, powers, _, _ = compared
  for name, rho in powers.items():
    rho = np.asarray(rho)
    assert np.all(rho >= 0) and np.all(rho[~data["serve_SxLxK"]] == 0), name
    assert _per_ap_power(rho, data["serve_SxLxK"]).max() <= RHO_MAX * (1 + 1e-5), name


def test_wmmse_sum_se_never_decreases(compared):
  data, powers, se, info = compared
  history = np.asarray(info["history"], np.float64)
  # Monotone up to float32 rounding of the sum SE (1e-5 relative).
  assert np.all(np.diff(history, axis=1) >= -1e-5 * history[:, 1:])
  start = cf.sum_se(cf.mr_se(powers["equal"], data, 4, tau_p=5, tau_c=200), data["ue_mask_SxK"])
  np.testing.assert_allclose(history[:, 0], start, rtol=1e-5)
  np.testing.assert_allclose(history[:, -1], cf.sum_se(se["wmmse"], data["ue_mask_SxK"]), rtol=1e-5)
  assert np.all(history[:, -1] > history[:, 0])


def test_baselines_rank_as_expected(compared):
  data, _, se, _ = compared
  mask = data["ue_mask_SxK"]
  total = {name: float(np.mean(cf.sum_se(v, mask))) for name, v in se.items()}
  assert total["wmmse"] > 1.05 * max(total["equal"], total["fractional"]), total
  # Max-min fairness lifts each setup's weakest UEs: per-setup 5th percentile, averaged over the setups.
  fifth = {name: np.mean([float(cf.percentile_se(v[s:s + 1], mask[s:s + 1])) for s in range(len(v))])
           for name, v in se.items()}
  assert fifth["max_min"] > 1.5 * fifth["equal"], fifth
  assert np.all(se["max_min"].min(axis=1) >= se["equal"].min(axis=1))


# ----------------------------------------------------------------------------------------------------------
# Padding and permutations

def _all_powers(data):
  return {
      "equal": cf.equal_power(data, rho_max=RHO_MAX, tau_p=5),
      "fractional": cf.fractional_power(data, rho_max=RHO_MAX),
      "max_min": cf.max_min_power(data, 4, rho_max=RHO_MAX)[0],
      "wmmse": cf.wmmse_power(data, 4, rho_max=RHO_MAX, tau_p=5, tau_c=200)[0],
  }


def test_padding_changes_nothing(compared):
  data, powers, se, _ = compared
  padded = cf.pad_setups(data, 24, 27)
  assert padded["beta_SxLxK"].shape == (8, 24, 27) and not np.any(np.asarray(padded["serve_SxLxK"])[:, 16:])
  # Deriving pilots and clusters on the padded gains gives the padded originals.
  derived = cf.pilots_and_clusters(padded["beta_SxLxK"], padded["ap_mask_SxL"], padded["ue_mask_SxK"], SMALL)
  for name, value in derived.items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(padded[name]), rtol=1e-6, err_msg=name)
  inside = _all_powers(padded)
  for name, rho in inside.items():
    np.testing.assert_allclose(np.asarray(rho)[:, :16, :20], powers[name], rtol=2e-4, atol=1e-5, err_msg=name)
    se_inside = np.asarray(cf.mr_se(rho, padded, 4, tau_p=5, tau_c=200))
    np.testing.assert_allclose(se_inside[:, :20], se[name], rtol=2e-4, err_msg=name)
    assert np.all(se_inside[:, 20:] == 0) and np.all(np.asarray(rho)[:, 16:] == 0)


def test_concat_setups_pads_to_the_largest(small):
  fewer = {name: (value[:, :12] if name.endswith(("SxK", "SxKx2")) else value[:, :, :12] if name.endswith("SxLxK")
                  else value) for name, value in small.items()}
  joined = cf.concat_setups([small, fewer])
  assert joined["beta_SxLxK"].shape == (8, 16, 20)
  for name, value in cf.pad_setups(fewer, 16, 20).items():
    np.testing.assert_array_equal(np.asarray(joined[name])[4:], np.asarray(value), err_msg=name)
  assert np.all(np.asarray(joined["pilot_SxK"])[4:, 12:] == -1) and not np.any(joined["ue_mask_SxK"][4:, 12:])


def test_generate_with_fewer_real_aps_and_ues_pads_inertly():
  data = _np(cf.generate(jax.random.key(5), SMALL, 4, num_aps=[16, 9, 12, 16], num_ues=[20, 11, 6, 1]))
  assert data["ap_mask_SxL"].sum(axis=1).tolist() == [16, 9, 12, 16]
  assert data["ue_mask_SxK"].sum(axis=1).tolist() == [20, 11, 6, 1]
  link = data["ap_mask_SxL"][:, :, None] & data["ue_mask_SxK"][:, None, :]
  assert np.all(data["beta_SxLxK"][~link] == 0) and np.all(data["beta_SxLxK"][link] > 0)
  assert not np.any(data["serve_SxLxK"][~link]) and np.all(data["pilot_SxK"][~data["ue_mask_SxK"]] == -1)
  # Setup 2 has 6 UEs and 5 pilots: the sixth UE reuses a pilot chosen at its master AP.
  s = 2
  beta = data["beta_SxLxK"][s, :12, :6].astype(np.float64)
  pilot, master = np_pilots(beta, 5)
  np.testing.assert_array_equal(data["pilot_SxK"][s, :6], pilot)
  np.testing.assert_array_equal(data["serve_SxLxK"][s, :12, :6], np_dcc(beta, pilot, master, 5))
  se = np.asarray(cf.mr_se(cf.max_min_power(data, 4, rho_max=RHO_MAX)[0], data, 4, tau_p=5, tau_c=200))
  assert np.all(se[~data["ue_mask_SxK"]] == 0) and np.all(se[data["ue_mask_SxK"]] > 0)


def _permute_ues(data, order):
  out = {}
  for name, value in data.items():
    axis = {"SxK": 1, "SxKx2": 1, "SxLxK": 2}.get(name.split("_")[-1])
    out[name] = value if axis is None else np.take(value, order, axis=axis)
  return out


def test_permuting_ues_permutes_the_outputs(compared):
  data, powers, _, _ = compared
  order = np.random.default_rng(3).permutation(20)
  permuted = _permute_ues(data, order)
  rho = np.random.default_rng(4).uniform(0, 30, data["beta_SxLxK"].shape)
  np.testing.assert_allclose(cf.mr_sinr(rho[:, :, order], permuted, 4), np.asarray(cf.mr_sinr(rho, data, 4))[:, order],
                             rtol=1e-5)
  for name, rho in _all_powers(permuted).items():
    np.testing.assert_allclose(rho, np.asarray(powers[name])[:, :, order], rtol=2e-3, atol=1e-4, err_msg=name)


def test_permuting_aps_permutes_the_clusters(small):
  order = np.random.default_rng(5).permutation(16)
  beta = small["beta_SxLxK"][:, order]
  derived = cf.pilots_and_clusters(beta, small["ap_mask_SxL"], small["ue_mask_SxK"], SMALL)
  np.testing.assert_array_equal(derived["pilot_SxK"], small["pilot_SxK"])
  np.testing.assert_array_equal(derived["serve_SxLxK"], small["serve_SxLxK"][:, order])
  np.testing.assert_array_equal(order[np.asarray(derived["master_SxK"])], small["master_SxK"])


# ----------------------------------------------------------------------------------------------------------
# Link graphs

def test_link_graph_nodes_edges_and_features(small):
  n_sxl = np.tile(np.arange(16) % 3 + 2, (4, 1))
  graphs = cf.link_graphs(small, num_antennas=n_sxl)
  assert len(graphs) == 4
  s = 1
  graph = cf.link_graph(small, s, num_antennas=n_sxl)
  for a, b in zip(jax.tree.leaves(graph), jax.tree.leaves(graphs[s])):
    np.testing.assert_array_equal(a, b)
  check_graph(graph)
  serve, beta, gamma = small["serve_SxLxK"][s], small["beta_SxLxK"][s], small["gamma_SxLxK"][s]
  links = [(l, k) for l in range(16) for k in range(20) if serve[l, k]]
  assert int(graph.n_node[0]) == len(links)
  assert list(zip(graph.nodes["ap"].tolist(), graph.nodes["ue"].tolist())) == links
  x = graph.nodes["x"]
  assert x.dtype == np.float32 and x.shape == (len(links), len(cf.NODE_FEATURES))
  for row, (l, k) in enumerate(links):
    want = [(10 * np.log10(beta[l, k]) - cf.BETA_DB_CENTER) / cf.BETA_DB_SCALE, n_sxl[s, l] / cf.ANTENNA_SCALE,
            serve[l].sum() / cf.CLUSTER_SCALE, serve[:, k].sum() / cf.CLUSTER_SCALE, gamma[l, k] / beta[l, k]]
    np.testing.assert_allclose(x[row], want, rtol=1e-5, atol=1e-6)
  assert np.all((x[:, 4] > 0) & (x[:, 4] < 1))
  want_edges = {}
  for a, b in itertools.permutations(range(len(links)), 2):
    if links[a][0] == links[b][0]:
      want_edges[(a, b)] = (1.0, 0.0)
    elif links[a][1] == links[b][1]:
      want_edges[(a, b)] = (0.0, 1.0)
  got_edges = {(int(a), int(b)): tuple(e) for a, b, e in zip(graph.senders, graph.receivers, graph.edges["x"])}
  assert len(got_edges) == int(graph.n_edge[0]) == len(graph.senders)
  assert got_edges == want_edges
  np.testing.assert_allclose(graph.globals["x"],
                             [[0.16, 0.20, n_sxl[s].mean() / 4, serve.sum(axis=0).mean() / 10]], rtol=1e-6)


def test_links_to_dense_inverts_the_node_order(small):
  graph = cf.link_graph(small, 0, num_antennas=4)
  rho_l = np.asarray(cf.fractional_power(small, rho_max=RHO_MAX))[0]
  values = rho_l[graph.nodes["ap"], graph.nodes["ue"]]
  dense = jax.jit(cf.links_to_dense, static_argnames=("num_aps", "num_ues"))(
      values, graph.nodes["ap"], graph.nodes["ue"], num_aps=16, num_ues=20)
  np.testing.assert_array_equal(np.asarray(dense)[0], rho_l)
  masked = cf.links_to_dense(values, graph.nodes["ap"], graph.nodes["ue"], num_aps=16, num_ues=20,
                             mask_n=np.arange(len(values)) % 2 == 0)
  assert np.count_nonzero(np.asarray(masked)) == (len(values) + 1) // 2
