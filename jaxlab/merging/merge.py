"""Streaming merge of Hugging Face-style checkpoints from a mergekit YAML config.

    python -m jaxlab.merging.merge CONFIG.yaml OUT_DIR [--overwrite] [--shard-size BYTES] [--seed N] [--quiet]
        [--prefetch] [--compile-cache DIR]

The merge is planned from the checkpoint headers only (tensor names, shapes, config.json), after a compatibility
check, and then executed tensor by tensor: the inputs of one output tensor are read from every model (one open
shard file per model, read straight into fresh arrays), merged by the jitted kernel from `jaxlab.merging.methods` on
the default JAX device, cast to the output dtype and streamed to the sharded writer.  Memory stays at a few tensors
per model.  The output directory is built beside OUT_DIR and renamed into place.  `prefetch=True` (`--prefetch`)
reads the next tensor on a background thread while the current one is merged and written; it is off by default
because on a 2-core machine with a fast disk it was slower (warm and cold page cache alike), and it may pay off with
slow storage and an accelerator doing the arithmetic.  `--compile-cache DIR` turns on JAX's persistent compilation
cache in DIR (every kernel is stored, however fast it compiled), so repeated merges with the same tensor shapes skip
most compilation.

`merge_in_memory` runs the same plan and the same per-tensor function on in-memory dicts, so the two agree bit for
bit.  Conventions:
- Arithmetic runs in float32 (or wider when an input or the output dtype is wider); the only rounding to the output
  dtype happens once, at the end.
- DARE randomness for an output tensor uses `fold_in(PRNGKey(seed), i)` with `i` its position in the sorted list of
  output tensor names, so it does not depend on processing order or sharding.
- Tied embeddings (`tie_word_embeddings: true`): the embedding is merged once; an `lm_head.weight` stored by every
  model is dropped from the output (transformers re-ties it on load).  If only some models store `lm_head.weight`
  the merge stops with an error.
- Non-floating tensors (integer or bool buffers) are copied from the reference model (base model, else the first).
- With `slices`, decoder layers are renumbered consecutively in slice order; tensors outside the layers come from
  the base model (passthrough) or are merged across all models named in the slices.
"""
import argparse
import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.merging import methods
from jaxlab.merging.config import METHODS, MergeConfig, layer_index, load_config, position_of
from jaxlab.merging.hf import CheckpointReader, write_checkpoint

__all__ = ["run_merge", "merge_in_memory", "plan_merge", "merge_tensor", "MergeTask", "ARCH_KEYS", "check_tokenizers",
           "enable_compile_cache", "main"]

ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
              "bfloat16": np.dtype(jnp.bfloat16)}
_TORCH_NAMES = {v: k for k, v in _NP_DTYPES.items()}
_LM_HEAD = "lm_head.weight"


@dataclasses.dataclass
class MergeTask:
  """How one output tensor is made: `base` and `sources` are (model path, tensor name) pairs."""
  name: str
  index: int
  base: tuple | None
  sources: list
  params: list
  gparams: dict
  out_dtype: np.dtype


@dataclasses.dataclass
class MergePlan:
  tasks: list
  config: dict | None
  ref_path: str


class _DictModel:
  """A dict of arrays behind the same small interface as CheckpointReader."""

  def __init__(self, tensors, config=None):
    self.tensors = tensors
    self.config = config

  def names(self):
    return list(self.tensors)

  def __contains__(self, name):
    return name in self.tensors

  def shape(self, name):
    return tuple(np.shape(self.tensors[name]))

  def dtype(self, name):
    return np.asarray(self.tensors[name]).dtype

  def get(self, name):
    return np.asarray(self.tensors[name])


# ----------------------------------------------------------------------------------------------------------------
# planning


