"""Synthetic skills: answers by a plain reimplementation, disjoint splits, tokenizers and padding masks."""
import numpy as np
import pytest

from jaxlab.merging import skills


def test_answers_by_hand():
  assert skills.answer("inc", "12395") == "23406"
  assert skills.answer("rev", "01234") == "43210"
  assert skills.answer("both", "12345") == "65432"
  assert skills.prompt("both", "12345") == "b12345="
  assert skills.prompt("inc", "7") == "i7="
  with pytest.raises(ValueError, match="unknown task"):
    skills.answer("mul", "1")


@pytest.mark.parametrize("task", skills.TASKS)
def test_samples_are_correct_distinct_and_split_disjoint(task):
  seen = {}
  for split in skills.SPLITS:
    pairs = skills.sample(task, 60, (2, 4), split, seed=3)
    prompts = [p for p, _ in pairs]
    assert len(set(prompts)) == len(prompts)
    for p, a in pairs:
      x = p[1:-1]
      assert p[0] == {"inc": "i", "rev": "r", "both": "b"}[task] and p[-1] == "="
      assert 2 <= len(x) <= 4
      src = x[::-1] if task in ("rev", "both") else x
      want = src if task == "rev" else "".join("1234567890"[int(c)] for c in src)
      assert a == want
    seen[split] = set(prompts)
  assert not (seen["train"] & seen["dev"]) and not (seen["train"] & seen["test"]) and not (seen["dev"] & seen["test"])
  assert skills.sample(task, 60, (2, 4), "dev", seed=3) == skills.sample(task, 60, (2, 4), "dev", seed=3)


def test_too_many_requested_is_an_error_unless_allowed():
  with pytest.raises(ValueError, match="distinct rev prompts"):
    skills.sample("rev", 50, (1, 1), "train", seed=0)
  assert len(skills.sample("rev", 50, (1, 1), "train", seed=0, allow_fewer=True)) <= 10


def test_tokenizers():
  char, pair = skills.CharTokenizer(), skills.ChunkTokenizer()
  assert pair.tokens("b12345=") == ["b", "12", "34", "5", "="]
  for tok in (char, pair):
    ids = tok.encode("b12345=")
    assert tok.decode(ids + [tok.eos_id, 5]) == "b12345="
    assert len(set(tok.vocab)) == len(tok.vocab)
  assert len(pair.vocab) == len(char.vocab) + 100
  with pytest.raises(ValueError, match="not in the alphabet"):
    char.encode("12+3")


def test_encode_examples_masks_answer_and_eos():
  tok = skills.CharTokenizer()
  tokens, mask, plen = skills.encode_examples(tok, [("i12=", "23"), ("r7=", "7")], 9)
  np.testing.assert_array_equal(tokens[0, :8], [tok.bos_id] + tok.encode("i12=23") + [tok.eos_id])
  assert tokens[0, 8] == tok.pad_id
  np.testing.assert_array_equal(np.nonzero(mask[0])[0], [5, 6, 7])
  np.testing.assert_array_equal(np.nonzero(mask[1])[0], [4, 5])
  np.testing.assert_array_equal(plen, [5, 4])
  with pytest.raises(ValueError, match="more than length"):
    skills.encode_examples(tok, [("i12=", "23")], 5)


def test_mixture_batches_depend_on_step_only():
  tok = skills.CharTokenizer()
  mix = skills.Mixture((("inc", (1, 2), 1.0), ("rev", (1, 3), 3.0)))
  a = mix.sample_batch(tok, 32, 12, step=5, seed=0, pool=64)
  b = mix.sample_batch(tok, 32, 12, step=5, seed=0, pool=64)
  c = mix.sample_batch(tok, 32, 12, step=6, seed=0, pool=64)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
