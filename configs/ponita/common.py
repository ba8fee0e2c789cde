"""Settings shared by the PONITA configs (model and loop defaults of the reference implementation)."""
import ml_collections

from configs.loop import loop_config


def model_config(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.num_ori = 16            # > 0 fibre bundle R3xS2, -1 point cloud, 0 PNITA (R3)
  m.hidden = 128
  m.basis_dim = 256
  m.degree = 3              # polynomial features up to cubic
  m.num_layers = 5
  m.widening = 4
  m.layer_scale = 0.0       # 0 = no layer scale
  m.multiple_readouts = True
  m.radius = 0.0            # 0 = fully connected, no envelope
  m.grid_rotation = "none"  # or "random_per_graph"
  m.dtype = "float32"
  m.update(overrides)
  return m


def train_config(**overrides) -> ml_collections.ConfigDict:
  t = loop_config()
  t.rotation_augmentation = True
  t.test_rotations = 0      # > 0: average predictions over this many random rotations at evaluation
  t.force_weight = 500.0    # rMD17: loss = MSE_E / force_weight + MSE_F
  t.update(overrides)
  return t
