"""User-centric cell-free massive MIMO with distributed MR precoding: setups, closed-form SE, power baselines.

The system model is that of Demir, Björnson and Sanguinetti, "Foundations of User-Centric Cell-Free Massive
MIMO" (Foundations and Trends in Signal Processing 14(3-4), 2021), reimplemented from its equations for
i.i.d. Rayleigh fading (``R_lk = beta_lk I_N``). Conventions used throughout:

- ``beta_SxLxK`` is the large-scale gain between AP l and UE k divided by the noise power (linear), so
  ``p * beta`` with p in mW is an SNR. Powers (``ul_power_mw``, ``rho_max_mw``, ``rho``) are in mW.
- Setups of different sizes share arrays through padding: ``ap_mask_SxL`` and ``ue_mask_SxK`` mark the real
  APs and UEs; padded entries have zero gain, ``serve = False``, pilot and master index -1, and take part in
  nothing (no SE, no interference, no power).
- ``serve_SxLxK`` is the DCC matrix ``D`` (AP l serves UE k). Powers ``rho_SxLxK`` only count on serving
  links; off-link entries are ignored.
- The numeric parts (setup sampling, pilot assignment, DCC, SE, power baselines) are jit-compiled and
  batched over setups; the link graphs for the GNN are built on the host in numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.graph import GraphsTuple, check_graph

# Diagonal loading of the shadowing correlation matrix before its float32 Cholesky factor: UEs a few
# millimetres apart make the matrix numerically singular. It raises each UE's shadowing variance by 0.01 %.
_SHADOW_JITTER = 1e-4

# Fixed feature scales of the link graph, chosen from the book's setting so that features are O(1) and
# comparable across data sets (a per-data-set normalisation would change what the network sees).
BETA_DB_CENTER = -10.0     # typical gain-over-noise of a serving link, dB
BETA_DB_SCALE = 20.0
ANTENNA_SCALE = 4.0        # antennas per AP in the book's setting
CLUSTER_SCALE = 10.0       # tau_p of the book's setting, the typical |D_l|
NETWORK_SCALE = 100.0      # APs in the book's setting

NODE_FEATURES = ("beta_db", "antennas", "ues_of_ap", "aps_of_ue", "estimation_quality")
GLOBAL_FEATURES = ("num_aps", "num_ues", "mean_antennas", "mean_aps_per_ue")
EDGE_TYPES = ("same_ap", "same_ue")


@dataclasses.dataclass(frozen=True)
class CellFreeSetup:
  """System parameters; the defaults are the book's Figure 7.2 setting (section7_figure2a_2b.m).

  Path loss in dB is ``pathloss_at_1m_db - pathloss_slope_db * log10(d / 1 m)`` with d the 3-D distance
  (``height_difference_m`` above the UE); shadowing is Gaussian in dB with covariance
  ``shadowing_std_db**2 * 2**(-delta / shadowing_decorrelation_m)`` between UEs delta metres apart,
  independent across APs. The noise power is ``-174 + 10 log10(bandwidth_hz) + noise_figure_db`` dBm.
  """

  num_aps: int = 100
  num_antennas: int = 4
  num_ues: int = 40
  area_side_m: float = 1000.0
  wrap_around: bool = True
  tau_p: int = 10
  tau_c: int = 200
  ul_power_mw: float = 100.0
  rho_max_mw: float = 200.0
  bandwidth_hz: float = 20e6
  noise_figure_db: float = 7.0
  pathloss_at_1m_db: float = -30.5
  pathloss_slope_db: float = 36.7
  shadowing_std_db: float = 4.0
  shadowing_decorrelation_m: float = 9.0
  height_difference_m: float = 10.0

  def __post_init__(self):
    for name in ("num_aps", "num_antennas", "num_ues", "tau_p", "tau_c"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"CellFreeSetup.{name} must be an int >= 1, got {value!r}")
      object.__setattr__(self, name, int(value))
    if self.tau_p > self.tau_c:
      raise ValueError(f"CellFreeSetup.tau_p ({self.tau_p}) must not exceed tau_c ({self.tau_c}): "
                       "pilots are part of the coherence block")
    if self.tau_p == self.tau_c:
      raise ValueError(f"CellFreeSetup.tau_p equals tau_c ({self.tau_c}): no samples are left for data")
    positive = ("area_side_m", "ul_power_mw", "rho_max_mw", "bandwidth_hz", "shadowing_decorrelation_m",
                "pathloss_slope_db")
    for name in positive + ("noise_figure_db", "pathloss_at_1m_db", "shadowing_std_db", "height_difference_m"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"CellFreeSetup.{name} must be a number, got {value!r}")
      if not math.isfinite(value):
        raise ValueError(f"CellFreeSetup.{name} must be finite, got {value!r}")
      object.__setattr__(self, name, float(value))
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"CellFreeSetup.{name} must be > 0, got {getattr(self, name)!r}")
    for name in ("shadowing_std_db", "height_difference_m"):
      if getattr(self, name) < 0:
        raise ValueError(f"CellFreeSetup.{name} must be >= 0, got {getattr(self, name)!r}")
    if not isinstance(self.wrap_around, bool):
      raise ValueError(f"CellFreeSetup.wrap_around must be a bool, got {self.wrap_around!r}")

  @property
  def noise_power_dbm(self) -> float:
    return -174.0 + 10.0 * math.log10(self.bandwidth_hz) + self.noise_figure_db

  @property
  def prelog(self) -> float:
    """Fraction of the coherence block used for downlink data, ``1 - tau_p / tau_c``."""
    return 1.0 - self.tau_p / self.tau_c


# ----------------------------------------------------------------------------------------------------------
# Setup generation (one setup per function; ``generate`` vmaps them)

def _distances(a_Ax2, b_Bx2, side: float, wrap: bool) -> jax.Array:
  """Horizontal distances [A, B]; with wrap-around the shortest over the 9 shifted copies of the square."""
  delta = jnp.abs(a_Ax2[:, None, :] - b_Bx2[None, :, :])
  if wrap:
    delta = jnp.minimum(delta, side - delta)
  return jnp.sqrt(jnp.sum(delta * delta, axis=-1))


def sample_shadowing_db(key, ue_pos_Kx2, num_aps: int, setup: CellFreeSetup) -> jax.Array:
  """Shadow fading in dB [num_aps, K], correlated across UEs and independent across APs.

  Each AP's vector over UEs is drawn jointly as ``std * chol(C) z`` with ``C_ki = 2**(-delta_ki / d0)``.
  This is equal in distribution to the book's sampler, which draws UE after UE from the conditional
  Gaussian given the earlier UEs, but not equal sample for sample. UE distances use wrap-around when the
  setup does.
  """
  delta_KxK = _distances(ue_pos_Kx2, ue_pos_Kx2, setup.area_side_m, setup.wrap_around)
  corr_KxK = jnp.exp2(-delta_KxK / setup.shadowing_decorrelation_m)
  num_ues = ue_pos_Kx2.shape[0]
  chol_KxK = jnp.linalg.cholesky(corr_KxK + _SHADOW_JITTER * jnp.eye(num_ues, dtype=corr_KxK.dtype))
  z_LxK = jax.random.normal(key, (num_aps, num_ues), corr_KxK.dtype)
  return setup.shadowing_std_db * z_LxK @ chol_KxK.T


def assign_pilots(beta_LxK, ap_mask_L, ue_mask_K, tau_p: int) -> tuple[jax.Array, jax.Array]:
  """Master APs and pilots of one setup (the book's Algorithm 4.1), in UE index order.

  The master AP of UE k is the real AP with the largest ``beta_lk``. The first ``tau_p`` real UEs get
  pilots 0..tau_p-1; each later UE takes the pilot whose earlier users have the least summed gain at its
  master AP (lowest pilot index on ties). Padded UEs get pilot and master -1.

  Returns:
    ``(pilot_K, master_K)``, int32.
  """
  beta_LxK = jnp.asarray(beta_LxK)
  master_K = jnp.argmax(jnp.where(ap_mask_L[:, None], beta_LxK, -1.0), axis=0).astype(jnp.int32)

  def step(carry, inputs):
    load_LxT, count = carry
    beta_L, master, real = inputs
    least_loaded = jnp.argmin(load_LxT[master]).astype(jnp.int32)
    pilot = jnp.where(count < tau_p, count, least_loaded)
    pilot = jnp.where(real, pilot, -1)
    load_LxT = load_LxT + beta_L[:, None] * jax.nn.one_hot(pilot, tau_p, dtype=load_LxT.dtype)[None, :]
    return (load_LxT, count + real.astype(jnp.int32)), pilot

  init = (jnp.zeros((beta_LxK.shape[0], tau_p), beta_LxK.dtype), jnp.zeros((), jnp.int32))
  _, pilot_K = jax.lax.scan(step, init, (beta_LxK.T, master_K, ue_mask_K))
  return pilot_K, jnp.where(ue_mask_K, master_K, -1)


def dcc_serving(beta_LxK, pilot_K, master_K, ap_mask_L, ue_mask_K, tau_p: int) -> jax.Array:
  """The book's DCC matrix of one setup, bool [L, K].

  Each real AP serves, on every pilot in use, the UE with the largest gain among those sharing it (lowest
  UE index on ties); every UE is also served by its master AP. The master rule can give an AP tau_p + 1
  UEs (a UE of a pilot it already serves through a stronger UE).
  """
  num_aps, num_ues = beta_LxK.shape
  onehot_KxT = jax.nn.one_hot(pilot_K, tau_p, dtype=jnp.bool_) & ue_mask_K[:, None]
  gains_LxTxK = jnp.where(onehot_KxT.T[None, :, :], beta_LxK[:, None, :], -1.0)
  strongest_LxT = jnp.argmax(gains_LxTxK, axis=-1)
  in_use_T = jnp.any(onehot_KxT, axis=0)
  serve_LxK = jnp.any(jax.nn.one_hot(strongest_LxT, num_ues, dtype=jnp.bool_) & in_use_T[None, :, None], axis=1)
  serve_LxK = serve_LxK | jax.nn.one_hot(master_K, num_aps, dtype=jnp.bool_).T
  return serve_LxK & ap_mask_L[:, None] & ue_mask_K[None, :]


def estimation_quality(beta_LxK, pilot_K, ue_mask_K, ul_power_mw: float, tau_p: int) -> jax.Array:
  """``gamma_lk = tr(B_lk) / N`` for MMSE estimation with i.i.d. Rayleigh fading and pilot contamination.

  ``gamma_lk = p tau_p beta_lk^2 / (p tau_p sum_{i in P_k} beta_li + 1)``, where P_k are the UEs that share
  UE k's pilot (k included). Zero for padded UEs.
  """
  onehot_KxT = jax.nn.one_hot(pilot_K, tau_p, dtype=beta_LxK.dtype) * ue_mask_K[:, None]
  beta_LxK = beta_LxK * ue_mask_K[None, :]
  pilot_load_LxK = (beta_LxK @ onehot_KxT) @ onehot_KxT.T
  snr = ul_power_mw * tau_p
  return snr * beta_LxK**2 / (snr * pilot_load_LxK + 1.0)


def _structure_one(beta_LxK, ap_mask_L, ue_mask_K, tau_p: int, ul_power_mw: float) -> dict:
  pilot_K, master_K = assign_pilots(beta_LxK, ap_mask_L, ue_mask_K, tau_p)
  serve_LxK = dcc_serving(beta_LxK, pilot_K, master_K, ap_mask_L, ue_mask_K, tau_p)
  gamma_LxK = estimation_quality(beta_LxK, pilot_K, ue_mask_K, ul_power_mw, tau_p)
  return {"pilot_SxK": pilot_K, "master_SxK": master_K, "serve_SxLxK": serve_LxK, "gamma_SxLxK": gamma_LxK}


@functools.partial(jax.jit, static_argnames=("tau_p",))
def _structure(beta_SxLxK, ap_mask_SxL, ue_mask_SxK, tau_p, ul_power_mw):
  return jax.vmap(_structure_one, in_axes=(0, 0, 0, None, None))(
      beta_SxLxK, ap_mask_SxL, ue_mask_SxK, tau_p, ul_power_mw)


def pilots_and_clusters(beta_SxLxK, ap_mask_SxL, ue_mask_SxK, setup: CellFreeSetup) -> dict:
  """Pilots, master APs, DCC and estimation quality for given gains (batched; used by ``generate``).

  Returns a dict with ``pilot_SxK``, ``master_SxK`` (int32, -1 for padded UEs), ``serve_SxLxK`` (bool) and
  ``gamma_SxLxK`` (float32).
  """
  beta_SxLxK = jnp.asarray(beta_SxLxK, jnp.float32)
  if beta_SxLxK.ndim != 3:
    raise ValueError(f"beta_SxLxK must have shape [setups, APs, UEs], got {beta_SxLxK.shape}")
  s, l, k = beta_SxLxK.shape
  ap_mask_SxL, ue_mask_SxK = jnp.asarray(ap_mask_SxL, bool), jnp.asarray(ue_mask_SxK, bool)
  if ap_mask_SxL.shape != (s, l) or ue_mask_SxK.shape != (s, k):
    raise ValueError(f"ap_mask_SxL and ue_mask_SxK must have shapes {(s, l)} and {(s, k)}, "
                     f"got {ap_mask_SxL.shape} and {ue_mask_SxK.shape}")
  return _structure(beta_SxLxK, ap_mask_SxL, ue_mask_SxK, setup.tau_p, setup.ul_power_mw)


def _generate_one(key, ap_mask_L, ue_mask_K, setup: CellFreeSetup) -> dict:
  key_ap, key_ue, key_shadow = jax.random.split(key, 3)
  side = setup.area_side_m
  ap_pos_Lx2 = jax.random.uniform(key_ap, (ap_mask_L.shape[0], 2), maxval=side)
  ue_pos_Kx2 = jax.random.uniform(key_ue, (ue_mask_K.shape[0], 2), maxval=side)
  # Shadowing is drawn for all UE slots before masking: padded slots then never coincide, which would make
  # the correlation matrix singular, and the real UEs' values are a marginal of the joint draw.
  shadow_LxK = sample_shadowing_db(key_shadow, ue_pos_Kx2, ap_mask_L.shape[0], setup)
  horizontal_LxK = _distances(ap_pos_Lx2, ue_pos_Kx2, side, setup.wrap_around)
  # Below 1 m the path-loss model is meaningless; the floor only matters with no height difference.
  distance_LxK = jnp.maximum(jnp.sqrt(horizontal_LxK**2 + setup.height_difference_m**2), 1.0)
  beta_db_LxK = (setup.pathloss_at_1m_db - setup.pathloss_slope_db * jnp.log10(distance_LxK) + shadow_LxK
                 - setup.noise_power_dbm)
  link_mask_LxK = ap_mask_L[:, None] & ue_mask_K[None, :]
  beta_LxK = jnp.where(link_mask_LxK, 10.0 ** (beta_db_LxK / 10.0), 0.0)
  out = {"ap_pos_SxLx2": ap_pos_Lx2 * ap_mask_L[:, None], "ue_pos_SxKx2": ue_pos_Kx2 * ue_mask_K[:, None],
         "shadowing_db_SxLxK": shadow_LxK * link_mask_LxK, "beta_SxLxK": beta_LxK,
         "ap_mask_SxL": ap_mask_L, "ue_mask_SxK": ue_mask_K}
  out.update(_structure_one(beta_LxK, ap_mask_L, ue_mask_K, setup.tau_p, setup.ul_power_mw))
  return out


@functools.partial(jax.jit, static_argnames=("setup",))
def _generate(keys_S, ap_mask_SxL, ue_mask_SxK, setup):
  return jax.vmap(_generate_one, in_axes=(0, 0, 0, None))(keys_S, ap_mask_SxL, ue_mask_SxK, setup)


def _counts(value, name: str, limit: int, num_setups: int) -> np.ndarray:
  if value is None:
    return np.full(num_setups, limit, np.int64)
  counts = np.asarray(value)
  if counts.ndim == 0:
    counts = np.full(num_setups, counts)
  if counts.shape != (num_setups,) or not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f"{name} must be an int or an int array of shape [{num_setups}], got {value!r}")
  if counts.min() < 1 or counts.max() > limit:
    raise ValueError(f"{name} must lie in [1, {limit}] (the array size is setup.{name}), got {counts}")
  return counts


def generate(key, setup: CellFreeSetup, num_setups: int, *, num_aps=None, num_ues=None) -> dict:
  """Samples ``num_setups`` independent setups; the same key gives the same arrays.

  APs and UEs are uniform in the square. Arrays have ``setup.num_aps`` APs and ``setup.num_ues`` UEs;
  ``num_aps`` / ``num_ues`` (an int, or one int per setup) make only the first so many real and the rest
  padding, which is how one batch holds setups of different sizes. The shadowing of the real UEs has the
  right joint distribution whatever the padding (it is a marginal of the joint draw).

  Returns a dict of jnp arrays, S = num_setups, L = setup.num_aps, K = setup.num_ues:
    ``ap_pos_SxLx2``, ``ue_pos_SxKx2``: positions in metres (0 for padding);
    ``shadowing_db_SxLxK``: shadow fading in dB; ``beta_SxLxK``: gain over noise, linear;
    ``ap_mask_SxL``, ``ue_mask_SxK``: bool, True for real APs / UEs;
    ``pilot_SxK``, ``master_SxK``: int32 pilot index and master AP (-1 for padding);
    ``serve_SxLxK``: bool DCC matrix; ``gamma_SxLxK``: MMSE estimation quality ``tr(B_lk) / N``.
  """
  if not isinstance(setup, CellFreeSetup):
    raise ValueError(f"setup must be a CellFreeSetup, got {type(setup).__name__}")
  try:
    num_setups = operator.index(num_setups)
  except TypeError:
    raise ValueError(f"num_setups must be an int, got {num_setups!r}") from None
  if num_setups < 1:
    raise ValueError(f"num_setups must be >= 1, got {num_setups}")
  ap_counts = _counts(num_aps, "num_aps", setup.num_aps, num_setups)
  ue_counts = _counts(num_ues, "num_ues", setup.num_ues, num_setups)
  ap_mask_SxL = np.arange(setup.num_aps)[None, :] < ap_counts[:, None]
  ue_mask_SxK = np.arange(setup.num_ues)[None, :] < ue_counts[:, None]
  keys_S = jax.random.split(key, num_setups)
  return _generate(keys_S, jnp.asarray(ap_mask_SxL), jnp.asarray(ue_mask_SxK), setup)


# How each key of a setup dict is laid out ("L" = AP axis, "K" = UE axis) and what padding holds.
_LAYOUT = {
    "ap_pos_SxLx2": ("L", 0.0), "ue_pos_SxKx2": ("K", 0.0), "shadowing_db_SxLxK": ("LK", 0.0),
    "beta_SxLxK": ("LK", 0.0), "gamma_SxLxK": ("LK", 0.0), "serve_SxLxK": ("LK", False),
    "ap_mask_SxL": ("L", False), "ue_mask_SxK": ("K", False), "pilot_SxK": ("K", -1), "master_SxK": ("K", -1),
}
_REQUIRED = ("beta_SxLxK", "gamma_SxLxK", "serve_SxLxK", "pilot_SxK", "ap_mask_SxL", "ue_mask_SxK")


def _sizes(data: dict, where: str) -> tuple[int, int, int]:
  """(S, L, K) of a setup dict, after checking that the keys the SE needs are there and agree."""
  if not isinstance(data, dict):
    raise ValueError(f"{where}: expected a dict of setup arrays, got {type(data).__name__}")
  missing = [k for k in _REQUIRED if k not in data]
  if missing:
    raise ValueError(f"{where}: setup dict lacks {missing}; make it with generate()")
  shape = tuple(np.shape(data["beta_SxLxK"]))
  if len(shape) != 3:
    raise ValueError(f"{where}: beta_SxLxK must have shape [setups, APs, UEs], got {shape}")
  s, l, k = shape
  expected = {"gamma_SxLxK": (s, l, k), "serve_SxLxK": (s, l, k), "pilot_SxK": (s, k),
              "ap_mask_SxL": (s, l), "ue_mask_SxK": (s, k)}
  for name, want in expected.items():
    if tuple(np.shape(data[name])) != want:
      raise ValueError(f"{where}: {name} has shape {tuple(np.shape(data[name]))}, expected {want}")
  return s, l, k


def pad_setups(data: dict, num_aps: int, num_ues: int) -> dict:
  """Pads every array of a setup dict to ``num_aps`` APs and ``num_ues`` UEs with inert entries."""
  _, l, k = _sizes(data, "pad_setups")
  if num_aps < l or num_ues < k:
    raise ValueError(f"pad_setups: cannot pad {l} APs and {k} UEs down to {num_aps} and {num_ues}")
  out = {}
  for name, value in data.items():
    if name not in _LAYOUT:
      raise ValueError(f"pad_setups: unknown key {name!r}; known keys are {sorted(_LAYOUT)}")
    axes, fill = _LAYOUT[name]
    value = jnp.asarray(value)
    widths = [(0, 0)] * value.ndim
    for position, axis in enumerate(axes, start=1):
      widths[position] = (0, (num_aps - l) if axis == "L" else (num_ues - k))
    out[name] = jnp.pad(value, widths, constant_values=fill)
  return out


def concat_setups(datas) -> dict:
  """Joins setup dicts of different sizes along the setup axis, padding each to the largest L and K."""
  datas = list(datas)
  if not datas:
    raise ValueError("concat_setups needs at least one setup dict")
  sizes = [_sizes(d, f"concat_setups[{i}]") for i, d in enumerate(datas)]
  num_aps, num_ues = max(s[1] for s in sizes), max(s[2] for s in sizes)
  keys = set(datas[0])
  for i, d in enumerate(datas):
    if set(d) != keys:
      raise ValueError(f"concat_setups: dict {i} has keys {sorted(d)}, dict 0 has {sorted(keys)}")
  padded = [pad_setups(d, num_aps, num_ues) for d in datas]
  return {name: jnp.concatenate([p[name] for p in padded]) for name in datas[0]}


# ----------------------------------------------------------------------------------------------------------
# Downlink SE with distributed MR precoding (i.i.d. closed form)

def _antennas(num_antennas, num_setups: int, num_aps: int) -> jax.Array:
  """Antennas per AP as float [S, L] from a scalar or anything broadcastable to [S, L]."""
  n = jnp.asarray(num_antennas, jnp.float32)
  try:
    return jnp.broadcast_to(n, (num_setups, num_aps))
  except ValueError:
    raise ValueError(f"num_antennas must be a scalar or broadcastable to [setups, APs] = "
                     f"{[num_setups, num_aps]}, got shape {n.shape}") from None


def _safe_sqrt(x):
  """sqrt with a zero (not infinite) gradient at 0, so a power that is switched off gives finite gradients."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _link_factor(beta_LxK, gamma_LxK, serve_LxK, n_L):
  """``sqrt(N_l gamma_lk) / beta_lk`` on serving links, 0 elsewhere.

  With it, MR's coherent gain at UE k of UE i's signal from AP l is ``beta_lk * factor_li * sqrt(rho_li)``;
  ``gamma_li / beta_li^2`` depends only on AP l and UE i's pilot, which is where pilot contamination comes from.
  """
  ratio = jnp.sqrt(n_L[:, None] * gamma_LxK) / jnp.where(serve_LxK, beta_LxK, 1.0)
  return jnp.where(serve_LxK, ratio, 0.0)


def _same_pilot(pilot_K, ue_mask_K):
  """bool [K, K]: UEs k and i share a pilot (diagonal included for real UEs)."""
  return (pilot_K[:, None] == pilot_K[None, :]) & ue_mask_K[:, None] & ue_mask_K[None, :]


def _mr_terms(mu_LxK, beta_LxK, factor_LxK, same_KxK):
  """Signal amplitude, interference-plus-noise and cross gains of MR for amplitudes ``mu = sqrt(rho)``.

  ``cross_KxK[k, i] = sum_l beta_lk factor_li mu_li`` is the coherent part of UE i's signal at UE k; its
  diagonal is UE k's signal amplitude ``sum_l sqrt(rho_lk N_l gamma_lk)``. The non-coherent interference
  is ``sum_l beta_lk sum_i rho_li``; the coherent (pilot contamination) term sums ``cross_ki^2`` over the
  other UEs of k's pilot.
  """
  cross_KxK = beta_LxK.T @ (factor_LxK * mu_LxK)
  signal_K = jnp.diagonal(cross_KxK)
  incoherent_K = beta_LxK.T @ jnp.sum(mu_LxK * mu_LxK, axis=1)
  off_KxK = same_KxK & ~jnp.eye(same_KxK.shape[0], dtype=bool)
  coherent_K = jnp.sum(jnp.where(off_KxK, cross_KxK**2, 0.0), axis=1)
  return signal_K, incoherent_K + coherent_K + 1.0, cross_KxK


def _sinr_one(mu_LxK, beta_LxK, gamma_LxK, serve_LxK, pilot_K, ue_mask_K, n_L):
  factor_LxK = _link_factor(beta_LxK, gamma_LxK, serve_LxK, n_L)
  mu_LxK = jnp.where(serve_LxK, mu_LxK, 0.0)
  signal_K, denominator_K, _ = _mr_terms(mu_LxK, beta_LxK, factor_LxK, _same_pilot(pilot_K, ue_mask_K))
  return jnp.where(ue_mask_K, signal_K**2 / denominator_K, 0.0)


def _fields(data: dict):
  return (jnp.asarray(data["beta_SxLxK"], jnp.float32), jnp.asarray(data["gamma_SxLxK"], jnp.float32),
          jnp.asarray(data["serve_SxLxK"], bool), jnp.asarray(data["pilot_SxK"], jnp.int32),
          jnp.asarray(data["ue_mask_SxK"], bool))


def mr_sinr(rho_SxLxK, data: dict, num_antennas) -> jax.Array:
  """Downlink SINR [S, K] of distributed MR precoding, the book's closed form for i.i.d. Rayleigh fading.

  ``SINR_k = (sum_l sqrt(rho_lk N_l gamma_lk))^2 / (sum_l beta_lk sum_i rho_li
  + sum_{i in P_k, i != k} (sum_l sqrt(rho_li N_l gamma_li) beta_lk / beta_li)^2 + 1)``,
  with sums over serving links only (rho off the DCC links is ignored). ``num_antennas`` is a scalar or per
  AP (broadcastable to [S, L]). Differentiable in rho; the gradient at rho_lk = 0 is taken as 0. Padded UEs
  get 0.
  """
  s, l, _ = _sizes(data, "mr_sinr")
  rho_SxLxK = jnp.asarray(rho_SxLxK, jnp.float32)
  if rho_SxLxK.shape != tuple(np.shape(data["beta_SxLxK"])):
    raise ValueError(f"mr_sinr: rho_SxLxK has shape {rho_SxLxK.shape}, expected {np.shape(data['beta_SxLxK'])}")
  return jax.vmap(_sinr_one)(_safe_sqrt(rho_SxLxK), *_fields(data), _antennas(num_antennas, s, l))


def mr_se(rho_SxLxK, data: dict, num_antennas, *, tau_p: int, tau_c: int) -> jax.Array:
  """Per-UE downlink SE [S, K] in bit/s/Hz: ``(1 - tau_p / tau_c) log2(1 + SINR_k)``; 0 for padded UEs."""
  return (1.0 - tau_p / tau_c) * jnp.log2(1.0 + mr_sinr(rho_SxLxK, data, num_antennas))


def sum_se(se_SxK, ue_mask_SxK) -> jax.Array:
  """Sum SE of each setup [S] over its real UEs."""
  return jnp.sum(jnp.where(ue_mask_SxK, se_SxK, 0.0), axis=-1)


def percentile_se(se_SxK, ue_mask_SxK, q: float = 5.0) -> jax.Array:
  """The q-th percentile of the per-UE SE pooled over all real UEs of all setups (the book's CDF plots).

  Linear interpolation between order statistics, as numpy's default; jit-able.
  """
  values = jnp.where(ue_mask_SxK, se_SxK, jnp.inf).reshape(-1)
  count = jnp.sum(ue_mask_SxK)
  ordered = jnp.sort(values)
  position = (q / 100.0) * (count - 1).astype(jnp.float32)
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, count - 1)
  weight = position - low
  return ordered[low] * (1.0 - weight) + ordered[high] * weight


