"""Heterogeneous distribution fusion (FuseLLM / FuseChat mechanics): token alignment, vocabulary mapping, teacher
top-k storage, MinCE / AvgCE fusion and the fused training objective.

Pipeline (host-side numpy preprocessing, JAX losses):
1. `topk_logits` stores each source model's per-position top-k logits (float16) and vocabulary ids (int32);
   `sequence_cross_entropy` gives the per-sequence CE of each source against its own gold tokens.
2. `dtw_align` aligns the source tokenisation of a text with the target ("pivot") tokenisation of the same text;
   `vocab_map` maps source vocabulary ids onto pivot ids.
3. `align_distributions` moves a source's top-k onto target positions and the pivot vocabulary.
4. `fuse_min_ce` / `fuse_avg_ce` combine the aligned sources per sequence.
5. `fusion_loss`, `clm_loss` and `fused_objective` are the (jit-able) training losses.

Distributions stay compact throughout: a distribution over the pivot vocabulary is a pair `(probs [..., K], ids
[..., K])` that stands for the dense vector `p[v] = sum_{k: ids[k] = v} probs[k]` (duplicate ids ADD).  Padding
slots carry probability 0.  `densify` builds the dense vector for inspection.

Position convention.  Token lists handed to the alignment are indexed like the stored distributions: position t of
a token list is the token that the distribution at position t predicts (the label, i.e. the input shifted by one).
Under this convention the first of several source positions aligned to one target position predicts the start of
the same text span from the same left context as the target position, and the one-hot fallback goes on the target
label `gold_ids[t]`.  Callers that align input tokens instead should keep that in mind when choosing
`many_to_one`.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "WORD_MARKERS", "clean_token", "normalize_markers", "edit_distance", "edit_distance_matrix", "dtw_align",
  "target_to_source", "source_for_target", "vocab_map", "topk_logits", "sequence_cross_entropy",
  "align_distributions", "densify", "avg_ce_weights", "fuse_min_ce", "fuse_avg_ce", "fusion_loss", "clm_loss",
  "fused_objective",
]

WORD_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁" and GPT-2 byte-level "Ġ"

_BIG = np.iinfo(np.int64).max // 4
_CHUNK_ELEMS = 1 << 22  # bound on the [rows, cols, len] work array of the vectorised edit distance


# ----------------------------------------------------------------------------------------------------------------
# strings and edit distance


def _check_str(s, name):
  if not isinstance(s, str):
    raise TypeError(f"{name} must be a str, got {type(s).__name__}")


def clean_token(s: str) -> str:
  """The token string with every word-boundary marker ("▁" SentencePiece, "Ġ" GPT-2 byte-level) removed.

  All occurrences are removed (a piece such as "▁▁" becomes ""); other byte-level symbols (e.g. "Ċ") are kept.
  Cleaned strings are what the DTW cost and the MinED vocabulary mapping compare.
  """
  _check_str(s, "token")
  for marker in WORD_MARKERS:
    s = s.replace(marker, "")
  return s


def normalize_markers(s: str) -> str:
  """The token string with the GPT-2 marker "Ġ" rewritten as the SentencePiece marker "▁".

  Unlike `clean_token` this keeps the word-start information, so "▁the" and "the" stay different tokens.
  """
  _check_str(s, "token")
  return s.replace(WORD_MARKERS[1], WORD_MARKERS[0])


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (unit-cost insertion, deletion and substitution) between two strings."""
  _check_str(a, "a")
  _check_str(b, "b")
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def _codes(strings, length):
  """[N, length] int32 code points of equal-length strings."""
  if length == 0:
    return np.zeros((len(strings), 0), np.int32)
  return np.array([[ord(c) for c in s] for s in strings], np.int32).reshape(len(strings), length)


