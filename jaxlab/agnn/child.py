"""Child training: full-batch transductive node classification, many runs in one compiled call.

A child is an architecture (a tuple of ``LayerArch``). ``train_children`` trains it from several seeds at
once: initialisation, every epoch and the model selection run inside one jitted function vmapped over the
seeds (``jaxlab.common.fit``), so a search trains and scores a child in one device call. Compiled functions
are cached per (architecture, epochs, number of seeds, hyper-parameters); revisiting an architecture, or
retraining it, does not compile again.

Protocol (GCN/GAT, GraphNAS): Adam with L2 weight decay on every weight, dropout on the inputs of each layer
and on the attention coefficients, the softmax cross-entropy of the labelled training nodes; after every
epoch the model is scored on the validation nodes, and the reported epoch is the one with the best
validation accuracy (ties to the lower validation loss). The test accuracy of that epoch is reported, never
used for any choice.

The caches of compiled functions are small on purpose: every compiled executable holds its own memory
mappings (about 900 on XLA:CPU), and a search of a few hundred architectures would otherwise exhaust the
process's mapping limit.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.agnn import layers as layers_lib
from jaxlab.agnn.model import apply_gnn, apply_gnn_multi, init_gnn, num_params
from jaxlab.agnn.sharing import inherit
from jaxlab.agnn.space import LayerArch
from jaxlab.common.fit import fit
from jaxlab.graph import GraphsTuple


@dataclasses.dataclass(frozen=True)
class ChildHParams:
  """Child-training hyper-parameters (GraphNAS/GAT defaults)."""

  epochs: int = 200
  learning_rate: float = 0.005
  weight_decay: float = 5e-4
  dropout: float = 0.6
  att_dropout: float = 0.6
  finetune_epochs: int = 50   # epochs of a child that inherited weights from its parent
  graphnas_compat: bool = False

  def __post_init__(self):
    if self.epochs < 1 or self.finetune_epochs < 1:
      raise ValueError(f"epochs and finetune_epochs must be >= 1, got {self.epochs}, {self.finetune_epochs}")
    for name in ("dropout", "att_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.learning_rate <= 0 or self.weight_decay < 0:
      raise ValueError(f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, "
                       f"{self.weight_decay}")


class NodeTask(NamedTuple):
  """One transductive data set on device, padded: the graph with self-loops, features, labels, split masks."""

  graph: GraphsTuple
  features: jax.Array        # [padded nodes, F], dense or ``layers.SparseFeatures``
  labels: jax.Array          # int32 [padded nodes]
  train_mask: jax.Array      # bool [padded nodes]
  val_mask: jax.Array
  test_mask: jax.Array

  @property
  def num_features(self) -> int:
    return int(self.features.shape[1])


def node_task(dataset, *, edge_multiple: int = 1024, sparse_features: bool = True) -> NodeTask:
  """``dataset`` (a ``data.Planetoid``) on device: self-loops added, padded with ``jaxlab.graph``.

  ``sparse_features`` keeps the (bag-of-words) features as their non-zero entries, so the first layer's
  projection costs the number of non-zeros instead of nodes x features.
  """
  graph = layers_lib.prepare_graph(dataset.senders, dataset.receivers, dataset.num_nodes,
                                   edge_multiple=edge_multiple)
  pad = lambda a: layers_lib.pad_node_array(np.asarray(a), graph)
  features = pad(np.asarray(dataset.features, np.float32))
  if sparse_features:
    features = layers_lib.SparseFeatures.from_dense(features)
  else:
    features = jnp.asarray(features)
  return NodeTask(graph=jax.tree.map(jnp.asarray, graph), features=features,
                  labels=jnp.asarray(pad(np.asarray(dataset.labels, np.int32))),
                  train_mask=jnp.asarray(pad(dataset.train_mask)), val_mask=jnp.asarray(pad(dataset.val_mask)),
                  test_mask=jnp.asarray(pad(dataset.test_mask)))


def _masked_ce(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _masked_acc(logits, labels, mask):
  hit = (jnp.argmax(logits, axis=-1) == labels) & mask
  return jnp.sum(hit) / jnp.maximum(jnp.sum(mask), 1)


def _fit(layers, hp: ChildHParams, epochs: int, multi: bool, task: NodeTask, params, keys):
  """One model (``apply_gnn``, one key) or all seeds as one stacked model (``apply_gnn_multi``, a key per
  seed: summed losses, per-model metrics and selection)."""
  ce, acc = _masked_ce, _masked_acc
  if multi:
    ce, acc = jax.vmap(_masked_ce, in_axes=(0, None, None)), jax.vmap(_masked_acc, in_axes=(0, None, None))

  def forward(p, k=None, **dropouts):
    if multi:
      return apply_gnn_multi(p, layers, task.graph, task.features, keys=k, graphnas_compat=hp.graphnas_compat,
                             **dropouts)
    return apply_gnn(p, layers, task.graph, task.features, key=k, graphnas_compat=hp.graphnas_compat, **dropouts)

  def loss_fn(p, k):
    logits = forward(p, k, dropout=hp.dropout, att_dropout=hp.att_dropout)
    return jnp.sum(ce(logits, task.labels, task.train_mask))

  def eval_fn(p):
    logits = forward(p)
    return {"val_acc": acc(logits, task.labels, task.val_mask), "val_loss": ce(logits, task.labels, task.val_mask),
            "test_acc": acc(logits, task.labels, task.test_mask),
            "train_acc": acc(logits, task.labels, task.train_mask)}

  optimizer = optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.adam(hp.learning_rate))
  return fit(loss_fn, eval_fn, optimizer, params, keys, epochs, select="val_acc", tie_break="val_loss")


@functools.lru_cache(maxsize=16)
def _compiled_init(layers: tuple[LayerArch, ...], in_dim: int):
  return jax.jit(jax.vmap(lambda k: init_gnn(k, layers, in_dim)))


PARALLEL = ("multi", "vmap", "sequential")


@functools.lru_cache(maxsize=16)
def _compiled_fit(layers: tuple[LayerArch, ...], hp: ChildHParams, epochs: int, parallel: str):
  one = functools.partial(_fit, layers, hp, epochs, False)
  if parallel == "multi":
    return jax.jit(functools.partial(_fit, layers, hp, epochs, True))
  if parallel == "vmap":
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  if parallel == "sequential":
    return jax.jit(lambda task, params, keys: jax.lax.map(lambda pk: one(task, *pk), (params, keys)))
  raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")


class ChildResult(NamedTuple):
  val_acc: np.ndarray        # [seeds]
  test_acc: np.ndarray       # [seeds]
  epoch: np.ndarray          # [seeds] selected epoch
  params: list               # per-layer parameter dicts, leaves with a leading seed axis
  num_params: int            # of one model
  seconds: float             # wall time, compilation included
  inherited: tuple[bool, ...]

  @property
  def reward(self) -> float:
    return float(np.mean(self.val_acc))


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  return jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])


def train_children(layers: Sequence[LayerArch], task: NodeTask, seeds: Sequence[int],
                   hp: ChildHParams = ChildHParams(), *, parent: tuple | None = None,
                   parallel: str = "multi") -> ChildResult:
  """Train ``layers`` from each of ``seeds`` at once; with ``parent = (parent_layers, parent_params)`` (params
  stacked over the same seeds) homogeneous layers start from the parent's weights and train for
  ``hp.finetune_epochs`` instead of ``hp.epochs``.

  ``parallel`` is how the seeds share the device: ``multi`` (the layers' native model axis: every seed in
  the same gathers and segment sums, node-major), ``vmap`` (``jax.vmap`` of the one-model step) or
  ``sequential`` (one seed after another inside the same compiled call). All three give the same result.
  """
  layers = tuple(layers)
  start = time.perf_counter()
  keys = jax.random.wrap_key_data(seed_keys(seeds))
  init_keys, fit_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  params = _compiled_init(layers, task.num_features)(init_keys)
  inherited = (False,) * len(layers)
  if parent is not None:
    params, inherited = inherit(parent[0], parent[1], layers, params, batch_dims=1)
  epochs = hp.finetune_epochs if any(inherited) else hp.epochs
  result = _compiled_fit(layers, hp, epochs, parallel)(task, params, fit_keys)
  best = jax.device_get(result.best_metrics)
  one = jax.tree.map(lambda leaf: leaf[0], result.best_params)
  return ChildResult(val_acc=np.asarray(best["val_acc"]), test_acc=np.asarray(best["test_acc"]),
                     epoch=np.asarray(best["epoch"]), params=result.best_params, num_params=num_params(one),
                     seconds=time.perf_counter() - start, inherited=inherited)
