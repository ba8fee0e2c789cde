"""UMM at small scale on synthetic reasoning skills (jaxlab.merging.train).

A base Llama learns three formats at 1-3 digits (inc = every digit plus one mod 10, rev = reversal, and both =
reverse then increment); an arithmetic expert and a reversal expert are fine-tuned from it at 4-6 digits.  The
experts are merged (linear, task arithmetic, TIES, DARE-TIES, and TIES with per-layer coefficients evolved by
CMA-ES on a dev split), and all models are scored by exact match on disjoint test splits of each skill and of
"both" at 4-6 digits.  Then the heterogeneous path:
a reversal expert with a different tokenizer (digit pairs) and architecture is fused with the arithmetic expert into
a target of yet another architecture (FuseLLM-style distillation, MinCE and AvgCE against plain fine-tuning).
  python -m jaxlab.train --config configs/merging/skills.py --workdir runs/merging_skills
  python -m jaxlab.train --config configs/merging/skills.py:small --workdir /tmp/merging_small   (about a minute)
"""
import ml_collections

from configs.loop import loop_config


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.method = "merging"
  c.seq_len = 18
  c.data_seed = 0
  c.dev_examples = 128          # per task, for the loop's validation loss
  c.steps_per_epoch = 100
  c.model = ml_collections.ConfigDict(dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                                           num_kv_heads=2, rope_theta=10000.0))
  # (task, lo digits, hi digits, weight)
  c.base_mixture = [("inc", 1, 3, 1.0), ("rev", 1, 3, 1.0), ("both", 1, 3, 1.0)]
  # each expert: its skill at long lengths, plus a replay of the base formats (an expert keeps its general abilities;
  # without the replay the fine-tunes drift so far from the base that no merge of them works)
  replay = [("inc", 1, 3, 1 / 6), ("rev", 1, 3, 1 / 6), ("both", 1, 3, 1 / 6)]
  c.experts = ml_collections.ConfigDict(dict(
      arith=[("inc", 4, 6, 1.0)] + replay,
      reverse=[("rev", 4, 6, 1.0)] + replay,
  ))
  c.base_loop = loop_config(batch_size=64, eval_batch_size=256, num_steps=3000, learning_rate=2e-3,
                            warmup_epochs=2, weight_decay=0.01, grad_clip=1.0, eval_every_steps=500,
                            log_every_steps=100, checkpoint_every_steps=500)
  c.expert_loop = loop_config(batch_size=64, eval_batch_size=256, num_steps=1500, learning_rate=2e-4,
                              warmup_epochs=1, weight_decay=0.01, grad_clip=1.0, eval_every_steps=500,
                              log_every_steps=100, checkpoint_every_steps=500)
  # evaluation: exact match on `eval_examples` distinct prompts per task
  c.eval_tasks = [("inc", 4, 6), ("rev", 4, 6), ("both", 4, 6), ("inc", 1, 3), ("rev", 1, 3), ("both", 1, 3)]
  c.eval_examples = 300
  # homogeneous merges (mergekit semantics); density for TIES / DARE-TIES, weight per expert
  c.merge = ml_collections.ConfigDict(dict(weight=1.0, density=0.5, seed=0))
  # layer-wise evolutionary merging (CMA-ES over per-layer TIES weight and density per expert)
  c.evolve = ml_collections.ConfigDict(dict(method="ties", layer_granularity=1, max_evals=480, sigma0=0.2,
                                            popsize=0, dev_examples=100, seed=0, weight_bounds=(0.0, 1.5)))
  # heterogeneous fusion
  c.fusion = ml_collections.ConfigDict(dict(
      enabled=True,
      source_model=dict(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=4),
      target_model=dict(hidden_size=112, intermediate_size=320, num_layers=3, num_heads=4, num_kv_heads=1),
      corpus=[("inc", 4, 6, 1.0), ("rev", 4, 6, 1.0), ("inc", 1, 3, 1.0), ("rev", 1, 3, 1.0), ("both", 1, 3, 1.0)],
      corpus_size=4096, top_k=10, lam=0.9, mapping="min_edit",
      seed=0,                   # batch order of the fusion fine-tunes (0: the default order)
  ))
  c.fusion_loop = loop_config(batch_size=64, eval_batch_size=256, num_steps=1000, learning_rate=1e-3,
                              warmup_epochs=1, weight_decay=0.01, grad_clip=1.0, eval_every_steps=500,
                              log_every_steps=100, checkpoint_every_steps=500)
  if arg == "small":
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    c.dev_examples = 32
    c.base_mixture = [("inc", 1, 2, 1.0), ("rev", 1, 2, 1.0), ("both", 1, 2, 1.0)]
    c.experts.arith = [("inc", 3, 3, 1.0)]
    c.experts.reverse = [("rev", 3, 3, 1.0)]
    for name in ("base_loop", "expert_loop", "fusion_loop"):
      c[name].update(num_steps=20, eval_every_steps=20, log_every_steps=10, batch_size=16, eval_batch_size=64,
                     checkpoint_every_steps=20)
    c.eval_tasks = [("inc", 3, 3), ("rev", 3, 3), ("both", 3, 3)]
    c.eval_examples = 16
    c.evolve.update(max_evals=8, popsize=4, dev_examples=8)
    c.fusion.update(source_model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                      num_kv_heads=1),
                    target_model=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                      num_kv_heads=2),
                    corpus=[("inc", 3, 3, 1.0), ("rev", 3, 3, 1.0)], corpus_size=32)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: small")
  return c
