"""PONITA: separable group convolutions on position-orientation space R³×S² (and its R³ / point-cloud modes).

Dense padded layout: a batch holds B graphs of at most N nodes, ``node_mask_BxN`` marks real nodes, and the
graph is fully connected with self-loops among real nodes (optionally cut off at ``radius``). Features live on
``x_BxNxOxC`` (nodes × orientations × channels). Symbols follow the PONITA reference:

  spatial basis  B_s = GELU(Lin(GELU(Lin(Poly(a1, a2)))))            [B, N, N−1, O, K] and [K]
  fibre basis    B_f = GELU(Lin(GELU(Lin(Poly(⟨o_p, o_q⟩)))))        [O, O, K]
  conv           x1_i(o) = Σ_j Lin_s(B_s)_ij(o) ⊙ x_j(o)             (spatial, depthwise)
                 x2_i(p) = 1/O Σ_o x1_i(o) ⊙ Lin_f(B_f)(o, p) + b    (fibre, depthwise)
  block          x ← x + γ · MLP(LayerNorm(conv(x)))                 (ConvNeXt)

The spatial basis is split into the N−1 pairs of each receiver with another node (``[B,N,N−1,O,K]``, see
``geometry.other_nodes``) and the self-loop, whose relative position is 0 and whose basis is therefore one
vector ``[K]`` for all nodes, orientations and graphs. The sum is the same as over all N×N pairs; the kernel
matmuls, the largest cost of a step, shrink by a factor (N−1)/N.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.ponita import geometry


def gelu(x):
  """Exact GELU ``x·Φ(x)``, torch's default (jax.nn.gelu defaults to the tanh approximation).

  Written with ``erf``: XLA lowers ``jax.nn.gelu(approximate=False)`` through ``erfc``, which costs about
  twice as much per element on CPU; the values agree to float32 rounding.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_grad(x):
  """d GELU(x)/dx = Φ(x) + x·φ(x)."""
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return cdf + x * pdf


def mode_for(num_ori: int) -> str:
  return "fiber_bundle" if num_ori > 0 else ("point_cloud" if num_ori == -1 else "position")


class KernelBasis(nnx.Module):
  """``GELU(Lin_{C→K}(GELU(Lin_{D→C}(Poly(a)))))``, computed once per forward and shared by all layers."""

  def __init__(self, attr_dim: int, hidden: int, basis_dim: int, degree: int, *, dtype, rngs: nnx.Rngs):
    self.degree = degree
    in_dim = sum(attr_dim**k for k in range(1, degree + 1))
    self.linear_in = nnx.Linear(in_dim, hidden, dtype=dtype, rngs=rngs)
    self.linear_out = nnx.Linear(hidden, basis_dim, dtype=dtype, rngs=rngs)

  def __call__(self, attr):
    return gelu(self.linear_out(gelu(self.linear_in(geometry.polynomial_features(attr, self.degree)))))

  def with_vjp(self, attr):
    """The basis and its pullback to the attributes, written out explicitly.

    Force training differentiates ``∂E/∂x`` once more with respect to the weights. Letting autodiff take the
    reverse-over-reverse path through this MLP (E·O rows, K wide) is the most expensive part of a PONITA step;
    the explicit pullback below is plain first-order code, so the outer gradient is an ordinary backward pass.
    """
    poly, poly_vjp = jax.vjp(lambda a: geometry.polynomial_features(a, self.degree), attr)
    z1 = self.linear_in(poly)
    z2 = self.linear_out(gelu(z1))
    w_in = self.linear_in.kernel[...].astype(z1.dtype)
    w_out = self.linear_out.kernel[...].astype(z2.dtype)

    def pullback(g_basis):
      g_h1 = (g_basis * gelu_grad(z2)) @ w_out.T
      g_poly = (g_h1 * gelu_grad(z1)) @ w_in.T
      return poly_vjp(g_poly)[0]

    return gelu(z2), pullback


