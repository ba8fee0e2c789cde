"""UMM's homogeneous strategy: CMA-ES over layer-wise merge coefficients, scored on a development set.

Genome (``mergekit-evolve`` layout): ``G`` layer groups of ``layer_granularity`` consecutive decoder layers, plus one
group for the tensors outside the layers (embedding, final norm), times ``M`` source models, times the method's
parameters (``weight`` for linear/task arithmetic; ``weight`` and ``density`` for TIES, DARE-TIES and breadcrumbs).
Every genome decodes to an ordinary mergekit-style config whose parameters are filter lists
``[{filter: "model.layers.3.", value: ...}, ..., {value: <non-layer gene>}]``, so the best genome is saved as a
YAML file that ``python -m jaxlab.merging.merge`` (or mergekit) reproduces exactly.

Decoding: the search runs in a box (``cma``'s bound handling): weights in ``weight_bounds`` and densities in
``[density_min, 1]``; values are used as decoded, without renormalisation (TIES normalises by the agreeing weights
itself).

Candidates of one CMA-ES generation are merged one after another but scored together: their parameters are stacked
and the jitted greedy decoder is vmapped over the model axis, so a generation is one compiled call per dev task.
Every evaluation is appended to ``history.jsonl``; a rerun replays it through the same seeded CMA-ES, so a killed
search resumes without re-scoring.
"""
from __future__ import annotations

import json
import math
import os

import cma
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxlab.merging import merge as merge_lib
from jaxlab.common.metrics import write_json_atomic
from jaxlab.merging.model import LlamaConfig, generate_from_state, model_from_tensors

PARAMS = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
          "dare_ties": ("weight", "density"), "dare_linear": ("weight", "density"),
          "breadcrumbs": ("weight", "density"), "breadcrumbs_ties": ("weight", "density")}


