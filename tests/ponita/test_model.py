"""PONITA model properties: symmetry, exact forces, padding, parameter count, calibration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.ponita import geometry
from jaxlab.ponita.model import Ponita, calibrate, count_params


def small_model(num_ori=8, **kw):
  args = dict(num_scalar_in=3, num_vector_in=0, num_scalar_out=1, num_vector_out=0, hidden=16, basis_dim=16,
              num_layers=2, num_ori=num_ori, rngs=nnx.Rngs(0))
  args.update(kw)
  return Ponita(**args)


def molecule_batch(b=3, n=6, seed=0, channels=3):
  rng = np.random.default_rng(seed)
  pos = jnp.asarray(rng.normal(size=(b, n, 3)), jnp.float32)
  scalars = jnp.asarray(np.eye(channels)[rng.integers(0, channels, (b, n))], jnp.float32)
  return pos, scalars, jnp.ones((b, n), bool)


def rotations(b, seed=1):
  return geometry.random_rotations(jax.random.key(seed), b)


def rotate(rot, x):
  return jnp.einsum("bxy,bny->bnx", rot, x)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def test_rmd17_default_has_the_reference_parameter_count():
  model = Ponita(num_scalar_in=9, num_vector_in=0, num_scalar_out=1, num_vector_out=0, num_ori=20,
                 rngs=nnx.Rngs(0))
  assert count_params(model) == 1_058_437


def test_fibonacci_grid_is_unit_and_spread():
  grid = geometry.fibonacci_grid(20)
  np.testing.assert_allclose(np.linalg.norm(grid, axis=-1), 1.0, rtol=1e-6)
  assert abs(float(np.linalg.norm(grid.mean(0)))) < 0.05
  dots = grid @ grid.T - 2 * np.eye(20)
  assert dots.max() < 0.9  # no two points nearly coincide


def test_random_rotations_are_proper():
  r = np.asarray(rotations(16))
  np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)


def test_polynomial_features_count_and_values():
  x = jnp.array([[2.0, 3.0]])
  f = geometry.polynomial_features(x, 3)
  assert f.shape == (1, 14)
  np.testing.assert_allclose(f[0, :6], [2, 3, 4, 6, 6, 9])
  assert geometry.polynomial_features(jnp.ones((1, 3)), 3).shape == (1, 39)


def test_energy_invariant_and_forces_equivariant_exactly_with_grid_rotated_along():
  model = small_model()
  pos, z, mask = molecule_batch()
  rot = rotations(pos.shape[0])
  t = jnp.array([0.3, -1.2, 2.0])
  e0, f0 = model.energy_and_forces(pos, z, None, mask, jnp.broadcast_to(jnp.eye(3), rot.shape))
  e1, f1 = model.energy_and_forces(rotate(rot, pos) + t, z, None, mask, rot)
  assert rel_err(e1, e0) < 1e-5
  assert rel_err(f1, rotate(rot, f0)) < 1e-4


def test_energy_invariance_with_fixed_grid_is_bounded():
  # A fixed grid is equivariant only approximately; the error shrinks with the number of orientations.
  pos, z, mask = molecule_batch(b=4)
  rot = rotations(4, seed=7)
  errors = {}
  for num_ori in (8, 32):
    model = small_model(num_ori=num_ori)
    calibrate(model, pos, z, None, mask)
    e0, _ = model(pos, z, None, mask)
    e1, _ = model(rotate(rot, pos), z, None, mask)
    errors[num_ori] = rel_err(e1, e0)
  assert errors[8] < 0.2, errors
  assert errors[32] < 0.05, errors
  assert errors[32] < errors[8]


def test_translation_invariance_with_fixed_grid():
  model = small_model()
  pos, z, mask = molecule_batch()
  e0, f0 = model.energy_and_forces(pos, z, None, mask)
  e1, f1 = model.energy_and_forces(pos + jnp.array([5.0, -3.0, 1.0]), z, None, mask)
  assert rel_err(e1, e0) < 1e-5 and rel_err(f1, f0) < 1e-4


def test_permutation_invariance_of_energy_and_equivariance_of_forces():
  model = small_model()
  pos, z, mask = molecule_batch()
  perm = np.random.default_rng(3).permutation(pos.shape[1])
  e0, f0 = model.energy_and_forces(pos, z, None, mask)
  e1, f1 = model.energy_and_forces(pos[:, perm], z[:, perm], None, mask)
  assert rel_err(e1, e0) < 1e-5
  assert rel_err(f1, f0[:, perm]) < 1e-4


@pytest.mark.parametrize("radius", [None, 2.5])
def test_explicit_force_path_equals_autodiff(radius):
  model = small_model(radius=radius)
  pos, z, mask = molecule_batch()

  def energy(p):
    s, _ = model(p, z, None, mask)
    return jnp.sum(s[:, 0])

  _, f = model.energy_and_forces(pos, z, None, mask)
  assert rel_err(f, -jax.grad(energy)(pos)) < 1e-5


def test_weight_gradients_of_force_loss_agree_between_paths():
  model = small_model()
  pos, z, mask = molecule_batch()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_explicit(p):
    _, f = nnx.merge(graphdef, p, rest).energy_and_forces(pos, z, None, mask)
    return jnp.sum(f**2)

  def loss_autodiff(p):
    m = nnx.merge(graphdef, p, rest)
    f = -jax.grad(lambda x: jnp.sum(m(x, z, None, mask)[0]))(pos)
    return jnp.sum(f**2)

  g1 = jax.grad(loss_explicit)(params)
  g2 = jax.grad(loss_autodiff)(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)


def test_forces_match_finite_differences_of_the_energy():
  model = small_model(num_ori=6)
  pos, z, mask = molecule_batch(b=1, n=4)
  _, f = model.energy_and_forces(pos, z, None, mask)
  eps = 1e-2
  energy = lambda p: float(model(p, z, None, mask)[0][0, 0])
  for atom, axis in [(0, 0), (1, 2), (3, 1)]:
    d = jnp.zeros_like(pos).at[0, atom, axis].set(eps)
    fd = -(energy(pos + d) - energy(pos - d)) / (2 * eps)
    assert abs(fd - float(f[0, atom, axis])) < 2e-2 * max(1.0, abs(fd)), (atom, axis, fd, float(f[0, atom, axis]))


def test_no_nan_in_forces_or_second_order_gradients_at_degenerate_geometry():
  model = small_model()
  grid = geometry.fibonacci_grid(8)
  # Atom 1 sits exactly along grid orientation 0 from atom 0, and atom 2 sits on top of atom 3: a2 = 0 and
  # rel = 0 beyond the self-loops.
  pos = jnp.asarray(np.stack([np.zeros(3), 1.5 * grid[0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])[None], jnp.float32)
  z = jnp.ones((1, 4, 3), jnp.float32) / 3
  mask = jnp.ones((1, 4), bool)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    _, f = nnx.merge(graphdef, p, rest).energy_and_forces(pos, z, None, mask)
    return jnp.sum(f**2)

  with jax.debug_nans(True):
    value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_padded_atoms_change_nothing():
  model = small_model()
  pos, z, mask = molecule_batch(b=2, n=5)
  pad_pos = jnp.concatenate([pos, 100.0 * jnp.ones((2, 3, 3))], axis=1)
  pad_z = jnp.concatenate([z, jnp.ones((2, 3, 3))], axis=1)
  pad_mask = jnp.concatenate([mask, jnp.zeros((2, 3), bool)], axis=1)
  e0, f0 = model.energy_and_forces(pos, z, None, mask)
  e1, f1 = model.energy_and_forces(pad_pos, pad_z, None, pad_mask)
  assert rel_err(e1, e0) < 1e-5
  assert rel_err(f1[:, :5], f0) < 1e-4
  assert float(jnp.max(jnp.abs(f1[:, 5:]))) == 0.0


def test_vector_output_is_equivariant_with_grid_rotated_along():
  model = small_model(num_scalar_in=1, num_vector_in=1, num_scalar_out=0, num_vector_out=1, global_pool=False,
                      layer_scale=1e-2)
  rng = np.random.default_rng(5)
  pos = jnp.asarray(rng.normal(size=(3, 5, 3)), jnp.float32)
  vel = jnp.asarray(rng.normal(size=(3, 5, 1, 3)), jnp.float32)
  q = jnp.asarray(rng.choice([-1.0, 1.0], size=(3, 5, 1)), jnp.float32)
  mask = jnp.ones((3, 5), bool)
  rot = rotations(3)
  _, v0 = model(pos, q, vel, mask, jnp.broadcast_to(jnp.eye(3), rot.shape))
  _, v1 = model(rotate(rot, pos), q, jnp.einsum("bxy,bnvy->bnvx", rot, vel), mask, rot)
  assert rel_err(v1, jnp.einsum("bxy,bnvy->bnvx", rot, v0)) < 1e-4


@pytest.mark.parametrize("num_ori", [0, -1])
def test_pnita_and_point_cloud_modes_are_invariant(num_ori):
  model = small_model(num_ori=num_ori)
  pos, z, mask = molecule_batch()
  rot = rotations(pos.shape[0])
  if num_ori == -1:
    # each node's orientation points to the centroid of the others: an equivariant choice
    def ori(p):
      d = jnp.mean(p, axis=1, keepdims=True) - p
      return d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    e0, _ = model(pos, z, None, mask, node_ori_BxNx3=ori(pos))
    e1, _ = model(rotate(rot, pos), z, None, mask, node_ori_BxNx3=ori(rotate(rot, pos)))
  else:
    e0, _ = model(pos, z, None, mask)
    e1, _ = model(rotate(rot, pos), z, None, mask)
  assert rel_err(e1, e0) < 1e-5


def test_pnita_rejects_vectors():
  with pytest.raises(ValueError, match="PNITA"):
    small_model(num_ori=0, num_vector_in=1)


def dense_spatial_conv(model, conv, x, pos, mask, node_ori=None):
  """The spatial step over all N×N pairs, self-loops included, straight from the definition."""
  rel = geometry.relative_positions(pos)
  if model.mode == "fiber_bundle":
    attr = geometry.fiber_bundle_spatial_attributes(rel, model.orientations())
  elif model.mode == "point_cloud":
    attr = geometry.point_cloud_attributes(rel, node_ori, jnp.broadcast_to(node_ori[:, None], rel.shape))
  else:
    attr = geometry.position_attributes(rel)
  basis = model.spatial_basis(attr)
  if model.radius is not None:
    basis = basis * geometry.polynomial_envelope(geometry.safe_norm(rel) / model.radius)[..., None, None]
  x = x * mask[:, :, None, None]
  return jnp.einsum("bijoc,bjoc->bioc", conv.spatial_kernel(basis), x)


def unit(v):
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("num_ori,radius", [(8, None), (8, 2.0), (-1, None), (0, 1.5)])
def test_self_loop_split_equals_the_all_pairs_convolution(num_ori, radius):
  model = small_model(num_ori=num_ori, radius=radius)
  pos, z, mask = molecule_batch(b=2, n=5)
  mask = mask.at[1, 4].set(False)
  node_ori = unit(jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 3)), jnp.float32))
  node_ori = node_ori if num_ori == -1 else None
  conv = model.blocks[0].conv
  orientations = model.orientations(None, node_ori)
  x = model.embedder(model.lift(z, None, orientations))
  x = x + jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)  # vary over the fibre
  spatial, fiber = model.bases(pos, mask, None, node_ori)
  expected = dense_spatial_conv(model, conv, x, pos, mask, node_ori)
  if conv.fiber_kernel is not None:
    expected = jnp.einsum("bnoc,poc->bnpc", expected, conv.fiber_kernel(fiber)) / expected.shape[2]
  assert rel_err(conv(x, spatial, fiber, mask), expected + conv.bias[...]) < 1e-5


def test_other_nodes_lists_every_other_node_once():
  x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5)
  others = np.asarray(geometry.other_nodes(x))
  assert others.shape == (2, 5, 4)
  for b in range(2):
    for i in range(5):
      assert sorted(others[b, i].tolist()) == sorted(np.delete(np.asarray(x[b]), i).tolist())


def test_calibration_equalises_conv_output_scale():
  model = small_model()
  pos, z, mask = molecule_batch()
  calibrate(model, pos, z, None, mask)
  x = model.embedder(model.lift(z, None, model.orientations()))
  conv = model.blocks[0].conv
  x1 = dense_spatial_conv(model, conv, x, pos, mask)
  fiber = model.fiber_basis_value()
  x2 = jnp.einsum("bnoc,poc->bnpc", x1, conv.fiber_kernel(fiber)) / x1.shape[2]
  np.testing.assert_allclose(float(jnp.std(x1, ddof=1)), float(jnp.std(x, ddof=1)), rtol=1e-3)
  np.testing.assert_allclose(float(jnp.std(x2, ddof=1)), float(jnp.std(x1, ddof=1)), rtol=1e-3)


def test_bfloat16_compute_stays_close_to_float32():
  pos, z, mask = molecule_batch()
  e32, f32 = small_model().energy_and_forces(pos, z, None, mask)
  e16, f16 = small_model(dtype=jnp.bfloat16).energy_and_forces(pos, z, None, mask)
  assert e16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(f16)))
  assert rel_err(e16, e32) < 5e-2
  assert rel_err(f16, f32) < 1e-1