# ----------------------------------------------------------------------------------------------------------
# Power allocation baselines. Each returns rho_SxLxK with sum_{k in D_l} rho_lk <= rho_max at every AP.

def _check_rho_max(rho_max):
  if isinstance(rho_max, (int, float)) and not rho_max > 0:
    raise ValueError(f"rho_max must be > 0 (mW per AP), got {rho_max!r}")


@functools.partial(jax.jit, static_argnames=("tau_p",))
def _equal(serve_SxLxK, rho_max, tau_p):
  served_SxL = jnp.sum(serve_SxLxK, axis=-1).astype(jnp.float32)
  share_SxL = served_SxL if tau_p is None else jnp.maximum(served_SxL, float(tau_p))
  return jnp.where(serve_SxLxK, rho_max / jnp.maximum(share_SxL, 1.0)[..., None], 0.0)


def equal_power(data: dict, *, rho_max: float, tau_p: int | None = None) -> jax.Array:
  """Equal power on the serving links of every AP.

  With ``tau_p``: ``rho_lk = rho_max / max(tau_p, |D_l|)``, the book's ``rho_max / tau_p`` for every AP
  with at most tau_p UEs; the master-AP rule of DCC can give an AP tau_p + 1 UEs, and that AP divides by
  |D_l| instead to stay within rho_max. Without ``tau_p``: ``rho_lk = rho_max / |D_l|`` (full power).
  """
  _sizes(data, "equal_power")
  _check_rho_max(rho_max)
  if tau_p is not None and (isinstance(tau_p, bool) or not isinstance(tau_p, int) or tau_p < 1):
    raise ValueError(f"equal_power: tau_p must be None or an int >= 1, got {tau_p!r}")
  return _equal(jnp.asarray(data["serve_SxLxK"], bool), rho_max, tau_p)