def _masked_std(x_BxNxOxC, node_mask_BxN):
  """Unbiased std over all real-node entries (the reference calibrates with a global ``tensor.std()``)."""
  m = node_mask_BxN[:, :, None, None].astype(x_BxNxOxC.dtype)
  count = jnp.sum(m) * x_BxNxOxC.shape[2] * x_BxNxOxC.shape[3]
  mean = jnp.sum(x_BxNxOxC * m) / count
  return jnp.sqrt(jnp.sum(m * (x_BxNxOxC - mean)**2) / (count - 1))


class SeparableConv(nnx.Module):
  """Depthwise spatial convolution over neighbours followed by a depthwise convolution over the fibre."""

  def __init__(self, channels: int, basis_dim: int, fiber: bool, *, dtype, rngs: nnx.Rngs):
    self.spatial_kernel = nnx.Linear(basis_dim, channels, use_bias=False, dtype=dtype, rngs=rngs)
    self.fiber_kernel = nnx.Linear(basis_dim, channels, use_bias=False, dtype=dtype, rngs=rngs) if fiber else None
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x_BxNxOxC, spatial_basis, fiber_basis_OxOxK, node_mask_BxN, calibrate=False):
    """``spatial_basis = (self_loop, pairs)``: ``[..., K]`` broadcastable to ``[B,N,O,K]``, and ``[B,N,N−1,O,K]``."""
    self_basis, pair_basis_BxNxMxOxK = spatial_basis
    x_BxNxOxC = x_BxNxOxC * node_mask_BxN[:, :, None, None].astype(x_BxNxOxC.dtype)  # padded senders send 0
    k1_BxNxMxOxC = self.spatial_kernel(pair_basis_BxNxMxOxK)
    x1 = (self.spatial_kernel(self_basis) * x_BxNxOxC
          + jnp.sum(k1_BxNxMxOxC * geometry.other_nodes(x_BxNxOxC), axis=2))
    if calibrate:
      scale = _masked_std(x_BxNxOxC, node_mask_BxN) / _masked_std(x1, node_mask_BxN)
      self.spatial_kernel.kernel[...] = self.spatial_kernel.kernel[...] * scale
      x1 = x1 * scale
    if self.fiber_kernel is not None:
      k2_OxOxC = self.fiber_kernel(fiber_basis_OxOxK)
      num_ori = k2_OxOxC.shape[0]
      x2 = jnp.einsum("bnoc,poc->bnpc", x1, k2_OxOxC) / num_ori
      if calibrate:
        scale = _masked_std(x1, node_mask_BxN) / _masked_std(x2, node_mask_BxN)
        self.fiber_kernel.kernel[...] = self.fiber_kernel.kernel[...] * scale
        x2 = x2 * scale
    else:
      x2 = x1
    return x2 + self.bias[...].astype(x2.dtype)


