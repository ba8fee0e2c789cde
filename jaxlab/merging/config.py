"""mergekit-compatible merge configuration (the core YAML schema), parsed with pyyaml.

Supported keys: `merge_method`, `models` (list of `{model, parameters}`) or `slices` (list of `{sources: [{model,
layer_range: [a, b], parameters}], parameters}`), `base_model`, `parameters` (global), `dtype`, `out_dtype`,
`tokenizer_source` (`base` or a model path; `union` is rejected) and `tokenizer` (only `{source: ...}`).  Keys the
streaming merge does not need but mergekit configs often carry (`chat_template`, `name`) are accepted and ignored;
any other key is an error.  Model paths are resolved relative to the YAML file's directory (or `base_dir`).

Parameter values (mergekit semantics):
- a scalar (number, bool or string);
- a gradient: a list of numbers whose anchors are spread evenly over the decoder layers and interpolated
  piecewise-linearly (`methods.interpolate_layer_values`: layer i of L sits at t = i / (L - 1), a single layer at
  t = 1).  Inside a `slices` entry the gradient spans that slice's layers.  Tensors outside the numbered decoder
  layers (embeddings, final norm, `lm_head`) are evaluated at t = 0, i.e. they take the FIRST anchor, as mergekit's
  planner does (its non-layer tensors are planned with the top-level reader at t = 0).  Placing them by their
  position (embeddings first anchor, final norm / lm_head last) would be a plausible reading of "layer-wise", but it
  would change what existing mergekit configs produce, so it is not done;
- a filter list `[{filter: self_attn, value: ...}, {value: default}]`: the first entry whose `filter` is a substring
  of the tensor name (an entry without `filter` always matches) gives the value, which may itself be a gradient.
  When no entry matches, the parameter counts as unset at that level.

Precedence: slice-source > slice > model > global > method default.  Method defaults follow mergekit: `weight`
required (linear and the task-vector methods), `density` 1, `gamma` 0.01, `lambda` 1, `int8_mask` false (accepted;
it only saves memory in mergekit), `normalize` true for linear and ties and false for task_arithmetic, dare_linear,
dare_ties, breadcrumbs and breadcrumbs_ties, `rescale` true for dare_* and false otherwise (true means mergekit's
norm-matching rescale; the strings accepted by `methods` select other norms or the paper's 1/density; task_arithmetic
has nothing to rescale and ignores it), slerp `t` required, model_stock `filter_wise` false, passthrough `scale` 1.
Sign election always uses mergekit's `sum` consensus.  DELLA's `epsilon` and LoRA model references are rejected.
"""
import dataclasses
import os
import re
from collections.abc import Mapping

import yaml

from jaxlab.merging.methods import gradient_value, interpolate_layer_values

__all__ = ["MergeConfig", "ModelRef", "Slice", "SliceSource", "load_config", "METHODS", "DTYPES", "layer_index",
           "position_of", "evaluate_value"]

DTYPES = ("float32", "float16", "bfloat16")

# method -> (needs base, per-model parameter defaults, global parameter defaults); a default of REQUIRED must be set.
REQUIRED = object()
_TV = {"weight": REQUIRED, "density": 1.0}
METHODS = {
  "linear": (False, {"weight": REQUIRED}, {"normalize": True}),
  "task_arithmetic": (True, dict(_TV), {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}),
  "ties": (True, dict(_TV), {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False}),
  "dare_linear": (True, dict(_TV), {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}),
  "dare_ties": (True, dict(_TV), {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}),
  "breadcrumbs": (True, dict(_TV, gamma=0.01),
                  {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}),
  "breadcrumbs_ties": (True, dict(_TV, gamma=0.01),
                       {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}),
  "model_stock": (True, {}, {"filter_wise": False}),
  "slerp": (True, {}, {"t": REQUIRED}),
  "passthrough": (False, {}, {"scale": 1.0}),
}
_KNOWN_PARAMS = {"weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
                 "filter_wise", "scale"}
_TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name):
  """The decoder-layer index in names like `model.layers.{i}.mlp.up_proj.weight`, or None."""
  m = _LAYER_RE.search(tensor_name)
  return int(m.group(1)) if m else None