@jax.jit
def _fractional(beta_SxLxK, serve_SxLxK, rho_max, upsilon):
  # Powers of beta in the log domain: beta spans ~10 orders of magnitude and upsilon may be negative.
  log_w = jnp.where(serve_SxLxK, upsilon * jnp.log(jnp.where(serve_SxLxK, beta_SxLxK, 1.0)), 0.0)
  top = jnp.max(jnp.where(serve_SxLxK, log_w, -jnp.inf), axis=-1, keepdims=True)
  weight = jnp.where(serve_SxLxK, jnp.exp(log_w - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  total = jnp.sum(weight, axis=-1, keepdims=True)
  return rho_max * weight / jnp.where(total > 0, total, 1.0)


def fractional_power(data: dict, *, rho_max: float, upsilon: float = 0.5) -> jax.Array:
  """Fractional power allocation for distributed operation, the book's eq. (7.47).

  ``rho_lk = rho_max beta_lk^upsilon / sum_{i in D_l} beta_li^upsilon`` on serving links: every AP spends
  exactly rho_max. upsilon = 0.5 favours strong links, -0.5 weak ones, 0 is ``rho_max / |D_l|``.
  """
  _sizes(data, "fractional_power")
  _check_rho_max(rho_max)
  return _fractional(jnp.asarray(data["beta_SxLxK"], jnp.float32), jnp.asarray(data["serve_SxLxK"], bool),
                     rho_max, upsilon)


def max_min_coefficients(data: dict, num_antennas) -> tuple[jax.Array, jax.Array]:
  """``b_SxK`` and ``c_SxKxK`` of the SINR when UE k uses power eta_k on all its serving links.

  With ``rho_lk = eta_k D_lk`` the closed form becomes ``SINR_k = b_k eta_k / (sum_i c_ki eta_i + 1)`` with
  ``b_k = (sum_{l in M_k} sqrt(N_l gamma_lk))^2`` and
  ``c_ki = sum_{l in M_i} beta_lk + [i in P_k, i != k] (sum_{l in M_i} sqrt(N_l gamma_li) beta_lk / beta_li)^2``.
  """
  s, l, _ = _sizes(data, "max_min_coefficients")
  return _coefficients(*_fields(data), _antennas(num_antennas, s, l))


@jax.jit
def _coefficients(beta_SxLxK, gamma_SxLxK, serve_SxLxK, pilot_SxK, ue_mask_SxK, n_SxL):
  def one(beta_LxK, gamma_LxK, serve_LxK, pilot_K, ue_mask_K, n_L):
    factor_LxK = _link_factor(beta_LxK, gamma_LxK, serve_LxK, n_L)
    served_LxK = serve_LxK.astype(beta_LxK.dtype)
    cross_KxK = beta_LxK.T @ (factor_LxK * served_LxK)
    same_KxK = _same_pilot(pilot_K, ue_mask_K) & ~jnp.eye(pilot_K.shape[0], dtype=bool)
    c_KxK = beta_LxK.T @ served_LxK + jnp.where(same_KxK, cross_KxK**2, 0.0)
    return jnp.diagonal(cross_KxK)**2, c_KxK
  return jax.vmap(one)(beta_SxLxK, gamma_SxLxK, serve_SxLxK, pilot_SxK, ue_mask_SxK, n_SxL)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _max_min(b_SxK, c_SxKxK, serve_SxLxK, ue_mask_SxK, rho_max, tol, max_iter):
  def one(b_K, c_KxK, serve_LxK, ue_mask_K):
    served_LxK = serve_LxK.astype(b_K.dtype)
    b_safe_K = jnp.where(ue_mask_K, b_K, 1.0)

    def rescale(eta_K):
      return eta_K * rho_max / jnp.max(served_LxK @ eta_K)

    def spread(eta_K):
      sinr_K = b_K * eta_K / (c_KxK @ eta_K + 1.0)
      return jnp.max(jnp.where(ue_mask_K, sinr_K, -jnp.inf)) - jnp.min(jnp.where(ue_mask_K, sinr_K, jnp.inf))

    def body(state):
      it, eta_K, _ = state
      eta_K = rescale(jnp.where(ue_mask_K, (c_KxK @ eta_K + 1.0) / b_safe_K, 0.0))
      return it + 1, eta_K, spread(eta_K)

    eta_K = rescale(ue_mask_K.astype(b_K.dtype))
    state = (jnp.zeros((), jnp.int32), eta_K, spread(eta_K))
    it, eta_K, gap = jax.lax.while_loop(lambda st: (st[2] >= tol) & (st[0] < max_iter), body, state)
    return served_LxK * eta_K[None, :], it, gap
  return jax.vmap(one)(b_SxK, c_SxKxK, serve_SxLxK, ue_mask_SxK)


def max_min_power(data: dict, num_antennas, *, rho_max: float, tol: float = 0.01,
                  max_iter: int = 2000) -> tuple[jax.Array, dict]:
  """Max-min fair power with one power per UE on all its serving links.

  The fixed point of the book's Algorithm 7.3 (stated there for centralised precoding), applied to the
  closed form of distributed MR with ``rho_lk = eta_k D_lk``; the book's per-link variant is Algorithm 7.5.

  Iterates ``eta_k <- (c_k^T eta + 1) / b_k`` (see ``max_min_coefficients``), each time rescaled so that the
  most loaded AP spends exactly rho_max (``max_l sum_{i in D_l} eta_i = rho_max``; the target SINR factor
  of the book cancels in that rescaling). Starts from equal eta; stops when max SINR - min SINR over the
  real UEs is below ``tol`` (absolute, linear SINR, as the book) or after ``max_iter`` iterations.

  Returns:
    ``(rho_SxLxK, info)`` with ``info = {"iterations": int32 [S], "spread": float [S]}`` (final SINR spread).
  """
  _check_rho_max(rho_max)
  if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
    raise ValueError(f"max_min_power: max_iter must be an int >= 1, got {max_iter!r}")
  b_SxK, c_SxKxK = max_min_coefficients(data, num_antennas)
  rho, iterations, gap = _max_min(b_SxK, c_SxKxK, jnp.asarray(data["serve_SxLxK"], bool),
                                  jnp.asarray(data["ue_mask_SxK"], bool), rho_max, tol, int(max_iter))
  return rho, {"iterations": iterations, "spread": gap}


def _project(v_LxK, served_LxK, rho_max):
  """Euclidean projection onto {v >= 0, v = 0 off the serving links, ||v_l||^2 <= rho_max for every AP l}.

  For a ball centred at the origin intersected with a cone, clipping onto the cone and then scaling into the
  ball is the exact projection.
  """
  v_LxK = jnp.maximum(v_LxK, 0.0) * served_LxK
  power_L = jnp.sum(v_LxK * v_LxK, axis=1)
  scale_L = jnp.minimum(1.0, jnp.sqrt(rho_max / jnp.maximum(power_L, 1e-30)))
  return v_LxK * scale_L[:, None]


def _lower_triangular_inverse(chol_BxMxM):
  """Inverse of a batch of lower-triangular matrices by forward substitution, one row per step.

  XLA's batched triangular solve against an identity runs about 15x slower on CPU than these M steps of
  batched matrix-vector products, which also suit a GPU.
  """
  size = chol_BxMxM.shape[-1]
  eye_MxM = jnp.eye(size, dtype=chol_BxMxM.dtype)

  def row(i, inverse_BxMxM):
    known = jnp.einsum("...j,...jk->...k", chol_BxMxM[..., i, :], inverse_BxMxM)
    return inverse_BxMxM.at[..., i, :].set((eye_MxM[i] - known) / chol_BxMxM[..., i, i][..., None])

  return jax.lax.fori_loop(0, size, row, jnp.zeros_like(chol_BxMxM))


def _wmmse_one(beta_LxK, gamma_LxK, serve_LxK, pilot_K, ue_mask_K, n_L, mu_LxK, rho_max, prelog, tol,
               admm_tol, *, max_iter, admm_max_iter, max_cluster):
  """WMMSE for one setup on the amplitudes ``mu_lk = sqrt(rho_lk)``; see ``wmmse_power``.

  The QP of each outer iteration is solved in the per-UE coordinates ``x_KxM[i, j] = mu[ap_KxM[i, j], i]``
  over UE i's serving APs (at most ``max_cluster``), which is where all the coupling is.
  """
  num_aps, num_ues = beta_LxK.shape
  dtype = beta_LxK.dtype
  served_LxK = serve_LxK.astype(dtype)
  factor_LxK = _link_factor(beta_LxK, gamma_LxK, serve_LxK, n_L)
  same_KxK = _same_pilot(pilot_K, ue_mask_K)
  # Serving APs first (stable order), then filler entries marked invalid.
  ap_KxM = jnp.argsort(~serve_LxK.T, axis=1, stable=True)[:, :max_cluster]
  ue_KxM = jnp.broadcast_to(jnp.arange(num_ues)[:, None], ap_KxM.shape)
  valid_KxM = serve_LxK[ap_KxM, ue_KxM]
  factor_KxM = factor_LxK[ap_KxM, ue_KxM]
  beta_KxMxK = beta_LxK[ap_KxM]
  own_beta_KxM = beta_LxK[ap_KxM, ue_KxM]
  eye_MxM = jnp.eye(max_cluster, dtype=dtype)

  def to_dense(x_KxM):
    return jnp.zeros((num_aps, num_ues), dtype).at[ap_KxM, ue_KxM].add(jnp.where(valid_KxM, x_KxM, 0.0))

  def project(v_KxM):
    v_KxM = jnp.where(valid_KxM, jnp.maximum(v_KxM, 0.0), 0.0)
    power_L = jnp.zeros((num_aps,), dtype).at[ap_KxM].add(v_KxM * v_KxM)
    scale_L = jnp.minimum(1.0, jnp.sqrt(rho_max / jnp.maximum(power_L, 1e-30)))
    return v_KxM * scale_L[ap_KxM]

  def objective_se(mu):
    signal, denominator, _ = _mr_terms(mu, beta_LxK, factor_LxK, same_KxK)
    return prelog * jnp.sum(jnp.where(ue_mask_K, jnp.log2(1.0 + signal**2 / denominator), 0.0))

  def surrogate(mu, a_K, bq_K):
    # Weighted MSE sum_k w_k e_k up to terms constant in mu: e_k = u_k^2 E|y_k|^2 - 2 u_k signal_k + 1.
    signal, denominator, _ = _mr_terms(mu, beta_LxK, factor_LxK, same_KxK)
    return jnp.sum(a_K * (denominator + signal**2) - 2.0 * bq_K * signal)

  def outer(state):
    it, mu, dual_KxM, se, history, _, inner_total = state
    signal_K, denominator_K, _ = _mr_terms(mu, beta_LxK, factor_LxK, same_KxK)
    total_K = denominator_K + signal_K**2
    # Receiver u = signal / total, weight w = 1 / MSE = total / denominator; the mu-problem needs w u^2, w u.
    a_K = jnp.where(ue_mask_K, signal_K**2 / (total_K * denominator_K), 0.0)
    bq_K = jnp.where(ue_mask_K, signal_K / denominator_K, 0.0)
    diag_KxM = jnp.where(valid_KxM, (beta_LxK @ a_K)[ap_KxM], 0.0)
    linear_KxM = 2.0 * bq_K[:, None] * factor_KxM * own_beta_KxM
    # UE i's serving APs are coupled through the UEs of its pilot:
    # C_i[l, m] = factor_li factor_mi sum_{k in P_i} a_k beta_lk beta_mk.
    weighted_KxMxK = beta_KxMxK * jnp.sqrt(a_K)[None, None, :]
    coupling_KxMxM = jnp.einsum("imk,ki,ink->imn", weighted_KxMxK, same_KxK.astype(dtype), weighted_KxMxK)
    coupling_KxMxM = coupling_KxMxM * factor_KxM[:, :, None] * factor_KxM[:, None, :]
    hessian_KxMxM = 2.0 * (coupling_KxMxM + diag_KxM[:, :, None] * eye_MxM)
    # ADMM penalty sqrt(lambda_min * lambda_max) of bounds on the Hessian's spectrum on the serving links:
    # the smallest per-AP diagonal, and the largest diagonal plus the largest trace of a coupling block.
    low = 2.0 * jnp.min(jnp.where(valid_KxM, diag_KxM, jnp.inf))
    high = 2.0 * (jnp.max(diag_KxM) + jnp.max(jnp.trace(coupling_KxMxM, axis1=1, axis2=2)))
    sigma = jnp.sqrt(jnp.clip(low, 1e-12, 1e30) * jnp.maximum(high, 1e-12))
    # (H + sigma I)^-1 = C^-T C^-1 with C the Cholesky factor; C^-1 is formed once per outer iteration.
    chol_inverse_KxMxM = _lower_triangular_inverse(jnp.linalg.cholesky(hessian_KxMxM + sigma * eye_MxM))

    def admm_step(inner):
      j, z, y, _ = inner
      half = jnp.einsum("imn,in->im", chol_inverse_KxMxM, linear_KxM + sigma * (z - y))
      x = jnp.einsum("inm,in->im", chol_inverse_KxMxM, half)
      z_new = project(x + y)
      y = y + x - z_new
      residual = jnp.maximum(jnp.max(jnp.abs(x - z_new)), jnp.max(jnp.abs(z_new - z)))
      return j + 1, z_new, y, residual

    limit = admm_tol * jnp.sqrt(rho_max)
    start = (jnp.zeros((), jnp.int32), mu[ap_KxM, ue_KxM], dual_KxM / sigma, jnp.asarray(jnp.inf, dtype))
    inner_it, candidate, y, _ = jax.lax.while_loop(
        lambda st: (st[0] < admm_max_iter) & (st[3] > limit), admm_step, start)
    candidate = to_dense(candidate)
    # An inexact inner solve could undo progress; keep the old point then, so the sum SE never falls.
    better = surrogate(candidate, a_K, bq_K) <= surrogate(mu, a_K, bq_K)
    mu_new = jnp.where(better, candidate, mu)
    se_new = objective_se(mu_new)
    history = history.at[it + 1].set(se_new)
    converged = jnp.abs(se_new - se) <= tol * jnp.maximum(jnp.abs(se_new), 1.0)
    return it + 1, mu_new, sigma * y, se_new, history, converged, inner_total + inner_it

  mu_LxK = _project(mu_LxK, served_LxK, rho_max)
  se0 = objective_se(mu_LxK)
  history = jnp.full((max_iter + 1,), se0)
  state = (jnp.zeros((), jnp.int32), mu_LxK, jnp.zeros(ap_KxM.shape, dtype), se0, history, jnp.zeros((), bool),
           jnp.zeros((), jnp.int32))
  it, mu_LxK, _, se, history, _, inner_total = jax.lax.while_loop(
      lambda st: (st[0] < max_iter) & ~st[5], outer, state)
  history = jnp.where(jnp.arange(max_iter + 1) > it, se, history)
  return mu_LxK**2, history, it, inner_total


@functools.partial(jax.jit, static_argnames=("max_iter", "admm_max_iter", "max_cluster"))
def _wmmse(beta, gamma, serve, pilot, ue_mask, n, mu, rho_max, prelog, tol, admm_tol, max_iter, admm_max_iter,
           max_cluster):
  one = functools.partial(_wmmse_one, max_iter=max_iter, admm_max_iter=admm_max_iter, max_cluster=max_cluster)
  return jax.vmap(one, in_axes=(0,) * 7 + (None,) * 4)(
      beta, gamma, serve, pilot, ue_mask, n, mu, rho_max, prelog, tol, admm_tol)


def wmmse_power(data: dict, num_antennas, *, rho_max: float, tau_p: int, tau_c: int, init=None,
                max_iter: int = 200, tol: float = 1e-4, admm_max_iter: int = 500, admm_tol: float = 1e-4,
                chunk_size: int = 16) -> tuple[jax.Array, dict]:
  """Sum-SE maximising per-link power for distributed MR by WMMSE with an ADMM inner solver.

  This is the per-link sum-SE problem the book solves for distributed operation with Algorithm 7.6 (7.4 in
  the centralised case), whose inner step is an SOCP there.

  In the amplitudes ``mu_lk = sqrt(rho_lk)`` the signal of UE k is linear and its received power
  quadratic, so with the MMSE receiver ``u_k`` and weight ``w_k = 1 + SINR_k`` (both closed form) the
  mu-step minimises a convex quadratic under the per-AP constraints ``||mu_l||^2 <= rho_max``,
  ``mu >= 0`` and ``mu = 0`` off the DCC links. That QP is solved by ADMM: the quadratic step is an exact
  per-UE linear solve over the UE's serving APs (coupled through the UEs of its pilot; one Cholesky factor
  per outer iteration), the other step is the projection onto the per-AP balls. ADMM is warm-started from
  the previous amplitudes and dual, uses the penalty ``sqrt(lambda_min lambda_max)`` of bounds on the
  Hessian's spectrum, and stops when the largest primal and dual residual is below
  ``admm_tol * sqrt(rho_max)`` or after ``admm_max_iter`` steps. Its result replaces the old amplitudes
  only if it lowers the weighted MSE, which makes the sum SE non-decreasing in exact arithmetic (float32
  rounding can show as changes of order 1e-6 relative). The outer loop starts from ``init`` (default:
  ``equal_power(data, rho_max=rho_max, tau_p=tau_p)``) and stops when the sum SE changes by at most ``tol``
  relative, or after ``max_iter`` iterations; with the defaults it ends within about 0.5 % of the sum SE
  reached with ``tol=1e-6``.

  This is a host function (it reads the largest cluster size from the data to size the per-UE systems).
  Setups are processed ``chunk_size`` at a time (vmapped; a chunk runs until its slowest setup stops).

  Returns:
    ``(rho_SxLxK, info)``: ``info["history"]`` float [S, max_iter + 1] is the sum SE (bit/s/Hz) at the
    start and after each iteration, repeated after the stop; ``info["iterations"]`` and
    ``info["admm_iterations"]`` (total inner steps) are int [S].
  """
  s, l, _ = _sizes(data, "wmmse_power")
  _check_rho_max(rho_max)
  for name, value in (("max_iter", max_iter), ("admm_max_iter", admm_max_iter), ("chunk_size", chunk_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"wmmse_power: {name} must be an int >= 1, got {value!r}")
  if init is None:
    init = equal_power(data, rho_max=rho_max, tau_p=tau_p)
  init = jnp.asarray(init, jnp.float32)
  if init.shape != tuple(np.shape(data["beta_SxLxK"])):
    raise ValueError(f"wmmse_power: init has shape {init.shape}, expected {np.shape(data['beta_SxLxK'])}")
  # Rounded up so that data sets of similar cluster sizes share one compiled program.
  largest = int(np.max(np.sum(np.asarray(data["serve_SxLxK"]), axis=1)))
  max_cluster = min(l, max(8, -(-largest // 8) * 8))
  arrays = (*_fields(data), _antennas(num_antennas, s, l), _safe_sqrt(init))
  chunk = min(chunk_size, s)
  outputs = []
  for start in range(0, s, chunk):
    # The last chunk is filled up with copies of its final setup so that every chunk has one shape.
    index = np.minimum(np.arange(start, start + chunk), s - 1)
    part = _wmmse(*(x[index] for x in arrays), rho_max, 1.0 - tau_p / tau_c, tol, admm_tol, max_iter,
                  admm_max_iter, max_cluster)
    outputs.append([x[:min(chunk, s - start)] for x in part])
  rho, history, iterations, inner = (jnp.concatenate(parts) for parts in zip(*outputs))
  return rho, {"history": history, "iterations": iterations, "admm_iterations": inner}


def baseline_powers(data: dict, setup: CellFreeSetup, num_antennas=None) -> dict:
  """All baselines with the setup's rho_max, tau_p, tau_c and antennas: name -> rho_SxLxK."""
  n = setup.num_antennas if num_antennas is None else num_antennas
  return {
      "equal": equal_power(data, rho_max=setup.rho_max_mw, tau_p=setup.tau_p),
      "full_equal": equal_power(data, rho_max=setup.rho_max_mw),
      "fractional": fractional_power(data, rho_max=setup.rho_max_mw),
      "max_min": max_min_power(data, n, rho_max=setup.rho_max_mw)[0],
      "wmmse": wmmse_power(data, n, rho_max=setup.rho_max_mw, tau_p=setup.tau_p, tau_c=setup.tau_c)[0],
  }


# ----------------------------------------------------------------------------------------------------------
# Link graphs for the GNN (host side)

def _pairs_within_groups(keys_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """All ordered pairs (a, b), a != b, of nodes with equal key, as int64 sender and receiver indices."""
  order = np.argsort(keys_n, kind="stable")
  sorted_keys = keys_n[order]
  starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
  sizes = np.diff(np.r_[starts, len(keys_n)])
  size_at = np.repeat(sizes, sizes)
  start_at = np.repeat(starts, sizes)
  sender_pos = np.repeat(np.arange(len(keys_n)), size_at)
  offset = np.arange(len(sender_pos)) - np.repeat(np.cumsum(size_at) - size_at, size_at)
  receiver_pos = np.repeat(start_at, size_at) + offset
  keep = sender_pos != receiver_pos
  return order[sender_pos[keep]], order[receiver_pos[keep]]


def _link_graph(beta_LxK, gamma_LxK, serve_LxK, ap_mask_L, ue_mask_K, n_L) -> GraphsTuple:
  ap_n, ue_n = np.nonzero(serve_LxK)
  ues_of_ap_L = serve_LxK.sum(axis=1)
  aps_of_ue_K = serve_LxK.sum(axis=0)
  beta_n = beta_LxK[ap_n, ue_n].astype(np.float64)
  x_nxF = np.stack([
      (10.0 * np.log10(beta_n) - BETA_DB_CENTER) / BETA_DB_SCALE,
      n_L[ap_n] / ANTENNA_SCALE,
      ues_of_ap_L[ap_n] / CLUSTER_SCALE,
      aps_of_ue_K[ue_n] / CLUSTER_SCALE,
      gamma_LxK[ap_n, ue_n] / beta_n,
  ], axis=1).astype(np.float32)
  ap_senders, ap_receivers = _pairs_within_groups(ap_n)
  ue_senders, ue_receivers = _pairs_within_groups(ue_n)
  senders = np.concatenate([ap_senders, ue_senders]).astype(np.int32)
  receivers = np.concatenate([ap_receivers, ue_receivers]).astype(np.int32)
  edge_type = np.repeat(np.array([0, 1]), [len(ap_senders), len(ue_senders)])
  globals_1xG = np.array([[
      ap_mask_L.sum() / NETWORK_SCALE,
      ue_mask_K.sum() / NETWORK_SCALE,
      n_L[ap_mask_L].mean() / ANTENNA_SCALE,
      aps_of_ue_K[ue_mask_K].mean() / CLUSTER_SCALE,
  ]], np.float32)
  return GraphsTuple(
      nodes={"x": x_nxF, "ap": ap_n.astype(np.int32), "ue": ue_n.astype(np.int32)},
      edges={"x": np.eye(2, dtype=np.float32)[edge_type]},
      senders=senders, receivers=receivers, globals={"x": globals_1xG},
      n_node=np.array([len(ap_n)], np.int32), n_edge=np.array([len(senders)], np.int32))


_GRAPH_KEYS = ("beta_SxLxK", "gamma_SxLxK", "serve_SxLxK", "ap_mask_SxL", "ue_mask_SxK")


def _host_arrays(data: dict, num_antennas):
  s, l, _ = _sizes(data, "link_graph")
  arrays = [np.asarray(data[k]) for k in _GRAPH_KEYS]
  return arrays, np.asarray(_antennas(num_antennas, s, l))


def link_graph(data: dict, s: int, *, num_antennas) -> GraphsTuple:
  """The serving-link graph of setup ``s``: one node per DCC link (l, k), edges between links that share an
  AP or a UE (both directions, never a self-loop).

  Nodes are in AP-major order. ``nodes["x"]`` float32 [n, 5] holds, in the order of ``NODE_FEATURES``:
  ``(beta_lk in dB - BETA_DB_CENTER) / BETA_DB_SCALE``, ``N_l / ANTENNA_SCALE``, ``|D_l| / CLUSTER_SCALE``,
  ``|M_k| / CLUSTER_SCALE`` and ``gamma_lk / beta_lk`` (the estimated fraction of the channel's variance,
  in [0, 1), low under pilot contamination); ``nodes["ap"]`` and ``nodes["ue"]`` are the int32 AP and UE
  indices in the setup arrays. ``edges["x"]`` is the float32 one-hot [e, 2] over ``EDGE_TYPES`` (same AP,
  same UE).
  ``globals["x"]`` float32 [1, 4] holds (``GLOBAL_FEATURES``) the real APs and UEs over NETWORK_SCALE, the
  mean antennas per real AP over ANTENNA_SCALE and the mean |M_k| over CLUSTER_SCALE.
  """
  arrays, n_SxL = _host_arrays(data, num_antennas)
  return check_graph(_link_graph(*(a[s] for a in arrays), n_SxL[s]), f"link_graph(setup {s})")


def link_graphs(data: dict, *, num_antennas) -> list[GraphsTuple]:
  """``link_graph`` of every setup, converting the arrays to numpy once."""
  arrays, n_SxL = _host_arrays(data, num_antennas)
  return [check_graph(_link_graph(*(a[s] for a in arrays), n_SxL[s]), f"link_graph(setup {s})")
          for s in range(n_SxL.shape[0])]


def links_to_dense(values_n, ap_n, ue_n, *, num_aps: int, num_ues: int, graph_n=None, num_graphs: int = 1,
                   mask_n=None) -> jax.Array:
  """Scatters per-link values (e.g. a GNN's rho) into dense [num_graphs, num_aps, num_ues]; jit-able.

  ``graph_n`` is each node's graph (``jaxlab.graph.node_graph_ids`` of a padded batch); masked nodes and
  indices out of range are dropped, and links absent from the graph stay 0.
  """
  values_n = jnp.asarray(values_n)
  graph_n = jnp.zeros_like(ap_n) if graph_n is None else graph_n
  keep = jnp.ones(values_n.shape, bool) if mask_n is None else mask_n
  dense = jnp.zeros((num_graphs, num_aps, num_ues), values_n.dtype)
  return dense.at[graph_n, ap_n, ue_n].add(jnp.where(keep, values_n, 0), mode="drop")
