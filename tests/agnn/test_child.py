import dataclasses

import jax
import numpy as np
import pytest

from jaxlab.agnn import child, data
from jaxlab.agnn.space import LayerArch, gat_layers, gcn_layers

HP = child.ChildHParams(epochs=40, finetune_epochs=10)


@pytest.fixture(scope="module")
def csbm():
  ds = data.contextual_sbm(240, 3, 60, avg_degree=5, homophily=0.8, feature_signal=0.5, seed=0)
  return ds, child.node_task(data_normalized(ds), edge_multiple=256)


def data_normalized(ds):
  return dataclasses.replace(ds, features=data.row_normalize(ds.features))


def test_gcn_learns_a_homophilous_graph_and_selects_by_validation(csbm):
  ds, task = csbm
  result = child.train_children(gcn_layers(3), task, [0, 1], HP)
  assert result.val_acc.shape == (2,) and result.test_acc.shape == (2,)
  assert result.test_acc.min() > 0.75  # chance is 1/3
  assert np.all((0 <= result.epoch) & (result.epoch < HP.epochs))
  assert result.reward == pytest.approx(result.val_acc.mean())


def test_seeds_in_parallel_equal_seeds_one_at_a_time(csbm):
  _, task = csbm
  layers = (LayerArch("gat", "mean", "elu", 2, 8, "mlp", "identity"), LayerArch("cos", "max", "linear", 1, 3))
  runs = {mode: child.train_children(layers, task, [3, 4], HP, parallel=mode) for mode in child.PARALLEL}
  for i, seed in enumerate([3, 4]):
    one = child.train_children(layers, task, [seed], HP, parallel="sequential")
    for mode, run in runs.items():
      assert run.epoch[i] == one.epoch[0], mode
      np.testing.assert_allclose(run.val_acc[i], one.val_acc[0], atol=1e-6, err_msg=mode)
      np.testing.assert_allclose(run.test_acc[i], one.test_acc[0], atol=1e-6, err_msg=mode)
  np.testing.assert_allclose(jax.tree.leaves(runs["multi"].params)[0], jax.tree.leaves(runs["vmap"].params)[0],
                             rtol=1e-4, atol=1e-5)


def test_sparse_and_dense_features_train_alike(csbm):
  ds, sparse_task = csbm
  dense_task = child.node_task(data_normalized(ds), edge_multiple=256, sparse_features=False)
  # without dropout (whose draws differ in shape between the two) only the summation order differs
  hp = dataclasses.replace(HP, dropout=0.0, att_dropout=0.0, epochs=30)
  a = child.train_children(gat_layers(3, heads=2), sparse_task, [0], hp)
  b = child.train_children(gat_layers(3, heads=2), dense_task, [0], hp)
  one_node = 1.0 / int(np.sum(ds.val_mask))
  assert abs(float(a.val_acc[0] - b.val_acc[0])) <= one_node + 1e-6
  assert abs(float(a.test_acc[0] - b.test_acc[0])) <= 2.0 / int(np.sum(ds.test_mask)) + 1e-6


def test_a_child_of_a_homogeneous_parent_inherits_and_fine_tunes(csbm):
  _, task = csbm
  parent_layers = gcn_layers(3, hidden=16)
  parent = child.train_children(parent_layers, task, [0, 1], HP)
  # the same shapes, attention and activation, other skip: both layers homogeneous
  child_layers = (parent_layers[0], dataclasses.replace(parent_layers[1], skip="identity"))
  inherited = child.train_children(child_layers, task, [0, 1], HP, parent=(parent_layers, parent.params))
  assert inherited.inherited == (True, True)
  assert np.all(inherited.epoch < HP.finetune_epochs)
  # starting from trained weights, ten epochs are enough to stay close to the parent
  assert inherited.val_acc.mean() > parent.val_acc.mean() - 0.05
  other = (dataclasses.replace(parent_layers[0], activation="tanh"), parent_layers[1])
  fresh = child.train_children(other, task, [0, 1], HP, parent=(parent_layers, parent.params))
  assert fresh.inherited == (False, True)


def test_hyper_parameters_are_checked():
  with pytest.raises(ValueError, match="dropout"):
    child.ChildHParams(dropout=1.0)
  with pytest.raises(ValueError, match="epochs"):
    child.ChildHParams(epochs=0)
  with pytest.raises(ValueError, match="parallel"):
    child._compiled_fit(gcn_layers(3), HP, 3, "threads")
