"""Heterogeneous fusion on the synthetic skills (FuseLLM-style, UMM section 3.3).

Sources of different architectures and tokenizers:
- the arithmetic expert of the homogeneous demonstration (character tokenizer);
- a reversal expert with a digit-pair tokenizer and its own architecture, trained from scratch on the base formats
  plus long reversal.
The target has a third architecture and the character tokenizer; it is first pretrained on the base formats, then
fine-tuned on a corpus mixing both skills with ``lam * CLM + (1 - lam) * fusion``: the teachers' top-k next-token
distributions are computed on the corpus, aligned to the target's tokens (DTW on edit distance, vocabulary map) and
fused per sequence by MinCE or AvgCE (the cross-entropy of each teacher on the sequence's answer tokens).
Continued fine-tuning on the same corpus without fusion (``lam = 1``) is the control.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.common import loop
from jaxlab.common import metrics as metrics_lib
from jaxlab.merging import fusion, hf, lm, skills
from jaxlab.merging.model import model_from_tensors


def teacher_topk(tensors, model_cfg, tok, texts, length, k, batch=256):
  """Per text: the teacher's top-k logits/ids at each label position and its answer-token cross-entropy.

  Returns lists (values [T_i, k], ids [T_i, k], tokens (strings, labels only), ce) over texts.
  """
  model = model_from_tensors(model_cfg, tensors)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    vals, ids = jax.lax.top_k(logits, k)
    logp = jax.nn.log_softmax(logits, -1)
    gold = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return vals, ids, gold

  vocab = tok.vocab
  out = []
  for i in range(0, len(texts), batch):
    chunk = texts[i:i + batch]
    toks, mask, _ = skills.encode_examples(tok, chunk, length)
    pad = batch - len(chunk)
    vals, ids, gold = map(np.asarray, run(state, jnp.asarray(np.pad(toks, ((0, pad), (0, 0))))))
    for j in range(len(chunk)):
      n = int((toks[j] != tok.pad_id).sum()) - 1          # label positions
      m = mask[j, 1:n + 1]
      ce = float(-(gold[j, :n] * m).sum() / max(m.sum(), 1))
      out.append((vals[j, :n], ids[j, :n], [vocab[t] for t in toks[j, 1:n + 1]], ce))
  return out


def fused_targets(teachers, src_toks, tgt_tok, pairs, length, mode_fuse: str, mapping: str):
  """Compact fused targets on the target's label positions: probs/ids ``[N, length - 1, K]``, valid ``[N, L-1]``."""
  tgt_vocab = tgt_tok.vocab
  maps = [fusion.vocab_map(t.vocab, tgt_vocab, mode=mapping) for t in src_toks]
  toks, _, _ = skills.encode_examples(tgt_tok, pairs, length)
  per_source = []
  for s, rows in enumerate(teachers):
    probs, ids, valid = [], [], []
    for n, (vals, idx, src_labels, _) in enumerate(rows):
      labels = toks[n, 1:]
      t_len = int((toks[n] != tgt_tok.pad_id).sum()) - 1
      tgt_labels = [tgt_vocab[t] for t in labels[:t_len]]
      path = fusion.dtw_align(src_labels, tgt_labels)
      p, i, v = fusion.align_distributions(vals.astype(np.float32), idx, path, maps[s], t_len,
                                           gold_ids=labels[:t_len])
      k = p.shape[1]
      pp = np.zeros((length - 1, k), np.float32)
      ii = np.zeros((length - 1, k), np.int32)
      vv = np.zeros((length - 1,), bool)
      pp[:t_len], ii[:t_len], vv[:t_len] = p, i, v
      probs.append(pp)
      ids.append(ii)
      valid.append(vv)
    per_source.append((np.stack(probs), np.stack(ids), np.stack(valid)))
  ces = np.array([[r[3] for r in rows] for rows in teachers])
  fuse = fusion.fuse_min_ce if mode_fuse == "min_ce" else fusion.fuse_avg_ce
  p, i, v = fuse(per_source, ces)
  return np.asarray(p, np.float32), np.asarray(i, np.int32), np.asarray(v, bool), ces


def fusion_task(model_cfg, init_tensors, tok, corpus, targets, cfg, lam: float, dev_task):
  """A loop task on the corpus with the fused objective; ``targets`` = (probs, ids, valid) or None (lam = 1)."""
  length, bs = int(cfg.seq_len), int(cfg.fusion_loop.batch_size)
  toks, mask, _ = skills.encode_examples(tok, corpus, length)
  if targets is None:
    k = 1
    probs = np.zeros((len(corpus), length - 1, k), np.float32)
    ids = np.zeros_like(probs, np.int32)
    valid = np.zeros((len(corpus), length - 1), bool)
  else:
    probs, ids, valid = targets

  def loss_fn(model, batch, key):
    del key
    logits = model(batch["tokens"][:, :-1])
    m = batch["mask"][:, 1:]
    total = fusion.fused_objective(logits, batch["tokens"][:, 1:], m, batch["probs"], batch["ids"], lam=lam,
                                   fusion_mask=m & batch["valid"])
    return total, {"clm": fusion.clm_loss(logits, batch["tokens"][:, 1:], m)}

  def train_batch(step):
    order = [int(cfg.data_seed), 7, step] + ([int(cfg.fusion.seed)] if int(cfg.fusion.seed) else [])
    rows = np.random.default_rng(order).integers(0, len(corpus), bs)
    return {"tokens": toks[rows], "mask": mask[rows], "probs": probs[rows], "ids": ids[rows], "valid": valid[rows]}

  return loop.Task(init_model=lambda key: model_from_tensors(model_cfg, init_tensors), loss_fn=loss_fn,
                   eval_fn=dev_task.eval_fn, train_batch=train_batch, steps_per_epoch=int(cfg.steps_per_epoch),
                   eval_sets=dev_task.eval_sets, finalize=dev_task.finalize, select="nll")