def _check_compatible(models, paths, arch_skip=()):
  """Same tensor names, shapes and architecture keys across `paths` (ValueError naming the first difference)."""
  ref = paths[0]
  rm = models[ref]
  heads = {p: _LM_HEAD in models[p] for p in paths}
  if len(set(heads.values())) > 1:
    has = [p for p in paths if heads[p]][0]
    lacks = [p for p in paths if not heads[p]][0]
    raise ValueError(f"{has} stores {_LM_HEAD} but {lacks} does not (tied vs untied embeddings); cannot merge")
  ref_names = set(rm.names())
  for p in paths[1:]:
    m = models[p]
    names = set(m.names())
    if names != ref_names:
      only_ref = sorted(ref_names - names)
      only_p = sorted(names - ref_names)
      if only_ref:
        raise ValueError(f"tensor {only_ref[0]!r} is in {ref} but not in {p}")
      raise ValueError(f"tensor {only_p[0]!r} is in {p} but not in {ref}")
    for n in rm.names():
      if tuple(m.shape(n)) != tuple(rm.shape(n)):
        raise ValueError(f"tensor {n!r} has shape {tuple(rm.shape(n))} in {ref} but {tuple(m.shape(n))} in {p}")
  _check_arch(models, paths, arch_skip)


def _check_arch(models, paths, skip=()):
  ref = paths[0]
  rc = models[ref].config
  for p in paths[1:]:
    c = models[p].config
    if rc is None or c is None:
      continue
    for k in ARCH_KEYS + ("tie_word_embeddings",):
      if k in skip:
        continue
      if rc.get(k) != c.get(k):
        raise ValueError(f"config key {k!r} differs: {rc.get(k)!r} in {ref} vs {c.get(k)!r} in {p}")


def _vocab_digest(path):
  tok = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok):
    return None
  try:
    with open(tok) as f:
      vocab = json.load(f).get("model", {}).get("vocab")
  except (json.JSONDecodeError, AttributeError):
    return None
  if vocab is None:
    return None
  return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()


def check_tokenizers(paths):
  """Warn (UserWarning) when two model directories ship tokenizer.json files with different vocabularies."""
  seen = {}
  for p in paths:
    d = _vocab_digest(p) if os.path.isdir(p) else None
    if d is not None:
      seen.setdefault(d, p)
  if len(seen) > 1:
    a, b = list(seen.values())[:2]
    warnings.warn(f"tokenizer vocabularies differ between {a} and {b}: the merged embeddings may not match either "
                  f"tokenizer", stacklevel=2)
    return False
  return True


def _num_layers(model, names):
  cfg = model.config or {}
  if "num_hidden_layers" in cfg:
    return int(cfg["num_hidden_layers"])
  idx = [i for i in (layer_index(n) for n in names) if i is not None]
  return max(idx) + 1 if idx else 0


def _out_dtype(cfg, model, name):
  if cfg.output_dtype is not None:
    return _NP_DTYPES[cfg.output_dtype]
  return np.dtype(model.dtype(name))


def _roles(cfg, paths):
  """(base path or None, source paths) for a list of candidate model paths."""
  method = cfg.merge_method
  needs_base = METHODS[method][0]
  if needs_base:
    base = cfg.base_model.path
    srcs = [p for p in paths if p != base]
  else:
    base, srcs = None, list(paths)
  if method == "slerp" and len(srcs) != 1:
    raise ValueError(f"slerp merges the base model with exactly one other model, got {len(srcs)} others")
  if method == "model_stock" and len(srcs) < 2:
    raise ValueError(f"model_stock needs at least 2 models besides the base, got {len(srcs)}")
  if method == "passthrough" and len(srcs) != 1:
    raise ValueError(f"passthrough copies exactly one model, got {len(srcs)}")
  if not srcs:
    raise ValueError(f"{method} needs at least one model besides the base model")
  return base, srcs