def position_of(tensor_name):
  """Where a non-layer tensor goes in the output order: 'pre' (embeddings, before the layers) or 'post' (the rest).

  Only the output tensor order uses this; parameter values of all non-layer tensors are taken at t = 0.
  """
  return "pre" if ("embed" in tensor_name or "wte" in tensor_name) else "post"


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(value, where):
  """Validate a parameter value's structure at load time (ValueError naming `where`)."""
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f"{where}: empty list")
    if all(_is_number(v) for v in value):
      return
    if all(isinstance(v, Mapping) for v in value):
      for i, entry in enumerate(value):
        extra = set(entry) - {"filter", "value"}
        if "value" not in entry or extra:
          raise ValueError(f"{where}[{i}]: a filter entry needs 'value' and optionally 'filter', got {dict(entry)}")
        if "filter" in entry and not isinstance(entry["filter"], str):
          raise ValueError(f"{where}[{i}]: filter must be a string, got {entry['filter']!r}")
        _check_value(entry["value"], f"{where}[{i}].value")
      return
    raise ValueError(f"{where}: a list must be all numbers (gradient) or all {{filter, value}} entries, got {value}")
  if isinstance(value, Mapping):
    raise ValueError(f"{where}: a mapping is not a parameter value; use a list of {{filter, value}} entries")
  if value is not None and not isinstance(value, (int, float, str, bool)):
    raise ValueError(f"{where}: unsupported value {value!r}")


def evaluate_value(value, tensor_name, layer, count):
  """Resolve a parameter value for one tensor.

  `layer`/`count` locate the tensor: layer `layer` of `count` (a gradient is evaluated there), or `layer=None` for a
  tensor outside the decoder layers (a gradient gives its first anchor, t = 0).  Returns None when a filter list has
  no matching entry.
  """
  if isinstance(value, (list, tuple)):
    if all(isinstance(v, Mapping) for v in value):
      for entry in value:
        if "filter" not in entry or entry["filter"] in tensor_name:
          return evaluate_value(entry["value"], tensor_name, layer, count)
      return None
    if layer is None:
      return float(gradient_value(list(value), 0.0))
    return float(interpolate_layer_values(list(value), count)[layer])
  return value


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A model in the config: `name` as written in the YAML, `path` resolved to an absolute path."""
  name: str
  path: str
  parameters: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SliceSource:
  model: ModelRef
  layer_range: tuple
  parameters: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Slice:
  sources: tuple
  parameters: dict = dataclasses.field(default_factory=dict)

  @property
  def num_layers(self):
    return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclasses.dataclass
class MergeConfig:
  """A parsed merge configuration.

  `models` are the entries of `models:` (empty with `slices`); `base_model` is a ModelRef or None; `model_paths`
  lists every distinct model path in order of first mention (base model first when given).
  """
  merge_method: str
  models: list
  base_model: ModelRef | None
  parameters: dict
  dtype: str | None = None
  out_dtype: str | None = None
  tokenizer_source: str | None = None
  slices: list | None = None
  base_dir: str = "."

  @property
  def model_paths(self):
    refs = ([self.base_model] if self.base_model else []) + list(self.models)
    for s in self.slices or []:
      refs += [src.model for src in s.sources]
    return list(dict.fromkeys(r.path for r in refs))

  @property
  def output_dtype(self):
    """The dtype of the written tensors (`out_dtype`, else `dtype`), or None to keep the reference model's."""
    return self.out_dtype or self.dtype

  def method_spec(self):
    return METHODS[self.merge_method]

  def resolve(self, name, tensor_name, model_path=None, layer=None, count=1, slice_index=None):
    """One parameter for one tensor (and model, for per-model parameters), by precedence; None when unset.

    Levels: the slice source for `model_path` in slice `slice_index`, that slice, the `models:` entry for
    `model_path`, the global `parameters`.
    """
    levels = []
    if slice_index is not None:
      sl = self.slices[slice_index]
      if model_path is not None:
        levels += [src.parameters for src in sl.sources if src.model.path == model_path]
      levels.append(sl.parameters)
    if model_path is not None:
      levels += [m.parameters for m in self.models if m.path == model_path]
    levels.append(self.parameters)
    for params in levels:
      if name in params:
        v = evaluate_value(params[name], tensor_name, layer, count)
        if v is not None:
          return v
    return None

  def params_for(self, tensor_name, model_index=None, layer_index=None, num_layers=None, *, slice_index=None):
    """Resolved method parameters (defaults filled in) for one tensor.

    `model_index` indexes `model_paths`; with it the per-model parameters (weight, density, ...) are included,
    without it only the global ones.  `layer_index`/`num_layers` place the tensor for gradients (layer index within
    the slice when `slice_index` is given); a tensor outside the decoder layers passes `layer_index=None` and is
    evaluated at t = 0 (first gradient anchor).  Raises ValueError when a required parameter is missing.
    """
    pos, count = layer_index, num_layers
    if layer_index is not None and (num_layers is None or not 0 <= layer_index < num_layers):
      raise ValueError(f"{tensor_name}: layer index {layer_index} outside 0 .. {num_layers}")
    _, per_model, global_ = self.method_spec()
    out = {}
    for name, default in global_.items():
      v = self.resolve(name, tensor_name, None, pos, count, slice_index)
      out[name] = default if v is None else v
      if out[name] is REQUIRED:
        raise ValueError(f"{self.merge_method}: parameter {name!r} is required but not set (tensor {tensor_name})")
    if model_index is not None:
      path = self.model_paths[model_index]
      for name, default in per_model.items():
        v = self.resolve(name, tensor_name, path, pos, count, slice_index)
        out[name] = default if v is None else v
        if out[name] is REQUIRED:
          raise ValueError(f"{self.merge_method}: parameter {name!r} is required but not set for model {path} "
                           f"(tensor {tensor_name})")
    return out