def pretrain(config, workdir: str, log=print):
  """The two fusion models that do not depend on the homogeneous experts: the pair-tokenizer reversal source and
  the pretrained target."""
  from jaxlab.merging.train import mixture, model_config
  fc = config.fusion
  char, pair = skills.CharTokenizer(), skills.ChunkTokenizer()
  src_cfg = model_config(pair, fc.source_model)
  rev_mix = list(config.base_mixture) + list(config.experts.reverse)
  pair_rev = lm.train_stage("fusion_source_reverse", workdir, src_cfg, mixture(rev_mix), pair, config,
                            config.base_loop, log=log)
  tgt_cfg = model_config(char, fc.target_model)
  target0 = lm.train_stage("fusion_target_base", workdir, tgt_cfg, mixture(config.base_mixture), char, config,
                           config.base_loop, log=log)
  return (pair_rev, src_cfg), (target0, tgt_cfg)


def run(config, workdir: str, log=print) -> dict:
  """Train the fusion sources and target, fuse, and score; returns ``{model: {task: exact match}}``."""
  from jaxlab.merging.train import mixture, model_config, task_suites
  fc = config.fusion
  char, pair = skills.CharTokenizer(), skills.ChunkTokenizer()
  length = int(config.seq_len)
  arith_cfg = model_config(char, config.model)
  arith = hf.load_tensors(os.path.join(workdir, "models", "arith"))
  (pair_rev, src_cfg), (target0, tgt_cfg) = pretrain(config, workdir, log)
  corpus_mix = mixture(fc.corpus)
  corpus = []
  per = int(fc.corpus_size) // len(corpus_mix.parts)
  for task, digits, _ in corpus_mix.parts:
    corpus += skills.sample(task, per, digits, "train", int(config.data_seed), allow_fewer=True)

  cache = os.path.join(workdir, "fusion_targets.npz")
  if os.path.exists(cache):
    z = np.load(cache)
    targets = {m: (z[f"{m}_p"], z[f"{m}_i"], z[f"{m}_v"]) for m in ("min_ce", "avg_ce")}
    ces = z["ces"]
  else:
    k = int(fc.top_k)
    teachers = [teacher_topk(arith, arith_cfg, char, corpus, length, k),
                teacher_topk(pair_rev, src_cfg, pair, corpus, length, k)]
    targets = {}
    for m in ("min_ce", "avg_ce"):
      p, i, v, ces = fused_targets(teachers, [char, pair], char, corpus, length, m, str(fc.mapping))
      targets[m] = (p, i, v)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, ces=ces, **{f"{m}_{s}": a for m, t in targets.items() for s, a in zip("piv", t)})
    os.replace(tmp, cache)
  log(f"fusion corpus: {len(corpus)} sequences; teacher answer CE (arith, reverse): "
      f"{ces.mean(axis=1).round(3).tolist()}")

  dev_task = lm.stage_task(tgt_cfg, corpus_mix, char, lm.with_loop(config, config.fusion_loop), None)
  models = {}
  for name, lam, tgt in (("sft", 1.0, None), ("fuse_min_ce", float(fc.lam), targets["min_ce"]),
                         ("fuse_avg_ce", float(fc.lam), targets["avg_ce"])):
    make = lambda lam=lam, tgt=tgt: fusion_task(tgt_cfg, target0, char, corpus, tgt, config, lam, dev_task)
    models[name] = lm.run_stage(f"fusion_{name}", workdir, tgt_cfg, make, config.fusion_loop, log)

  suites = task_suites(config, "test", config.eval_examples)
  scores_path = os.path.join(workdir, "fusion_scores.json")
  table = json.load(open(scores_path)) if os.path.exists(scores_path) else {}
  rows = [("source:arith (char)", arith, arith_cfg, char), ("source:reverse (pair)", pair_rev, src_cfg, pair),
          ("target:pretrained", target0, tgt_cfg, char), ("target:sft (lam=1)", models["sft"], tgt_cfg, char),
          ("target:fuse MinCE", models["fuse_min_ce"], tgt_cfg, char),
          ("target:fuse AvgCE", models["fuse_avg_ce"], tgt_cfg, char)]
  for name, tensors, cfg_, tok in rows:
    if name not in table:
      table[name] = lm.score(tensors, cfg_, tok, suites)
      metrics_lib.write_json_atomic(scores_path, table)
      log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[name].items()))
  return {name: table[name] for name, *_ in rows}
