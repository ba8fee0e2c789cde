"""AGNN controllers: valid and masked sampling, exact log-probabilities, REINFORCE's direction, the conservative
explorer and its guider, the baselines' progress, and resuming a search by replaying its history."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxlab.agnn import controller as ctl
from jaxlab.agnn import search
from jaxlab.agnn.space import Position, SearchSpace, gnn_space

CFG = ctl.ControllerConfig(lstm_hidden=16)


def uneven_space():
  """NAS-Bench-Graph's shape: link positions with 1..4 choices interleaved with 9-way op positions."""
  positions = []
  for node in range(4):
    positions.append(Position(f"in{node}", "links", tuple(range(node + 1))))
    positions.append(Position(f"op{node}", "ops", tuple(f"op{k}" for k in range(9))))
  return SearchSpace(tuple(positions))


SPACES = {"gnn": gnn_space(2), "uneven": uneven_space()}


def sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def reference_scores(params, space, arch, mask, cfg):
  """A plain numpy LSTM walk over ``arch`` (teacher-forced): the log-probability and the summed entropy of the
  decisions at the masked positions."""
  p = jax.tree.map(np.asarray, params)
  hidden = p["start"].shape[0]
  h, c, x = np.zeros(hidden), np.zeros(hidden), p["start"]
  logp_sum = entropy_sum = 0.0
  for t, size in enumerate(space.sizes):
    i, f, g, o = np.split(x @ p["lstm_wx"] + h @ p["lstm_wh"] + p["lstm_b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    z = cfg.tanh_constant * np.tanh((h @ p["head_w"][t] + p["head_b"][t]) / cfg.temperature)[:size]
    logp = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
    if mask[t]:
      logp_sum += logp[arch[t]]
      entropy_sum -= np.sum(np.exp(logp) * logp)
    x = p["embed"][t, arch[t]]
  return logp_sum, entropy_sum


@pytest.mark.parametrize("name", list(SPACES))
def test_sampled_architectures_are_valid_and_masked_choices_never_drawn(name):
  space = SPACES[name]
  num, sizes = len(space.sizes), np.asarray(space.sizes)
  params = ctl.init_policy(jax.random.key(0), space, CFG)
  # Push every invalid choice's raw logit far up: the mask must still exclude it.
  invalid = np.arange(sizes.max())[None, :] >= sizes[:, None]
  params["head_b"] = params["head_b"] + 100.0 * invalid
  stacked = jax.tree.map(lambda v: v[None], params)
  n, draws = 8, []
  for i in range(40):
    archs, logp, entropy = ctl.sample_batch(stacked, jax.random.split(jax.random.key(i), n), space,
                                            np.zeros(n, np.int32), np.zeros((n, num), np.int32),
                                            np.ones((n, num), bool), CFG)
    assert np.all(np.isfinite(logp)) and np.all(np.isfinite(entropy))
    draws.append(np.asarray(archs))
  archs = np.concatenate(draws)
  assert np.all(archs >= 0) and np.all(archs < sizes)
  for t, size in enumerate(sizes):  # every valid choice shows up (the policy is near uniform over valid ones)
    assert set(archs[:, t]) == set(range(size))
  logits = np.asarray(ctl.policy_logits(params, space, archs[0], CFG))
  assert np.all(np.isneginf(logits[invalid])) and np.all(np.abs(logits[~invalid]) <= CFG.tanh_constant)
  # Masked entries must not leak NaN into the gradient, hence into the updated parameters.
  updated, _, loss = ctl.reinforce_update(params, ctl.init_opt_state(params, CFG), space, archs[:n],
                                          np.ones((n, num), bool), np.linspace(-1, 1, n), CFG)
  assert np.isfinite(loss) and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(updated))


@pytest.mark.parametrize("name", list(SPACES))
def test_partial_mask_keeps_the_context_and_scores_are_exact(name):
  space = SPACES[name]
  num, rng = len(space.sizes), np.random.default_rng(0)
  params = ctl.init_policy(jax.random.key(2), space, CFG)
  params = jax.tree.map(lambda v: v * 5.0, params)  # a sharper, less uniform policy
  for trial in range(3):
    context = np.array([rng.integers(s) for s in space.sizes])
    mask = rng.random(num) < 0.5
    arch, logp, entropy = ctl.sample(params, jax.random.key(10 + trial), space, context, mask, CFG)
    arch = np.asarray(arch)
    np.testing.assert_array_equal(arch[~mask], context[~mask])
    ref_logp, ref_entropy = reference_scores(params, space, arch, mask, CFG)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ctl.log_prob(params, space, arch, mask, CFG), logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctl.decision_entropy(params, space, arch, mask, CFG), entropy, rtol=1e-5, atol=1e-6)


