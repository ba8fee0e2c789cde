"""Seeded single-cell MU-MISO channels (spec §3(a)) and the padding/mask convention shared by the package.

``H_BxKxN`` is complex, row k is ``h_kᴴ`` (user k's conjugated channel), so ``(H W)[k, j] = h_kᴴ w_j``.
Samples with fewer users or antennas than the batch budget (K_max, N_max) are zero-padded; ``user_mask_BxK`` and
``antenna_mask_BxN`` (bool) mark the real entries. Everything here is jittable for fixed sizes; the sizes and the
correlation coefficient are host values (they fix shapes or constants), validated before any tracing.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PaddedChannels(NamedTuple):
  """Channels padded to a budget with the masks of their real users and antennas."""
  H_BxKxN: jax.Array
  user_mask_BxK: jax.Array
  antenna_mask_BxN: jax.Array


def _positive_int(name: str, value) -> int:
  try:
    as_int = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
  if as_int <= 0:
    raise ValueError(f"{name} must be a positive integer, got {as_int}")
  return as_int


def _correlation_coefficient(rho) -> float:
  rho = float(rho)
  if not 0.0 <= rho < 1.0:
    raise ValueError(f"rho must lie in [0, 1), got {rho}")
  return rho


def _size_range(name: str, value) -> tuple[int, int]:
  try:
    low, high = value
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an inclusive (low, high) pair of positive integers, got {value!r}") from None
  low, high = _positive_int(f"{name}[0]", low), _positive_int(f"{name}[1]", high)
  if high < low:
    raise ValueError(f"{name} must have low <= high, got {value!r}")
  return low, high


def exponential_correlation(num_antennas: int, rho: float) -> np.ndarray:
  """Transmit correlation ``R_ij = rho^|i-j|`` of a uniform linear array (float64, host side)."""
  num_antennas = _positive_int("num_antennas", num_antennas)
  rho = _correlation_coefficient(rho)
  index = np.arange(num_antennas)
  return rho ** np.abs(index[:, None] - index[None, :]).astype(np.float64)


def rayleigh(key: jax.Array, batch: int, num_users: int, num_antennas: int, dtype=jnp.complex64) -> jax.Array:
  """I.i.d. CN(0, 1) channels ``H = (X + iY)/√2`` with X, Y ~ N(0, 1): shape [batch, num_users, num_antennas]."""
  shape = (_positive_int("batch", batch), _positive_int("num_users", num_users),
           _positive_int("num_antennas", num_antennas))
  real_dtype = jnp.finfo(dtype).dtype
  key_re, key_im = jax.random.split(key)
  re = jax.random.normal(key_re, shape, real_dtype)
  im = jax.random.normal(key_im, shape, real_dtype)
  return (jax.lax.complex(re, im) / np.sqrt(2.0).astype(real_dtype)).astype(dtype)


def correlated_rayleigh(key: jax.Array, batch: int, num_users: int, num_antennas: int, rho: float,
                        dtype=jnp.complex64) -> jax.Array:
  """Rayleigh channels with exponential transmit correlation: ``H = H_iid R^{1/2}``, ``R_ij = rho^|i-j|``.

  Each user's channel then has covariance ``E[h_k h_kᴴ] = R`` (``R^{1/2}`` is the symmetric square root, real since
  R is real symmetric). rho = 0 gives i.i.d. channels.
  """
  correlation = exponential_correlation(num_antennas, rho)
  eigval, eigvec = np.linalg.eigh(correlation)
  sqrt_correlation = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
  H_iid = rayleigh(key, batch, num_users, num_antennas, dtype)
  return H_iid @ jnp.asarray(sqrt_correlation, jnp.finfo(dtype).dtype).astype(dtype)


def pad_channels(H_BxKxN: jax.Array, K_max: int, N_max: int) -> PaddedChannels:
  """Zero-pads ``H [B, K, N]`` to ``[B, K_max, N_max]`` and returns it with its user and antenna masks."""
  H_BxKxN = jnp.asarray(H_BxKxN)
  if H_BxKxN.ndim != 3:
    raise ValueError(f"H must have shape [B, K, N], got {H_BxKxN.shape}")
  batch, num_users, num_antennas = H_BxKxN.shape
  K_max, N_max = _positive_int("K_max", K_max), _positive_int("N_max", N_max)
  if K_max < num_users:
    raise ValueError(f"K_max={K_max} is smaller than the number of users K={num_users}")
  if N_max < num_antennas:
    raise ValueError(f"N_max={N_max} is smaller than the number of antennas N={num_antennas}")
  H_padded = jnp.pad(H_BxKxN, ((0, 0), (0, K_max - num_users), (0, N_max - num_antennas)))
  user_mask_BxK = jnp.broadcast_to(jnp.arange(K_max) < num_users, (batch, K_max))
  antenna_mask_BxN = jnp.broadcast_to(jnp.arange(N_max) < num_antennas, (batch, N_max))
  return PaddedChannels(H_padded, user_mask_BxK, antenna_mask_BxN)


def sample_sizes(key: jax.Array, batch: int, user_range: tuple[int, int], antenna_range: tuple[int, int], *,
                 rho: float = 0.0, K_max: int | None = None, N_max: int | None = None,
                 dtype=jnp.complex64) -> PaddedChannels:
  """A batch of channels whose per-sample (K, N) are drawn uniformly from inclusive ranges, padded to a budget.

  ``user_range = (K_low, K_high)`` and ``antenna_range = (N_low, N_high)``; the budget defaults to the upper ends.
  With ``rho > 0`` the real antennas of each sample have exponential correlation ``rho^|i-j|``. The correlated
  channel is drawn as ``H_iid Lᵀ`` with ``R = L Lᵀ`` (Cholesky): the same distribution as ``H_iid R^{1/2}``, but the
  leading n×n block of the factor is the factor of the n-antenna R, so truncating to a sample's first n antennas
  is exact and one factor serves every N in the batch.
  """
  batch = _positive_int("batch", batch)
  K_low, K_high = _size_range("user_range", user_range)
  N_low, N_high = _size_range("antenna_range", antenna_range)
  K_max = K_high if K_max is None else _positive_int("K_max", K_max)
  N_max = N_high if N_max is None else _positive_int("N_max", N_max)
  if K_max < K_high:
    raise ValueError(f"K_max={K_max} is smaller than the largest user count {K_high} of user_range")
  if N_max < N_high:
    raise ValueError(f"N_max={N_max} is smaller than the largest antenna count {N_high} of antenna_range")
  rho = _correlation_coefficient(rho)
  key_users, key_antennas, key_channel = jax.random.split(key, 3)
  num_users_B = jax.random.randint(key_users, (batch,), K_low, K_high + 1)
  num_antennas_B = jax.random.randint(key_antennas, (batch,), N_low, N_high + 1)
  user_mask_BxK = jnp.arange(K_max)[None, :] < num_users_B[:, None]
  antenna_mask_BxN = jnp.arange(N_max)[None, :] < num_antennas_B[:, None]
  H_BxKxN = rayleigh(key_channel, batch, K_max, N_max, dtype)
  if rho > 0.0:
    factor = np.linalg.cholesky(exponential_correlation(N_max, rho))
    H_BxKxN = H_BxKxN @ jnp.asarray(factor.T, jnp.finfo(dtype).dtype).astype(dtype)
  H_BxKxN = H_BxKxN * (user_mask_BxK[:, :, None] & antenna_mask_BxN[:, None, :])
  return PaddedChannels(H_BxKxN, user_mask_BxK, antenna_mask_BxN)


def apply_masks(H_BxKxN, user_mask_BxK=None, antenna_mask_BxN=None):
  """Complex H with padded users and antennas zeroed, and the masks as real 0/1 arrays (all ones when omitted).

  Leading batch dimensions are free (``H [..., K, N]``, masks ``[..., K]`` and ``[..., N]`` broadcast against
  them). The real masks multiply into sums and diagonals, which keeps padded entries out without branches.
  """
  H_BxKxN = jnp.asarray(H_BxKxN)
  if H_BxKxN.ndim < 2:
    raise ValueError(f"H must have shape [..., K, N], got {H_BxKxN.shape}")
  if not jnp.iscomplexobj(H_BxKxN):
    H_BxKxN = H_BxKxN.astype(jnp.complex64)
  real_dtype = H_BxKxN.real.dtype
  *batch_shape, num_users, num_antennas = H_BxKxN.shape
  masks = []
  for name, mask, size in (("user_mask", user_mask_BxK, num_users), ("antenna_mask", antenna_mask_BxN, num_antennas)):
    if mask is None:
      masks.append(jnp.ones((*batch_shape, size), real_dtype))
      continue
    mask = jnp.asarray(mask)
    try:
      mask = jnp.broadcast_to(mask, (*batch_shape, size))
    except ValueError:
      raise ValueError(f"{name} of shape {mask.shape} does not match H of shape {H_BxKxN.shape} "
                       f"(expected {(*batch_shape, size)})") from None
    masks.append(mask.astype(bool).astype(real_dtype))
  user_mask, antenna_mask = masks
  H_BxKxN = H_BxKxN * (user_mask[..., :, None] * antenna_mask[..., None, :]).astype(H_BxKxN.dtype)
  return H_BxKxN, user_mask, antenna_mask
