"""MU-MISO downlink precoders: MRT, ZF, RZF (exact and by conjugate gradient), the optimal beamforming structure
and WMMSE (spec §2.2, §2.5).

Shapes: ``H_BxKxN`` complex with row k = ``h_kᴴ``; precoders ``W_BxNxK`` with column k = ``w_k``. Leading batch
dimensions are free. ``P`` (total power) and ``sigma2`` (noise variance) are scalars or one value per sample.
Optional ``user_mask [B, K]`` / ``antenna_mask [B, N]`` mark the real entries of zero-padded channels: padded users
get zero precoders, padded antennas zero rows, and every matrix that is inverted gets a unit diagonal on padded
users (WMMSE's pseudo-inverse drops their zero singular values), so padding changes no real number. "K" below is
the number of real users of a sample.

Power normalisations (they change the SE, spec pitfall 6): ``"total"`` scales W to ``‖W‖_F² = P`` (the default and
the convention of the spec's §2.2/§7 tables); ``"per_column"`` gives every real user's column the power P/K.

The functions check sizes and powers on host values before tracing and are jittable; under ``jax.jit`` with
traced arguments the host checks are skipped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.icgnn.channels import apply_masks
from jaxlab.icgnn.metrics import abs2, sinr, spectral_efficiency

NORMALIZATIONS = ("total", "per_column")
DOMAINS = ("auto", "user", "antenna")
WMMSE_INITS = ("rzf", "zf", "mrt")


# ----- host checks --------------------------------------------------------------------------------------------


def _host_value(x):
  """``x`` as a numpy array, or None when it is traced (the check is then left to the caller's data)."""
  if x is None:
    return None
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def _check_positive(name: str, value, allow_zero: bool = False):
  host = _host_value(value)
  if host is None:
    return
  bad = ~np.isfinite(host) | ((host < 0) if allow_zero else (host <= 0))
  if np.any(bad):
    kind = "non-negative" if allow_zero else "positive"
    raise ValueError(f"{name} must be finite and {kind}, got {host if host.size <= 8 else host[bad][:8]}")


def _check_normalization(normalization: str):
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _check_iters(name: str, iters) -> int:
  if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
    raise ValueError(f"{name} must be a non-negative Python integer (it fixes the unrolled length), got {iters!r}")
  return int(iters)


def _check_zf_sizes(H_BxKxN, user_mask, antenna_mask):
  """ZF needs as many antennas as users in every sample: on static shapes, or on host masks when given."""
  num_users, num_antennas = np.shape(H_BxKxN)[-2:]
  if user_mask is None and antenna_mask is None:
    if num_users > num_antennas:
      raise ValueError(f"ZF needs K <= N, got K={num_users} users and N={num_antennas} antennas")
    return
  users = _host_value(user_mask) if user_mask is not None else np.array(True)
  antennas = _host_value(antenna_mask) if antenna_mask is not None else np.array(True)
  if users is None or antennas is None:
    return
  try:
    users_B = np.broadcast_to(users.astype(bool), np.shape(H_BxKxN)[:-1]).sum(-1)
    antennas_B = np.broadcast_to(antennas.astype(bool), (*np.shape(H_BxKxN)[:-2], num_antennas)).sum(-1)
  except ValueError:
    return  # apply_masks reports the mismatched shape
  users_B, antennas_B = np.broadcast_arrays(users_B, antennas_B)
  bad = np.argwhere(users_B > antennas_B)
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"ZF needs K <= N, got K={users_B[index]} users and N={antennas_B[index]} antennas "
                     f"in sample {index if len(index) > 1 else index[0]} ({len(bad)} samples affected)")


# ----- shared pieces ------------------------------------------------------------------------------------------


def _per_sample(x, batch_shape, dtype):
  return jnp.broadcast_to(jnp.asarray(x, dtype), batch_shape)


def _hermitian(X):
  return jnp.conj(jnp.swapaxes(X, -1, -2))


