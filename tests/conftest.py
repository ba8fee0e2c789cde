import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs/ are imported by path from the repository root


@pytest.fixture(scope="session")
def nbody_smoke_dir(tmp_path_factory):
  """The smoke-sized N-body files (seeded generator), shared by the tests that train."""
  from jaxlab.ponita import data
  path = tmp_path_factory.mktemp("nbody_smoke")
  data.generate_nbody(path, num_train=40, num_valid=16, num_test=16, seed=43)
  return str(path)


def smoke_config(name="nbody", nbody_dir=None, **train_overrides):
  import importlib
  module = importlib.import_module(f"configs.ponita.{name}")
  config = module.get_config("smoke")
  if nbody_dir is not None:
    config.data.nbody_dir = nbody_dir
  config.train.update(train_overrides)
  return config