def test_reinforce_sign_and_convergence_to_a_rewarded_action():
  space = SPACES["uneven"]  # the rewarded action: choice 2 of the 9-way position "op0"
  num, n = len(space.sizes), 8
  cfg = dataclasses.replace(CFG, learning_rate=0.03)
  params = ctl.init_policy(jax.random.key(0), space, cfg)
  opt_state = ctl.init_opt_state(params, cfg)
  masks = np.ones((n, num), bool)

  def p_two(q):
    return float(jax.nn.softmax(ctl.policy_logits(q, space, (0,) * num, cfg)[1])[2])

  # A step with a positive advantage makes the child more likely, a negative one less likely.
  child = (0, 2, 1, 5, 0, 0, 3, 8)
  before = ctl.log_prob(params, space, child, masks[0], cfg)
  for sign in (1.0, -1.0):
    q, _, _ = ctl.reinforce_update(params, opt_state, space, [child] * n, masks, [sign] * n, cfg)
    assert sign * (ctl.log_prob(q, space, child, masks[0], cfg) - before) > 0

  assert abs(p_two(params) - 1 / 9) < 0.03
  baseline, key = None, jax.random.key(1)
  for step in range(100):
    stacked = jax.tree.map(lambda v: v[None], params)
    archs, _, _ = ctl.sample_batch(stacked, jax.random.split(jax.random.fold_in(key, step), n), space,
                                   np.zeros(n, np.int32), np.zeros((n, num), np.int32), masks, cfg)
    rewards = (np.asarray(archs)[:, 1] == 2).astype(float)
    advantages, baseline = ctl.ema_advantages(baseline, rewards, cfg.baseline_decay)
    params, opt_state, _ = ctl.reinforce_update(params, opt_state, space, archs, masks, advantages, cfg)
  assert p_two(params) > 0.6


def test_ema_baseline():
  advantages, b = ctl.ema_advantages(None, [1.0, 3.0], 0.5)
  np.testing.assert_allclose(advantages, [-1.0, 1.0])  # the first batch is centred on its mean
  assert b == pytest.approx(0.5 * (0.5 * 2.0 + 0.5) + 0.5 * 3.0)
  advantages, b2 = ctl.ema_advantages(b, [4.0], 0.5)
  np.testing.assert_allclose(advantages, [4.0 - b])
  assert b2 == pytest.approx(0.5 * b + 2.0)


def only_class_changed(space, parent, child, action_class):
  changed = [t for t, (a, b) in enumerate(zip(parent, child)) if a != b]
  return bool(changed) and all(space.positions[t].action_class == action_class for t in changed)


@pytest.mark.parametrize("name", list(SPACES))
def test_agnn_children_mutate_one_class_of_the_best(name):
  space = SPACES[name]
  agnn = search.AGNNController(space, dataclasses.replace(CFG, guide="sample"), seed=3)
  rng, seen = np.random.default_rng(0), set()
  for _ in range(6):
    best = agnn.best_arch
    proposals = agnn.propose(8)
    for p in proposals:
      assert p.parent == best and only_class_changed(space, best, p.arch, p.action_class)
      seen.add(p.action_class)
    agnn.observe(proposals, list(rng.random(8)))
  if name == "gnn":  # the sampling guider explores several classes (in the uneven space the summed entropy of
    assert len(seen) > 1  # four 9-way ops dwarfs that of the links, so "ops" is drawn nearly always)


