"""ICGNN speed: batched inference of ICGNN vs WMMSE vs RZF on the same device and batch; SE vs CG iterations.

  python -m jaxlab.benchmark --only icgnn [--out benchmarks/results/icgnn.jsonl] [-- --run runs/icgnn_precoding
      --config configs/icgnn/precoding.py]

Every method is jitted and timed on the same batch of i.i.d. Rayleigh channels (SNR 10 dB). WMMSE runs its fixed
iteration budget (200 rounds under jit; a sample stops changing once it meets the tolerance, but the batch runs
all rounds), RZF uses a direct solve, ICGNN the full pipeline (graph, GNN, CG precoder). With ``--run`` the
trained parameters of that run are timed and scored, and the SE-vs-CG-iterations curve uses them; without it
the timing uses freshly initialised parameters (the same cost).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs.icgnn import precoding as precoding_config  # noqa: E402
from jaxlab.common import timing  # noqa: E402
from jaxlab.icgnn import metrics, precoding  # noqa: E402
from jaxlab.icgnn import cellfree, cellfree_train  # noqa: E402
from jaxlab.icgnn.train import host_channels, icgnn_precoder, load_trained, precoding_task  # noqa: E402

SIZES = ((8, 8), (8, 16), (16, 16), (16, 32))


def load_config(path: str):
  import importlib.util
  name, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("icgnn_bench_config", os.path.join(REPO, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def model_and_config(args):
  if args.run:
    config = load_config(args.config)
    model, _, _ = load_trained(config, args.run)
    return model, config
  config = precoding_config.get_config()
  task, _ = precoding_task(config)
  return task.init_model(jax.random.key(0)), config


def main(out: str | None = None, argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description="ICGNN benchmarks")
  ap.add_argument("--batch", type=int, default=1000)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--sizes", default=",".join(f"{k}x{n}" for k, n in SIZES), help="KxN list")
  ap.add_argument("--run", default="", help="a trained precoding run's workdir")
  ap.add_argument("--config", default="configs/icgnn/precoding.py", help="the config the run was trained with")
  ap.add_argument("--cg-iters", default="1,2,4,8,16,32", help="CG iterations for the SE curve")
  ap.add_argument("--cellfree-run", default="", help="also time a trained cell-free run against WMMSE power")
  ap.add_argument("--cellfree-config", default="configs/icgnn/cellfree.py")
  ap.add_argument("--cellfree-setups", type=int, default=200)
  ap.add_argument("--out", default=out)
  args = ap.parse_args(argv)
  model, config = model_and_config(args)
  mcfg = config.model
  P = float(10.0**(config.system.snr_db / 10.0) * config.system.sigma2)
  sigma2 = float(config.system.sigma2)
  env = {"method": "icgnn", "trained": bool(args.run), **timing.environment()}
  records = []
  for size in args.sizes.split(","):
    k, n = (int(v) for v in size.split("x"))
    batch = {key: jnp.asarray(v) for key, v in
             host_channels(np.random.default_rng([7, k, n]), args.batch, (k, k), (n, n), k, n).items()}
    H, um = batch["H"], batch["user_mask"]
    methods = {
        "icgnn": lambda b, T=k: icgnn_precoder(model, b, P, sigma2, T, rounds=mcfg.rounds,
                                               precoder_stats=mcfg.precoder_stats),
        "wmmse": lambda b: precoding.wmmse(b["H"], P, sigma2, iters=200, tol=1e-4)[0],
        "rzf": lambda b: precoding.rzf(b["H"], P, sigma2),
        "rzf_cg": lambda b, T=k: precoding.rzf_cg(b["H"], P, sigma2, T),
    }
    base = {**env, "workload": f"k{k}_n{n}", "batch_size": args.batch, "snr_db": config.system.snr_db}
    row = {}
    for name, fn in methods.items():
      rec = timing.time_jitted(fn, (batch,), iters=args.iters, warmup=1, examples_per_call=args.batch)
      W = jax.jit(fn)(batch)
      rec["sum_se"] = float(jnp.mean(metrics.sum_se(H, W, sigma2, um)))
      row[name] = rec
      records.append({**base, "what": f"inference_{name}", **rec})
    ratio = row["wmmse"]["step_ms_median"] / row["icgnn"]["step_ms_median"]
    records.append({**base, "what": "speedup_icgnn_over_wmmse", "ratio": ratio,
                    "sum_se_ratio": row["icgnn"]["sum_se"] / row["wmmse"]["sum_se"]})
    for T in (int(t) for t in args.cg_iters.split(",")):
      W = jax.jit(lambda b: icgnn_precoder(model, b, P, sigma2, T, rounds=mcfg.rounds,
                                           precoder_stats=mcfg.precoder_stats))(batch)
      W_rzf = precoding.rzf_cg(H, P, sigma2, T)
      records.append({**base, "what": "sum_se_vs_cg_iters", "cg_iters": T,
                      "icgnn_sum_se": float(jnp.mean(metrics.sum_se(H, W, sigma2, um))),
                      "rzf_cg_sum_se": float(jnp.mean(metrics.sum_se(H, W_rzf, sigma2, um)))})
  if args.cellfree_run:
    records += cellfree_records(args, env)
  for r in records:
    if args.out:
      timing.append_jsonl(args.out, r)
  print_table(records)
  return records


def cellfree_records(args, env) -> list[dict]:
  """ICGNN power allocation (one padded batch of link graphs) against WMMSE power on the same setups."""
  import time
  config = load_config(args.cellfree_config)
  model, _, _ = load_trained(config, args.cellfree_run)
  records = []
  for l, k, n in config.data.test_sizes:
    system = cellfree_train.system_for(config.system, l, k, n)
    data = cellfree_train.SetupSet(system, args.cellfree_setups, 123, args.cellfree_setups, f"l{l}_k{k}_n{n}")
    batch = jax.tree.map(jnp.asarray, next(iter(data.eval_batches())))
    arrays = {key: jnp.asarray(v) for key, v in data.arrays.items()}
    base = {**env, "workload": f"cellfree_l{l}_k{k}_n{n}", "batch_size": args.cellfree_setups}
    rec = timing.time_jitted(lambda b: cellfree_train.icgnn_powers(model, b, system), (batch,), iters=args.iters,
                             warmup=1, examples_per_call=args.cellfree_setups)
    rho = jax.jit(lambda b: cellfree_train.icgnn_powers(model, b, system))(batch)
    se = cellfree_train.se_of(rho, arrays, np.full(args.cellfree_setups, n, np.float32), system)
    rec["sum_se"] = float(jnp.mean(cellfree.sum_se(se, arrays["ue_mask_SxK"])))
    records.append({**base, "what": "inference_icgnn", **rec})
    wmmse = lambda: cellfree.wmmse_power(arrays, n, rho_max=system.rho_max_mw, tau_p=system.tau_p,
                                         tau_c=system.tau_c)[0]
    jax.block_until_ready(wmmse())
    times = []
    for _ in range(max(1, args.iters // 3)):
      start = time.perf_counter()
      rho_w = jax.block_until_ready(wmmse())
      times.append((time.perf_counter() - start) * 1e3)
    se = cellfree_train.se_of(rho_w, arrays, np.full(args.cellfree_setups, n, np.float32), system)
    wrec = {"step_ms_median": float(np.median(times)), "step_ms_p10": float(np.percentile(times, 10)),
            "step_ms_p90": float(np.percentile(times, 90)),
            "examples_per_s": args.cellfree_setups / (np.median(times) * 1e-3),
            "sum_se": float(jnp.mean(cellfree.sum_se(se, arrays["ue_mask_SxK"])))}
    records.append({**base, "what": "inference_wmmse", **wrec})
    records.append({**base, "what": "speedup_icgnn_over_wmmse", "ratio": wrec["step_ms_median"] / rec["step_ms_median"],
                    "sum_se_ratio": rec["sum_se"] / wrec["sum_se"]})
  return records


def print_table(records):
  print(f"{'workload':10s} {'what':20s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'samples/s':>10s} {'sum-SE':>8s}")
  for r in records:
    if r["what"].startswith("inference_"):
      print(f"{r['workload']:10s} {r['what'][10:]:20s} {r['step_ms_median']:10.2f} {r['step_ms_p10']:8.2f} "
            f"{r['step_ms_p90']:8.2f} {r['examples_per_s']:10.0f} {r['sum_se']:8.2f}")
    elif r["what"] == "speedup_icgnn_over_wmmse":
      print(f"{r['workload']:10s} ICGNN is {r['ratio']:.1f}x faster than WMMSE at {100 * r['sum_se_ratio']:.1f} % "
            "of its sum-SE")
  curves = [r for r in records if r["what"] == "sum_se_vs_cg_iters"]
  if curves:
    print("sum-SE vs CG iterations T (ICGNN / RZF-CG):")
    for r in curves:
      print(f"  {r['workload']:10s} T={r['cg_iters']:3d}  {r['icgnn_sum_se']:7.2f} / {r['rzf_cg_sum_se']:7.2f}")


if __name__ == "__main__":
  main()