class ConvNextBlock(nnx.Module):

  def __init__(self, channels: int, basis_dim: int, fiber: bool, widening: int, layer_scale: float | None, *,
               dtype, rngs: nnx.Rngs):
    self.conv = SeparableConv(channels, basis_dim, fiber, dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(channels, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.linear_1 = nnx.Linear(channels, widening * channels, dtype=dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(widening * channels, channels, dtype=dtype, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((channels,), layer_scale, jnp.float32)) if layer_scale else None

  def __call__(self, x, spatial_basis, fiber_basis, node_mask, calibrate=False):
    y = self.conv(x, spatial_basis, fiber_basis, node_mask, calibrate)
    y = self.linear_2(gelu(self.linear_1(self.norm(y))))
    if self.layer_scale is not None:
      y = y * self.layer_scale[...].astype(y.dtype)
    return x + y


class Ponita(nnx.Module):
  """PONITA / PNITA with scalar and vector inputs and outputs.

  ``num_ori > 0``: fibre-bundle mode on a Fibonacci grid of ``num_ori`` orientations (the main model);
  ``num_ori = -1``: point-cloud mode (each node carries its own orientation, given as ``node_ori``);
  ``num_ori = 0``: PNITA, plain distance-conditioned convolution on R³ (scalar inputs and outputs only).
  """

  def __init__(self, *, num_scalar_in: int, num_vector_in: int, num_scalar_out: int, num_vector_out: int,
               hidden: int = 128, basis_dim: int = 256, degree: int = 3, num_layers: int = 5, num_ori: int = 20,
               widening: int = 4, layer_scale: float | None = None, multiple_readouts: bool = True,
               radius: float | None = None, global_pool: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    if num_ori < -1:
      raise ValueError(f"num_ori must be > 0 (fibre bundle), -1 (point cloud) or 0 (PNITA), got {num_ori}")
    self.mode = mode_for(num_ori)
    if self.mode == "position" and (num_vector_in or num_vector_out):
      raise ValueError("PNITA (num_ori = 0) has no orientation axis: it takes and returns scalars only")
    self.num_ori = num_ori
    self.num_scalar_out, self.num_vector_out = num_scalar_out, num_vector_out
    self.radius, self.global_pool, self.multiple_readouts = radius, global_pool, multiple_readouts
    self.dtype = dtype
    self.grid = nnx.Variable(jnp.asarray(geometry.fibonacci_grid(num_ori))) if num_ori > 0 else None
    attr_dim = {"fiber_bundle": 2, "point_cloud": 3, "position": 1}[self.mode]
    self.spatial_basis = KernelBasis(attr_dim, hidden, basis_dim, degree, dtype=dtype, rngs=rngs)
    fiber = self.mode == "fiber_bundle"
    self.fiber_basis = KernelBasis(1, hidden, basis_dim, degree, dtype=dtype, rngs=rngs) if fiber else None
    self.embedder = nnx.Linear(num_scalar_in + num_vector_in, hidden, use_bias=False, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([ConvNextBlock(hidden, basis_dim, fiber, widening, layer_scale, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])
    num_readouts = num_layers if multiple_readouts else 1
    self.readouts = nnx.List([nnx.Linear(hidden, num_scalar_out + num_vector_out, dtype=dtype, rngs=rngs)
                              for _ in range(num_readouts)])

  # ----- geometry ------------------------------------------------------------------------------------------
  def orientations(self, grid_rotation_Bx3x3=None, node_ori_BxNx3=None):
    """The orientations each node's fibre is sampled at: ``[O,3]``, ``[B,O,3]`` (rotated grid) or ``[B,N,1,3]``."""
    if self.mode == "fiber_bundle":
      grid = self.grid[...]
      if grid_rotation_Bx3x3 is not None:
        grid = jnp.einsum("bxy,oy->box", grid_rotation_Bx3x3, grid)
      return grid
    if self.mode == "point_cloud":
      if node_ori_BxNx3 is None:
        raise ValueError("point-cloud mode (num_ori = -1) needs node_ori, one unit orientation per node")
      return node_ori_BxNx3[:, :, None, :]
    return None

  def _geometry(self, pos_BxNx3, node_mask_BxN, grid_rotation_Bx3x3=None, node_ori_BxNx3=None):
    """Attributes of each receiver's pairs with the other nodes ``[B,N,N−1,O,A]`` and the radial envelope
    ``[B,N,N−1]`` (None without a radius).

    Padded nodes need no pair mask here: every conv zeroes padded senders, so they reach no real node.
    """
    rel = geometry.pair_relative_positions(pos_BxNx3)
    if self.mode == "fiber_bundle":
      attr = geometry.fiber_bundle_spatial_attributes(rel, self.orientations(grid_rotation_Bx3x3))
    elif self.mode == "point_cloud":
      ori = self.orientations(None, node_ori_BxNx3)[:, :, 0]
      attr = geometry.point_cloud_attributes(rel, ori, geometry.other_nodes(ori))
    else:
      attr = geometry.position_attributes(rel)
    envelope = None
    if self.radius is not None:
      envelope = geometry.polynomial_envelope(geometry.safe_norm(rel) / self.radius).astype(self.dtype)
    return attr.astype(self.dtype), envelope

  def self_loop_basis(self, node_ori_BxNx3=None):
    """The spatial basis of a self-loop (relative position 0, envelope 1): ``[1,1,1,K]``, or ``[B,N,1,K]`` in
    point-cloud mode, where its attribute ``⟨o_i, o_i⟩`` is computed from the given orientations."""
    if self.mode == "point_cloud":
      ori = self.orientations(None, node_ori_BxNx3)[:, :, 0]
      sq = jnp.sum(ori * ori, axis=-1)
      attr = jnp.stack([jnp.zeros_like(sq), jnp.zeros_like(sq), sq], axis=-1)[:, :, None, :]
    else:
      attr = jnp.zeros((1, 1, 1, 2 if self.mode == "fiber_bundle" else 1), jnp.float32)
    return self.spatial_basis(attr.astype(self.dtype))

  def fiber_basis_value(self):
    if self.mode != "fiber_bundle":
      return None
    return self.fiber_basis(geometry.fiber_attributes(self.grid[...]).astype(self.dtype))

  def bases(self, pos_BxNx3, node_mask_BxN, grid_rotation_Bx3x3=None, node_ori_BxNx3=None):
    """Spatial basis ``(self_loop, pairs)`` (``[..., K]`` and ``[B,N,N−1,O,K]``, zero beyond the radius) and
    fibre basis ``[O,O,K]``."""
    attr, envelope = self._geometry(pos_BxNx3, node_mask_BxN, grid_rotation_Bx3x3, node_ori_BxNx3)
    pairs = self.spatial_basis(attr)
    if envelope is not None:
      pairs = pairs * envelope[:, :, :, None, None]
    return (self.self_loop_basis(node_ori_BxNx3), pairs), self.fiber_basis_value()

  def lift(self, scalars_BxNxS, vectors_BxNxVx3, orientations):
    """Scalars are constant over the fibre; a vector v becomes the function ``o ↦ ⟨v, o⟩``."""
    b, n = scalars_BxNxS.shape[:2]
    o = 1 if orientations is None else orientations.shape[-2]
    parts = [jnp.broadcast_to(scalars_BxNxS[:, :, None, :], (b, n, o, scalars_BxNxS.shape[-1]))]
    if vectors_BxNxVx3 is not None and vectors_BxNxVx3.shape[2]:
      if orientations.ndim == 2:
        parts.append(jnp.einsum("bnvx,ox->bnov", vectors_BxNxVx3, orientations))
      elif orientations.ndim == 3:
        parts.append(jnp.einsum("bnvx,box->bnov", vectors_BxNxVx3, orientations))
      else:
        parts.append(jnp.einsum("bnvx,bnox->bnov", vectors_BxNxVx3, orientations))
    return jnp.concatenate(parts, axis=-1).astype(self.dtype)

  # ----- forward -------------------------------------------------------------------------------------------
  def from_bases(self, spatial, fiber, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN, orientations,
                 calibrate: bool = False):
    """The network on precomputed kernel bases: lift, embed, ConvNeXt blocks, readouts, pooling."""
    x = self.embedder(self.lift(scalars_BxNxS, vectors_BxNxVx3, orientations))
    readout_sum = 0.0
    for i, block in enumerate(self.blocks):
      x = block(x, spatial, fiber, node_mask_BxN, calibrate)
      if self.multiple_readouts:
        readout_sum = readout_sum + self.readouts[i](x)
    readout = readout_sum / len(self.blocks) if self.multiple_readouts else self.readouts[0](x)
    readout = readout.astype(jnp.float32) * node_mask_BxN[:, :, None, None]
    s, v = self.num_scalar_out, self.num_vector_out
    scalar_out = jnp.mean(readout[..., :s], axis=2)
    vector_out = None
    if v:
      f_BxNxOxV = readout[..., s:s + v]
      if orientations.ndim == 2:
        vector_out = jnp.einsum("bnov,ox->bnvx", f_BxNxOxV, orientations) / orientations.shape[0]
      elif orientations.ndim == 3:
        vector_out = jnp.einsum("bnov,box->bnvx", f_BxNxOxV, orientations) / orientations.shape[1]
      else:
        vector_out = jnp.einsum("bnov,bnox->bnvx", f_BxNxOxV, orientations)
    if self.global_pool:
      scalar_out = jnp.sum(scalar_out, axis=1)
      vector_out = None if vector_out is None else jnp.sum(vector_out, axis=1)
    return scalar_out, vector_out

  def __call__(self, pos_BxNx3, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN, grid_rotation_Bx3x3=None,
               node_ori_BxNx3=None, calibrate: bool = False):
    """Returns ``(scalar_out, vector_out)``: ``[B,S]`` and ``[B,V,3]`` with global pooling (sum over real
    nodes), else ``[B,N,S]`` and ``[B,N,V,3]`` (zero at padded nodes)."""
    node_mask_BxN = node_mask_BxN.astype(bool)
    orientations = self.orientations(grid_rotation_Bx3x3, node_ori_BxNx3)
    spatial, fiber = self.bases(pos_BxNx3, node_mask_BxN, grid_rotation_Bx3x3, node_ori_BxNx3)
    return self.from_bases(spatial, fiber, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN, orientations, calibrate)

  def energy_and_forces(self, pos_BxNx3, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN,
                        grid_rotation_Bx3x3=None):
    """Per-graph energy ``[B]`` (first scalar output, summed over nodes) and forces ``F = −∂E/∂x`` ``[B,N,3]``.

    The same numbers as ``-jax.grad`` of :meth:`__call__`, but the pullback through the kernel-basis MLP is
    written out (see :meth:`KernelBasis.with_vjp`), which makes training on forces several times cheaper.
    """
    if self.mode == "point_cloud" or not self.global_pool:
      def energy(p):
        s, _ = self(p, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN, grid_rotation_Bx3x3)
        return jnp.sum(s[:, 0]), s[:, 0]
      grad, e = jax.grad(energy, has_aux=True)(pos_BxNx3)
      return e, -grad
    node_mask_BxN = node_mask_BxN.astype(bool)
    (attr, envelope), geometry_vjp = jax.vjp(
        lambda p: self._geometry(p, node_mask_BxN, grid_rotation_Bx3x3), pos_BxNx3)
    raw, basis_vjp = self.spatial_basis.with_vjp(attr)
    fiber = self.fiber_basis_value()
    self_loop = self.self_loop_basis()
    orientations = self.orientations(grid_rotation_Bx3x3)

    def energy(pairs):
      s, _ = self.from_bases((self_loop, pairs), fiber, scalars_BxNxS, vectors_BxNxVx3, node_mask_BxN,
                             orientations)
      return jnp.sum(s[:, 0]), s[:, 0]

    if envelope is None:
      g_spatial, e = jax.grad(energy, has_aux=True)(raw)
      (g_pos,) = geometry_vjp((basis_vjp(g_spatial), None))
    else:
      g_spatial, e = jax.grad(energy, has_aux=True)(raw * envelope[:, :, :, None, None])
      g_attr = basis_vjp(g_spatial * envelope[:, :, :, None, None])
      (g_pos,) = geometry_vjp((g_attr, jnp.sum(g_spatial * raw, axis=(3, 4))))
    return e, -g_pos


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def calibrate(model: Ponita, pos, scalars, vectors, node_mask, **kw) -> None:
  """Data-dependent init: rescale each conv's kernels so ``std(x1) = std(x)`` and ``std(x2) = std(x1)``.

  Runs eagerly, block by block in one forward pass, so each block is calibrated on the output of the already
  calibrated blocks before it. Conv outputs are linear in the kernel weights, so rescaling the output in
  place equals recomputing it with the rescaled weights.
  """
  model(pos, scalars, vectors, node_mask, calibrate=True, **kw)
