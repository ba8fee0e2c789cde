"""Constrained parameter sharing: a child inherits weights from its parent only between homogeneous layers.

AGNN's rule (spec 2.4): layer ``l`` of the child takes layer ``l`` of the parent ``A*`` only when the two
layers are homogeneous: the same attention function, the same activation, and every trainable tensor of
the layer (skip connections aside) of the same shape. Shapes follow from the input and output widths and
the number of heads; which tensors exist follows from the attention function, the aggregator (pool MLP)
and the combine function. Skip-connection weights are never shared. Inherited layers are then fine-tuned
together with the freshly initialised ones.

GraphNAS's sharing, for contrast, reuses weights between any layers whose ``{attention}_{aggregator}_{in}_
{out}_{heads}`` keys match, from any earlier architecture: ``graphnas_key`` gives that key.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxlab.agnn.space import LayerArch

EXCLUDED = ("skip",)  # parameter groups that are never shared


def _shared_part(layer_params: dict) -> dict:
  return {k: v for k, v in layer_params.items() if k not in EXCLUDED}


def layer_signature(index: int, layer: LayerArch, layer_params: dict, batch_dims: int = 0) -> tuple:
  """What must match for layer ``index`` to share: position, attention, activation, tensor names and shapes.

  ``batch_dims`` leading axes of every leaf (e.g. a seed axis) are not part of the shape.
  """
  leaves = jax.tree.leaves_with_path(_shared_part(layer_params))
  shapes = tuple(sorted((jax.tree_util.keystr(path), tuple(leaf.shape[batch_dims:])) for path, leaf in leaves))
  return (index, layer.attention, layer.activation, shapes)


def homogeneous_layers(parent_layers: Sequence[LayerArch], parent_params: Sequence[dict],
                       child_layers: Sequence[LayerArch], child_params: Sequence[dict],
                       batch_dims: int = 0) -> tuple[bool, ...]:
  """For each child layer, whether the parent's layer at the same index is homogeneous with it."""
  out = []
  for i, (layer, params) in enumerate(zip(child_layers, child_params)):
    if i >= len(parent_layers):
      out.append(False)
      continue
    out.append(layer_signature(i, layer, params, batch_dims)
               == layer_signature(i, parent_layers[i], parent_params[i], batch_dims))
  return tuple(out)


def inherit(parent_layers: Sequence[LayerArch], parent_params: Sequence[dict], child_layers: Sequence[LayerArch],
            child_params: Sequence[dict], batch_dims: int = 0) -> tuple[list[dict], tuple[bool, ...]]:
  """The child's parameters with every homogeneous layer's shared tensors taken from the parent.

  ``child_params`` are the child's fresh initialisation; excluded groups (skip) always stay fresh. Returns
  the new parameters and, per layer, whether it inherited.
  """
  shared = homogeneous_layers(parent_layers, parent_params, child_layers, child_params, batch_dims)
  params = []
  for take, fresh, parent in zip(shared, child_params, list(parent_params) + [None] * len(child_params)):
    if take:
      layer = dict(fresh)
      layer.update(_shared_part(parent))
      params.append(layer)
    else:
      params.append(fresh)
  return params, shared


def graphnas_key(layer: LayerArch, in_dim: int, concat: bool) -> str:
  """GraphNAS's (unconstrained) sharing key of a layer."""
  out = layer.heads * layer.hidden if concat else layer.hidden
  return f"{layer.attention}_{layer.aggregator}_{in_dim}_{out}_{layer.heads}"
