"""SINR and spectral efficiency of MU-MISO downlink precoding (spec §2.1), and per-user SE CDF plots.

``SINR_k = |h_kᴴ w_k|² / (Σ_{j≠k} |h_kᴴ w_j|² + σ²)`` with ``H_BxKxN`` (row k = h_kᴴ) and ``W_BxNxK`` (column k =
w_k); ``SE_k = log2(1 + SINR_k)`` in bit/s/Hz. Padded users have SINR and SE 0 and their precoders, even if
nonzero, cause no interference.
"""
from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.icgnn.channels import apply_masks


def abs2(x):
  """``|x|²`` as ``re² + im²``: no square root, so its gradient is finite at 0."""
  return jnp.real(x) ** 2 + jnp.imag(x) ** 2


@jax.jit
def sinr(H_BxKxN, W_BxNxK, sigma2=1.0, user_mask=None, antenna_mask=None) -> jax.Array:
  """Per-user SINR ``[B, K]``; ``sigma2`` is a scalar or one noise variance per sample ``[B]``."""
  H_BxKxN, user_mask, _ = apply_masks(H_BxKxN, user_mask, antenna_mask)
  W_BxNxK = jnp.asarray(W_BxNxK, H_BxKxN.dtype)
  if W_BxNxK.shape[-2:] != H_BxKxN.shape[-2:][::-1]:
    raise ValueError(f"W must have shape [..., N, K] = [..., {H_BxKxN.shape[-1]}, {H_BxKxN.shape[-2]}] "
                     f"for H of shape {H_BxKxN.shape}, got {W_BxNxK.shape}")
  gain_BxKxK = abs2(H_BxKxN @ W_BxNxK)
  num_users = gain_BxKxK.shape[-1]
  signal_BxK = jnp.diagonal(gain_BxKxK, axis1=-2, axis2=-1)
  off_diagonal = 1.0 - jnp.eye(num_users, dtype=gain_BxKxK.dtype)
  interference_BxK = jnp.sum(gain_BxKxK * off_diagonal * user_mask[..., None, :], axis=-1)
  sigma2 = jnp.asarray(sigma2, gain_BxKxK.dtype)[..., None]
  return signal_BxK / (interference_BxK + sigma2) * user_mask


def spectral_efficiency(sinr_BxK, user_mask=None) -> jax.Array:
  """``log2(1 + SINR)`` per user ``[B, K]``, 0 on padded users."""
  se_BxK = jnp.log1p(sinr_BxK) / np.log(2.0).astype(np.float32)
  if user_mask is not None:
    se_BxK = jnp.where(jnp.asarray(user_mask, bool), se_BxK, 0.0)
  return se_BxK


@jax.jit
def sum_se(H_BxKxN, W_BxNxK, sigma2=1.0, user_mask=None, antenna_mask=None) -> jax.Array:
  """Sum spectral efficiency over the real users of each sample ``[B]`` (bit/s/Hz)."""
  return jnp.sum(spectral_efficiency(sinr(H_BxKxN, W_BxNxK, sigma2, user_mask, antenna_mask), user_mask), axis=-1)


def percentile_se(se_BxK, user_mask=None, q=5) -> jax.Array:
  """The q-th percentile of the per-user SE pooled over all real users of the batch (a scalar).

  The 5th percentile is the cell-edge figure of merit of cell-free evaluations (spec §4).
  """
  se_BxK = jnp.asarray(se_BxK)
  if user_mask is not None:
    se_BxK = jnp.where(jnp.asarray(user_mask, bool), se_BxK, jnp.nan)
  return jnp.nanpercentile(se_BxK.reshape(-1), q)


def se_cdf_plot(curves: dict, path: str, title: str = "", xlabel: str = "per-user SE (bit/s/Hz)") -> str:
  """Empirical CDFs of per-user SE, one line per entry of ``curves`` (name → 1-D array), written as a PNG.

  The legend gives each curve's mean and 5th percentile. The file is written to a temporary name in the target
  folder and then renamed, so a reader never sees a half-written image.
  """
  if not curves:
    raise ValueError("se_cdf_plot needs at least one curve")
  arrays = {}
  for name, values in curves.items():
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
      raise ValueError(f"curve {name!r} must be a non-empty 1-D array of per-user SE, got shape {values.shape}")
    arrays[name] = np.sort(values)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for name, values in arrays.items():
    cdf = np.arange(1, values.size + 1) / values.size
    label = f"{name} (mean {values.mean():.2f}, 5% {np.percentile(values, 5):.2f})"
    ax.step(values, cdf, where="post", label=label)
  ax.set(xlabel=xlabel, ylabel="CDF", ylim=(0.0, 1.0), title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".se_cdf_", suffix=".png")
  os.close(handle)
  try:
    fig.savefig(tmp_path, dpi=110, format="png")
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  finally:
    plt.close(fig)
  return path