def _check_params(params, where):
  if params is None:
    return {}
  if not isinstance(params, Mapping):
    raise ValueError(f"{where}: parameters must be a mapping, got {params!r}")
  for k, v in params.items():
    if k not in _KNOWN_PARAMS:
      raise ValueError(f"{where}: unknown parameter {k!r} (known: {sorted(_KNOWN_PARAMS)})")
    if k == "epsilon":
      raise ValueError(f"{where}: parameter 'epsilon' (della) is not supported")
    _check_value(v, f"{where}.{k}")
  return dict(params)


def _model_ref(entry, base_dir, where, check_paths, params=None):
  if not isinstance(entry, str) or not entry:
    raise ValueError(f"{where}: model must be a non-empty path string, got {entry!r}")
  if "+" in entry and not os.path.exists(os.path.join(base_dir, entry)):
    raise ValueError(f"{where}: LoRA references ('model+lora') are not supported: {entry!r}")
  path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(entry)))
  if check_paths and not os.path.exists(path):
    raise FileNotFoundError(f"{where}: model path not found: {path} (from {entry!r}; relative paths are resolved "
                            f"against {base_dir}; hub downloads are not supported)")
  return ModelRef(entry, path, params or {})


def load_config(source, *, base_dir=None, check_paths=True) -> MergeConfig:
  """Parse a mergekit YAML config from a path, a YAML string (text with a newline or `key: value`) or a dict.

  Relative model paths are resolved against `base_dir`, which defaults to the YAML file's directory (or the current
  directory for a dict/string).  With `check_paths` every model path must exist (FileNotFoundError otherwise).
  """
  if isinstance(source, Mapping):
    raw = dict(source)
    base_dir = base_dir or os.getcwd()
  else:
    source = os.fspath(source)
    if os.path.exists(source) or ("\n" not in source and ": " not in source):
      if not os.path.isfile(source):
        raise FileNotFoundError(f"merge config not found: {source}")
      with open(source) as f:
        text = f.read()
      base_dir = base_dir or os.path.dirname(os.path.abspath(source))
      where = source
    else:
      text, where = source, "<config string>"
      base_dir = base_dir or os.getcwd()
    try:
      raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise ValueError(f"{where}: invalid YAML: {e}") from None
    if not isinstance(raw, Mapping):
      raise ValueError(f"{where}: a merge config must be a YAML mapping")
  base_dir = os.path.abspath(base_dir)
  unknown = set(raw) - _TOP_KEYS
  if unknown:
    raise ValueError(f"unknown config key(s) {sorted(unknown)} (supported: {sorted(_TOP_KEYS)})")
  method = raw.get("merge_method")
  if method not in METHODS:
    raise ValueError(f"unknown merge_method {method!r}; known methods: {', '.join(METHODS)}")
  has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
  if has_models == has_slices:
    raise ValueError("a merge config needs exactly one of 'models' and 'slices'")
  for key in ("dtype", "out_dtype"):
    if raw.get(key) is not None and raw[key] not in DTYPES:
      raise ValueError(f"{key} must be one of {DTYPES}, got {raw[key]!r}")

  base = None
  if raw.get("base_model") is not None:
    base = _model_ref(raw["base_model"], base_dir, "base_model", check_paths)

  models = []
  slices = None
  if has_models:
    if not isinstance(raw["models"], list) or not raw["models"]:
      raise ValueError("'models' must be a non-empty list")
    for i, entry in enumerate(raw["models"]):
      where = f"models[{i}]"
      if isinstance(entry, str):
        entry = {"model": entry}
      if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
        raise ValueError(f"{where}: expected {{model: path, parameters: {{...}}}}, got {entry!r}")
      models.append(_model_ref(entry["model"], base_dir, where, check_paths,
                               _check_params(entry.get("parameters"), f"{where}.parameters")))
    if len({m.path for m in models}) != len(models):
      raise ValueError("models lists the same model more than once")
  else:
    if not isinstance(raw["slices"], list) or not raw["slices"]:
      raise ValueError("'slices' must be a non-empty list")
    slices = []
    for i, sl in enumerate(raw["slices"]):
      where = f"slices[{i}]"
      if not isinstance(sl, Mapping) or not sl.get("sources") or set(sl) - {"sources", "parameters"}:
        raise ValueError(f"{where}: expected {{sources: [...], parameters: {{...}}}}, got {sl!r}")
      sources = []
      for j, src in enumerate(sl["sources"]):
        w = f"{where}.sources[{j}]"
        if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src \
            or set(src) - {"model", "layer_range", "parameters"}:
          raise ValueError(f"{w}: expected {{model, layer_range: [start, end], parameters}}, got {src!r}")
        lr = src["layer_range"]
        if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(x, int) for x in lr)
                and 0 <= lr[0] < lr[1]):
          raise ValueError(f"{w}: layer_range must be [start, end] with 0 <= start < end, got {lr!r}")
        sources.append(SliceSource(_model_ref(src["model"], base_dir, w, check_paths), tuple(lr),
                                   _check_params(src.get("parameters"), f"{w}.parameters")))
      if len({s.layer_range[1] - s.layer_range[0] for s in sources}) != 1:
        raise ValueError(f"{where}: all sources of a slice must span the same number of layers")
      if method == "passthrough" and len(sources) != 1:
        raise ValueError(f"{where}: passthrough takes exactly one source per slice, got {len(sources)}")
      if len({s.model.path for s in sources}) != len(sources):
        raise ValueError(f"{where}: a slice may name each model only once")
      slices.append(Slice(tuple(sources), _check_params(sl.get("parameters"), f"{where}.parameters")))

  tok = raw.get("tokenizer_source")
  if raw.get("tokenizer") is not None:
    t = raw["tokenizer"]
    if tok is not None or not isinstance(t, Mapping) or set(t) - {"source"}:
      raise ValueError("only 'tokenizer: {source: ...}' is supported (and not together with tokenizer_source)")
    tok = t.get("source")
  if tok is not None:
    if tok == "union":
      raise ValueError("tokenizer_source 'union' (vocabulary merging) is not supported; use 'base' or a model path")
    if not isinstance(tok, str):
      raise ValueError(f"tokenizer_source must be 'base' or a model path, got {tok!r}")
    if tok == "base":
      if base is None:
        raise ValueError("tokenizer_source 'base' needs base_model")
      tok = base.path
    else:
      tok = _model_ref(tok, base_dir, "tokenizer_source", check_paths).path

  cfg = MergeConfig(method, models, base, _check_params(raw.get("parameters"), "parameters"), raw.get("dtype"),
                    raw.get("out_dtype"), tok, slices, base_dir)
  needs_base = METHODS[method][0]
  if needs_base and base is None:
    raise ValueError(f"merge_method {method!r} needs base_model")
  return cfg
