"""Synthetic reasoning skills for the merging demonstrations, and two tokenizers of different granularity.

Three tasks on digit strings, each a prompt and an exact-match answer:

- ``inc`` (digit-wise modular arithmetic): ``"i12395="`` -> ``"23406"``, every digit plus one modulo 10.
- ``rev`` (symbolic rewriting): ``"r12345="`` -> ``"54321"``.
- ``both``: ``"b12345="`` -> reverse, then increment every digit: ``"65432"``.  It needs both skills in one pass, so
  it probes the combinatorial effect of merging an arithmetic and a reversal expert.

Difficulty is the digit count.  A base model sees all three formats at short lengths; each expert is then fine-tuned
on one skill at long lengths, and the merged model is tested on both skills and on ``both`` at long lengths.

Splits are disjoint by construction: an example's split is a hash of its prompt, so no test prompt is ever a
training or dev prompt.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

TASKS = ("inc", "rev", "both")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One token per character, plus pad (0), bos and eos."""

  alphabet: str = "0123456789=ibr"
  name: str = "char"

  @property
  def vocab(self) -> list[str]:
    return ["<pad>", "<bos>", "<eos>"] + list(self.alphabet)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def tokens(self, text: str) -> list[str]:
    bad = set(text) - set(self.alphabet)
    if bad:
      raise ValueError(f"characters {sorted(bad)} are not in the alphabet {self.alphabet!r}")
    return list(text)

  def encode(self, text: str) -> list[int]:
    index = {t: i for i, t in enumerate(self.vocab)}
    return [index[t] for t in self.tokens(text)]

  def decode(self, ids) -> str:
    vocab = self.vocab
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i > self.eos_id:
        out.append(vocab[i])
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class ChunkTokenizer(CharTokenizer):
  """Digits grouped greedily in pairs (``"12345"`` -> ``"12" "34" "5"``): a coarser, different vocabulary."""

  name: str = "pair"

  @property
  def vocab(self) -> list[str]:
    pairs = [f"{a}{b}" for a in range(10) for b in range(10)]
    return ["<pad>", "<bos>", "<eos>"] + list(self.alphabet) + pairs

  def tokens(self, text: str) -> list[str]:
    super().tokens(text)
    out, i = [], 0
    while i < len(text):
      if text[i].isdigit() and i + 1 < len(text) and text[i + 1].isdigit():
        out.append(text[i:i + 2])
        i += 2
      else:
        out.append(text[i])
        i += 1
    return out


def _inc(a: str) -> str:
  return "".join(str((int(c) + 1) % 10) for c in a)


_PREFIX = {"inc": "i", "rev": "r", "both": "b"}


def answer(task: str, a: str) -> str:
  if task == "inc":
    return _inc(a)
  if task == "rev":
    return a[::-1]
  if task == "both":
    return _inc(a[::-1])
  raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def prompt(task: str, a: str) -> str:
  if task not in _PREFIX:
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")
  return f"{_PREFIX[task]}{a}="


def _split_of(text: str, fractions=(0.8, 0.1, 0.1)) -> str:
  h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2.0**64
  return "train" if h < fractions[0] else ("dev" if h < fractions[0] + fractions[1] else "test")


def _number(rng, digits: int) -> str:
  return "".join(map(str, rng.integers(0, 10, digits)))


def sample(task: str, n: int, digits: tuple[int, int], split: str, seed: int, *,
           allow_fewer: bool = False) -> list[tuple[str, str]]:
  """``n`` distinct (prompt, answer) pairs of ``task`` with operand lengths in ``digits`` (inclusive) from ``split``.

  Raises when the split cannot hold ``n`` distinct prompts at these lengths, unless ``allow_fewer`` (then all
  that were found).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  lo, hi = digits
  if not 1 <= lo <= hi:
    raise ValueError(f"digits must satisfy 1 <= lo <= hi, got {digits}")
  rng = np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split), lo, hi])
  seen, out = set(), []
  for _ in range(200 * n + 1000):
    if len(out) == n:
      break
    a = _number(rng, int(rng.integers(lo, hi + 1)))
    p = prompt(task, a)
    if p in seen or _split_of(p) != split:
      continue
    seen.add(p)
    out.append((p, answer(task, a)))
  if len(out) < n and not allow_fewer:
    raise ValueError(f"only {len(out)} distinct {task} prompts with digits {digits} in split {split}; asked {n}")
  return out


def encode_examples(tok: CharTokenizer, pairs, length: int):
  """Right-padded ``[N, length]`` token ids ``<bos> prompt answer <eos>``; ``loss_mask`` marks answer + eos targets.

  Returns (tokens, loss_mask, prompt_lengths).
  """
  n = len(pairs)
  tokens = np.zeros((n, length), np.int32)
  mask = np.zeros((n, length), bool)
  plen = np.zeros((n,), np.int32)
  for i, (p, a) in enumerate(pairs):
    pi, ai = [tok.bos_id] + tok.encode(p), tok.encode(a) + [tok.eos_id]
    if len(pi) + len(ai) > length:
      raise ValueError(f"example {p!r}{a!r} needs {len(pi) + len(ai)} tokens, more than length {length}")
    tokens[i, :len(pi) + len(ai)] = pi + ai
    mask[i, len(pi):len(pi) + len(ai)] = True
    plen[i] = len(pi)
  return tokens, mask, plen


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A training mixture: per task, the operand digit range and the sampling weight."""

  parts: tuple[tuple[str, tuple[int, int], float], ...]

  def sample_batch(self, tok, batch: int, length: int, step: int, seed: int, pool: int = 4096):
    """A batch drawn deterministically from ``step`` (exact resume) out of per-task pools of train examples."""
    pools = _pools(self, tok, length, seed, pool)
    rng = np.random.default_rng([seed, step])
    w = np.array([p[2] for p in self.parts], np.float64)
    which = rng.choice(len(self.parts), size=batch, p=w / w.sum())
    rows = [rng.integers(0, len(pools[j][0])) for j in which]
    toks = np.stack([pools[j][0][r] for j, r in zip(which, rows)])
    mask = np.stack([pools[j][1][r] for j, r in zip(which, rows)])
    return toks, mask


_POOL_CACHE: dict = {}


def _pools(mix: Mixture, tok, length: int, seed: int, pool: int):
  key = (mix, tok, length, seed, pool)
  if key not in _POOL_CACHE:
    out = []
    for task, digits, _ in mix.parts:
      pairs = sample(task, pool, digits, "train", seed, allow_fewer=True)
      t, m, _ = encode_examples(tok, pairs, length)
      out.append((t, m))
    _POOL_CACHE[key] = out
  return _POOL_CACHE[key]