def _block_distances(a_codes, b_codes):
  """Edit distances [Na, Nb] between all rows of a_codes [Na, la] and b_codes [Nb, lb] (equal-length buckets).

  The Levenshtein recursion runs row by row over the characters of a and column by column over those of b, each
  step one numpy operation over all Na x Nb pairs (layout [lb + 1, Na, Nb] so every step is contiguous).
  """
  na, la = a_codes.shape
  nb, lb = b_codes.shape
  if la == 0 or lb == 0:
    return np.full((na, nb), max(la, lb), np.int64)
  out = np.empty((na, nb), np.int64)
  dt = np.int16 if la + lb < 30000 else np.int64
  b_t = b_codes.T[:, None, :]  # [lb, 1, Nb]
  rows = max(1, _CHUNK_ELEMS // max(1, nb * (lb + 1)))
  for s in range(0, na, rows):
    a = a_codes[s:s + rows]
    prev = np.broadcast_to(np.arange(lb + 1, dtype=dt)[:, None, None], (lb + 1, a.shape[0], nb)).copy()
    cur = np.empty_like(prev)
    for i in range(1, la + 1):
      cur[0] = i
      np.add(prev[:-1], a[None, :, i - 1, None] != b_t, out=cur[1:])
      np.minimum(cur[1:], prev[1:] + 1, out=cur[1:])
      for j in range(1, lb + 1):
        np.minimum(cur[j], cur[j - 1] + 1, out=cur[j])
      prev, cur = cur, prev
    out[s:s + rows] = prev[lb]
  return out


def _buckets(strings):
  """{length: (positions int64 [N], codes [N, length])} for a list of strings."""
  by_len = {}
  for i, s in enumerate(strings):
    by_len.setdefault(len(s), []).append(i)
  return {n: (np.array(idx, np.int64), _codes([strings[i] for i in idx], n)) for n, idx in by_len.items()}


def edit_distance_matrix(a, b) -> np.ndarray:
  """Levenshtein distances [len(a), len(b)] (int64) between two lists of strings, vectorised by length bucket."""
  for name, seq in (("a", a), ("b", b)):
    if not isinstance(seq, (list, tuple)):
      raise TypeError(f"{name} must be a list of str, got {type(seq).__name__}")
    for s in seq:
      _check_str(s, f"every element of {name}")
  if len(a) == 0 or len(b) == 0:
    return np.zeros((len(a), len(b)), np.int64)
  ua, ub = list(dict.fromkeys(a)), list(dict.fromkeys(b))
  pos_a, pos_b = {s: i for i, s in enumerate(ua)}, {s: i for i, s in enumerate(ub)}
  inv_a = np.array([pos_a[s] for s in a], np.int64)
  inv_b = np.array([pos_b[s] for s in b], np.int64)
  dist = np.empty((len(ua), len(ub)), np.int64)
  ba, bb = _buckets(ua), _buckets(ub)
  for pa, ca in ba.values():
    for pb, cb in bb.values():
      dist[np.ix_(pa, pb)] = _block_distances(ca, cb)
  return dist[np.ix_(inv_a, inv_b)]


# ----------------------------------------------------------------------------------------------------------------
# token alignment


def _check_tokens(tokens, name):
  if not isinstance(tokens, (list, tuple)):
    raise TypeError(f"{name} must be a list of token strings, got {type(tokens).__name__}")
  if len(tokens) == 0:
    raise ValueError(f"{name} is empty; DTW needs at least one token on each side")
  for t in tokens:
    _check_str(t, f"every element of {name}")


def dtw_align(src_tokens: list[str], tgt_tokens: list[str]) -> list[tuple[int, int]]:
  """Dynamic-time-warping alignment of two tokenisations of the same text.

  Cost of pairing source token i with target token j: `edit_distance(clean_token(src[i]), clean_token(tgt[j]))`.
  Accumulated cost D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]) (computed along anti-diagonals,
  exact integer arithmetic).  The returned warping path is monotone, starts at (0, 0), ends at (n-1, m-1) and every
  step advances by (1, 1), (1, 0) or (0, 1); a pair is (source index, target index).

  Tie-breaking (deterministic): backtracking from (n-1, m-1), among predecessors with equal accumulated cost the
  diagonal (i-1, j-1) wins, then the source step (i-1, j), then the target step (i, j-1).

  Cost: O(n·m) edit distances (vectorised over unique token strings) plus O(n + m) numpy steps for the recursion;
  two 2048-token sequences of random strings take under a second.  Cache paths alongside the teacher top-k files.
  """
  _check_tokens(src_tokens, "src_tokens")
  _check_tokens(tgt_tokens, "tgt_tokens")
  n, m = len(src_tokens), len(tgt_tokens)
  cost = edit_distance_matrix([clean_token(t) for t in src_tokens], [clean_token(t) for t in tgt_tokens])
  acc = np.full((n + 1, m + 1), _BIG, np.int64)
  acc[0, 0] = 0
  for k in range(2, n + m + 1):  # 1-based cells (i, j) with i + j = k
    i = np.arange(max(1, k - m), min(n, k - 1) + 1)
    j = k - i
    prev = np.minimum(acc[i - 1, j - 1], np.minimum(acc[i - 1, j], acc[i, j - 1]))
    acc[i, j] = cost[i - 1, j - 1] + prev
  i, j = n, m
  path = [(n - 1, m - 1)]
  while (i, j) != (1, 1):
    moves = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
    i, j = min(moves, key=lambda c: acc[c])  # min() keeps the first of equal keys: diagonal, source, target
    path.append((i - 1, j - 1))
  return path[::-1]


def _check_path(path, tgt_len, src_len=None):
  if isinstance(tgt_len, bool) or not isinstance(tgt_len, (int, np.integer)) or tgt_len < 1:
    raise ValueError(f"tgt_len must be a positive int, got {tgt_len!r}")
  try:
    arr = np.asarray(path, dtype=np.int64)
  except (TypeError, ValueError):
    raise ValueError("alignment must be a list of (source index, target index) pairs") from None
  if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
    raise ValueError(f"alignment must be a non-empty list of (source, target) pairs, got shape {arr.shape}")
  steps = np.diff(arr, axis=0)
  ok_steps = np.all((steps >= 0) & (steps <= 1), axis=1) & (steps.sum(axis=1) >= 1)
  if tuple(arr[0]) != (0, 0) or not ok_steps.all():
    raise ValueError("alignment is not a warping path: it must start at (0, 0) and advance by (1,1), (1,0) or (0,1)")
  if arr[-1, 1] != tgt_len - 1:
    raise ValueError(f"alignment ends at target index {arr[-1, 1]} but tgt_len is {tgt_len}")
  if src_len is not None and arr[-1, 0] != src_len - 1:
    raise ValueError(f"alignment ends at source index {arr[-1, 0]} but the source has {src_len} positions")
  return arr


def target_to_source(path, tgt_len: int) -> list[list[int]]:
  """For each target position, the ascending list of source positions the warping path aligns to it.

  A list with several entries is a many-to-one group (several source tokens cover one target token); one source
  position appearing in several consecutive lists is a one-to-many group.
  """
  arr = _check_path(path, tgt_len)
  out = [[] for _ in range(tgt_len)]
  for i, j in arr:
    out[j].append(int(i))
  return out


def source_for_target(path, tgt_len: int, rule: str = "first") -> np.ndarray:
  """The single source position whose distribution serves each target position: int64 [tgt_len], -1 for none.

  Rules for a target position aligned to several source positions (one-to-one positions always use their source):
  - "first" (default): the first of them.  With the label convention of this module it predicts the start of the
    same span from the same left context as the target position, so it is the context-faithful choice.
  - "last": the last of them (the context-faithful choice if the token lists are input tokens instead of labels).
  - "onehot": none (-1), so the caller falls back to the gold target token; this is the FuseLLM reference rule.
  """
  if rule not in ("first", "last", "onehot"):
    raise ValueError(f"rule must be 'first', 'last' or 'onehot', got {rule!r}")
  groups = target_to_source(path, tgt_len)
  out = np.empty(tgt_len, np.int64)
  for j, g in enumerate(groups):
    if len(g) == 1:
      out[j] = g[0]
    else:
      out[j] = {"first": g[0], "last": g[-1], "onehot": -1}[rule]
  return out


# ----------------------------------------------------------------------------------------------------------------
# vocabulary mapping


def _check_vocab(vocab, name):
  if not isinstance(vocab, (list, tuple)):
    raise TypeError(f"{name} must be a list of token strings (index = id), got {type(vocab).__name__}")
  for t in vocab:
    _check_str(t, f"every element of {name}")


def _first_ids(strings):
  """{string: lowest index holding it}."""
  out = {}
  for i, s in enumerate(strings):
    out.setdefault(s, i)
  return out


def vocab_map(src_vocab, tgt_vocab, mode: str = "exact", normalize: bool = True) -> np.ndarray:
  """Pivot id for every source id: int64 [len(src_vocab)], -1 where unmapped.

  mode="exact" (FuseLLM EM): a source token maps to the lowest target id whose string is identical.  With
  `normalize=True` (default) both sides first go through `normalize_markers` ("Ġ" -> "▁"), so GPT-2 and
  SentencePiece spellings of the same word-start piece match; `normalize=False` compares raw strings.  Cleaned
  strings (markers removed) do NOT count as identical: "▁the" (word start) and "the" (word-internal) stay distinct.

  mode="min_edit" (FuseLLM MinED): every source token maps.  An exact match as above wins; otherwise the nearest
  target by `edit_distance` between cleaned strings, ties going to the lowest target id.  An empty target vocabulary
  is an error in this mode.

  Cost of min_edit: exact and cleaned-identical strings are dictionary look-ups; the remaining unique cleaned source
  strings are compared only against target length buckets with |len difference| <= the best distance found so far
  (edit distance >= length difference), each comparison a vectorised O(len_s · len_t) dynamic programme.  Total
  O(U_src · C · L²) for U_src unmatched unique source strings, C candidates inside the length window and L the token
  length.  Measured on 2 CPU cores with unrelated random strings (the worst case, no exact matches): 3k x 2k
  tokens 0.3 s, 12k x 8k 4 s; a 49k x 32k pair extrapolates to about a minute, and real vocabularies, where most
  tokens match exactly, take far less.
  """
  _check_vocab(src_vocab, "src_vocab")
  _check_vocab(tgt_vocab, "tgt_vocab")
  if mode not in ("exact", "min_edit"):
    raise ValueError(f"mode must be 'exact' or 'min_edit', got {mode!r}")
  key = normalize_markers if normalize else (lambda s: s)
  exact = _first_ids([key(t) for t in tgt_vocab])
  out = np.array([exact.get(key(s), -1) for s in src_vocab], np.int64)
  if mode == "exact":
    return out
  if len(tgt_vocab) == 0:
    raise ValueError("tgt_vocab is empty; min_edit needs at least one target token")
  clean_first = _first_ids([clean_token(t) for t in tgt_vocab])
  todo = {}
  for s_id in np.nonzero(out < 0)[0]:
    c = clean_token(src_vocab[s_id])
    if c in clean_first:
      out[s_id] = clean_first[c]
    else:
      todo.setdefault(c, []).append(int(s_id))
  if not todo:
    return out
  # target buckets of unique cleaned strings, each sorted by its lowest id so argmin picks the lowest id on ties
  tgt_buckets = {}
  for c, t_id in sorted(clean_first.items(), key=lambda kv: kv[1]):
    tgt_buckets.setdefault(len(c), []).append((c, t_id))
  tgt_buckets = {n: (np.array([t for _, t in v], np.int64), _codes([c for c, _ in v], n))
                 for n, v in tgt_buckets.items()}
  max_len = max(tgt_buckets)
  src_strings = list(todo)
  for la, (pos, a_codes) in _buckets(src_strings).items():
    best_d = np.full(len(pos), _BIG, np.int64)
    best_id = np.full(len(pos), _BIG, np.int64)
    for d in range(0, max(la, max_len) + 1):
      active = np.nonzero(best_d >= d)[0]
      if active.size == 0:
        break
      for lb in sorted({la - d, la + d}):
        if lb not in tgt_buckets:
          continue
        t_ids, b_codes = tgt_buckets[lb]
        dist = _block_distances(a_codes[active], b_codes)
        arg = np.argmin(dist, axis=1)
        dmin = dist[np.arange(active.size), arg]
        cand = t_ids[arg]
        better = (dmin < best_d[active]) | ((dmin == best_d[active]) & (cand < best_id[active]))
        best_d[active[better]] = dmin[better]
        best_id[active[better]] = cand[better]
    for p, t_id in zip(pos, best_id):
      out[todo[src_strings[p]]] = t_id
  return out


# ----------------------------------------------------------------------------------------------------------------
# teacher representations


def _as_float_array(x, name, min_ndim=1):
  arr = np.asarray(x)
  if arr.dtype.kind not in "fiu":
    raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
  if arr.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {arr.shape}")
  return arr


def topk_logits(logits, k: int = 10):
  """Compact teacher storage: the k largest logits per position.

  logits [..., V] -> (values float16 [..., k], indices int32 [..., k]), sorted by descending logit; equal logits
  are ordered by ascending vocabulary id, so the selection at the k-th place is deterministic.  The order is decided
  on the full-precision logits before the float16 cast.  NaN logits are rejected.
  """
  x = _as_float_array(logits, "logits")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= x.shape[-1]:
    raise ValueError(f"k must be an int in [1, V={x.shape[-1]}], got {k!r}")
  if np.isnan(x).any():
    raise ValueError("logits contain NaN")
  lead, v = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, v)
  idx = np.empty((x2.shape[0], k), np.int64)
  rows = max(1, _CHUNK_ELEMS // v)
  for s in range(0, x2.shape[0], rows):
    xs = x2[s:s + rows]
    kth = np.partition(xs, v - k, axis=-1)[:, v - k:v - k + 1]  # k-th largest value per row
    gt = xs > kth
    eq = xs == kth
    need = k - gt.sum(axis=-1, keepdims=True)
    sel = gt | (eq & (np.cumsum(eq, axis=-1) <= need))
    cols = np.nonzero(sel)[1].reshape(xs.shape[0], k)  # ascending id
    vals = np.take_along_axis(xs, cols, axis=-1)
    order = np.lexsort((cols, -vals.astype(np.float64)), axis=-1)
    idx[s:s + rows] = np.take_along_axis(cols, order, axis=-1)
  values = np.take_along_axis(x2, idx, axis=-1)
  return values.astype(np.float16).reshape(*lead, k), idx.astype(np.int32).reshape(*lead, k)


def _log_softmax_np(x):
  x = x.astype(np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def sequence_cross_entropy(logits, targets, mask=None) -> np.ndarray:
  """Per-sequence mean token cross-entropy of a source model against its gold tokens (float64, host-side).

  logits [..., T, V] (position t scores targets[..., t]; shift before calling), targets int [..., T], mask
  [..., T] (default all ones).  Returns [...]: sum_t mask·(-log softmax(logits)[target]) / max(sum_t mask, 1).
  This is the per-source CE that MinCE / AvgCE rank sources by (reward exp(-CE)).
  """
  x = _as_float_array(logits, "logits", 2)
  tg = np.asarray(targets)
  if tg.dtype.kind not in "iu":
    raise TypeError(f"targets must be an integer array, got dtype {tg.dtype}")
  if tg.shape != x.shape[:-1]:
    raise ValueError(f"targets shape {tg.shape} does not match logits shape {x.shape} without the vocab axis")
  if tg.size and (tg.min() < 0 or tg.max() >= x.shape[-1]):
    raise ValueError(f"targets must lie in [0, {x.shape[-1]}), got range [{tg.min()}, {tg.max()}]")
  mk = np.ones(tg.shape) if mask is None else np.asarray(mask, np.float64)
  if mk.shape != tg.shape:
    raise ValueError(f"mask shape {mk.shape} does not match targets shape {tg.shape}")
  nll = -np.take_along_axis(_log_softmax_np(x), tg[..., None].astype(np.int64), axis=-1)[..., 0]
  return (nll * mk).sum(-1) / np.maximum(mk.sum(-1), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# distribution alignment


def _merge_duplicates(probs, ids, keep):
  """Sum probabilities of repeated ids within each row, then order rows by descending probability (stable).

  Returns probs [T, K] and ids [T, K] where each id appears once; freed and dropped slots hold (0.0, 0).
  """
  same = (ids[:, :, None] == ids[:, None, :]) & keep[:, :, None] & keep[:, None, :]
  earlier = np.tril(np.ones(same.shape[1:], bool), -1)  # earlier[a, b]: b < a
  first = keep & ~np.any(same & earlier, axis=-1)
  merged = np.where(first, np.einsum("tab,tb->ta", same.astype(probs.dtype), probs), 0.0).astype(np.float32)
  ids = np.where(first, ids, 0)
  order = np.argsort(-merged, axis=-1, kind="stable")
  return np.take_along_axis(merged, order, -1), np.take_along_axis(ids, order, -1).astype(np.int32)


def align_distributions(values, indices, alignment, vocab_map, tgt_len, *, gold_ids=None, src_tokens=None,
                        tgt_tokens=None, mode="soft", many_to_one="first", temperature=1.0, normalize=True):
  """Move one source's stored top-k onto target positions and the pivot vocabulary (host-side, one sequence).

  Inputs: values [T_src, k] (top-k logits), indices [T_src, k] (source ids), `alignment` a warping path from
  `dtw_align(src_tokens, tgt_tokens)`, `vocab_map` int [V_src] (pivot id or -1, from `vocab_map`), `tgt_len`.
  Returns (probs float32 [T_tgt, k], ids int32 [T_tgt, k], valid bool [T_tgt]).  The pivot model's own top-k can
  join the fusion as a source with the identity path and `vocab_map = arange(V)`.  FuseChat aligns with
  temperature 0.5; the default 1.0 is FuseLLM's.

  Per target position j:
  1. Source position: `source_for_target(alignment, tgt_len, many_to_one)` (one-to-one positions use their source;
     many-to-one groups use the first / last source position, or none for "onehot" as in the FuseLLM reference).
  2. mode="soft" (MinED): the source distribution is used whenever a source position was selected.
     mode="hard" (EM): it is used only when in addition the two aligned tokens are identical strings (after
     `normalize_markers` when `normalize`); this needs `src_tokens` and `tgt_tokens`.
  3. A used distribution is the softmax of the top-k logits / `temperature` over the entries whose id maps to a
     pivot id; unmapped (-1) entries are dropped and the rest renormalised (tail mass beyond the top-k is ignored).
     Several source ids mapping to the same pivot id ADD their probabilities into a single slot.
  4. Otherwise (no source position, token mismatch in hard mode, or no top-k entry maps): one-hot on
     `gold_ids[j]`, the target label at j.  Without `gold_ids`, or where gold_ids[j] < 0, the position is invalid
     (valid=False, all-zero probabilities).
  Rows are ordered by descending probability; unused slots hold (0.0, 0).
  """
  vals = _as_float_array(values, "values", 2)
  inds = np.asarray(indices)
  if vals.ndim != 2:
    raise ValueError(f"values must be [T_src, k], got shape {vals.shape}")
  if np.isnan(vals).any() or np.isposinf(vals).any():
    raise ValueError("values contain NaN or +inf logits")
  if inds.shape != vals.shape or inds.dtype.kind not in "iu":
    raise ValueError(f"indices must be an integer array of shape {vals.shape}, got {inds.dtype} {inds.shape}")
  vmap = np.asarray(vocab_map)
  if vmap.ndim != 1 or vmap.dtype.kind not in "iu":
    raise ValueError(f"vocab_map must be a 1-D integer array, got {vmap.dtype} {vmap.shape}")
  if inds.size and (inds.min() < 0 or inds.max() >= vmap.shape[0]):
    raise ValueError(f"indices must lie in [0, len(vocab_map)={vmap.shape[0]}), got [{inds.min()}, {inds.max()}]")
  if vmap.size and vmap.min() < -1:
    raise ValueError("vocab_map entries must be pivot ids >= 0 or -1 (unmapped)")
  if mode not in ("soft", "hard"):
    raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
  if many_to_one not in ("first", "last", "onehot"):
    raise ValueError(f"many_to_one must be 'first', 'last' or 'onehot', got {many_to_one!r}")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
      or not 0 < temperature < np.inf:
    raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
  src_pos = source_for_target(_check_path(alignment, tgt_len, vals.shape[0]).tolist(), tgt_len, many_to_one)
  if gold_ids is not None:
    gold = np.asarray(gold_ids)
    if gold.shape != (tgt_len,) or gold.dtype.kind not in "iu":
      raise ValueError(f"gold_ids must be an integer array of shape ({tgt_len},), got {gold.dtype} {gold.shape}")
  use = src_pos >= 0
  if mode == "hard":
    if src_tokens is None or tgt_tokens is None:
      raise ValueError("mode='hard' needs src_tokens and tgt_tokens to compare the aligned tokens")
    _check_tokens(src_tokens, "src_tokens")
    _check_tokens(tgt_tokens, "tgt_tokens")
    if len(src_tokens) != vals.shape[0] or len(tgt_tokens) != tgt_len:
      raise ValueError(f"src_tokens/tgt_tokens lengths ({len(src_tokens)}, {len(tgt_tokens)}) do not match "
                       f"T_src={vals.shape[0]} and tgt_len={tgt_len}")
    key = normalize_markers if normalize else (lambda s: s)
    same = np.array([p >= 0 and key(src_tokens[p]) == key(t) for p, t in zip(src_pos, tgt_tokens)], bool)
    use &= same
  sel = np.where(use, src_pos, 0)
  logits = vals[sel].astype(np.float64) / float(temperature)
  mapped = vmap[inds[sel]]
  keep = (mapped >= 0) & use[:, None] & (logits > -np.inf)
  use &= keep.any(axis=1)
  keep &= use[:, None]
  zmax = np.max(np.where(keep, logits, -np.inf), axis=1, keepdims=True)
  zmax = np.where(np.isfinite(zmax), zmax, 0.0)
  e = np.where(keep, np.exp(np.where(keep, logits - zmax, 0.0)), 0.0)
  probs = e / np.maximum(e.sum(axis=1, keepdims=True), 1e-300)
  probs, ids = _merge_duplicates(probs, np.where(keep, mapped, 0), keep)
  valid = use.copy()
  if gold_ids is not None:
    fb = ~use & (gold >= 0)
    probs[fb] = 0.0
    ids[fb] = 0
    probs[fb, 0] = 1.0
    ids[fb, 0] = gold[fb]
    valid |= fb
  return probs, ids, valid


def densify(probs, ids, vocab_size: int) -> np.ndarray:
  """Dense target [..., vocab_size] (float64) from a compact (probs, ids) distribution; repeated ids ADD."""
  p = np.asarray(probs, np.float64)
  i = np.asarray(ids)
  if p.shape != i.shape:
    raise ValueError(f"probs shape {p.shape} and ids shape {i.shape} differ")
  if i.size and (i.min() < 0 or i.max() >= vocab_size):
    raise ValueError(f"ids must lie in [0, {vocab_size}), got [{i.min()}, {i.max()}]")
  out = np.zeros(p.shape[:-1] + (vocab_size,))
  lead = np.indices(p.shape)[:-1]
  np.add.at(out, tuple(lead) + (i,), p)
  return out


# ----------------------------------------------------------------------------------------------------------------
# fusion


def _check_dists(dists, ces):
  if not isinstance(dists, (list, tuple)) or len(dists) == 0:
    raise ValueError("dists must be a non-empty list of (probs, ids, valid) tuples, one per source")
  out = []
  for s, d in enumerate(dists):
    if not isinstance(d, (list, tuple)) or len(d) != 3:
      raise ValueError(f"dists[{s}] must be a (probs, ids, valid) tuple")
    p, i, v = np.asarray(d[0], np.float32), np.asarray(d[1]), np.asarray(d[2], bool)
    if p.ndim < 2 or i.shape != p.shape or v.shape != p.shape[:-1]:
      raise ValueError(f"dists[{s}] shapes do not fit probs [..., T, K], ids [..., T, K], valid [..., T]: "
                       f"{p.shape}, {i.shape}, {v.shape}")
    if i.dtype.kind not in "iu":
      raise ValueError(f"dists[{s}] ids must be integers, got dtype {i.dtype}")
    out.append((p, i.astype(np.int32), v))
  lead = {d[0].shape[:-1] for d in out}
  if len(lead) != 1:
    raise ValueError(f"sources disagree on the [..., T] shape: {sorted(lead)}")
  c = np.asarray(ces, np.float64)
  expected = (len(out),) + out[0][0].shape[:-2]
  if c.shape != expected:
    raise ValueError(f"ces must have shape [num_sources, *batch] = {expected}, got {c.shape}")
  if not np.isfinite(c).all():
    raise ValueError("ces contain non-finite values")
  return out, c


def avg_ce_weights(ces) -> np.ndarray:
  """AvgCE source weights: softmax over sources (axis 0) of the rewards exp(-CE).

  As in the reference, the rewards exp(-CE) lie in (0, 1], so the weights stay fairly close to uniform.
  """
  c = np.asarray(ces, np.float64)
  if c.ndim == 0 or c.shape[0] == 0 or not np.isfinite(c).all():
    raise ValueError(f"ces must be a finite [num_sources, ...] array, got shape {c.shape}")
  r = np.exp(-c)
  e = np.exp(r - r.max(axis=0, keepdims=True))
  return e / e.sum(axis=0, keepdims=True)


def fuse_min_ce(dists, ces):
  """MinCE fusion: per sequence, the aligned distribution of the source with the lowest CE.

  dists: list over sources of (probs [..., T, K_s], ids [..., T, K_s], valid [..., T]) with the same [..., T];
  ces: [num_sources, ...] per-sequence CE.  Ties go to the lowest source index.  Returns (probs float32
  [..., T, K], ids int32, valid bool) with K = max K_s (narrower sources are zero-padded).
  """
  ds, c = _check_dists(dists, ces)
  kmax = max(d[0].shape[-1] for d in ds)
  pad = [((0, 0),) * (d[0].ndim - 1) + ((0, kmax - d[0].shape[-1]),) for d in ds]
  probs = np.stack([np.pad(d[0], w) for d, w in zip(ds, pad)])
  ids = np.stack([np.pad(d[1], w) for d, w in zip(ds, pad)])
  valid = np.stack([d[2] for d in ds])
  best = np.argmin(c, axis=0)  # [...]
  pick = best[None, ..., None]
  return (np.take_along_axis(probs, pick[..., None], 0)[0], np.take_along_axis(ids, pick[..., None], 0)[0],
          np.take_along_axis(valid, pick, 0)[0])


def fuse_avg_ce(dists, ces):
  """AvgCE fusion: weighted average of the sources' distributions with weights `avg_ce_weights(ces)` per sequence.

  The compact forms are concatenated along K (entries scaled by their source weight; ids may repeat, the loss adds
  them).  At a position where some sources are invalid the weights are renormalised over the valid ones, so the
  fused distribution still sums to 1; a position is valid when any source is.  Returns (probs float32
  [..., T, sum K_s], ids int32, valid bool).
  """
  ds, c = _check_dists(dists, ces)
  w = avg_ce_weights(c)  # [S, ...]
  valid = np.stack([d[2] for d in ds])  # [S, ..., T]
  wpos = w[..., None] * valid
  wpos = wpos / np.maximum(wpos.sum(axis=0, keepdims=True), 1e-300)
  probs = np.concatenate([(wpos[s][..., None] * d[0]).astype(np.float32) for s, d in enumerate(ds)], axis=-1)
  ids = np.concatenate([d[1] for d in ds], axis=-1)
  return probs, ids, valid.any(axis=0)


# ----------------------------------------------------------------------------------------------------------------
# losses (JAX, jit-able; shape checks use static shapes)


def _check_loss_shapes(logits, mask, name_shapes):
  if logits.ndim < 2:
    raise ValueError(f"logits must be [..., T, V], got shape {logits.shape}")
  lead = logits.shape[:-1]
  if mask.shape != lead:
    raise ValueError(f"mask shape {mask.shape} does not match logits shape {logits.shape} without the vocab axis")
  for name, shape, want in name_shapes:
    if shape != want:
      raise ValueError(f"{name} shape {shape} does not match the expected {want}")


def _concrete(x):
  """The value as a numpy array, or None when it is a tracer (value checks are then skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_ids_range(ids, vocab, name):
  c = _concrete(ids)
  if c is not None and c.size and (c.min() < 0 or c.max() >= vocab):
    raise ValueError(f"{name} must lie in [0, V={vocab}), got range [{c.min()}, {c.max()}]")


def _masked_mean(per_pos, mask):
  m = mask.astype(jnp.float32)
  return jnp.sum(per_pos * m) / jnp.maximum(jnp.sum(m), 1.0)


def fusion_loss(student_logits, probs, ids, mask):
  """Soft-target cross-entropy -sum_v p_v log softmax(student)_v, averaged over unmasked positions (float32).

  student_logits [..., T, V]; probs, ids [..., T, K] a compact target (p_v = sum of probs whose id is v; ids
  must lie in [0, V), checked when concrete); mask [..., T].  The dense target is never materialised: by linearity
  -sum_v p_v log q_v = -sum_k probs_k log q_{ids_k}, so gathering the log-softmax at the K ids and weighting by probs
  equals the scatter-ADD dense target, repeated ids included.  A fully masked batch gives 0.
  """
  logits = jnp.asarray(student_logits)
  probs, ids, mask = jnp.asarray(probs), jnp.asarray(ids), jnp.asarray(mask)
  _check_loss_shapes(logits, mask, [("ids", ids.shape, probs.shape),
                                    ("probs without the K axis", probs.shape[:-1], logits.shape[:-1])])
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
  _check_ids_range(ids, logits.shape[-1], "ids")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, ids.astype(jnp.int32), axis=-1)
  per_pos = -jnp.sum(probs.astype(jnp.float32) * picked, axis=-1)
  return _masked_mean(per_pos, mask)


def clm_loss(logits, targets, mask):
  """Causal-LM cross-entropy of logits [..., T, V] against targets int [..., T] (already shifted: position t scores
  targets[..., t]), averaged over unmasked positions, in float32.  A fully masked batch gives 0."""
  logits, targets, mask = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
  _check_loss_shapes(logits, mask, [("targets", targets.shape, logits.shape[:-1])])
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integers, got dtype {targets.dtype}")
  _check_ids_range(targets, logits.shape[-1], "targets")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  return _masked_mean(nll, mask)


def fused_objective(logits, targets, mask, probs, ids, lam=0.9, fusion_mask=None):
  """FuseLLM objective lam·clm_loss + (1 - lam)·fusion_loss (default lam = 0.9).

  `fusion_mask` (default `mask`) restricts the fusion term, e.g. to `mask & valid` of the fused teacher targets.
  """
  lam_c = _concrete(lam)
  if lam_c is not None and (lam_c.shape != () or not 0.0 <= float(lam_c) <= 1.0):
    raise ValueError(f"lam must be a scalar in [0, 1], got {lam!r}")
  fusion_mask = mask if fusion_mask is None else fusion_mask
  lam = jnp.asarray(lam, jnp.float32)
  return lam * clm_loss(logits, targets, mask) + (1.0 - lam) * fusion_loss(logits, probs, ids, fusion_mask)
