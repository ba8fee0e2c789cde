"""Search spaces: architectures as tuples of choice indices, grouped into action classes.

A search space is an ordered list of positions. Each position is one decision (for example layer 1's
attention function) with a finite list of choices, and belongs to an action class (``attention``). An
architecture is a tuple of choice indices, one per position; the controllers in ``controller.py`` work
on these index tuples only, so the same controllers search the GNN space below and the NAS-Bench-Graph
table (``nasbench.py``).

The GNN space follows GraphNAS's value lists, with AGNN's seven action classes per layer. The output
layer has no hidden-dimension position: its width is the number of classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

ATTENTIONS = ("const", "gcn", "gat", "gat_sym", "cos", "linear", "generalized_linear")
AGGREGATORS = ("sum", "mean", "max", "mlp")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear", "softplus", "leaky_relu", "relu6", "elu")
HEADS = (1, 2, 4, 6, 8, 16)
HIDDEN = (4, 8, 16, 32, 64, 128, 256)
# combine: how the heads' outputs become the layer output. "identity" concatenates them (averages them in the
# output layer); "mlp" follows that with a two-layer perceptron of the same width.
COMBINES = ("identity", "mlp")
# skip: "none", or "identity", a residual from the layer input (a linear map when the widths differ).
SKIPS = ("none", "identity")

# The order in which a layer's decisions are made (and fed to the controllers' RNNs).
LAYER_CLASSES = ("attention", "aggregator", "activation", "heads", "hidden", "combine", "skip")
_VALUES = dict(attention=ATTENTIONS, aggregator=AGGREGATORS, activation=ACTIVATIONS, heads=HEADS,
               hidden=HIDDEN, combine=COMBINES, skip=SKIPS)


@dataclasses.dataclass(frozen=True)
class Position:
  """One decision of an architecture: its name, action class and the values it can take."""

  name: str
  action_class: str
  choices: tuple

  @property
  def size(self) -> int:
    return len(self.choices)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """An ordered list of positions. ``classes`` are the action classes in order of first appearance."""

  positions: tuple[Position, ...]

  def __post_init__(self):
    if not self.positions:
      raise ValueError("a search space needs at least one position")
    names = [p.name for p in self.positions]
    if len(set(names)) != len(names):
      raise ValueError(f"position names must be unique, got {names}")
    for p in self.positions:
      if p.size < 1:
        raise ValueError(f"position {p.name!r} has no choices")

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(p.size for p in self.positions)

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.action_class for p in self.positions))

  def class_mask(self, action_class: str) -> tuple[bool, ...]:
    """Which positions belong to ``action_class``."""
    if action_class not in self.classes:
      raise ValueError(f"unknown action class {action_class!r}; this space has {self.classes}")
    return tuple(p.action_class == action_class for p in self.positions)

  def validate(self, arch: Sequence[int]) -> tuple[int, ...]:
    """``arch`` as a tuple of ints, or a ValueError naming the first bad position."""
    arch = tuple(int(a) for a in arch)
    if len(arch) != len(self.positions):
      raise ValueError(f"an architecture has {len(self.positions)} choices, got {len(arch)}")
    for p, a in zip(self.positions, arch):
      if not 0 <= a < p.size:
        raise ValueError(f"choice {a} out of range for {p.name!r} ({p.size} choices)")
    return arch

  def values(self, arch: Sequence[int]) -> dict[str, object]:
    """The chosen value of every position, by position name."""
    arch = self.validate(arch)
    return {p.name: p.choices[a] for p, a in zip(self.positions, arch)}

  def index(self, values: dict[str, object]) -> tuple[int, ...]:
    """The architecture whose positions take ``values`` (by position name): the inverse of ``values``."""
    missing = [p.name for p in self.positions if p.name not in values]
    if missing:
      raise ValueError(f"no value given for positions {missing}")
    arch = []
    for p in self.positions:
      if values[p.name] not in p.choices:
        raise ValueError(f"{values[p.name]!r} is not a choice of {p.name!r}: {p.choices}")
      arch.append(p.choices.index(values[p.name]))
    return tuple(arch)


@dataclasses.dataclass(frozen=True)
class LayerArch:
  """One GNN layer. ``hidden`` is the width per head; heads are concatenated, or averaged when ``concat``
  is False (the output layer)."""

  attention: str = "gat"
  aggregator: str = "sum"
  activation: str = "elu"
  heads: int = 8
  hidden: int = 8
  combine: str = "identity"
  skip: str = "none"

  def __post_init__(self):
    if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
      raise ValueError(f"LayerArch.hidden must be a positive int, got {self.hidden!r}")
    for name, values in _VALUES.items():
      if name != "hidden" and getattr(self, name) not in values:
        raise ValueError(f"LayerArch.{name} must be one of {values}, got {getattr(self, name)!r}")


def gnn_space(num_layers: int = 2) -> SearchSpace:
  """AGNN's space: every layer chooses all seven action classes, except the output layer's hidden size."""
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  positions = []
  for layer in range(num_layers):
    for cls in LAYER_CLASSES:
      if cls == "hidden" and layer == num_layers - 1:
        continue
      positions.append(Position(f"layer{layer}.{cls}", cls, _VALUES[cls]))
  return SearchSpace(tuple(positions))


def decode_gnn(space: SearchSpace, arch: Sequence[int], num_classes: int) -> tuple[LayerArch, ...]:
  """The layers of a ``gnn_space`` architecture; the output layer is ``num_classes`` wide."""
  values = space.values(arch)
  num_layers = 1 + max(int(name.split(".")[0][len("layer"):]) for name in values)
  layers = []
  for layer in range(num_layers):
    fields = {cls: values.get(f"layer{layer}.{cls}") for cls in LAYER_CLASSES}
    if layer == num_layers - 1:
      fields["hidden"] = num_classes
    layers.append(LayerArch(**fields))
  return tuple(layers)


def encode_gnn(space: SearchSpace, layers: Sequence[LayerArch]) -> tuple[int, ...]:
  """The index tuple of ``layers`` in ``space`` (the output layer's width is not a position)."""
  values = {}
  for i, layer in enumerate(layers):
    for cls in LAYER_CLASSES:
      name = f"layer{i}.{cls}"
      if any(p.name == name for p in space.positions):
        values[name] = getattr(layer, cls)
  return space.index(values)


def gcn_layers(num_classes: int, hidden: int = 16) -> tuple[LayerArch, ...]:
  """Kipf and Welling's GCN in this space: gcn weights, sum, ReLU then the linear output layer."""
  return (LayerArch("gcn", "sum", "relu", 1, hidden), LayerArch("gcn", "sum", "linear", 1, num_classes))


def gat_layers(num_classes: int, hidden: int = 8, heads: int = 8, output_heads: int = 1) -> tuple[LayerArch, ...]:
  """Velickovic et al.'s GAT: 8 heads of 8 with ELU, then ``output_heads`` averaged heads (8 on Pubmed)."""
  return (LayerArch("gat", "sum", "elu", heads, hidden),
          LayerArch("gat", "sum", "linear", output_heads, num_classes))
