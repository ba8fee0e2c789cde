"""Merging speed and memory: jaxlab's streaming merge CLI against mergekit on the same checkpoints and configs.

  python benchmarks/merging.py [--out benchmarks/results/merging_cpu_2core.jsonl] [--repeats 2]
      [--methods linear,ties,dare_ties] [--workdir /tmp/jaxlab_merging_bench] [--small]

Three float32 Hugging Face-format Llama checkpoints with SmolLM2-135M shapes (vocab 49152, hidden 576, FFN 1536,
30 layers, 9 query / 3 KV heads, tied embeddings; 134.5M parameters, 538 MB each) are created once and cached in
``--workdir``: a random base (matrices N(0, 0.02), norm weights 1 + N(0, 0.02)) and two experts, base plus a
deterministic N(0, 1e-3) perturbation each.  ``--small`` uses 2 layers of width 64 for a smoke test.

For each method (linear over all three; ties and dare_ties with the base model, density 0.5) one mergekit
YAML config (``dtype: float32``) is written and merged, in the same run, by

  mergekit   ``mergekit-yaml CFG OUT --no-copy-tokenizer --no-write-model-card --quiet`` (mergekit's CPU defaults:
             lazy per-tensor safetensors loading, synchronous writes, torch's default thread count) and
  jaxlab     ``python -m jaxlab.merging.merge CFG OUT --quiet``,

each as its own child process, in alternating order, ``--repeats`` times.  Per run: wall seconds, the child's peak
RSS (``os.wait4`` rusage of exactly that child) and its user/system CPU seconds.  Per method: median wall time and
peak RSS, the mergekit/jaxlab ratios, and, for the deterministic methods, the max abs difference between the two
outputs tensor by tensor (for dare_ties the random masks differ, so the norms of the merged deltas are compared).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from jaxlab.common import timing  # noqa: E402

FULL = dict(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3)
SMALL = dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
MODELS = ("base", "expert_a", "expert_b")
METHODS = ("linear", "ties", "dare_ties")
# mergekit pins its own torch, so it usually lives in a separate virtual environment: point --mergekit (or
# MERGEKIT_YAML) at that environment's mergekit-yaml.
DEFAULT_MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml") or ""


def tensor_specs(dims: dict) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of a tied-embedding Llama checkpoint in Hugging Face naming."""
  h, i = dims["hidden"], dims["intermediate"]
  kv = h // dims["heads"] * dims["kv_heads"]
  specs = [("model.embed_tokens.weight", (dims["vocab"], h))]
  for layer in range(dims["layers"]):
    p = f"model.layers.{layer}."
    specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
              (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
              (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
              (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
              (p + "mlp.down_proj.weight", (h, i))]
  specs.append(("model.norm.weight", (h,)))
  return specs


def llama_config(dims: dict) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": dims["vocab"],
          "hidden_size": dims["hidden"], "intermediate_size": dims["intermediate"],
          "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
          "num_key_value_heads": dims["kv_heads"], "head_dim": dims["hidden"] // dims["heads"], "hidden_act": "silu",
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
          "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
          "initializer_range": 0.02}


def model_tensors(model: str, dims: dict):
  """Yield (name, float32 array); the same inputs give the same arrays."""
  for index, (name, shape) in enumerate(tensor_specs(dims)):
    rng = np.random.default_rng([0, index])
    if len(shape) == 1:
      base = (1.0 + rng.normal(0.0, 0.02, size=shape)).astype(np.float32)
    else:
      base = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    if model != "base":
      noise = np.random.default_rng([MODELS.index(model), index]).normal(0.0, 1e-3, size=shape)
      base = (base + noise).astype(np.float32)
    yield name, base


def write_model(path: str, model: str, dims: dict) -> None:
  config = llama_config(dims)
  try:
    from jaxlab.merging.hf import write_checkpoint
  except ImportError:
    write_checkpoint = None
  if write_checkpoint is not None:
    write_checkpoint(path, model_tensors(model, dims), config, overwrite=True)
    return
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  save_file(dict(model_tensors(model, dims)), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def ensure_models(workdir: str, dims: dict) -> dict:
  """Create the three checkpoints unless cached (a stamp file records the shapes they were made with)."""
  paths = {}
  stamp = json.dumps(dims, sort_keys=True)
  for model in MODELS:
    path = os.path.join(workdir, "models", model)
    stamp_file = os.path.join(path, ".bench_stamp")
    if not (os.path.isfile(stamp_file) and open(stamp_file).read() == stamp):
      shutil.rmtree(path, ignore_errors=True)
      start = time.perf_counter()
      write_model(path, model, dims)
      with open(stamp_file, "w") as f:
        f.write(stamp)
      print(f"[bench] created {path} in {time.perf_counter() - start:.1f}s", flush=True)
    paths[model] = path
  return paths


def merge_config(method: str, paths: dict, density: float) -> str:
  a, b = paths["expert_a"], paths["expert_b"]
  if method == "linear":
    return (f"merge_method: linear\ndtype: float32\nmodels:\n"
            f"  - model: {paths['base']}\n    parameters:\n      weight: 0.2\n"
            f"  - model: {a}\n    parameters:\n      weight: 0.5\n"
            f"  - model: {b}\n    parameters:\n      weight: 0.3\n")
  return (f"merge_method: {method}\ndtype: float32\nbase_model: {paths['base']}\nmodels:\n"
          f"  - model: {a}\n    parameters:\n      weight: 0.6\n      density: {density}\n"
          f"  - model: {b}\n    parameters:\n      weight: 0.4\n      density: {density}\n")


def run_child(cmd: list[str], log_path: str) -> dict:
  """Run one command; wall time and the rusage (peak RSS, CPU) of exactly that child."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  with open(log_path, "w") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "user_s": usage.ru_utime,
          "sys_s": usage.ru_stime, "returncode": proc.returncode}


def _reader(path):
  from jaxlab.merging.hf import CheckpointReader
  return CheckpointReader(path)


def compare_outputs(mk_dir: str, jl_dir: str, base_dir: str | None, deterministic: bool) -> dict:
  """Max abs difference tensor by tensor (deterministic methods), or the merged-delta norms (random masks)."""
  mk, jl = _reader(mk_dir), _reader(jl_dir)
  base = _reader(base_dir) if base_dir else None
  names_mk, names_jl = set(mk.names()), set(jl.names())
  result = {"tensors": len(names_jl), "missing_in_jaxlab": sorted(names_mk - names_jl)[:5],
            "extra_in_jaxlab": sorted(names_jl - names_mk)[:5]}
  max_abs, worst, n_diff, total = 0.0, None, 0, 0
  sq_mk = sq_jl = 0.0
  for name in sorted(names_mk & names_jl):
    a = np.asarray(mk.get(name), np.float64)
    b = np.asarray(jl.get(name), np.float64)
    if a.shape != b.shape:
      result.setdefault("shape_mismatch", []).append(name)
      continue
    total += a.size
    if deterministic:
      diff = np.abs(a - b)
      m = float(diff.max()) if diff.size else 0.0
      n_diff += int(np.count_nonzero(diff > 1e-6))
      if m > max_abs:
        max_abs, worst = m, name
    elif base is not None:
      ref = np.asarray(base.get(name), np.float64)
      sq_mk += float(np.sum((a - ref) ** 2))
      sq_jl += float(np.sum((b - ref) ** 2))
  for r in (mk, jl) + ((base,) if base else ()):
    r.close()
  result["elements"] = total
  if deterministic:
    result.update(max_abs_diff=max_abs, worst_tensor=worst, elements_diff_gt_1e6=n_diff)
  else:
    result.update(delta_norm_mergekit=sq_mk ** 0.5, delta_norm_jaxlab=sq_jl ** 0.5,
                  delta_norm_ratio=(sq_mk / sq_jl) ** 0.5 if sq_jl else None)
  return result


def main(out: str | None = None, argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description="mergekit vs jaxlab merge CLI (wall time, peak RSS, output agreement)")
  ap.add_argument("--workdir", default="/tmp/jaxlab_merging_bench", help="cached checkpoints, configs, outputs, logs")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--density", type=float, default=0.5)
  ap.add_argument("--small", action="store_true", help="2 layers of width 64 (smoke test)")
  ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable ('' to skip)")
  ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options (space separated)")
  ap.add_argument("--jaxlab-args", default="", help="extra jaxlab merge options, e.g. --prefetch")
  ap.add_argument("--keep-outputs", action="store_true", help="keep the merged checkpoints in the workdir")
  ap.add_argument("--out", default=out)
  args = ap.parse_args(argv)
  dims = SMALL if args.small else FULL
  workdir = os.path.join(args.workdir, "small" if args.small else "smollm2_135m")
  os.makedirs(workdir, exist_ok=True)
  paths = ensure_models(workdir, dims)
  n_params = sum(int(np.prod(s)) for _, s in tensor_specs(dims))
  tools = {"jaxlab": [sys.executable, "-m", "jaxlab.merging.merge"]}
  if args.mergekit:
    tools["mergekit"] = [args.mergekit]
  env = {"method_group": "merging", **timing.environment(), "load_avg_start": os.getloadavg()[0],
         "workload": "small" if args.small else "smollm2_135m_f32", "params": n_params,
         "mergekit_cmd_options": "--no-copy-tokenizer --no-write-model-card --quiet " + args.mergekit_args,
         "jaxlab_cmd_options": "--quiet " + args.jaxlab_args}
  try:
    from importlib.metadata import version
    env["mergekit_version"] = subprocess.run(
        [os.path.join(os.path.dirname(args.mergekit), "python"), "-c",
         "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True, text=True).stdout.strip() if args.mergekit else None
    env["jaxlab_jax_version"] = version("jax")
  except Exception:  # version lookups are informational only
    pass
  records = []
  for method in args.methods.split(","):
    cfg_path = os.path.join(workdir, f"{method}.yaml")
    with open(cfg_path, "w") as f:
      f.write(merge_config(method, paths, args.density))
    runs = {tool: [] for tool in tools}
    order = list(tools)
    for rep in range(args.repeats):
      for tool in (order if rep % 2 == 0 else order[::-1]):
        out_dir = os.path.join(workdir, "out", f"{method}_{tool}")
        shutil.rmtree(out_dir, ignore_errors=True)
        if tool == "mergekit":
          cmd = tools[tool] + [cfg_path, out_dir, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
          cmd += args.mergekit_args.split()
        else:
          cmd = tools[tool] + [cfg_path, out_dir, "--quiet"] + args.jaxlab_args.split()
        rec = run_child(cmd, os.path.join(workdir, f"{method}_{tool}_{rep}.log"))
        rec.update(env, what="merge_run", method=method, tool=tool, repeat=rep, load_avg=os.getloadavg()[0])
        records.append(rec)
        runs[tool].append(rec)
        print(f"[bench] {method:10s} {tool:9s} rep {rep}: {rec['wall_s']:.1f}s, {rec['peak_rss_mb']:.0f} MB, "
              f"rc {rec['returncode']}", flush=True)
    summary = {**env, "what": "merge_summary", "method": method, "repeats": args.repeats}
    for tool, recs in runs.items():
      ok = [r for r in recs if r["returncode"] == 0]
      summary[f"{tool}_ok"] = len(ok) == len(recs)
      if ok:
        summary[f"{tool}_wall_s"] = float(np.median([r["wall_s"] for r in ok]))
        summary[f"{tool}_peak_rss_mb"] = float(np.median([r["peak_rss_mb"] for r in ok]))
        summary[f"{tool}_cpu_s"] = float(np.median([r["user_s"] + r["sys_s"] for r in ok]))
    if "mergekit_wall_s" in summary and "jaxlab_wall_s" in summary:
      summary["time_ratio_mergekit_over_jaxlab"] = summary["mergekit_wall_s"] / summary["jaxlab_wall_s"]
      summary["rss_ratio_mergekit_over_jaxlab"] = summary["mergekit_peak_rss_mb"] / summary["jaxlab_peak_rss_mb"]
      mk_dir = os.path.join(workdir, "out", f"{method}_mergekit")
      jl_dir = os.path.join(workdir, "out", f"{method}_jaxlab")
      cmp = compare_outputs(mk_dir, jl_dir, None if method == "linear" else paths["base"],
                            deterministic=not method.startswith("dare"))
      summary.update({f"cmp_{k}": v for k, v in cmp.items()})
    records.append(summary)
    if not args.keep_outputs:
      shutil.rmtree(os.path.join(workdir, "out"), ignore_errors=True)
  for r in records:
    if args.out:
      timing.append_jsonl(args.out, r)
  print_table(records)
  return records


def print_table(records):
  print(f"{'method':10s} {'mk s':>7s} {'jl s':>7s} {'t ratio':>7s} {'mk MB':>7s} {'jl MB':>7s} {'rss ratio':>9s} "
        f"{'max|diff|':>10s} {'n>1e-6':>7s}")
  for r in records:
    if r["what"] != "merge_summary":
      continue

    def f(key, fmt):
      v = r.get(key)
      return format(v, fmt) if isinstance(v, (int, float)) else "-"
    diff = f("cmp_max_abs_diff", ".3g") if "cmp_max_abs_diff" in r else f("cmp_delta_norm_ratio", ".4f") + "*"
    print(f"{r['method']:10s} {f('mergekit_wall_s', '7.1f')} {f('jaxlab_wall_s', '7.1f')} "
          f"{f('time_ratio_mergekit_over_jaxlab', '7.2f')} {f('mergekit_peak_rss_mb', '7.0f')} "
          f"{f('jaxlab_peak_rss_mb', '7.0f')} {f('rss_ratio_mergekit_over_jaxlab', '9.2f')} {diff:>10s} "
          f"{f('cmp_elements_diff_gt_1e6', '7d')}")
  print("(* dare_ties: ratio of the merged-delta norms, mergekit / jaxlab; masks are random)")


if __name__ == "__main__":
  main()