def test_agnn_guider_takes_the_most_uncertain_class():
  space = SPACES["gnn"]
  agnn = search.AGNNController(space, dataclasses.replace(CFG, learning_rate=0.05, guide="argmax"), seed=0)
  rng = np.random.default_rng(1)
  for _ in range(4):
    per_class = [jax.tree.map(lambda v, c=c: v[c], agnn.params) for c in range(len(agnn.classes))]
    entropies = [float(ctl.decision_entropy(q, space, agnn.best_arch, space.class_mask(cls), agnn.cfg))
                 for q, cls in zip(per_class, agnn.classes)]
    np.testing.assert_allclose(agnn.guider_entropies(), entropies, rtol=1e-5)
    proposals = agnn.propose(8)
    assert {p.action_class for p in proposals} == {agnn.classes[int(np.argmax(entropies))]}
    chosen = agnn.classes.index(proposals[0].action_class)
    agnn.observe(proposals, list(rng.random(8)))
    # Only the controller that produced children moved.
    for c, q in enumerate(per_class):
      moved = any(np.any(np.asarray(a)[c] != np.asarray(b)) for a, b in zip(jax.tree.leaves(agnn.params),
                                                                           jax.tree.leaves(q)))
      assert moved == (c == chosen)


def test_agnn_best_changes_only_on_a_better_reward():
  space = SPACES["uneven"]
  initial = (0, 3, 1, 4, 2, 5, 3, 6)
  agnn = search.AGNNController(space, CFG, seed=0, initial=initial)
  assert agnn.best is None and agnn.best_arch == initial
  low = [0.1] * 5
  proposals = agnn.propose(8)
  agnn.observe(proposals, [0.5, 0.7, 0.6] + low)  # the first batch sets R*
  assert agnn.best == (proposals[1].arch, 0.7)
  proposals = agnn.propose(8)
  agnn.observe(proposals, [0.7, 0.1, 0.69] + low)  # a tie does not replace A*
  assert agnn.best == (proposals[0].parent, 0.7)
  proposals = agnn.propose(8)
  assert all(p.parent == agnn.best_arch for p in proposals)
  agnn.observe(proposals, [0.2, 0.8, 0.75] + low)
  assert agnn.best == (proposals[1].arch, 0.8)


def test_agnn_explorer_always_moves():
  space = SPACES["uneven"]
  agnn = search.AGNNController(space, CFG, seed=0)
  agnn._sample = lambda keys, which: np.tile(np.asarray(agnn.best_arch), (len(which), 1))  # a stuck controller
  for p in agnn.propose(8):
    changed = [t for t in range(len(space.sizes)) if p.arch[t] != agnn.best_arch[t]]
    assert len(changed) == 1 and space.positions[changed[0]].action_class == p.action_class
    assert space.sizes[changed[0]] > 1


def test_agnn_never_guides_to_a_class_without_choices():
  positions = SPACES["uneven"].positions
  space = SearchSpace((dataclasses.replace(positions[0], action_class="fixed"),) + positions[1:])
  agnn = search.AGNNController(space, dataclasses.replace(CFG, guide="sample"), seed=0)
  agnn._sample = lambda keys, which: np.tile(np.asarray(agnn.best_arch), (len(which), 1))  # only the guider counts
  assert "fixed" not in {p.action_class for _ in range(6) for p in agnn.propose(8)}


def additive_reward(space, arch):
  """In [0, 1]: the mean over positions of the chosen index scaled to [0, 1] (single-choice positions count 1)."""
  return float(np.mean([a / (s - 1) if s > 1 else 1.0 for a, s in zip(arch, space.sizes)]))


def evaluator(space, calls=None):
  def evaluate(proposals):
    if calls is not None:
      calls.append(len(proposals))
    rewards = [additive_reward(space, p.arch) for p in proposals]
    return [{"reward": r, "test": r - 0.01, "tag": np.float32(0.5)} for r in rewards]
  return evaluate


def test_baselines_and_agnn_make_progress_on_an_additive_reward():
  space = SPACES["gnn"]
  cfg = dataclasses.replace(CFG, learning_rate=0.03, guide="sample")
  random_records = search.run_search(search.RandomSearch(space, seed=0), evaluator(space), budget=160, batch_size=8)
  initial_mean = np.mean([r.reward for r in random_records])
  assert random_records[-1].info == {"test": pytest.approx(random_records[-1].reward - 0.01), "tag": 0.5}
  assert max(r.reward for r in random_records) > initial_mean + 0.15

  graphnas = search.run_search(search.GraphNASController(space, cfg, seed=0), evaluator(space), budget=480,
                               batch_size=8)
  rewards = np.array([r.reward for r in graphnas])
  assert rewards[-80:].mean() > rewards[:40].mean() + 0.1
  assert all(r.parent is None and r.action_class is None for r in graphnas)

  agnn = search.AGNNController(space, cfg, seed=0)
  records = search.run_search(agnn, evaluator(space), budget=160, batch_size=8)
  assert agnn.best[1] > initial_mean + 0.2 and agnn.best[1] == max(r.reward for r in records)