def _safe_sqrt(x):
  """``sqrt(x)`` for x > 0, else 0, with a zero (not NaN) gradient at and below 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _safe_sqrt_ratio(num, den):
  """``sqrt(num/den)`` where both are positive, else 0, with finite gradients at 0 (zero powers, zero columns)."""
  positive = (num > 0) & (den > 0)
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, num, 1.0) / jnp.where(positive, den, 1.0)), 0.0)


def _normalize(W_BxNxK, P, user_mask, normalization):
  real_dtype = user_mask.dtype
  P_B = _per_sample(P, user_mask.shape[:-1], real_dtype)
  if normalization == "total":
    norm2_B = jnp.sum(abs2(W_BxNxK), axis=(-2, -1))
    return W_BxNxK * _safe_sqrt_ratio(P_B, norm2_B)[..., None, None].astype(W_BxNxK.dtype)
  norm2_BxK = jnp.sum(abs2(W_BxNxK), axis=-2)
  target_B = P_B / jnp.maximum(jnp.sum(user_mask, axis=-1), 1.0)
  scale_BxK = _safe_sqrt_ratio(target_B[..., None], norm2_BxK) * user_mask
  return W_BxNxK * scale_BxK[..., None, :].astype(W_BxNxK.dtype)


def normalize_power(W_BxNxK, P=1.0, normalization: str = "total", user_mask=None) -> jax.Array:
  """Scales a precoder to ``‖W‖_F² = P`` ("total") or to power P/K on every real user's column ("per_column").

  Zero columns (padded or switched-off users) stay zero; the gradient is finite everywhere.
  """
  _check_normalization(normalization)
  _check_positive("P", P)
  W_BxNxK = jnp.asarray(W_BxNxK)
  if not jnp.iscomplexobj(W_BxNxK):
    W_BxNxK = W_BxNxK.astype(jnp.complex64)
  real_dtype = W_BxNxK.real.dtype
  if user_mask is None:
    user_mask = jnp.ones(W_BxNxK.shape[:-2] + W_BxNxK.shape[-1:], real_dtype)
  user_mask = jnp.broadcast_to(jnp.asarray(user_mask, bool), W_BxNxK.shape[:-2] + W_BxNxK.shape[-1:])
  W_BxNxK = W_BxNxK * user_mask[..., None, :].astype(W_BxNxK.dtype)
  return _normalize(W_BxNxK, P, user_mask.astype(real_dtype), normalization)


def _gram_BxKxK(H_BxKxN):
  return H_BxKxN @ _hermitian(H_BxKxN)


def _diag_embed(d_BxK):
  return d_BxK[..., :, None] * jnp.eye(d_BxK.shape[-1], dtype=d_BxK.dtype)


def _default_alpha(P, sigma2, user_mask):
  """RZF regularisation ``alpha = K sigma2 / P`` with K the number of real users of each sample."""
  batch_shape = user_mask.shape[:-1]
  dtype = user_mask.dtype
  return jnp.sum(user_mask, -1) * _per_sample(sigma2, batch_shape, dtype) / _per_sample(P, batch_shape, dtype)


def _regularized_gram(H_BxKxN, alpha, user_mask):
  """``H Hᴴ + alpha I`` on real users, a unit diagonal on padded ones."""
  alpha_B = _per_sample(alpha, user_mask.shape[:-1], user_mask.dtype)
  diagonal_BxK = alpha_B[..., None] * user_mask + (1.0 - user_mask)
  return _gram_BxKxK(H_BxKxN) + _diag_embed(diagonal_BxK).astype(H_BxKxN.dtype)


# ----- linear precoders ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("normalization",))
def _mrt(H_BxKxN, P, user_mask, antenna_mask, normalization):
  H_BxKxN, user_mask, _ = apply_masks(H_BxKxN, user_mask, antenna_mask)
  return _normalize(_hermitian(H_BxKxN), P, user_mask, normalization)


def mrt(H_BxKxN, P=1.0, *, user_mask=None, antenna_mask=None, normalization: str = "total") -> jax.Array:
  """Maximum-ratio transmission ``W = Hᴴ``, normalised: ``[B, N, K]``."""
  _check_positive("P", P)
  _check_normalization(normalization)
  return _mrt(H_BxKxN, P, user_mask, antenna_mask, normalization)


@functools.partial(jax.jit, static_argnames=("normalization",))
def _rzf(H_BxKxN, P, sigma2, alpha, user_mask, antenna_mask, normalization):
  H_BxKxN, user_mask, _ = apply_masks(H_BxKxN, user_mask, antenna_mask)
  if alpha is None:
    alpha = _default_alpha(P, sigma2, user_mask)
  X_BxKxN = jnp.linalg.solve(_regularized_gram(H_BxKxN, alpha, user_mask), H_BxKxN)
  return _normalize(_hermitian(X_BxKxN), P, user_mask, normalization)


def zf(H_BxKxN, P=1.0, *, user_mask=None, antenna_mask=None, normalization: str = "total") -> jax.Array:
  """Zero forcing ``W = Hᴴ (H Hᴴ)⁻¹``, normalised: ``[B, N, K]``. Needs K <= N in every sample."""
  _check_positive("P", P)
  _check_normalization(normalization)
  _check_zf_sizes(H_BxKxN, user_mask, antenna_mask)
  return _rzf(H_BxKxN, P, 1.0, 0.0, user_mask, antenna_mask, normalization)


def rzf(H_BxKxN, P=1.0, sigma2=1.0, alpha=None, *, user_mask=None, antenna_mask=None,
        normalization: str = "total") -> jax.Array:
  """Regularised ZF ``W = Hᴴ (H Hᴴ + alpha I)⁻¹``, normalised: ``[B, N, K]``.

  ``alpha`` defaults to ``K sigma2 / P`` (K real users per sample), the MMSE choice for equal user powers.
  """
  _check_positive("P", P)
  _check_positive("sigma2", sigma2)
  _check_normalization(normalization)
  if alpha is not None:
    _check_positive("alpha", alpha, allow_zero=True)
  return _rzf(H_BxKxN, P, sigma2, alpha, user_mask, antenna_mask, normalization)


# ----- conjugate gradient -------------------------------------------------------------------------------------


def cg_solve(matvec, b, iters: int, x0=None, preconditioner=None) -> jax.Array:
  """Fixed-iteration (preconditioned) conjugate gradient for Hermitian positive-definite systems ``A x = b``.

  ``b [..., n, m]``: the inner products run over axis -2, so every column and every leading index is its own
  system with its own step sizes (alpha, beta). ``matvec(x)`` returns ``A x`` for ``x`` of b's shape.
  ``preconditioner`` is None, the diagonal of A (Jacobi; positive, broadcastable to b, e.g. ``[..., n, 1]``) or a
  callable ``r ↦ M⁻¹ r``. ``x0`` (default 0) is the initial point.

  The loop is a ``lax.scan`` of exactly ``iters`` steps, so reverse-mode differentiation unrolls it. A column whose
  residual has reached float precision (``rᴴz <= eps² bᴴM⁻¹b + sqrt(tiny)``), including a zero right-hand side,
  is frozen: alpha = beta = 0 instead of 0/0, with a second ``where`` on each denominator so that neither the
  forward nor the backward pass produces NaN (spec pitfall 3). The floor sqrt(tiny) keeps every squared
  denominator of the backward pass a normal float.
  """
  iters = _check_iters("iters", iters)
  b = jnp.asarray(b)
  if b.ndim < 2:
    raise ValueError(f"b must have shape [..., n, m] (use b[..., None] for one right-hand side), got {b.shape}")
  real_dtype = b.real.dtype
  if preconditioner is None:
    apply_preconditioner = lambda r: r
  elif callable(preconditioner):
    apply_preconditioner = preconditioner
  else:
    diagonal = jnp.asarray(preconditioner)
    apply_preconditioner = lambda r: r / diagonal.astype(r.dtype)

  def dot(u, v):
    return jnp.real(jnp.sum(jnp.conj(u) * v, axis=-2))

  finfo = jnp.finfo(real_dtype)
  floor_abs = np.sqrt(finfo.tiny).astype(real_dtype)
  floor = jax.lax.stop_gradient(finfo.eps ** 2 * dot(b, apply_preconditioner(b)) + floor_abs)
  if x0 is None:
    x = jnp.zeros_like(b)
    r = b
  else:
    x = jnp.broadcast_to(jnp.asarray(x0, b.dtype), b.shape)
    r = b - matvec(x)
  z = apply_preconditioner(r)
  rz = dot(r, z)

  def step(carry, _):
    x, r, p, rz = carry
    Ap = matvec(p)
    pAp = dot(p, Ap)
    live = (rz > floor) & (pAp > floor_abs)
    alpha = jnp.where(live, rz / jnp.where(live, pAp, 1.0), 0.0)[..., None, :]
    x = x + alpha * p
    r = r - alpha * Ap
    z = apply_preconditioner(r)
    rz_new = dot(r, z)
    beta = jnp.where(live, rz_new / jnp.where(live, rz, 1.0), 0.0)[..., None, :]
    return (x, r, z + beta * p, rz_new), None

  (x, _, _, _), _ = jax.lax.scan(step, (x, r, z, rz), None, length=iters)
  return x


@functools.partial(jax.jit, static_argnames=("iters", "normalization", "jacobi"))
def _rzf_cg(H_BxKxN, P, sigma2, alpha, user_mask, antenna_mask, iters, normalization, jacobi):
  H_BxKxN, user_mask, _ = apply_masks(H_BxKxN, user_mask, antenna_mask)
  if alpha is None:
    alpha = _default_alpha(P, sigma2, user_mask)
  A_BxKxK = _regularized_gram(H_BxKxN, alpha, user_mask)
  rhs_BxKxK = _diag_embed(user_mask).astype(H_BxKxN.dtype)
  diagonal = jnp.real(jnp.diagonal(A_BxKxK, axis1=-2, axis2=-1))[..., None] if jacobi else None
  Y_BxKxK = cg_solve(lambda Y: A_BxKxK @ Y, rhs_BxKxK, iters, preconditioner=diagonal)
  return _normalize(_hermitian(H_BxKxN) @ Y_BxKxK, P, user_mask, normalization)


def rzf_cg(H_BxKxN, P=1.0, sigma2=1.0, iters: int = 8, alpha=None, *, user_mask=None, antenna_mask=None,
           normalization: str = "total", jacobi: bool = False) -> jax.Array:
  """RZF with the inverse replaced by ``iters`` steps of conjugate gradient: ``[B, N, K]``.

  Solved in the user domain: ``(H Hᴴ + alpha I) Y = I_K`` (K right-hand sides e_k), then ``W = Hᴴ Y``; in exact
  arithmetic ``Y = (H Hᴴ + alpha I)⁻¹`` and ``Yᴴ H`` solves ``(H Hᴴ + alpha I) X = H``. With the unit vectors as
  right-hand sides an iteration costs O(K²) per user whatever N is, and the truncated iterates are those of the
  spec's §2.2 check (it reproduces its seed-0 row N=64, K=8 exactly). Exact after K steps in exact arithmetic.
  ``jacobi=True`` preconditions with the diagonal ``‖h_k‖² + alpha``.
  """
  _check_positive("P", P)
  _check_positive("sigma2", sigma2)
  _check_normalization(normalization)
  iters = _check_iters("iters", iters)
  if alpha is not None:
    _check_positive("alpha", alpha, allow_zero=True)
  return _rzf_cg(H_BxKxN, P, sigma2, alpha, user_mask, antenna_mask, iters, normalization, bool(jacobi))


# ----- optimal beamforming structure --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cg_iters", "domain", "jacobi"))
def _optimal_structure(H_BxKxN, p_BxK, lam_BxK, sigma2, user_mask, antenna_mask, cg_iters, domain, jacobi):
  H_BxKxN, user_mask, _ = apply_masks(H_BxKxN, user_mask, antenna_mask)
  dtype = H_BxKxN.dtype
  real_dtype = user_mask.dtype
  batch_shape = user_mask.shape[:-1]
  sigma2_B = _per_sample(sigma2, batch_shape, real_dtype)
  p_BxK = jnp.broadcast_to(jnp.asarray(p_BxK, real_dtype), user_mask.shape) * user_mask
  lam_BxK = jnp.broadcast_to(jnp.asarray(lam_BxK, real_dtype), user_mask.shape) * user_mask
  H_herm_BxNxK = _hermitian(H_BxKxN)
  if domain == "user":
    sqrt_lam_BxK = _safe_sqrt(lam_BxK)
    S_BxKxK = (sqrt_lam_BxK[..., :, None] * _gram_BxKxK(H_BxKxN) * sqrt_lam_BxK[..., None, :]
               + _diag_embed(sigma2_B[..., None] * user_mask + (1.0 - user_mask)).astype(dtype))
    rhs_BxKxK = _diag_embed(user_mask).astype(dtype)
    if cg_iters is None:
      Z_BxKxK = jnp.linalg.solve(S_BxKxK, rhs_BxKxK)
    else:
      diagonal = jnp.real(jnp.diagonal(S_BxKxK, axis1=-2, axis2=-1))[..., None] if jacobi else None
      Z_BxKxK = cg_solve(lambda Z: S_BxKxK @ Z, rhs_BxKxK, cg_iters, preconditioner=diagonal)
    V_BxNxK = (H_herm_BxNxK * sqrt_lam_BxK[..., None, :].astype(dtype)) @ Z_BxKxK
  else:
    def matvec(X_BxNxK):
      return sigma2_B[..., None, None] * X_BxNxK + H_herm_BxNxK @ (lam_BxK[..., :, None] * (H_BxKxN @ X_BxNxK))

    if cg_iters is None:
      num_antennas = H_BxKxN.shape[-1]
      A_BxNxN = (sigma2_B[..., None, None] * jnp.eye(num_antennas, dtype=real_dtype)).astype(dtype)
      A_BxNxN = A_BxNxN + H_herm_BxNxK @ (lam_BxK[..., :, None] * H_BxKxN)
      V_BxNxK = jnp.linalg.solve(A_BxNxN, H_herm_BxNxK)
    else:
      diagonal = None
      if jacobi:
        diagonal = (sigma2_B[..., None] + jnp.sum(lam_BxK[..., :, None] * abs2(H_BxKxN), axis=-2))[..., None]
      V_BxNxK = cg_solve(matvec, H_herm_BxNxK, cg_iters, preconditioner=diagonal)
  norm2_BxK = jnp.sum(abs2(V_BxNxK), axis=-2)
  scale_BxK = _safe_sqrt_ratio(p_BxK, norm2_BxK)
  return V_BxNxK * scale_BxK[..., None, :].astype(dtype)


def optimal_structure(H_BxKxN, p_BxK, lam_BxK, sigma2=1.0, cg_iters: int | None = None, *, user_mask=None,
                      antenna_mask=None, domain: str = "auto", jacobi: bool = False) -> jax.Array:
  """The optimal beamforming structure ``w_k = √p_k v_k/‖v_k‖``, ``v_k = (σ² I_N + Σ_i λ_i h_i h_iᴴ)⁻¹ h_k``.

  ``p_BxK`` are the user powers (the precoder's total power is Σ p_k, so a network normalises them to P) and
  ``lam_BxK`` the virtual uplink powers; both must be positive on real users (padded entries are ignored).
  ``cg_iters=None`` solves exactly with a linear solve; an integer runs that many CG steps. ``domain``:

  - ``"antenna"``: ``(σ² I_N + Hᴴ Λ H) V = Hᴴ``, K right-hand sides of length N, matrix-free mat-vec O(NK).
  - ``"user"``: the push-through identity ``(σ² I_N + HᴴΛH)⁻¹ HᴴΛ^{1/2} = HᴴΛ^{1/2}(σ² I_K + Λ^{1/2}GΛ^{1/2})⁻¹``
    with ``G = H Hᴴ``; solve ``(σ² I_K + Λ^{1/2}GΛ^{1/2}) Z = I_K`` and take ``V = HᴴΛ^{1/2} Z`` (column k is v_k
    scaled by √λ_k, which the normalisation removes). It needs λ > 0.
  - ``"auto"`` (default): the user domain when N >= K (padded sizes), else the antenna domain. For N >= K the
    K×K system is the smaller one: an iteration costs O(K²) per right-hand side instead of O(NK), a direct
    solve O(K³) instead of O(N³), and, since the N-domain iterates stay in the K-dimensional range of Hᴴ, both
    reach the exact solution within K steps.

  With ``p = λ = P/K`` this is RZF with ``alpha = K σ²/P`` and per-column power normalisation; with CG in the
  user domain it equals ``rzf_cg(..., normalization="per_column")`` step for step.
  """
  if domain not in DOMAINS:
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
  if cg_iters is not None:
    cg_iters = _check_iters("cg_iters", cg_iters)
  _check_positive("sigma2", sigma2)
  for name, value in (("p", p_BxK), ("lam", lam_BxK)):
    host = _host_value(value)
    if host is None:
      continue
    mask = _host_value(user_mask)
    if mask is not None:
      host = np.where(np.broadcast_to(mask.astype(bool), np.broadcast_shapes(mask.shape, host.shape)), host, 1.0)
    _check_positive(name, host)
  if domain == "auto":
    domain = "user" if np.shape(H_BxKxN)[-1] >= np.shape(H_BxKxN)[-2] else "antenna"
  return _optimal_structure(H_BxKxN, p_BxK, lam_BxK, sigma2, user_mask, antenna_mask, cg_iters, domain,
                            bool(jacobi))


# ----- WMMSE --------------------------------------------------------------------------------------------------


def _wmmse_round(H_BxKxN, W_BxNxK, P_B, sigma2_B, weights_BxK, user_mask, bisection_steps):
  """One WMMSE round (Shi et al. 2011 with single-antenna users): receivers, weights, then the transmit update.

  Receivers ``u_k = h_kᴴw_k / (Σ_j |h_kᴴw_j|² + σ²)``, weights ``ω_k = 1/MSE_k = 1 + SINR_k`` (no division by a
  vanishing MSE), and ``W(μ) = (Σ_l a_l ω_l |u_l|² h_l h_lᴴ + μ I)⁻¹ [a_k ω_k u_k h_k]_k`` (a = user weights).
  With ``d_k = a_k ω_k |u_k|²``, ``e_k = √(a_k ω_k) u_k/|u_k|`` and ``F = D^{1/2} H`` this is
  ``W(μ) = (FᴴF + μ I)⁻¹ Fᴴ E``; the thin SVD ``F = U Σ Vᴴ`` gives ``W(μ) = V diag(σ_i/(σ_i² + μ)) Uᴴ E`` and
  ``‖W(μ)‖² = Σ_i σ_i² |(UᴴE)_i|² / (σ_i² + μ)²`` for the bisection on μ. Decomposing F rather than the Gram
  matrix ``F Fᴴ`` keeps float32 accurate at K = N and high SNR, where the Gram's condition number (the square of
  F's) exceeds 1/eps. A user switched off (``u_k → 0``, common at K = N and high SNR) has d_k = 0 and a zero
  column; its phase is set to 1 and singular values at float noise level are dropped (a pseudo-inverse), so
  nothing divides by 0. Padded users have zero weight and hence zero rows of F.
  """
  dtype = H_BxKxN.dtype
  real_dtype = user_mask.dtype
  num_users, num_antennas = H_BxKxN.shape[-2:]
  tiny = jnp.finfo(real_dtype).tiny
  HW_BxKxK = H_BxKxN @ W_BxNxK
  signal_BxK = jnp.diagonal(HW_BxKxK, axis1=-2, axis2=-1)
  signal2_BxK = abs2(signal_BxK)
  off_diagonal = 1.0 - jnp.eye(num_users, dtype=real_dtype)
  noise_BxK = jnp.sum(abs2(HW_BxKxK) * off_diagonal * user_mask[..., None, :], axis=-1) + sigma2_B[..., None]
  u_BxK = signal_BxK / (noise_BxK + signal2_BxK).astype(dtype)
  omega_BxK = 1.0 + signal2_BxK / noise_BxK
  u_abs_BxK = jnp.abs(u_BxK)
  live = u_abs_BxK > tiny
  phase_BxK = jnp.where(live, u_BxK / jnp.where(live, u_abs_BxK, 1.0).astype(dtype), 1.0)
  e_BxK = jnp.sqrt(weights_BxK * omega_BxK).astype(dtype) * phase_BxK
  sqrt_d_BxK = jnp.sqrt(weights_BxK * omega_BxK) * u_abs_BxK
  F_BxKxN = sqrt_d_BxK[..., :, None].astype(dtype) * H_BxKxN
  U_BxKxR, sv_BxR, Vh_BxRxN = jnp.linalg.svd(F_BxKxN, full_matrices=False)
  Phi_BxRxK = _hermitian(U_BxKxR) * e_BxK[..., None, :]
  phi2_BxR = jnp.sum(abs2(Phi_BxRxK), axis=-1)
  rank_floor_B = max(num_users, num_antennas) * jnp.finfo(real_dtype).eps * jnp.max(sv_BxR, axis=-1)
  keep_BxR = sv_BxR > rank_floor_B[..., None]
  sv_BxR = jnp.where(keep_BxR, sv_BxR, 0.0)

  def gain(mu_B):
    shifted = sv_BxR ** 2 + mu_B[..., None]
    return jnp.where(keep_BxR, sv_BxR / jnp.where(keep_BxR, shifted, 1.0), 0.0)

  def power(mu_B):
    return jnp.sum(gain(mu_B) ** 2 * phi2_BxR, axis=-1)

  def bisect(_, bounds):
    low_B, high_B = bounds
    mid_B = 0.5 * (low_B + high_B)
    feasible = power(mid_B) <= P_B
    return jnp.where(feasible, low_B, mid_B), jnp.where(feasible, mid_B, high_B)

  high_B = jnp.sqrt(jnp.sum(sv_BxR ** 2 * phi2_BxR, axis=-1) / P_B)
  _, high_B = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.zeros_like(high_B), high_B))
  constrained = power(jnp.zeros_like(high_B)) > P_B
  mu_B = jnp.where(constrained, high_B, 0.0)
  W_BxNxK = _hermitian(Vh_BxRxN) @ (gain(mu_B)[..., :, None].astype(dtype) * Phi_BxRxK)
  norm2_B = jnp.sum(abs2(W_BxNxK), axis=(-2, -1))
  scale_B = jnp.where(constrained, _safe_sqrt_ratio(P_B, norm2_B), 1.0)
  return W_BxNxK * scale_B[..., None, None].astype(dtype)


@functools.partial(jax.jit, static_argnames=("iters", "init", "bisection_steps"))
def _wmmse(H_BxKxN, P, sigma2, W0_BxNxK, weights, user_mask, antenna_mask, tol, iters, init, bisection_steps):
  H_BxKxN, user_mask, antenna_mask = apply_masks(H_BxKxN, user_mask, antenna_mask)
  real_dtype = user_mask.dtype
  batch_shape = user_mask.shape[:-1]
  P_B = _per_sample(P, batch_shape, real_dtype)
  sigma2_B = _per_sample(sigma2, batch_shape, real_dtype)
  weights_BxK = user_mask if weights is None else jnp.broadcast_to(jnp.asarray(weights, real_dtype),
                                                                   user_mask.shape) * user_mask
  if init == "mrt":
    W_BxNxK = _mrt(H_BxKxN, P_B, user_mask, antenna_mask, "total")
  elif init == "zf":
    W_BxNxK = _rzf(H_BxKxN, P_B, sigma2_B, 0.0, user_mask, antenna_mask, "total")
  elif init == "rzf":
    W_BxNxK = _rzf(H_BxKxN, P_B, sigma2_B, None, user_mask, antenna_mask, "total")
  else:
    W_BxNxK = jnp.asarray(W0_BxNxK, H_BxKxN.dtype) * (antenna_mask[..., :, None] * user_mask[..., None, :])
    W_BxNxK = _normalize(W_BxNxK, P_B, user_mask, "total")

  def objective(W):
    return jnp.sum(weights_BxK * spectral_efficiency(sinr(H_BxKxN, W, sigma2_B, user_mask), user_mask), axis=-1)

  def body(carry):
    t, W, value, active, count, history = carry
    W_new = _wmmse_round(H_BxKxN, W, P_B, sigma2_B, weights_BxK, user_mask, bisection_steps)
    value_new = objective(W_new)
    change = jnp.abs(value_new - value) / jnp.maximum(jnp.abs(value), jnp.finfo(real_dtype).tiny)
    W = jnp.where(active[..., None, None], W_new, W)
    value = jnp.where(active, value_new, value)
    count = count + active.astype(jnp.int32)
    active = active & ~(change < tol)
    return t + 1, W, value, active, count, history.at[t + 1].set(value)

  def running(carry):
    t, _, _, active, _, _ = carry
    return (t < iters) & jnp.any(active)

  value0 = objective(W_BxNxK)
  history = jnp.broadcast_to(value0, (iters + 1, *batch_shape))
  carry = (0, W_BxNxK, value0, jnp.ones(batch_shape, bool), jnp.zeros(batch_shape, jnp.int32), history)
  t, W_BxNxK, value, active, count, history = jax.lax.while_loop(running, body, carry)
  history = jnp.where(jnp.arange(iters + 1).reshape(-1, *(1,) * len(batch_shape)) > t, value, history)
  return W_BxNxK, {"sum_se": history, "iterations": count, "converged": ~active}


def wmmse(H_BxKxN, P=1.0, sigma2=1.0, *, iters: int = 200, tol: float = 1e-4, init="rzf", weights=None,
          user_mask=None, antenna_mask=None, bisection_steps: int = 40):
  """Weighted sum-rate WMMSE for MU-MISO (Shi, Razaviyayn, Luo, He, TSP 2011), batched and jittable.

  At most ``iters`` rounds with static shapes: a sample freezes once the relative change of its weighted sum-SE
  falls below ``tol`` (the spec's §7 rule: tol 1e-4, at most 200 rounds, RZF start), and the ``lax.while_loop``
  ends when every sample of the batch is frozen, with the same result as running all rounds. ``init`` is "rzf",
  "zf", "mrt" or an initial precoder ``[B, N, K]`` (rescaled to total power P). ``weights [B, K]`` are the user
  priorities (default 1). The power multiplier μ >= 0 comes from ``bisection_steps`` bisection steps; when μ > 0
  the update is rescaled to ‖W‖_F² = P exactly (otherwise the power constraint is inactive and ‖W‖_F² <= P).

  Returns ``(W [B, N, K], info)`` with ``info["sum_se"] [iters+1, B]`` the weighted sum-SE after each round
  (index 0: the initial precoder; frozen samples repeat their last value), ``info["iterations"] [B]`` the rounds
  each sample ran before it froze (``iters`` if it never did) and ``info["converged"] [B]`` whether it met ``tol``.
  Frozen samples still cost compute until the last sample of the batch freezes. Not differentiable (while_loop).
  """
  iters = _check_iters("iters", iters)
  bisection_steps = _check_iters("bisection_steps", bisection_steps)
  _check_positive("P", P)
  _check_positive("sigma2", sigma2)
  _check_positive("tol", tol, allow_zero=True)
  if weights is not None:
    _check_positive("weights", weights, allow_zero=True)
  W0_BxNxK = None
  if isinstance(init, str):
    if init not in WMMSE_INITS:
      raise ValueError(f"init must be one of {WMMSE_INITS} or a precoder array, got {init!r}")
    if init == "zf":
      _check_zf_sizes(H_BxKxN, user_mask, antenna_mask)
  else:
    W0_BxNxK = jnp.asarray(init)
    expected = (*np.shape(H_BxKxN)[:-2], np.shape(H_BxKxN)[-1], np.shape(H_BxKxN)[-2])
    if W0_BxNxK.shape != expected:
      raise ValueError(f"init precoder must have shape {expected} for H of shape {np.shape(H_BxKxN)}, "
                       f"got {W0_BxNxK.shape}")
    init = None
  return _wmmse(H_BxKxN, P, sigma2, W0_BxNxK, weights, user_mask, antenna_mask, tol, iters, init, bisection_steps)