def plan_merge(cfg: MergeConfig, models: dict) -> MergePlan:
  """Plan every output tensor from model headers (`models`: path -> CheckpointReader-like object)."""
  missing = [p for p in cfg.model_paths if p not in models]
  if missing:
    raise ValueError(f"no tensors given for model {missing[0]}")
  if cfg.slices:
    return _plan_slices(cfg, models)
  ref = cfg.base_model.path if cfg.base_model else cfg.models[0].path
  paths = [ref] + [p for p in cfg.model_paths if p != ref]
  _check_compatible(models, paths)
  rm = models[ref]
  names = rm.names()
  nl = _num_layers(rm, names)
  base, srcs = _roles(cfg, [m.path for m in cfg.models])
  tied = bool((rm.config or {}).get("tie_word_embeddings", False))
  if tied and _LM_HEAD in rm:
    names = [n for n in names if n != _LM_HEAD]
  order = {n: i for i, n in enumerate(sorted(names))}
  model_index = {p: i for i, p in enumerate(cfg.model_paths)}
  tasks = []
  for n in names:
    li = layer_index(n)
    if li is not None and li >= nl:
      raise ValueError(f"tensor {n!r} has layer index {li} but the config says num_hidden_layers={nl}")
    params = [cfg.params_for(n, model_index[p], li, nl) for p in srcs]
    gparams = cfg.params_for(n, None, li, nl)
    tasks.append(MergeTask(n, order[n], (base, n) if base else None, [(p, n) for p in srcs], params, gparams,
                           _out_dtype(cfg, rm, n)))
  out_config = copy.deepcopy(rm.config) if rm.config is not None else None
  return MergePlan(tasks, out_config, ref)


def _rename_layer(name, old, new):
  key = f"layers.{old}."
  i = name.index(key)
  return f"{name[:i]}layers.{new}.{name[i + len(key):]}"


def _plan_slices(cfg, models):
  ref = cfg.base_model.path if cfg.base_model else cfg.slices[0].sources[0].model.path
  all_paths = [ref] + [p for p in cfg.model_paths if p != ref]
  _check_arch(models, all_paths, skip=("num_hidden_layers",))
  by_layer = {}
  for p in all_paths:
    d = {}
    for n in models[p].names():
      li = layer_index(n)
      d.setdefault(li, []).append(n)
    by_layer[p] = d
  needs_base = METHODS[cfg.merge_method][0]
  rm = models[ref]
  model_index = {p: i for i, p in enumerate(cfg.model_paths)}
  entries = []  # (out name, base pair, source pairs, params, gparams, dtype)
  out_layer = 0
  for si, sl in enumerate(cfg.slices):
    count = sl.num_layers
    slice_paths = [s.model.path for s in sl.sources]
    if needs_base and cfg.base_model.path not in slice_paths:
      raise ValueError(f"slices[{si}]: {cfg.merge_method} needs the base model {cfg.base_model.path} among the "
                       f"slice's sources")
    base, srcs = _roles(cfg, slice_paths)
    start = {s.model.path: s.layer_range[0] for s in sl.sources}
    lead = sl.sources[0].model.path
    for off in range(count):
      for p in slice_paths:
        if start[p] + off not in by_layer[p]:
          raise ValueError(f"slices[{si}]: layer {start[p] + off} not found in {p}")
      for n in by_layer[lead][start[lead] + off]:
        out_name = _rename_layer(n, start[lead] + off, out_layer)
        pairs = {}
        for p in slice_paths:
          src_name = _rename_layer(n, start[lead] + off, start[p] + off)
          if src_name not in models[p]:
            raise ValueError(f"slices[{si}]: tensor {src_name!r} not found in {p}")
          if tuple(models[p].shape(src_name)) != tuple(models[lead].shape(n)):
            raise ValueError(f"slices[{si}]: tensor {src_name!r} in {p} has shape {tuple(models[p].shape(src_name))}"
                             f" but {n!r} in {lead} has {tuple(models[lead].shape(n))}")
          pairs[p] = (p, src_name)
        params = [cfg.params_for(out_name, model_index[p], off, count, slice_index=si) for p in srcs]
        gparams = cfg.params_for(out_name, None, off, count, slice_index=si)
        entries.append((out_name, pairs[base] if base else None, [pairs[p] for p in srcs], params, gparams,
                        _out_dtype(cfg, models[lead], n)))
      out_layer += 1
  non_layer = by_layer[ref].get(None, [])
  tied = bool((rm.config or {}).get("tie_word_embeddings", False))
  if tied and _LM_HEAD in rm:
    non_layer = [n for n in non_layer if n != _LM_HEAD]
  if cfg.merge_method == "passthrough":
    nl_base, nl_srcs = None, [ref]
  else:
    nl_base, nl_srcs = _roles(cfg, all_paths)
  pre, post = [], []
  for n in non_layer:
    for p in nl_srcs + ([nl_base] if nl_base else []):
      if n not in models[p] or tuple(models[p].shape(n)) != tuple(rm.shape(n)):
        raise ValueError(f"tensor {n!r} is missing or has a different shape in {p} than in {ref}")
    params = [cfg.params_for(n, model_index[p], None, None) for p in nl_srcs] \
        if cfg.merge_method != "passthrough" else [cfg.params_for(n, None, None, None)]
    e = (n, (nl_base, n) if nl_base else None, [(p, n) for p in nl_srcs], params, cfg.params_for(n, None, None, None),
         _out_dtype(cfg, rm, n))
    (pre if position_of(n) == "pre" else post).append(e)
  entries = pre + entries + post
  order = {n: i for i, n in enumerate(sorted(e[0] for e in entries))}
  tasks = [MergeTask(e[0], order[e[0]], e[1], e[2], e[3], e[4], e[5]) for e in entries]
  out_config = copy.deepcopy(rm.config) if rm.config is not None else None
  if out_config is not None:
    out_config["num_hidden_layers"] = out_layer
  return MergePlan(tasks, out_config, ref)


