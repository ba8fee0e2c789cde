"""The shared loop: a falling loss, exact resume, sharded == single device, two processes == one."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.common import optim
from jaxlab.ponita import train as ponita_train
from tests.conftest import REPO, smoke_config


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_falls_on_a_fixed_batch(nbody_smoke_dir, tmp_path):
  config = smoke_config(nbody_dir=nbody_smoke_dir)
  task = ponita_train.build_task(config, str(tmp_path))
  model = task.init_model(jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, task.train_batch(0))
  task.calibrate(model, task.train_batch(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    loss, grads = jax.value_and_grad(lambda p: task.loss_fn(nnx.merge(graphdef, p, rest), batch, key)[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for i in range(30):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_schedule_follows_the_per_epoch_cosine_with_warmup():
  sched = optim.cosine_warmup_per_epoch(1.0, steps_per_epoch=10, num_epochs=100, warmup_epochs=10)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(55)), 0.5 * (1 + np.cos(np.pi * 5 / 100)) * 5 / 10, rtol=1e-6)
  np.testing.assert_allclose(float(sched(500)), 0.5 * (1 + np.cos(np.pi * 50 / 100)), rtol=1e-6)


def test_weight_decay_skips_biases_norms_and_layer_scales():
  model = ponita_train.model_factory(smoke_config().model, num_scalar_in=1, num_vector_in=1, num_scalar_out=0,
                                     num_vector_out=1, global_pool=False)(jax.random.key(0))
  mask = optim.decay_mask(nnx.state(model, nnx.Param))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree.leaves_with_path(mask)}
  assert any(v for v in flat.values())
  for name, decayed in flat.items():
    if name.endswith(("bias", "scale", "layer_scale")):
      assert not decayed, name
    if name.endswith("kernel"):
      assert decayed, name


def test_killed_run_resumes_to_the_same_final_parameters(nbody_smoke_dir, tmp_path):
  config = smoke_config(nbody_dir=nbody_smoke_dir)
  full = ponita_train.train_and_evaluate(config, str(tmp_path / "full"))
  first = ponita_train.train_and_evaluate(config, str(tmp_path / "split"), stop_at_step=7)
  assert first.step == 7 and not first.metrics
  resumed = ponita_train.train_and_evaluate(config, str(tmp_path / "split"))
  for a, b in zip(leaves(full.state["params"]), leaves(resumed.state["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert full.metrics["test"]["mse"] == pytest.approx(resumed.metrics["test"]["mse"], rel=1e-5)
  records = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
  assert {r["kind"] for r in records} >= {"train", "eval", "final"}


def test_eval_only_evaluates_a_stopped_run_without_training(nbody_smoke_dir, tmp_path):
  config = smoke_config(nbody_dir=nbody_smoke_dir)
  ponita_train.train_and_evaluate(config, str(tmp_path), stop_at_step=6)
  result = ponita_train.train_and_evaluate(config, str(tmp_path), eval_only=True)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["trained_steps"] == 6 and saved["best_step"] == 5
  assert saved["test"]["mse"] == pytest.approx(result.metrics["test"]["mse"])
  assert int(result.state["step"]) == 6


def test_resume_refuses_a_checkpoint_of_another_config(nbody_smoke_dir, tmp_path):
  config = smoke_config(nbody_dir=nbody_smoke_dir)
  ponita_train.train_and_evaluate(config, str(tmp_path), stop_at_step=5)
  other = smoke_config(nbody_dir=nbody_smoke_dir, learning_rate=0.5)
  with pytest.raises(ValueError, match="different 'config'"):
    ponita_train.train_and_evaluate(other, str(tmp_path))


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from jaxlab.common import loop, mesh as mesh_lib
    from jaxlab.ponita import train as ponita_train
    from tests.conftest import smoke_config
    assert jax.device_count() == 8
    config = smoke_config(nbody_dir={data!r})
    task = ponita_train.build_task(config, {work!r})
    out = []
    for n in (1, 8):
      trainer = loop.Trainer(task, config.train, {work!r}, mesh=mesh_lib.make_data_mesh(n))
      state = trainer.init_state(calibrate_batch=task.train_batch(0))
      trainer.compile(state)
      for step in range(2):
        state, metrics = trainer.train_step(state, mesh_lib.put_global_batch(task.train_batch(step), trainer.mesh))
      if n == 8:
        assert len(state["params"]["embedder"]["kernel"].value.sharding.device_set) == 8
      out.append((jax.tree.map(np.asarray, state["params"]), float(metrics["loss"])))
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
    print("OK")
""")


def test_sharded_step_over_8_devices_equals_single_device(nbody_smoke_dir, tmp_path):
  script = SHARDED_SCRIPT.format(repo=REPO, data=nbody_smoke_dir, work=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_to_the_same_loss_as_one(nbody_smoke_dir, tmp_path):
  args = [sys.executable, "-m", "jaxlab.train", "--config", "configs/ponita/nbody.py:smoke",
          f"--config.data.nbody_dir={nbody_smoke_dir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  single = subprocess.run(args + [f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = []
  for i in range(2):
    penv = dict(env, JAXLAB_COORDINATOR=f"127.0.0.1:{port}", JAXLAB_NUM_PROCESSES="2", JAXLAB_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args + [f"--workdir={tmp_path / 'two'}"], cwd=REPO, env=penv,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one = json.load(open(tmp_path / "one" / "results.json"))
  two = json.load(open(tmp_path / "two" / "results.json"))
  assert two["test"]["mse"] == pytest.approx(one["test"]["mse"], rel=1e-4)
  losses = lambda d: [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if r["kind"] == "train"]
  np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4)


def test_non_finite_loss_stops_the_run_naming_step_and_term(tmp_path):
  import ml_collections
  from jaxlab.common import loop

  def batch(step):  # the fourth batch (step 3) carries a NaN
    x = np.full((4, 2), np.nan if step == 3 else 1.0, np.float32)
    return {"x": x, "y": np.ones((4, 1), np.float32), "example_mask": np.ones(4, bool)}

  def loss_fn(model, b, key):
    err = jnp.mean((model(b["x"]) - b["y"])**2)
    return err, {"squared_error": err}

  task = loop.Task(init_model=lambda key: nnx.Linear(2, 1, rngs=nnx.Rngs(params=key)), loss_fn=loss_fn,
                   eval_fn=lambda m, b, k: {"count": jnp.sum(b["example_mask"])}, train_batch=batch,
                   steps_per_epoch=10, eval_sets={"val": lambda: [batch(0)]}, finalize=lambda s: {"n": s["count"]},
                   select="n")
  cfg = ml_collections.ConfigDict(dict(num_epochs=1, num_steps=0, learning_rate=1e-2, warmup_epochs=0,
                                       weight_decay=0.0, grad_clip=1.0, ema_decay=0.0, eval_every_steps=0,
                                       log_every_steps=1, checkpoint_every_steps=100, keep_checkpoints=1, seed=0))
  with pytest.raises(FloatingPointError, match=r"step 3.*squared_error"):
    loop.train(task, cfg, str(tmp_path))