class Interrupt(Exception):
  pass


@pytest.mark.parametrize("kind", ["agnn", "graphnas"])
def test_resume_by_replay_matches_an_uninterrupted_search(tmp_path, kind):
  space = SPACES["uneven"]

  def make(seed=0):
    if kind == "agnn":
      return search.AGNNController(space, dataclasses.replace(CFG, guide="sample"), seed=seed)
    return search.GraphNASController(space, CFG, seed=seed)

  def fields(records):
    return [(r.index, r.arch, r.reward, r.info, r.parent, r.action_class) for r in records]

  full = search.run_search(make(), evaluator(space), budget=24, batch_size=8, history_path=tmp_path / "full.jsonl")
  assert len({r.arch for r in full}) > 12

  path = tmp_path / "resumed.jsonl"
  evaluate, calls = evaluator(space), []

  def failing(proposals):
    if len(calls) == 2:
      raise Interrupt
    calls.append(len(proposals))
    return evaluate(proposals)

  with pytest.raises(Interrupt):
    search.run_search(make(), failing, budget=24, batch_size=8, history_path=path)
  lines = path.read_text().splitlines(keepends=True)
  assert len(lines) == 16
  # Keep half of the second batch, then a line cut short by a crash.
  path.write_text("".join(lines[:12]) + '{"index": 12, "arch": [0, 1')
  calls.clear()
  progressed = []
  resumed = search.run_search(make(), evaluator(space, calls), budget=24, batch_size=8, history_path=path,
                              progress=progressed.append)
  assert fields(resumed) == fields(full)
  assert calls == [4, 8] and [r.index for r in progressed] == list(range(12, 24))
  assert fields(search.load_history(path)) == fields(full)

  with pytest.raises(ValueError, match="history was made with another strategy/seed"):
    search.run_search(make(seed=1), evaluator(space), budget=24, batch_size=8, history_path=path)


def test_best_so_far():
  def record(i, reward, test):
    return search.Record(i, (i,), reward, {"test": test, "val2": -reward}, None, None, 0.1)

  records = [record(0, 0.5, 0.40), record(1, 0.4, 0.90), record(2, 0.7, 0.60), record(3, 0.7, 0.10),
             record(4, 0.6, 0.95), record(5, 0.8, 0.65)]
  assert search.best_so_far(records) == [0.40, 0.40, 0.60, 0.60, 0.60, 0.65]
  assert search.best_so_far(records, key="val2", report="test") == [0.40, 0.90, 0.90, 0.90, 0.90, 0.90]
  assert search.best_so_far(records, report="reward") == [0.5, 0.5, 0.7, 0.7, 0.7, 0.8]
  assert search.best_so_far([]) == []


def test_agnn_evaluates_a_given_initial_architecture_first_and_leaves_it_only_for_better():
  space = gnn_space(2)
  initial = tuple([1] * len(space.sizes))
  strategy = search.AGNNController(space, ctl.ControllerConfig(guide="sample"), 0, initial=initial)
  params = jax.tree.map(np.array, strategy.params)
  first = strategy.propose(3)
  assert first[0] == search.Proposal(initial) and all(p.parent == initial for p in first[1:])
  strategy.observe(first, [0.8, 0.5, 0.6])
  assert strategy.best == (initial, 0.8)
  # the initial architecture was no policy's decision: only the mutated children's controllers learn
  changed = {i for i in range(len(space.classes))
             if not all(np.array_equal(a[i], b[i]) for a, b in zip(jax.tree.leaves(params),
                                                                    jax.tree.leaves(strategy.params)))}
  assert changed == {space.classes.index(p.action_class) for p in first[1:]}
  later = strategy.propose(2)
  assert all(p.parent == initial and p.action_class is not None for p in later)