# ----------------------------------------------------------------------------------------------------------------
# the per-tensor merge (shared by the streaming and in-memory paths)


def _vec(params, key, task):
  vals = [p[key] for p in params]
  for v, (path, _) in zip(vals, task.sources):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ValueError(f"{task.name}: parameter {key!r} for model {path} must be a number, got {v!r}")
  return np.asarray(vals, np.float64)


def _scalar(gparams, key, task):
  v = gparams[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError(f"{task.name}: parameter {key!r} must be a number, got {v!r}")
  return float(v)


def merge_tensor(method, task: MergeTask, base, sources, seed=0):
  """Merge one tensor: `base` (array or None) and `sources` (list of arrays) as planned by `task`.

  Returns a numpy array of `task.out_dtype`.  Raises ValueError prefixed with the tensor name on bad parameters.
  """
  ref = base if base is not None else sources[0]
  out_dtype = task.out_dtype
  if not np.issubdtype(ref.dtype, np.floating) and ref.dtype != jnp.bfloat16:
    return np.array(ref, copy=True)
  g = task.gparams
  if method == "passthrough":
    scale = _scalar(g, "scale", task)
    if scale == 1.0:
      return np.array(sources[0], dtype=out_dtype, copy=True)
  ct = jnp.promote_types(jnp.promote_types(jnp.result_type(*([ref] + list(sources))), out_dtype), jnp.float32)
  srcs = [jnp.asarray(s, dtype=ct) for s in sources]
  b = jnp.asarray(base, dtype=ct) if base is not None else None
  try:
    if method == "passthrough":
      out = srcs[0] * scale
    elif method == "linear":
      out = methods.linear(srcs, _vec(task.params, "weight", task), normalize=bool(g["normalize"]))
    elif method == "slerp":
      out = methods.slerp(b, srcs[0], _scalar(g, "t", task))
    elif method == "model_stock":
      out = methods.model_stock(b, srcs, filter_wise=bool(g["filter_wise"]))
    else:
      w = _vec(task.params, "weight", task)
      lam = _scalar(g, "lambda", task)
      norm = bool(g["normalize"])
      rescale = g["rescale"] if isinstance(g["rescale"], (bool, str)) else bool(g["rescale"])
      if method == "task_arithmetic":
        out = methods.task_arithmetic(b, srcs, w, lam, normalize=norm)
      elif method == "ties":
        out = methods.ties(b, srcs, w, _vec(task.params, "density", task), majority="sum", normalize=norm,
                           lambda_=lam, rescale=rescale)
      elif method in ("dare_linear", "dare_ties"):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), task.index)
        out = methods.dare(b, srcs, w, _vec(task.params, "density", task), key, rescale=rescale, then=method[5:],
                           majority="sum", normalize=norm, lambda_=lam)
      elif method in ("breadcrumbs", "breadcrumbs_ties"):
        out = methods.breadcrumbs(b, srcs, w, _vec(task.params, "density", task), _vec(task.params, "gamma", task),
                                  lambda_=lam, normalize=norm, rescale=rescale,
                                  majority="sum" if method == "breadcrumbs_ties" else None)
      else:
        raise ValueError(f"unknown merge_method {method!r}")
  except ValueError as e:
    if str(e).startswith(task.name):
      raise
    raise ValueError(f"{task.name}: {e}") from None
  return np.asarray(out).astype(out_dtype, copy=False)


