"""The one training loop shared by every method.

A method supplies a :class:`Task`: how to build (and calibrate) its model, a loss, an evaluation and its data.
The loop owns everything else: optimizer and schedule, EMA, data-parallel placement, the jitted and donated
step, periodic evaluation with best-checkpoint selection, orbax checkpoints with exact resume, JSONL metrics,
a progress line and the non-finite-loss guard.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab.common import checkpoint as ckpt_lib
from jaxlab.common import mesh as mesh_lib
from jaxlab.common import metrics as metrics_lib
from jaxlab.common import optim
from jaxlab.common import plots

Batch = Any
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, Batch, jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass
class Task:
  """What a method hands to :func:`train`.

  init_model: key -> model (NNX module).
  loss_fn: (model, batch, key) -> (scalar loss, named loss terms); the names appear in logs and in the
    non-finite guard's message.
  eval_fn: (model, batch, key) -> dict of per-batch *sums* (they are added over batches, then divided by
    ``finalize``); batches carry ``example_mask``.
  train_batch: step -> host batch; must depend on the step only (exact resume).
  steps_per_epoch: for the per-epoch learning-rate schedule.
  eval_sets: name -> callable returning an iterable of host batches ("val" selects the best parameters).
  finalize: sums -> reported metrics (e.g. ``{"mae": s["abs_err"] / s["count"]}``).
  select: the finalized validation metric to minimise for best-parameter selection.
  calibrate: optional (model, host batch) -> None, run once on a fresh start, before the first step.
  """
  init_model: Callable[[jax.Array], nnx.Module]
  loss_fn: LossFn
  eval_fn: EvalFn
  train_batch: Callable[[int], Batch]
  steps_per_epoch: int
  eval_sets: dict[str, Callable[[], Iterable[Batch]]]
  finalize: Callable[[dict[str, float]], dict[str, float]]
  select: str
  calibrate: Callable[[nnx.Module, Batch], None] | None = None


@dataclasses.dataclass
class Result:
  step: int
  best_step: int
  metrics: dict[str, dict[str, float]]
  state: Any
  graphdef: Any


class Trainer:
  """Builds the jitted step and evaluation for a task; :meth:`run` is the loop."""

  def __init__(self, task: Task, cfg, workdir: str, mesh=None, log=print, config_json: str | None = None,
               stop_at_step: int | None = None, eval_only: bool = False):
    self.task, self.cfg, self.workdir, self.log = task, cfg, workdir, log
    self.config_json = config_json
    self.stop_at_step = stop_at_step
    self.eval_only = eval_only
    self.mesh = mesh or mesh_lib.make_data_mesh()
    self.num_steps = int(cfg.num_epochs * task.steps_per_epoch) if cfg.get("num_steps", 0) <= 0 \
        else int(cfg.num_steps)
    self.schedule = optim.cosine_warmup_per_epoch(
        cfg.learning_rate, task.steps_per_epoch, max(cfg.num_epochs, self.num_steps / task.steps_per_epoch),
        cfg.warmup_epochs)
    self.base_key = jax.random.key(cfg.seed)

  # ----- state -------------------------------------------------------------------------------------------
  def init_state(self, calibrate_batch=None):
    model = self.task.init_model(jax.random.fold_in(self.base_key, 10**6))
    if calibrate_batch is not None and self.task.calibrate is not None:
      self.task.calibrate(model, calibrate_batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.graphdef = graphdef
    self.tx = optim.make_optimizer(self.cfg, self.schedule, params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": self.tx.init(params),
        "ema": params if self.cfg.ema_decay > 0 else {},
        "best_params": params,
        "best_metric": jnp.full((), jnp.inf, jnp.float32),
        "best_step": jnp.zeros((), jnp.int32),
    }
    # put_replicated makes separate device buffers for params, ema and best_params (needed for donation).
    return mesh_lib.put_replicated(state, self.mesh)

  def eval_params(self, state):
    return state["ema"] if self.cfg.ema_decay > 0 else state["params"]

  # ----- jitted pieces -----------------------------------------------------------------------------------
  def _train_step(self, state, batch):
    step = state["step"]
    key = jax.random.fold_in(self.base_key, step)

    def loss_of(params):
      model = nnx.merge(self.graphdef, params, state["rest"])
      return self.task.loss_fn(model, batch, key)

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=step + 1, params=params, opt_state=opt_state)
    if self.cfg.ema_decay > 0:
      d = self.cfg.ema_decay
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(step)}
    return new, metrics

  def _eval_step(self, params, rest, batch, key):
    model = nnx.merge(self.graphdef, params, rest)
    return self.task.eval_fn(model, batch, key)

  def _update_best(self, state, metric, step):
    better = metric < state["best_metric"]
    pick = lambda new, old: jnp.where(better, new, old)
    return dict(state, best_params=jax.tree.map(pick, self.eval_params(state), state["best_params"]),
                best_metric=pick(metric, state["best_metric"]), best_step=pick(step, state["best_step"]))

  def compile(self, state):
    repl = mesh_lib.replicated(self.mesh)
    data = mesh_lib.batch_sharded(self.mesh)
    state_sh = jax.tree.map(lambda _: repl, state)
    self.train_step = jax.jit(self._train_step, in_shardings=(state_sh, data), out_shardings=(state_sh, repl),
                              donate_argnums=(0,))
    self.eval_step = jax.jit(self._eval_step, in_shardings=(repl, repl, data, repl), out_shardings=repl)
    self.update_best = jax.jit(self._update_best, in_shardings=(state_sh, repl, repl), out_shardings=state_sh,
                               donate_argnums=(0,))

  def evaluate(self, params, rest, name: str, step: int) -> dict[str, float]:
    sums: dict[str, float] = {}
    key = jax.random.fold_in(jax.random.fold_in(self.base_key, 2**30), step)
    for i, batch in enumerate(self.task.eval_sets[name]()):
      out = self.eval_step(params, rest, mesh_lib.put_global_batch(batch, self.mesh), jax.random.fold_in(key, i))
      for k, v in mesh_lib.to_host(out).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return self.task.finalize(sums)

  # ----- the loop ----------------------------------------------------------------------------------------
  def run(self) -> Result:
    cfg, task = self.cfg, self.task
    writer = metrics_lib.MetricWriter(self.workdir)
    checkpointer = ckpt_lib.Checkpointer(f"{self.workdir}/checkpoints", keep=cfg.get("keep_checkpoints", 2))
    config_json = self.config_json
    expect = {"config": config_json} if config_json is not None else {}

    first_batch = task.train_batch(0)
    mesh_lib.check_batch_divisible(jax.tree.leaves(first_batch)[0].shape[0], self.mesh)
    latest = checkpointer.latest_step()
    if self.eval_only:
      # Evaluation settings (e.g. test-time rotations) may differ from the training run's, so the stored
      # config is not required to match; the parameter structure still is.
      if latest is None:
        raise FileNotFoundError(f"--eval_only: no checkpoint in {checkpointer.directory}")
      expect = {}
    if latest is None:
      state = self.init_state(calibrate_batch=first_batch)
    else:
      state = self.init_state(calibrate_batch=None)
      state, _ = checkpointer.restore(state, expect_meta=expect)
      self.log(f"resumed from {checkpointer.directory} at step {latest}")
    self.compile(state)
    start = int(mesh_lib.to_host(state["step"]))
    meta = {"config": config_json, "num_steps": self.num_steps}

    progress = metrics_lib.Progress(self.num_steps, start)
    pending = None  # (step, metrics on device), fetched one step late so the host never waits for the device
    eval_every = cfg.eval_every_steps if cfg.eval_every_steps > 0 else task.steps_per_epoch
    t_last, s_last = time.perf_counter(), start

    def drain(p):
      step_done, m = p
      m = mesh_lib.to_host(m)
      bad = {k: float(v) for k, v in m.items() if not math.isfinite(float(v))}
      if bad:
        raise FloatingPointError(
            f"non-finite training loss at step {step_done}: {bad}; the run stops here (last checkpoint kept)")
      return {k: float(v) for k, v in m.items()}

    end = self.num_steps if self.stop_at_step is None else min(self.stop_at_step, self.num_steps)
    if self.eval_only:
      end = start
    for step in range(start, end):
      batch = mesh_lib.put_global_batch(task.train_batch(step) if step else first_batch, self.mesh)
      state, m = self.train_step(state, batch)
      if pending is not None:
        done_step, _ = pending
        fetched = drain(pending)
        if done_step % cfg.log_every_steps == 0:
          now = time.perf_counter()
          rate = (done_step + 1 - s_last) / max(now - t_last, 1e-9)
          writer.write(done_step + 1, "train", steps_per_s=rate, **fetched)
          progress.update(done_step + 1, loss=fetched["loss"])
          t_last, s_last = now, done_step + 1
      pending = (step, m)
      done = step + 1
      if done % eval_every == 0 or done == self.num_steps:
        drain(pending)
        pending = None
        val = self.evaluate(self.eval_params(state), state["rest"], "val", done)
        writer.write(done, "eval", **{f"val/{k}": v for k, v in val.items()})
        state = self.update_best(state, np.float32(val[task.select]), np.int32(done))
        self.log(f"eval step {done}: " + ", ".join(f"val/{k} {v:.5g}" for k, v in val.items()))
        t_last, s_last = time.perf_counter(), done
      if done % cfg.checkpoint_every_steps == 0 or done in (self.num_steps, end):
        if pending is not None:
          drain(pending)
          pending = None
        checkpointer.save(done, state, meta, force=True)
    if pending is not None:
      drain(pending)
    if end < self.num_steps and not self.eval_only:
      checkpointer.close()
      self.log(f"stopped at step {end} of {self.num_steps}; the same command resumes from here")
      return Result(end, int(mesh_lib.to_host(state["best_step"])), {}, state, self.graphdef)

    results = {}
    for name in task.eval_sets:
      results[name] = self.evaluate(state["best_params"], state["rest"], name, self.num_steps)
      writer.write(end, "final", **{f"{name}/{k}": v for k, v in results[name].items()})
    best_step = int(mesh_lib.to_host(state["best_step"]))
    metrics_lib.write_json_atomic(f"{self.workdir}/results.json",
                                  {"best_step": best_step, "trained_steps": end, "num_steps": self.num_steps,
                                   **results})
    if jax.process_index() == 0:
      plots.learning_curves(writer.path, f"{self.workdir}/curves.png")
    checkpointer.close()
    return Result(self.num_steps, best_step, results, state, self.graphdef)


def train(task: Task, cfg, workdir: str, mesh=None, log=print, config_json: str | None = None,
          stop_at_step: int | None = None, eval_only: bool = False) -> Result:
  """Trains ``task`` with the loop settings ``cfg`` (a ConfigDict: num_epochs or num_steps, learning_rate,
  warmup_epochs, weight_decay, grad_clip, ema_decay, eval/log/checkpoint intervals, seed) in ``workdir``.

  ``stop_at_step`` ends this run early with a checkpoint (a time-sliced job); calling again continues it.
  ``eval_only`` evaluates the best parameters of the latest checkpoint on every evaluation set, training no
  further (with the given config's evaluation settings)."""
  return Trainer(task, cfg, workdir, mesh=mesh, log=log, config_json=config_json, stop_at_step=stop_at_step,
                 eval_only=eval_only).run()
