"""Orientation grids, invariant attributes ("bi-invariants") and the polynomial kernel basis inputs.

Conventions: ``rel[b, i, j] = x_j − x_i`` with i the receiver and j the sender (all pairs ``[B,N,N,3]``, or the
N−1 other nodes of each receiver ``[B,N,N−1,3]`` as the model uses them); orientation grids are
``[O, 3]`` (shared) or ``[B, O, 3]`` (rotated per graph).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def fibonacci_grid(n: int) -> np.ndarray:
  """The deterministic Fibonacci lattice on S² with ``n`` points: ``[n, 3]`` float32, unit norm."""
  if n <= 0:
    raise ValueError(f"fibonacci_grid needs a positive number of points, got {n}")
  i = np.arange(n, dtype=np.float64)
  theta = np.mod(np.pi * i * (1.0 + math.sqrt(5.0)), 2.0 * np.pi)
  phi = np.arccos(1.0 - 2.0 * (i + 0.5) / n)
  grid = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=-1)
  return grid.astype(np.float32)


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """Euclidean norm whose gradient is 0 (not NaN) at the zero vector, to any order.

  Self-loops give ``rel = 0`` and ``rel − ⟨rel,o⟩o`` vanishes whenever ``rel ∥ o``; a plain norm would poison
  force training (a second derivative) with NaNs there.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def random_rotations(key: jax.Array, n: int) -> jax.Array:
  """``n`` Haar-random rotation matrices ``[n, 3, 3]`` (QR of Gaussian matrices with the sign fixed)."""
  a = jax.random.normal(key, (n, 3, 3))
  q, r = jnp.linalg.qr(a)
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  det = jnp.linalg.det(q)
  return q.at[:, :, 0].multiply(det[:, None])


def relative_positions(pos_BxNx3: jax.Array) -> jax.Array:
  """All pairs, ``[B,N,N,3]``: ``rel[b, i, j] = x_j − x_i``."""
  return pos_BxNx3[:, None, :, :] - pos_BxNx3[:, :, None, :]


def other_nodes(x: jax.Array) -> jax.Array:
  """Each node's N−1 other nodes in cyclic order: ``[B,N,…] → [B,N,N−1,…]`` with entry ``(i, s−1)`` holding
  ``x[(i+s) mod N]`` for s = 1…N−1.

  Self-loops are kept out of the pair tensors: a self-loop's relative position is 0, so its kernel is the same
  for every node, orientation and graph and is computed once (see ``Ponita.self_loop_basis``).
  """
  n = x.shape[1]
  if n == 1:
    return jnp.zeros((x.shape[0], 1, 0) + x.shape[2:], x.dtype)
  return jnp.stack([jnp.roll(x, -s, axis=1) for s in range(1, n)], axis=2)


def pair_relative_positions(pos_BxNx3: jax.Array) -> jax.Array:
  """``[B,N,N−1,3]``: ``x_j − x_i`` for each receiver i and each other node j, in the order of :func:`other_nodes`."""
  return other_nodes(pos_BxNx3) - pos_BxNx3[:, :, None, :]


def fiber_bundle_spatial_attributes(rel_BxNxMx3: jax.Array, grid: jax.Array) -> jax.Array:
  """``[a1, a2]`` per edge and grid orientation: ``a1 = ⟨rel, o⟩``, ``a2 = ‖rel − a1·o‖``; ``[B,N,M,O,2]``."""
  if grid.ndim == 2:
    a1 = jnp.einsum("bijx,ox->bijo", rel_BxNxMx3, grid)
    perp = rel_BxNxMx3[:, :, :, None, :] - a1[..., None] * grid[None, None, None]
  else:
    a1 = jnp.einsum("bijx,box->bijo", rel_BxNxMx3, grid)
    perp = rel_BxNxMx3[:, :, :, None, :] - a1[..., None] * grid[:, None, None]
  return jnp.stack([a1, safe_norm(perp)], axis=-1)


def fiber_attributes(grid_Ox3: jax.Array) -> jax.Array:
  """``⟨o_p, o_q⟩`` between grid points, ``[O, O, 1]``; invariant to a common rotation of the grid."""
  return (grid_Ox3 @ grid_Ox3.T)[..., None]


def point_cloud_attributes(rel_BxNxMx3: jax.Array, ori_recv_BxNx3: jax.Array,
                           ori_send_BxNxMx3: jax.Array) -> jax.Array:
  """Point-cloud mode (one orientation per node): ``[⟨rel,o_i⟩, ‖rel − ⟨rel,o_i⟩o_i‖, ⟨o_j,o_i⟩]``, ``[B,N,M,1,3]``
  for M senders per receiver (``ori_send`` holds the senders' orientations)."""
  o_recv = ori_recv_BxNx3[:, :, None, :]
  a1 = jnp.sum(rel_BxNxMx3 * o_recv, axis=-1)
  a2 = safe_norm(rel_BxNxMx3 - a1[..., None] * o_recv)
  a3 = jnp.sum(ori_send_BxNxMx3 * o_recv, axis=-1)
  return jnp.stack([a1, a2, a3], axis=-1)[:, :, :, None, :]


def position_attributes(rel_BxNxMx3: jax.Array) -> jax.Array:
  """R³ mode (PNITA): the distance alone, ``[B,N,M,1,1]``."""
  return safe_norm(rel_BxNxMx3)[:, :, :, None, None]


def polynomial_features(x: jax.Array, degree: int = 3) -> jax.Array:
  """``[x, x⊗x, x⊗x⊗x, …]`` flattened over the last axis, up to ``degree`` (2-d input, degree 3 → 14)."""
  if degree < 1:
    raise ValueError(f"polynomial degree must be >= 1, got {degree}")
  feats, term = [x], x
  for _ in range(degree - 1):
    term = (term[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
    feats.append(term)
  return jnp.concatenate(feats, axis=-1)


def polynomial_envelope(d: jax.Array, p: int = 6) -> jax.Array:
  """DimeNet's smooth cutoff ``1 − (p+1)(p+2)/2·d^p + p(p+2)·d^(p+1) − p(p+1)/2·d^(p+2)`` for d < 1, else 0."""
  env = 1.0 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d**(p + 1) - p * (p + 1) / 2 * d**(p + 2)
  return jnp.where(d < 1.0, env, 0.0)