def _inputs(task, get):
  base = get(*task.base) if task.base else None
  return base, [get(p, n) for p, n in task.sources]


# ----------------------------------------------------------------------------------------------------------------
# entry points


def _as_config(config, check_paths):
  if isinstance(config, MergeConfig):
    return config
  return load_config(config, check_paths=check_paths)


def merge_in_memory(config, tensors_by_model: dict, *, seed=0, configs: dict | None = None) -> dict:
  """Merge in-memory models: `tensors_by_model` maps each model (its resolved path or its name as written in the
  config) to a `{tensor name: array}` dict; `configs` optionally maps the same keys to config.json dicts.

  Models the config does not use are ignored.  Runs the same plan and per-tensor function as `run_merge`, so the
  results agree bit for bit.  Returns the merged `{name: numpy array}` in output order.
  """
  cfg = _as_config(config, check_paths=False)
  refs = ([cfg.base_model] if cfg.base_model else []) + list(cfg.models)
  for s in cfg.slices or []:
    refs += [src.model for src in s.sources]
  alias = {}
  for r in refs:
    alias[r.path] = r.path
    alias[r.name] = r.path
    alias[os.path.abspath(r.name)] = r.path
  models = {}
  for key, tensors in tensors_by_model.items():
    path = alias.get(key, alias.get(os.path.abspath(os.fspath(key))))
    if path is not None:
      models[path] = _DictModel(tensors, (configs or {}).get(key))
  plan = plan_merge(cfg, models)
  out = {}
  for task in plan.tasks:
    base, srcs = _inputs(task, lambda p, n: models[p].get(n))
    out[task.name] = merge_tensor(cfg.merge_method, task, base, srcs, seed)
  return out


def _fmt_bytes(n):
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024


