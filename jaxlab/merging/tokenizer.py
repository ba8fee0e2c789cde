"""Tokenizers for merged language models, built from GGUF metadata or loaded from a ``tokenizer.json``.

``tokenizer_from_gguf`` rebuilds a ``tokenizers.Tokenizer`` from the vocabulary embedded in a GGUF file:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``
  with the GPT-2 byte-level pre-tokenizer and decoder. ``tokenizer.ggml.pre`` picks the split rule: ``smollm`` (and
  the StarCoder family) first splits every digit on its own, ``llama-bpe``/``llama3`` uses the LLaMA-3 pattern.
- ``tokenizer.ggml.model == "llama"`` (SentencePiece): BPE over the pieces with merges ranked by the score of the
  merged piece, byte fallback through the ``<0xNN>`` pieces and the ``▁`` word-boundary convention.

Tokens whose ``tokenizer.ggml.token_type`` is CONTROL (3) become special tokens and USER_DEFINED (4) tokens added
tokens, so that ``<|im_start|>`` and friends are never split.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_PRE = ("default", "gpt-2", "gpt2")
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


def _byte_level_pre_tokenizer(pre: str):
  if pre in _BYTE_LEVEL_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  if pre in _LLAMA3_PRE:
    return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  known = ", ".join(_BYTE_LEVEL_PRE + _DIGIT_SPLIT_PRE + _LLAMA3_PRE)
  raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {known}")


def _gpt2_tokenizer(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  pairs = []
  for m in merges:
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"GGUF merge {m!r} is not two space-separated tokens")
    pairs.append((parts[0], parts[1]))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece_tokenizer(tokens: list[str], scores: Sequence[float], types: Sequence[int],
                             unk_id: int | None, add_space_prefix: bool) -> Tokenizer:
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  mergeable = {t: i for t, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
  ranked = []
  for piece, i in mergeable.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in mergeable and right in mergeable:
        ranked.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
  ranked.sort()
  merges = [(r[4], r[5]) for r in ranked]
  unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  steps = [normalizers.Prepend("▁")] if add_space_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
  return tok


def tokenizer_from_gguf(path_or_reader) -> Tokenizer:
  """A ``tokenizers.Tokenizer`` equivalent to the one embedded in a GGUF file (``gpt2`` or ``llama`` models).

  The result adds no BOS/EOS by itself; callers add ``tokenizer.ggml.bos_token_id`` where a model needs it.
  """
  from jaxlab.merging.gguf_io import gguf_field, open_gguf
  reader = open_gguf(path_or_reader)
  kind = gguf_field(reader, "tokenizer.ggml.model", None)
  if kind is None:
    raise ValueError("GGUF file has no embedded tokenizer (no tokenizer.ggml.model field)")
  tokens = gguf_field(reader, "tokenizer.ggml.tokens", None)
  if not tokens:
    raise ValueError("GGUF file has no tokenizer.ggml.tokens")
  types = gguf_field(reader, "tokenizer.ggml.token_type", None) or [TOKEN_NORMAL] * len(tokens)
  if len(types) != len(tokens):
    raise ValueError(f"GGUF tokenizer: {len(types)} token types for {len(tokens)} tokens")
  if kind == "gpt2":
    merges = gguf_field(reader, "tokenizer.ggml.merges", None)
    if merges is None:
      raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    tok = _gpt2_tokenizer(tokens, merges, str(gguf_field(reader, "tokenizer.ggml.pre", "default")))
  elif kind == "llama":
    scores = gguf_field(reader, "tokenizer.ggml.scores", None)
    if scores is None or len(scores) != len(tokens):
      raise ValueError("GGUF llama (SentencePiece) tokenizer needs one tokenizer.ggml.scores entry per token")
    unk_id = gguf_field(reader, "tokenizer.ggml.unknown_token_id", None)
    add_space = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    tok = _sentencepiece_tokenizer(tokens, scores, types, None if unk_id is None else int(unk_id), add_space)
  else:
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
  special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
  user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  return tok


def load_tokenizer(path) -> Tokenizer:
  """A tokenizer from a directory holding ``tokenizer.json``, a ``tokenizer.json`` file, or a ``.gguf`` file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer.json in {os.path.dirname(path)}")
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer at {path}")
  if path.endswith(".gguf"):
    return tokenizer_from_gguf(path)
  try:
    return Tokenizer.from_file(path)
  except Exception as e:
    raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e


def encode(tok: Tokenizer, text: str) -> list[int]:
  """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) map to their single ids."""
  if not isinstance(text, str):
    raise TypeError(f"encode expects a str, got {type(text).__name__}")
  return list(tok.encode(text, add_special_tokens=False).ids)


def encode_batch(tok: Tokenizer, texts: Iterable[str]) -> list[list[int]]:
  return [list(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
  """Text of ``ids``; with ``skip_special_tokens`` control tokens such as ``<|im_end|>`` are dropped."""
  return tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _messages(messages) -> list[dict]:
  if isinstance(messages, str):
    return [{"role": "user", "content": messages}]
  out = []
  for m in messages:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"chat message {m!r} is not a dict with 'role' and 'content'")
    out.append({"role": str(m["role"]), "content": str(m["content"])})
  if not out:
    raise ValueError("chat needs at least one message")
  return out


def chat_prompt(messages, system: str | None = SMOLLM2_SYSTEM_PROMPT, add_generation_prompt: bool = True) -> str:
  """ChatML text of a conversation as SmolLM2-Instruct's template renders it.

  ``messages`` is a user string or a list of ``{"role", "content"}`` dicts. Each turn becomes
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; when the first message is not a system message, ``system`` is put in
  front (SmolLM2's default system prompt; ``None`` leaves it out). ``add_generation_prompt`` ends the text with
  ``<|im_start|>assistant\\n``.
  """
  msgs = _messages(messages)
  if msgs[0]["role"] != "system" and system is not None:
    msgs = [{"role": "system", "content": system}] + msgs
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat_template(template: str, messages, add_generation_prompt: bool = True, **extra) -> str:
  """Renders a Hugging Face / GGUF Jinja chat template (``tokenizer.chat_template``) in a sandbox."""
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("rendering a Jinja chat template needs jinja2: pip install jinja2") from e
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template).render(messages=_messages(messages), add_generation_prompt=add_generation_prompt,
                                          **extra)


def chat_template_from_gguf(path_or_reader) -> str | None:
  from jaxlab.merging.gguf_io import gguf_field, open_gguf
  return gguf_field(open_gguf(path_or_reader), "tokenizer.chat_template", None)


def save_tokenizer(tok: Tokenizer, directory) -> str:
  """Writes ``tokenizer.json`` into ``directory`` (created if needed); returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(os.fspath(directory), "tokenizer.json")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(json.dumps(json.loads(tok.to_str()), ensure_ascii=False))
  os.replace(tmp, path)
  return path
