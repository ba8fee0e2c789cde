"""The UMM demonstration on synthetic skills: base -> experts -> homogeneous merges (incl. evolved layer-wise
coefficients) -> heterogeneous fusion; a table, a plot and ``results.json`` in the workdir.

Every model is a Hugging Face checkpoint under ``workdir/models/``; the merges run the same per-tensor code as
``python -m jaxlab.merging.merge`` and their mergekit-style configs are written to ``workdir/merges/*.yaml``.  Each
finished stage is read back on a rerun, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import yaml

from jaxlab.common import metrics as metrics_lib
from jaxlab.common import plots
from jaxlab.merging import evolve, hf, lm, skills
from jaxlab.merging import merge as merge_lib
from jaxlab.merging.model import LlamaConfig


@dataclasses.dataclass
class Result:
  metrics: dict


def mixture(spec) -> skills.Mixture:
  return skills.Mixture(tuple((t, (int(lo), int(hi)), float(w)) for t, lo, hi, w in spec))


def model_config(tok, spec) -> LlamaConfig:
  return LlamaConfig(vocab_size=len(tok.vocab), bos_id=tok.bos_id, eos_id=tok.eos_id, tie_embeddings=True,
                     **{k: (float(v) if k == "rope_theta" else int(v)) for k, v in dict(spec).items()})


def task_suites(config, split: str, n: int):
  return {f"{t}{lo}-{hi}": skills.sample(t, int(n), (int(lo), int(hi)), split, int(config.data_seed),
                                         allow_fewer=True) for t, lo, hi in config.eval_tasks}


def baseline_merges(config, base_path: str, expert_paths: list[str]) -> dict[str, dict]:
  """mergekit-style configs of the non-evolved merges of the experts (uniform weights, one global density)."""
  w, rho = float(config.merge.weight), float(config.merge.density)
  models = lambda extra: [{"model": p, "parameters": {"weight": w, **extra}} for p in expert_paths]
  return {
      "linear": {"merge_method": "linear", "models": models({}), "dtype": "float32"},
      "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base_path, "models": models({}),
                          "dtype": "float32"},
      "ties": {"merge_method": "ties", "base_model": base_path, "models": models({"density": rho}),
               "dtype": "float32"},
      "dare_ties": {"merge_method": "dare_ties", "base_model": base_path, "models": models({"density": rho}),
                    "dtype": "float32"},
  }


def _used(cfg: dict, tensors_by_model: dict) -> dict:
  paths = [m["model"] for m in cfg["models"]] + ([cfg["base_model"]] if "base_model" in cfg else [])
  return {p: tensors_by_model[p] for p in paths}


def _save_merge(workdir, name, cfg, tensors, mcfg):
  os.makedirs(os.path.join(workdir, "merges"), exist_ok=True)
  tmp = os.path.join(workdir, "merges", f".{name}.yaml.tmp")
  with open(tmp, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
  os.replace(tmp, os.path.join(workdir, "merges", f"{name}.yaml"))
  hf.write_checkpoint(os.path.join(workdir, "models", f"merge_{name}"), tensors, mcfg.to_hf(), overwrite=True)


def _table_md(table: dict, columns: list[str]) -> str:
  lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, row in table.items():
    lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" if c in row else "" for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _plot(table: dict, columns: list[str], path: str, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(table)
  fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 3.6))
  width = 0.8 / len(columns)
  for j, col in enumerate(columns):
    ax.bar(np.arange(len(names)) + (j - (len(columns) - 1) / 2) * width,
           [100 * table[n].get(col, np.nan) for n in names], width, label=col)
  ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
  ax.set_ylabel("test exact match (%)")
  ax.set_ylim(0, 125)
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=len(columns), loc="upper center")
  fig.tight_layout()
  plots.save_figure(fig, path)
  plt.close(fig)


def homogeneous(config, workdir, log=print):
  tok = skills.CharTokenizer()
  mcfg = model_config(tok, config.model)
  base = lm.train_stage("base", workdir, mcfg, mixture(config.base_mixture), tok, config, config.base_loop,
                        log=log)
  experts = {name: lm.train_stage(name, workdir, mcfg, mixture(spec), tok, config, config.expert_loop,
                                  init_tensors=base, log=log) for name, spec in config.experts.items()}
  path = lambda name: os.path.abspath(os.path.join(workdir, "models", name))
  tensors_by_model = {path("base"): base, **{path(n): t for n, t in experts.items()}}
  expert_paths = [path(n) for n in experts]
  suites = task_suites(config, "test", config.eval_examples)
  scores_path = os.path.join(workdir, "homogeneous_scores.json")
  table = json.load(open(scores_path)) if os.path.exists(scores_path) else {}

  def record(name, tensors):
    if name not in table:
      table[name] = lm.score(tensors, mcfg, tok, suites)
      metrics_lib.write_json_atomic(scores_path, table)
      log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[name].items()))

  record("base", base)
  for name, t in experts.items():
    record(f"expert:{name}", t)
  for name, cfg in baseline_merges(config, path("base"), expert_paths).items():
    if f"merge:{name}" in table:
      continue
    merged = merge_lib.merge_in_memory(cfg, _used(cfg, tensors_by_model), seed=int(config.merge.seed))
    _save_merge(workdir, name, cfg, merged, mcfg)
    record(f"merge:{name}", merged)

  ev = config.evolve
  genome = evolve.Genome(ev.method, mcfg.num_layers, expert_paths, path("base"),
                         layer_granularity=int(ev.layer_granularity), weight_bounds=tuple(ev.weight_bounds))
  dev = task_suites(config, "dev", ev.dev_examples)
  best = evolve.cma_search(genome, tensors_by_model, mcfg, tok, dev, os.path.join(workdir, "evolve"),
                           max_evals=int(ev.max_evals), sigma0=float(ev.sigma0), popsize=int(ev.popsize),
                           seed=int(ev.seed), x0=genome.initial(float(config.merge.weight),
                                                                float(config.merge.density)),
                           merge_seed=int(config.merge.seed), log=log)
  name = f"merge:evolved_{ev.method}"
  scored = os.path.join(workdir, "evolve", "scored_genome.json")
  if name in table and (not os.path.exists(scored) or json.load(open(scored)) != best["x"]):
    del table[name]          # a longer search found another genome: score it again
  if name not in table:
    merged = merge_lib.merge_in_memory(best["config"], tensors_by_model, seed=int(config.merge.seed))
    _save_merge(workdir, f"evolved_{ev.method}", best["config"], merged, mcfg)
    record(name, merged)
    metrics_lib.write_json_atomic(scored, best["x"])
  order = ["base"] + [f"expert:{n}" for n in experts] + [f"merge:{n}" for n in baseline_merges(config, "", [])] + [name]
  table = {k: table[k] for k in order}
  return table, {"evolve_best_dev": best["dev"], "evolve_best_fitness": best["fitness"],
                 "evolve_evaluations": int(ev.max_evals), "genome_size": genome.size}


def train_and_evaluate(config, workdir: str, eval_only: bool = False, log=print) -> Result:
  del eval_only
  os.makedirs(workdir, exist_ok=True)
  table, extra = homogeneous(config, workdir, log)
  columns = [f"{t}{lo}-{hi}" for t, lo, hi in config.eval_tasks]
  results = {"test_exact_match": table, **extra}
  if config.fusion.enabled:
    from jaxlab.merging import fusion_demo
    fusion_table = fusion_demo.run(config, workdir, log)
    results["fusion_test_exact_match"] = fusion_table
  metrics_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
  md = "## Homogeneous merging (test exact match, %)\n\n" + _table_md(table, columns)
  _plot(table, columns, os.path.join(workdir, "homogeneous.png"), "experts and their merges")
  if "fusion_test_exact_match" in results:
    ft = results["fusion_test_exact_match"]
    fcols = columns
    md += "\n## Heterogeneous fusion (test exact match, %)\n\n" + _table_md(ft, fcols)
    _plot(ft, fcols, os.path.join(workdir, "fusion.png"), "distribution fusion into a different architecture")
  tmp = os.path.join(workdir, ".table.md.tmp")
  with open(tmp, "w") as f:
    f.write(md)
  os.replace(tmp, os.path.join(workdir, "table.md"))
  log(md)
  return Result({"test/" + k: v for k, v in table.items()})
