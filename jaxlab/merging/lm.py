"""Training and scoring the Llama model on the synthetic skills, through the shared loop.

A stage trains one model (from scratch or from given tensors) on a :class:`~jaxlab.merging.skills.Mixture` with
``jaxlab.common.loop`` (checkpoints, exact resume, metrics), then writes the best parameters as a Hugging Face
checkpoint directory, so every model of a demonstration can be merged with ``python -m jaxlab.merging.merge``.
A finished stage is not retrained: its checkpoint directory is read back.
"""
from __future__ import annotations

import os

import numpy as np
from flax import nnx

from jaxlab.common import loop
from jaxlab.merging import hf, skills
from jaxlab.merging.model import Llama, LlamaConfig, generate, lm_loss, model_from_tensors, model_to_tensors


def answer_loss(model, batch, key):
  """Mean cross-entropy over answer tokens (the prompt is context, not a target)."""
  del key
  loss, _ = lm_loss(model, batch["tokens"], batch["loss_mask"])
  return loss, {}


def answer_eval(model, batch, key):
  del key
  loss, count = lm_loss(model, batch["tokens"], batch["loss_mask"] & batch["example_mask"][:, None])
  return {"nll": loss * count, "count": count}


def stage_task(model_cfg: LlamaConfig, mixture: skills.Mixture, tok, cfg, init_tensors=None) -> loop.Task:
  """A loop task on ``mixture``; the model starts from ``init_tensors`` (fine-tuning) or at random."""
  length, seed, bs = int(cfg.seq_len), int(cfg.data_seed), int(cfg.loop.batch_size)

  def init_model(key):
    if init_tensors is not None:
      return model_from_tensors(model_cfg, init_tensors)
    return Llama(model_cfg, rngs=nnx.Rngs(params=key))

  def train_batch(step):
    tokens, mask = mixture.sample_batch(tok, bs, length, step, seed)
    return {"tokens": tokens, "loss_mask": mask}

  dev = []
  for task, digits, _ in mixture.parts:
    dev += skills.sample(task, int(cfg.dev_examples), digits, "dev", seed, allow_fewer=True)
  dev_tokens, dev_mask, _ = skills.encode_examples(tok, dev, length)
  ebs = int(cfg.loop.eval_batch_size)

  def val_batches():
    for i in range(0, len(dev), ebs):
      t, m = dev_tokens[i:i + ebs], dev_mask[i:i + ebs]
      pad = ebs - len(t)
      em = np.r_[np.ones(len(t), bool), np.zeros(pad, bool)]
      yield {"tokens": np.pad(t, ((0, pad), (0, 0))), "loss_mask": np.pad(m, ((0, pad), (0, 0))),
             "example_mask": em}

  return loop.Task(init_model=init_model, loss_fn=answer_loss, eval_fn=answer_eval, train_batch=train_batch,
                   steps_per_epoch=int(cfg.steps_per_epoch), eval_sets={"val": val_batches},
                   finalize=lambda s: {"nll": s["nll"] / max(s["count"], 1.0)}, select="nll")


def with_loop(cfg, loop_cfg):
  """A copy of the demonstration config whose ``loop`` entry is ``loop_cfg`` (what :func:`stage_task` reads)."""
  out = cfg.copy_and_resolve_references()
  with out.unlocked():
    out.loop = loop_cfg
  return out


def run_stage(name: str, workdir: str, model_cfg: LlamaConfig, make_task, loop_cfg, log=print):
  """Train ``make_task()`` with the shared loop in ``workdir/stages/<name>`` (resuming a killed run) and write the
  best parameters to ``workdir/models/<name>`` as a Hugging Face checkpoint; a finished stage is read back."""
  out = os.path.join(workdir, "models", name)
  if os.path.exists(os.path.join(out, "config.json")):
    return hf.load_tensors(out)
  result = loop.train(make_task(), loop_cfg, os.path.join(workdir, "stages", name), log=log)
  model = nnx.merge(result.graphdef, result.state["best_params"], result.state["rest"])
  tensors = model_to_tensors(model)
  hf.write_checkpoint(out, tensors, model_cfg.to_hf(), overwrite=True)
  log(f"stage {name}: best step {result.best_step}, val nll {result.metrics['val']['nll']:.4f} -> {out}")
  return tensors


def train_stage(name: str, workdir: str, model_cfg: LlamaConfig, mixture: skills.Mixture, tok, cfg, loop_cfg,
                init_tensors=None, log=print) -> dict[str, np.ndarray]:
  """:func:`run_stage` of a language-model task on ``mixture`` (from ``init_tensors`` or from scratch)."""
  make = lambda: stage_task(model_cfg, mixture, tok, with_loop(cfg, loop_cfg), init_tensors)
  return run_stage(name, workdir, model_cfg, make, loop_cfg, log)


def exact_match(model, tok, pairs, *, batch: int = 512) -> float:
  """Fraction of prompts whose greedy continuation up to eos equals the answer exactly."""
  if not pairs:
    raise ValueError("no examples to score")
  max_new = max(len(tok.encode(a)) for _, a in pairs) + 1
  correct = 0
  for i in range(0, len(pairs), batch):
    chunk = pairs[i:i + batch]
    ids = [[tok.bos_id] + tok.encode(p) for p, _ in chunk]
    t = max(map(len, ids))
    arr = np.zeros((batch, t), np.int32)
    lens = np.ones((batch,), np.int32)
    for j, row in enumerate(ids):
      arr[j, :len(row)] = row
      lens[j] = len(row)
    out = generate(model, arr, lens, max_new, eos_id=tok.eos_id)
    correct += sum(tok.decode(out[j]) == a for j, (_, a) in enumerate(chunk))
  return correct / len(pairs)


def score(model_or_tensors, model_cfg: LlamaConfig, tok, suites: dict[str, list]) -> dict[str, float]:
  """Exact match per named example list; ``model_or_tensors`` is a Llama or a dict of Hugging Face tensors."""
  model = model_or_tensors if isinstance(model_or_tensors, Llama) else model_from_tensors(model_cfg,
                                                                                          model_or_tensors)
  return {name: exact_match(model, tok, pairs) for name, pairs in suites.items()}


def eval_suites(spec, split: str, n: int, seed: int) -> dict[str, list]:
  """``{task: pairs}`` for ``spec`` = sequence of (task, (lo, hi)); ``n`` distinct examples of ``split`` each."""
  return {task: skills.sample(task, n, tuple(digits), split, seed) for task, digits in spec}