class Genome:
  """Layout of the search vector and its decoding into a mergekit-style config dict."""

  def __init__(self, method: str, num_layers: int, sources: list[str], base: str | None, *,
               layer_granularity: int = 1, weight_bounds=(0.0, 1.5), density_min: float = 0.05,
               extra_parameters: dict | None = None):
    if method not in PARAMS:
      raise ValueError(f"evolutionary merging supports {sorted(PARAMS)}, got {method!r}")
    if layer_granularity < 1 or num_layers < 1:
      raise ValueError(f"need num_layers >= 1 and layer_granularity >= 1, got {num_layers}, {layer_granularity}")
    if method != "linear" and base is None:
      raise ValueError(f"{method} needs a base model")
    self.method, self.num_layers, self.sources, self.base = method, num_layers, list(sources), base
    self.granularity = layer_granularity
    self.groups = math.ceil(num_layers / layer_granularity) + 1  # the last group: tensors outside the layers
    self.params = PARAMS[method]
    self.extra = dict(extra_parameters or {})
    lo = {"weight": weight_bounds[0], "density": density_min}
    hi = {"weight": weight_bounds[1], "density": 1.0}
    self.lower = np.array([lo[p] for _ in range(self.groups) for _ in self.sources for p in self.params])
    self.upper = np.array([hi[p] for _ in range(self.groups) for _ in self.sources for p in self.params])

  @property
  def size(self) -> int:
    return self.groups * len(self.sources) * len(self.params)

  def initial(self, weight: float = 1.0, density: float = 0.5) -> np.ndarray:
    start = {"weight": weight, "density": density}
    return np.array([start[p] for _ in range(self.groups) for _ in self.sources for p in self.params], np.float64)

  def values(self, x) -> np.ndarray:
    """``[groups, sources, params]`` clipped into the box."""
    x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
    return x.reshape(self.groups, len(self.sources), len(self.params))

  def to_config(self, x) -> dict:
    v = self.values(x)
    models = []
    for s, path in enumerate(self.sources):
      params = {}
      for p, name in enumerate(self.params):
        entries = []
        for layer in range(self.num_layers):
          entries.append({"filter": f"model.layers.{layer}.", "value": float(v[layer // self.granularity, s, p])})
        entries.append({"value": float(v[-1, s, p])})
        params[name] = entries
      models.append({"model": path, "parameters": params})
    cfg = {"merge_method": self.method, "models": models, "dtype": "float32"}
    if self.base is not None:
      cfg["base_model"] = self.base
    if self.extra:
      cfg["parameters"] = dict(self.extra)
    return cfg


def _stack_states(tensor_dicts, model_cfg):
  states = []
  graphdef = None
  for t in tensor_dicts:
    graphdef, state = nnx.split(model_from_tensors(model_cfg, t))
    states.append(state)
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _many(graphdef, states, prompt, lengths, max_new, eos_id):
  fn = lambda st: generate_from_state(graphdef, st, prompt, lengths, max_new, True, jnp.float32(1.0), jax.random.key(0),
                                eos_id)
  return jax.vmap(fn)(states)


_many_jit = jax.jit(_many, static_argnums=(0, 4))


def exact_match_many(tensor_dicts, model_cfg: LlamaConfig, tok, pairs) -> np.ndarray:
  """Exact-match accuracy of several same-shaped models on ``pairs``, decoded together (vmapped over models)."""
  graphdef, states = _stack_states(tensor_dicts, model_cfg)
  ids = [[tok.bos_id] + tok.encode(p) for p, _ in pairs]
  t = max(map(len, ids))
  arr = np.zeros((len(ids), t), np.int32)
  for j, row in enumerate(ids):
    arr[j, :len(row)] = row
  lens = np.array([len(r) for r in ids], np.int32)
  max_new = max(len(tok.encode(a)) for _, a in pairs) + 1
  out = np.asarray(_many_jit(graphdef, states, jnp.asarray(arr), jnp.asarray(lens), max_new, tok.eos_id))
  return np.array([np.mean([tok.decode(o[j]) == a for j, (_, a) in enumerate(pairs)]) for o in out])


def _read_history(path):
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  return rows


def cma_search(genome: Genome, tensors_by_model: dict, model_cfg: LlamaConfig, tok, dev_suites: dict, workdir: str,
               *, max_evals: int = 100, sigma0: float = 0.2, popsize: int = 0, seed: int = 0, x0=None,
               merge_seed: int = 0, log=print) -> dict:
  """Minimise ``1 - mean dev exact match`` over the genome with CMA-ES; returns the best genome and its config.

  ``tensors_by_model`` maps every model path in the genome (sources and base) to its tensors; ``dev_suites`` maps
  a task name to (prompt, answer) pairs; the fitness is the mean over tasks.  Writes ``history.jsonl``,
  ``best.json`` and ``best.yaml`` (the merge config) in ``workdir``.
  """
  os.makedirs(workdir, exist_ok=True)
  hist_path = os.path.join(workdir, "history.jsonl")
  history = _read_history(hist_path)
  x0 = genome.initial() if x0 is None else np.asarray(x0, np.float64)
  opts = {"bounds": [genome.lower.tolist(), genome.upper.tolist()], "seed": seed + 1, "maxfevals": max_evals,
          "verbose": -9, "verb_log": 0, "verb_disp": 0,
          # exact-match fitness is discrete: plateaus are expected, so the budget alone ends the search
          "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9}
  if popsize:
    opts["popsize"] = popsize
  es = cma.CMAEvolutionStrategy(x0.tolist(), sigma0, opts)
  done = 0
  best = None
  while done < max_evals and not es.stop():
    xs = es.ask()
    xs = xs[:max_evals - done]
    fits = []
    pending = []
    for i, x in enumerate(xs):
      if done + i < len(history):
        row = history[done + i]
        if not np.allclose(row["x"], np.asarray(x), rtol=0, atol=1e-9) or set(row["dev"]) != set(dev_suites):
          raise ValueError(f"{hist_path} does not replay: entry {done + i} differs from the seeded search "
                           "(different settings or dev tasks?); move it away to start afresh")
        fits.append(row["fitness"])
      else:
        fits.append(None)
        pending.append(i)
    if pending:
      merged = [merge_lib.merge_in_memory(genome.to_config(xs[i]), tensors_by_model, seed=merge_seed)
                for i in pending]
      scores = {name: exact_match_many(merged, model_cfg, tok, pairs) for name, pairs in dev_suites.items()}
      with open(hist_path, "a") as f:
        for k, i in enumerate(pending):
          per_task = {name: float(s[k]) for name, s in scores.items()}
          fit = float(np.mean(list(per_task.values())))
          fits[i] = fit
          row = {"eval": done + i, "x": np.asarray(xs[i]).tolist(), "fitness": fit, "dev": per_task}
          f.write(json.dumps(row) + "\n")
          history.append(row)
    if len(xs) == es.popsize:
      es.tell(xs, [1.0 - f for f in fits])
    done += len(xs)
    gen_best = int(np.argmax(fits))
    if best is None or fits[gen_best] > best["fitness"]:
      best = {"fitness": fits[gen_best], "x": np.asarray(xs[gen_best]).tolist(), "eval": done - len(xs) + gen_best}
    log(f"evolve: {done}/{max_evals} evaluations, generation best {max(fits):.3f}, best so far {best['fitness']:.3f}")
  best["config"] = genome.to_config(best["x"])
  best["dev"] = history[best["eval"]]["dev"]
  write_json_atomic(os.path.join(workdir, "best.json"), best)
  tmp = os.path.join(workdir, ".best.yaml.tmp")
  with open(tmp, "w") as f:
    yaml.safe_dump(best["config"], f, sort_keys=False)
  os.replace(tmp, os.path.join(workdir, "best.yaml"))
  return best