def run_merge(config, out_dir, *, overwrite=False, max_shard_bytes=5e9, seed=0, progress=True, prefetch=False,
              stream=None):
  """Merge the checkpoints named by `config` (YAML path, YAML string, dict or MergeConfig) into `out_dir`.

  Streams one tensor at a time (see the module docstring); returns the absolute output directory.  `progress`
  prints a line about once a second (tensors and bytes done / total) to `stream` (default stderr); `seed` drives the
  DARE masks; `max_shard_bytes` bounds each output shard.  Refuses an `out_dir` that is, or contains, an input model.
  """
  cfg = _as_config(config, check_paths=True)
  out_dir = os.path.abspath(os.fspath(out_dir))
  for p in cfg.model_paths + ([cfg.tokenizer_source] if cfg.tokenizer_source else []):
    if out_dir == p or p.startswith(out_dir + os.sep):
      raise ValueError(f"output directory {out_dir} would overwrite the input {p}")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"output directory {out_dir} exists and is not empty (use --overwrite)")
  stream = sys.stderr if stream is None else stream
  readers = {p: CheckpointReader(p) for p in cfg.model_paths}
  plan = plan_merge(cfg, readers)
  check_tokenizers(cfg.model_paths)
  out_config = plan.config
  if out_config is not None and plan.tasks:
    dt = plan.tasks[0].out_dtype
    if dt in _TORCH_NAMES:
      out_config["torch_dtype"] = _TORCH_NAMES[dt]
      if "dtype" in out_config:
        out_config["dtype"] = _TORCH_NAMES[dt]
  tok_dir = cfg.tokenizer_source or plan.ref_path
  extra = {}
  if os.path.isdir(tok_dir):
    extra = {f: os.path.join(tok_dir, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tok_dir, f))}
  total = len(plan.tasks)
  total_bytes = sum(int(np.prod(readers[t.sources[0][0]].shape(t.sources[0][1]), dtype=np.int64))
                    * t.out_dtype.itemsize for t in plan.tasks)

  def read(task):
    return _inputs(task, lambda p, n: readers[p].get(n))

  def produce():
    done_bytes = 0
    last = 0.0
    start = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    try:
      nxt = pool.submit(read, plan.tasks[0]) if (pool and plan.tasks) else None
      for i, task in enumerate(plan.tasks):
        if pool:
          base, srcs = nxt.result()
          nxt = pool.submit(read, plan.tasks[i + 1]) if i + 1 < total else None
        else:
          base, srcs = read(task)
        merged = merge_tensor(cfg.merge_method, task, base, srcs, seed)
        del base, srcs
        done_bytes += merged.nbytes
        now = time.monotonic()
        if progress and (now - last >= 1.0 or i + 1 == total):
          last = now
          print(f"[merge] {i + 1}/{total} tensors, {_fmt_bytes(done_bytes)}/{_fmt_bytes(total_bytes)}, "
                f"{now - start:.1f}s", file=stream, flush=True)
        yield task.name, merged
    finally:
      if pool:
        pool.shutdown(wait=True, cancel_futures=True)

  try:
    return write_checkpoint(out_dir, produce(), out_config, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                            extra_files=extra)
  finally:
    for r in readers.values():
      r.close()


def enable_compile_cache(cache_dir):
  """Store every compiled kernel in JAX's persistent compilation cache under `cache_dir` (created if needed)."""
  cache_dir = os.path.abspath(os.fspath(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return cache_dir


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m jaxlab.merging.merge",
                               description="Merge Hugging Face safetensors checkpoints from a mergekit YAML config.")
  ap.add_argument("config", help="mergekit-style YAML config")
  ap.add_argument("out_dir", help="output checkpoint directory")
  ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  ap.add_argument("--shard-size", type=float, default=5e9, help="maximum bytes per output shard (default 5e9)")
  ap.add_argument("--seed", type=int, default=0, help="random seed for DARE masks (default 0)")
  ap.add_argument("--quiet", action="store_true", help="no progress output")
  ap.add_argument("--prefetch", action="store_true", help="read the next tensor on a background thread")
  ap.add_argument("--compile-cache", metavar="DIR", default=None,
                  help="persistent JAX compilation cache directory (reused across runs)")
  args = ap.parse_args(argv)
  if args.compile_cache:
    enable_compile_cache(args.compile_cache)
  try:
    out = run_merge(args.config, args.out_dir, overwrite=args.overwrite, max_shard_bytes=args.shard_size,
                    seed=args.seed, progress=not args.quiet, prefetch=args.prefetch)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.quiet:
    print(f"[merge] wrote {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
