import dataclasses

import jax
import numpy as np

from jaxlab.agnn.model import init_gnn
from jaxlab.agnn.sharing import graphnas_key, homogeneous_layers, inherit
from jaxlab.agnn.space import LayerArch

IN_DIM, CLASSES = 12, 3
PARENT = (LayerArch("gat", "sum", "elu", 2, 8, "identity", "identity"),
          LayerArch("gat", "sum", "linear", 1, CLASSES, "identity", "identity"))


def _params(layers, seed):
  return init_gnn(jax.random.key(seed), layers, IN_DIM)


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_homogeneous_child_inherits_everything_but_the_skip_weights():
  parent_params = _params(PARENT, 0)
  child = (dataclasses.replace(PARENT[0], combine="identity"), dataclasses.replace(PARENT[1], skip="none"))
  fresh = _params(child, 1)
  params, shared = inherit(PARENT, parent_params, child, fresh)
  assert shared == (True, True)
  for mine, theirs, new in zip(params, parent_params, fresh):
    for name in mine:
      if name == "skip":
        assert _same(mine[name], new[name]) and not _same(mine[name], theirs[name])
      else:
        assert _same(mine[name], theirs[name])
  assert "skip" in params[0]  # 12 -> 16 needs a projection, and it stays fresh


def test_no_sharing_across_attention_activation_or_shape_changes():
  parent_params = _params(PARENT, 0)
  cases = {
      "attention": (dataclasses.replace(PARENT[0], attention="cos"), PARENT[1]),
      "activation": (dataclasses.replace(PARENT[0], activation="relu"), PARENT[1]),
      "aggregator": (dataclasses.replace(PARENT[0], aggregator="mean"), PARENT[1]),
      "combine": (dataclasses.replace(PARENT[0], combine="mlp"), PARENT[1]),
  }
  for what, child in cases.items():
    shared = homogeneous_layers(PARENT, parent_params, child, _params(child, 2))
    assert shared == (False, True), what
  # a wider first layer changes the second layer's input width too
  wider = (dataclasses.replace(PARENT[0], hidden=16), PARENT[1])
  assert homogeneous_layers(PARENT, parent_params, wider, _params(wider, 2)) == (False, False)
  more_heads = (dataclasses.replace(PARENT[0], heads=4, hidden=4), PARENT[1])  # same width, other heads
  assert homogeneous_layers(PARENT, parent_params, more_heads, _params(more_heads, 2))[0] is False


def test_inherit_works_on_parameters_stacked_over_seeds():
  stacked = jax.vmap(lambda k: init_gnn(k, PARENT, IN_DIM))(jax.random.split(jax.random.key(0), 3))
  fresh = jax.vmap(lambda k: init_gnn(k, PARENT, IN_DIM))(jax.random.split(jax.random.key(1), 3))
  params, shared = inherit(PARENT, stacked, PARENT, fresh, batch_dims=1)
  assert shared == (True, True)
  assert _same(params[0]["weight"], stacked[0]["weight"])
  wider = (dataclasses.replace(PARENT[0], hidden=16), PARENT[1])
  fresh_wider = jax.vmap(lambda k: init_gnn(k, wider, IN_DIM))(jax.random.split(jax.random.key(1), 3))
  assert inherit(PARENT, stacked, wider, fresh_wider, batch_dims=1)[1] == (False, False)


def test_graphnas_key():
  assert graphnas_key(PARENT[0], IN_DIM, concat=True) == "gat_sum_12_16_2"
  assert graphnas_key(PARENT[1], 16, concat=False) == "gat_sum_16_3_1"
