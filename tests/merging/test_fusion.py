"""Distribution fusion against hand-computed values and plain numpy / pure-Python references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.merging import fusion as f

SP, G = "\u2581", "\u0120"  # "▁", "Ġ"


# ----------------------------------------------------------------------------------------------------------------
# strings


@pytest.mark.parametrize("a,b,d", [
  ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
  ("Hel", "ello", 3), ("ld", "world", 3), ("wor", "ello", 4), ("abc", "abc", 0), ("ab", "ba", 2),
])
def test_edit_distance_hand_cases(a, b, d):
  assert f.edit_distance(a, b) == d
  assert f.edit_distance(b, a) == d


def test_edit_distance_matrix_matches_scalar():
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcd"), size=rng.integers(0, 6))) for _ in range(40)]
  a, b = words[:25], words[15:]
  mat = f.edit_distance_matrix(a, b)
  ref = np.array([[f.edit_distance(x, y) for y in b] for x in a])
  np.testing.assert_array_equal(mat, ref)


def test_clean_and_normalize_tokens():
  assert f.clean_token(SP + "world") == "world"
  assert f.clean_token(G + "world") == "world"
  assert f.clean_token(SP + SP) == ""
  assert f.clean_token("\u010a") == "\u010a"  # GPT-2 newline symbol is not a word marker
  assert f.normalize_markers(G + "the") == SP + "the"
  with pytest.raises(TypeError, match="token must be a str"):
    f.clean_token(3)


# ----------------------------------------------------------------------------------------------------------------
# DTW


def _dtw_reference(src, tgt):
  """Plain row-by-row DTW with explicit backtracking (diagonal, then source step, then target step)."""
  n, m = len(src), len(tgt)
  inf = float("inf")
  acc = [[inf] * (m + 1) for _ in range(n + 1)]
  acc[0][0] = 0
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      c = f.edit_distance(f.clean_token(src[i - 1]), f.clean_token(tgt[j - 1]))
      acc[i][j] = c + min(acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1])
  i, j, path = n, m, [(n - 1, m - 1)]
  while (i, j) != (1, 1):
    options = [(acc[i - 1][j - 1], (i - 1, j - 1)), (acc[i - 1][j], (i - 1, j)), (acc[i][j - 1], (i, j - 1))]
    best = min(o[0] for o in options)
    i, j = next(o[1] for o in options if o[0] == best)
    path.append((i - 1, j - 1))
  return path[::-1]


def test_dtw_hand_example():
  # cleaned costs rows Hel, lo, wor, ld vs cols H, ello, world: [[2,3,4],[2,2,4],[3,4,2],[2,3,3]]
  # accumulated: [[2,5,9],[4,4,8],[7,8,6],[9,10,9]] -> back from (3,2): (2,2) cost 6, (1,1) cost 4, (0,0)
  path = f.dtw_align(["Hel", "lo", SP + "wor", "ld"], ["H", "ello", SP + "world"])
  assert path == [(0, 0), (1, 1), (2, 2), (3, 2)]
  assert f.target_to_source(path, 3) == [[0], [1], [2, 3]]
  np.testing.assert_array_equal(f.source_for_target(path, 3, "first"), [0, 1, 2])
  np.testing.assert_array_equal(f.source_for_target(path, 3, "last"), [0, 1, 3])
  np.testing.assert_array_equal(f.source_for_target(path, 3, "onehot"), [0, 1, -1])


def test_dtw_identical_tokenisations_give_diagonal():
  toks = [SP + "The", SP + "cat", "s", SP + "sat", "."]
  assert f.dtw_align(toks, toks) == [(i, i) for i in range(5)]
  # different markers, same words
  assert f.dtw_align([G + "a", G + "bc"], [SP + "a", SP + "bc"]) == [(0, 0), (1, 1)]


def test_dtw_tie_breaking():
  # all costs 0: diagonal preferred over the source step while backtracking
  assert f.dtw_align(["a", "a"], ["a", "a", "a"]) == [(0, 0), (0, 1), (1, 2)]
  assert f.dtw_align(["a", "a", "a"], ["a", "a"]) == [(0, 0), (1, 0), (2, 1)]
  # costs [[1,1,1],[1,2,0],[1,0,2]], accumulated [[1,2,3],[2,3,2],[3,2,4]]: at (2,2) the source step (1,2) and
  # the target step (2,1) both cost 2 and the diagonal 3 -> the source step wins
  assert f.dtw_align(["b", "bc", "cb"], ["c", "cb", "bc"]) == [(0, 0), (0, 1), (1, 2), (2, 2)]


def test_dtw_matches_reference_on_random_tokenisations():
  rng = np.random.default_rng(1)
  for _ in range(30):
    src = ["".join(rng.choice(list("ab" + SP), size=rng.integers(1, 4))) for _ in range(rng.integers(1, 7))]
    tgt = ["".join(rng.choice(list("ab" + G), size=rng.integers(1, 4))) for _ in range(rng.integers(1, 7))]
    assert f.dtw_align(src, tgt) == _dtw_reference(src, tgt)


def test_dtw_and_path_errors():
  with pytest.raises(ValueError, match="src_tokens is empty"):
    f.dtw_align([], ["a"])
  with pytest.raises(ValueError, match="not a warping path"):
    f.target_to_source([(0, 0), (2, 1)], 2)
  with pytest.raises(ValueError, match="tgt_len is 3"):
    f.target_to_source([(0, 0), (1, 1)], 3)
  with pytest.raises(ValueError, match="rule must be"):
    f.source_for_target([(0, 0)], 1, "middle")


# ----------------------------------------------------------------------------------------------------------------
# vocabulary mapping

TGT_VOCAB = ["<unk>", SP + "the", "the", SP + "world", "wor", "ld", "ab", "ac"]
SRC_VOCAB = [G + "the", "the", G + "world", "xyz", "world", "ad", G]


def test_vocab_map_exact():
  np.testing.assert_array_equal(f.vocab_map(SRC_VOCAB, TGT_VOCAB, "exact"), [1, 2, 3, -1, -1, -1, -1])
  np.testing.assert_array_equal(f.vocab_map(SRC_VOCAB, TGT_VOCAB, "exact", normalize=False),
                                [-1, 2, -1, -1, -1, -1, -1])
  # duplicate target strings: the lowest id wins
  np.testing.assert_array_equal(f.vocab_map(["x"], ["y", "x", "x"], "exact"), [1])


def test_vocab_map_min_edit():
  # Ġthe/the/Ġworld: exact; "world": cleaned-identical to "▁world" (3); "xyz": distance 3 to many, lowest id is
  # "▁the" (1); "ad": distance 1 to "ld" (5), "ab" (6), "ac" (7) -> 5; "Ġ" cleans to "": nearest are the
  # length-2 targets "ld", "ab", "ac" -> 5
  np.testing.assert_array_equal(f.vocab_map(SRC_VOCAB, TGT_VOCAB, "min_edit"), [1, 2, 3, 1, 3, 5, 5])
  # an exact match beats a cleaned-identical target with a lower id
  np.testing.assert_array_equal(f.vocab_map([SP + "x"], ["x", SP + "x"], "min_edit"), [1])


def test_vocab_map_min_edit_matches_brute_force():
  rng = np.random.default_rng(2)
  letters = list("abcdef")
  src = ["".join(rng.choice(letters + [SP], size=rng.integers(1, 7))) for _ in range(300)]
  tgt = ["".join(rng.choice(letters + [G], size=rng.integers(1, 7))) for _ in range(200)]
  got = f.vocab_map(src, tgt, "min_edit")
  norm_tgt = [f.normalize_markers(t) for t in tgt]
  clean_tgt = [f.clean_token(t) for t in tgt]
  for s_id, s in enumerate(src):
    if f.normalize_markers(s) in norm_tgt:
      want = norm_tgt.index(f.normalize_markers(s))
    else:
      dists = [f.edit_distance(f.clean_token(s), c) for c in clean_tgt]
      want = int(np.argmin(dists))  # first minimum = lowest id
    assert got[s_id] == want, (s, tgt[got[s_id]], tgt[want])


def test_vocab_map_errors():
  with pytest.raises(ValueError, match="mode must be"):
    f.vocab_map(["a"], ["a"], "fuzzy")
  with pytest.raises(ValueError, match="tgt_vocab is empty"):
    f.vocab_map(["a"], [], "min_edit")
  with pytest.raises(TypeError, match="src_vocab"):
    f.vocab_map("abc", ["a"])


# ----------------------------------------------------------------------------------------------------------------
# teacher representations


def test_topk_matches_stable_argsort_with_ties():
  rng = np.random.default_rng(3)
  logits = rng.integers(-3, 4, size=(2, 6, 50)).astype(np.float32)  # many ties
  values, indices = f.topk_logits(logits, k=10)
  assert values.dtype == np.float16 and indices.dtype == np.int32 and values.shape == (2, 6, 10)
  ref = np.argsort(-logits, axis=-1, kind="stable")[..., :10]
  np.testing.assert_array_equal(indices, ref)
  np.testing.assert_array_equal(values, np.take_along_axis(logits, ref, -1).astype(np.float16))
  with pytest.raises(ValueError, match="k must be"):
    f.topk_logits(logits, k=51)
  with pytest.raises(ValueError, match="NaN"):
    f.topk_logits(np.array([[0.0, np.nan]]), k=1)


def test_sequence_cross_entropy_vs_hand_values():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  targets = np.array([[0, 1, 2]])
  mask = np.array([[1, 1, 0]])
  ce = f.sequence_cross_entropy(logits, targets, mask)
  np.testing.assert_allclose(ce, [-(np.log(0.5) + np.log(0.8)) / 2], rtol=1e-12)
  with pytest.raises(ValueError, match="targets must lie"):
    f.sequence_cross_entropy(logits, np.array([[0, 1, 3]]))


# ----------------------------------------------------------------------------------------------------------------
# distribution alignment


def test_align_scatter_add_and_dropping():
  vmap = np.array([0, 2, 2, -1])  # source B and C both map to pivot 2, D is unmapped
  values = np.log(np.array([[4.0, 2.0, 1.0], [5.0, 1.0, 1.0], [3.0, 2.0, 1.0]]))
  indices = np.array([[0, 1, 2], [3, 1, 2], [3, 3, 3]])
  path = [(0, 0), (1, 1), (2, 2)]
  probs, ids, valid = f.align_distributions(values, indices, path, vmap, 3, gold_ids=np.array([1, 1, 7]))
  # row 0: A 4/7 -> 0, B 2/7 + C 1/7 -> 2; row 1: D dropped, B + C -> 2 with mass 1; row 2: nothing maps -> gold
  np.testing.assert_allclose(probs, [[4 / 7, 3 / 7, 0], [1, 0, 0], [1, 0, 0]], rtol=1e-6)
  np.testing.assert_array_equal(ids, [[0, 2, 0], [2, 0, 0], [7, 0, 0]])
  np.testing.assert_array_equal(valid, [True, True, True])
  assert probs.dtype == np.float32 and ids.dtype == np.int32
  # without gold ids the unmappable position is invalid
  _, _, valid = f.align_distributions(values, indices, path, vmap, 3)
  np.testing.assert_array_equal(valid, [True, True, False])


def test_align_temperature():
  values = np.array([[2.0, 0.0]])
  probs, _, _ = f.align_distributions(values, np.array([[0, 1]]), [(0, 0)], np.array([0, 1]), 1, temperature=0.5)
  p0 = np.exp(4.0) / (np.exp(4.0) + 1.0)
  np.testing.assert_allclose(probs[0], [p0, 1 - p0], rtol=1e-6)


def test_align_many_to_one_rules_and_hard_mode():
  src = ["Hel", "lo", SP + "wor", "ld"]
  tgt = ["H", "ello", SP + "world"]
  path = f.dtw_align(src, tgt)
  vmap = np.arange(4)
  values = np.zeros((4, 1))
  indices = np.array([[0], [1], [2], [3]])  # source position i predicts source id i
  gold = np.array([5, 6, 7])
  for rule, last in [("first", 2), ("last", 3), ("onehot", 7)]:
    _, ids, valid = f.align_distributions(values, indices, path, vmap, 3, gold_ids=gold, many_to_one=rule)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, last])
    assert valid.all()
  # hard mode: aligned token strings differ everywhere -> one-hot on gold
  _, ids, _ = f.align_distributions(values, indices, path, vmap, 3, gold_ids=gold, mode="hard",
                                    src_tokens=src, tgt_tokens=tgt)
  np.testing.assert_array_equal(ids[:, 0], gold)
  # hard mode with matching tokens (Ġ vs ▁ normalised) keeps the source distribution
  _, ids, _ = f.align_distributions(np.zeros((2, 1)), np.array([[0], [1]]), [(0, 0), (1, 1)], vmap, 2,
                                    gold_ids=np.array([9, 9]), mode="hard",
                                    src_tokens=[G + "a", "b"], tgt_tokens=[SP + "a", "c"])
  np.testing.assert_array_equal(ids[:, 0], [0, 9])
  with pytest.raises(ValueError, match="needs src_tokens"):
    f.align_distributions(values, indices, path, vmap, 3, mode="hard")


def test_align_errors():
  values, indices = np.zeros((2, 2)), np.array([[0, 1], [1, 0]])
  with pytest.raises(ValueError, match="indices must lie"):
    f.align_distributions(values, indices, [(0, 0), (1, 1)], np.array([0]), 2)
  with pytest.raises(ValueError, match="source has 2 positions"):
    f.align_distributions(values, indices, [(0, 0), (0, 1)], np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="gold_ids must be"):
    f.align_distributions(values, indices, [(0, 0), (1, 1)], np.array([0, 1]), 2, gold_ids=np.array([1]))


# ----------------------------------------------------------------------------------------------------------------
# fusion


def _random_dists(rng, s, b, t, k, v):
  out = []
  for _ in range(s):
    p = rng.dirichlet(np.ones(k), size=(b, t)).astype(np.float32)
    out.append((p, rng.integers(0, v, size=(b, t, k)).astype(np.int32), np.ones((b, t), bool)))
  return out


def test_fuse_min_ce_picks_lowest_ce_source():
  rng = np.random.default_rng(4)
  dists = _random_dists(rng, 2, 3, 4, 3, 20)
  ces = np.array([[1.0, 0.5, 2.0], [0.7, 0.9, 2.0]])  # sequence 2 ties -> source 0
  probs, ids, valid = f.fuse_min_ce(dists, ces)
  for b, s in enumerate([1, 0, 0]):
    np.testing.assert_array_equal(probs[b], dists[s][0][b])
    np.testing.assert_array_equal(ids[b], dists[s][1][b])
  assert valid.all()


def test_avg_ce_weights_and_averages():
  ces = np.array([[0.2, 3.0], [1.5, 0.1], [0.9, 0.9]])
  r = np.exp(-ces)
  np.testing.assert_allclose(f.avg_ce_weights(ces), np.exp(r) / np.exp(r).sum(0), rtol=1e-12)
  # hand-made: one sequence, two sources, vocabulary 3
  d0 = (np.array([[[1.0, 0.0]]]), np.array([[[0, 0]]]), np.array([[True]]))
  d1 = (np.array([[[0.5, 0.5]]]), np.array([[[0, 2]]]), np.array([[True]]))
  ce = np.array([[0.0], [np.log(2.0)]])  # rewards 1 and 0.5
  w0 = np.exp(1.0) / (np.exp(1.0) + np.exp(0.5))
  probs, ids, valid = f.fuse_avg_ce([d0, d1], ce)
  np.testing.assert_allclose(f.densify(probs, ids, 3)[0, 0], [w0 + (1 - w0) * 0.5, 0.0, (1 - w0) * 0.5], rtol=1e-6)
  assert valid.all() and probs.shape == (1, 1, 4)


def test_fuse_avg_ce_dense_equivalence_and_invalid_sources():
  rng = np.random.default_rng(5)
  dists = _random_dists(rng, 3, 2, 5, 4, 12)
  ces = rng.uniform(0.1, 3.0, size=(3, 2))
  probs, ids, valid = f.fuse_avg_ce(dists, ces)
  w = f.avg_ce_weights(ces)
  dense = sum(w[s][:, None, None] * f.densify(d[0], d[1], 12) for s, d in enumerate(dists))
  np.testing.assert_allclose(f.densify(probs, ids, 12), dense, rtol=1e-5, atol=1e-7)
  # source 1 invalid at (0, 2): the other two are renormalised there
  dists[1][2][0, 2] = False
  probs, ids, valid = f.fuse_avg_ce(dists, ces)
  w02 = w[[0, 2], 0] / w[[0, 2], 0].sum()
  want = w02[0] * f.densify(dists[0][0], dists[0][1], 12)[0, 2] + w02[1] * f.densify(dists[2][0], dists[2][1], 12)[0, 2]
  np.testing.assert_allclose(f.densify(probs, ids, 12)[0, 2], want, rtol=1e-5, atol=1e-7)
  assert valid.all()


def test_fusion_errors():
  rng = np.random.default_rng(6)
  dists = _random_dists(rng, 2, 2, 3, 2, 5)
  with pytest.raises(ValueError, match="ces must have shape"):
    f.fuse_min_ce(dists, np.zeros(2))
  with pytest.raises(ValueError, match="non-empty list"):
    f.fuse_avg_ce([], np.zeros(0))


# ----------------------------------------------------------------------------------------------------------------
# losses


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_fusion_loss_equals_dense_soft_ce_with_repeated_ids_and_mask():
  rng = np.random.default_rng(7)
  b, t, v, k = 2, 5, 11, 6
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  probs = rng.dirichlet(np.ones(k), size=(b, t)).astype(np.float32)
  ids = rng.integers(0, 4, size=(b, t, k)).astype(np.int32)  # small id range -> repeated ids
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
  target = f.densify(probs, ids, v)
  per_pos = -(target * _log_softmax(logits)).sum(-1)
  want = (per_pos * mask).sum() / mask.sum()
  got = jax.jit(f.fusion_loss)(logits, probs, ids, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # padded positions are ignored
  logits2 = logits.copy()
  logits2[0, 3:] = 100.0 * rng.normal(size=(2, v))
  np.testing.assert_allclose(float(f.fusion_loss(logits2, probs, ids, mask)), want, rtol=1e-5)


def test_clm_loss_and_objective():
  rng = np.random.default_rng(8)
  b, t, v = 2, 4, 7
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  want_clm = (nll * mask).sum() / mask.sum()
  clm = f.clm_loss(logits, targets, mask)
  np.testing.assert_allclose(float(clm), want_clm, rtol=1e-5)
  probs = rng.dirichlet(np.ones(3), size=(b, t)).astype(np.float32)
  ids = rng.integers(0, v, size=(b, t, 3))
  obj = jax.jit(f.fused_objective)
  np.testing.assert_allclose(float(obj(logits, targets, mask, probs, ids, 1.0)), want_clm, rtol=1e-5)
  fus = float(f.fusion_loss(logits, probs, ids, mask))
  np.testing.assert_allclose(float(obj(logits, targets, mask, probs, ids)), 0.9 * want_clm + 0.1 * fus, rtol=1e-5)
  # one-hot soft targets on the gold tokens reproduce the CLM loss
  onehot = np.ones((b, t, 1), np.float32)
  np.testing.assert_allclose(float(f.fusion_loss(logits, onehot, targets[..., None], mask)), want_clm, rtol=1e-5)
  # fully masked batch gives 0
  assert float(f.clm_loss(logits, targets, np.zeros_like(mask))) == 0.0


def test_loss_shape_errors():
  logits = np.zeros((2, 3, 5), np.float32)
  with pytest.raises(ValueError, match="mask shape"):
    f.clm_loss(logits, np.zeros((2, 3), np.int32), np.ones((2, 4)))
  with pytest.raises(ValueError, match="ids shape"):
    f.fusion_loss(logits, np.ones((2, 3, 2)), np.zeros((2, 3, 3), np.int32), np.ones((2, 3)))


def test_loss_value_errors():
  logits = np.zeros((1, 2, 3), np.float32)
  with pytest.raises(ValueError, match="targets must lie"):
    f.clm_loss(logits, np.array([[0, 3]]), np.ones((1, 2)))
  with pytest.raises(ValueError, match="lam must be"):
    f.fused_objective(logits, np.zeros((1, 2), np.int32), np.ones((1, 2)), np.ones((1, 2, 1)),
                      np.zeros((1, 2, 1), np.int32), lam=1.5)
  with pytest.raises(ValueError, match="many_to_one must be"):
    f.align_distributions(np.zeros((1, 1)), np.zeros((1, 1), np.int32), [(0, 0)], np.array([0]), 1,
                          many_to_one="middle")


def test_pipeline_two_tokenisers_end_to_end():
  rng = np.random.default_rng(9)
  tgt_vocab = ["<pad>", "H", "ello", SP + "world", SP + "wor", "ld", "!"]
  src_vocab = ["Hel", "lo", G + "wor", "ld", G + "world", "!!"]
  src_tokens, tgt_tokens = ["Hel", "lo", G + "wor", "ld"], ["H", "ello", SP + "world"]
  gold = np.array([1, 2, 3])
  vmap = f.vocab_map(src_vocab, tgt_vocab, "min_edit")
  np.testing.assert_array_equal(vmap, [1, 5, 4, 5, 3, 6])  # "Hel" -> "H" (1) beats "ello" (3); "lo" -> "ld"
  path = f.dtw_align(src_tokens, tgt_tokens)
  dists = []
  for _ in range(2):
    values, indices = f.topk_logits(rng.normal(size=(4, len(src_vocab))), k=3)
    dists.append(f.align_distributions(values, indices, path, vmap, 3, gold_ids=gold))
  own_values, own_indices = f.topk_logits(rng.normal(size=(3, len(tgt_vocab))), k=3)
  dists.append(f.align_distributions(own_values, own_indices, [(0, 0), (1, 1), (2, 2)],
                                     np.arange(len(tgt_vocab)), 3, gold_ids=gold))
  batch = [(p[None], i[None], v[None]) for p, i, v in dists]
  ces = np.array([[1.2], [0.4], [0.8]])
  for fused in (f.fuse_min_ce(batch, ces), f.fuse_avg_ce(batch, ces)):
    probs, ids, valid = fused
    assert valid.all()
    np.testing.assert_allclose(f.densify(probs, ids, len(tgt_vocab)).sum(-1), 1.0, rtol=1e-6)
    logits = rng.normal(size=(1, 3, len(tgt_vocab))).astype(np.float32)
    loss = jax.jit(f.fused_objective)(logits, gold[None], np.ones((1, 3)), probs, ids)
    assert np.isfinite(float(loss))
  np.testing.assert_array_equal(f.fuse_min_ce(batch, ces)[1], batch[1][1])


def test_align_very_negative_logits_stay_normalised():
  values = np.array([[-1000.0, -1001.0, -np.inf]])
  probs, ids, valid = f.align_distributions(values, np.array([[0, 1, 2]]), [(0, 0)], np.array([0, 1, 2]), 1)
  p0 = 1.0 / (1.0 + np.exp(-1.0))
  np.testing.assert_allclose(probs[0], [p0, 1 - p0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(ids[0, :2], [0, 1])
  assert valid.all()
