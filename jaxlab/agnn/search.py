"""Search strategies (random search, a GraphNAS controller, AGNN's conservative controller) and a resumable driver.

A strategy proposes children and observes their rewards; ``run_search`` evaluates batches of proposals with a
caller-supplied function and keeps an append-only JSONL history. All of a strategy's random draws come from
``jax.random.fold_in(jax.random.key(seed), step)`` (the typed form of ``PRNGKey(seed)``): the controllers take
step 0 for their setup (policy initialisation, AGNN's initial architecture), and every ``propose`` call takes the
next step. A strategy's proposals therefore depend only
on its seed and the rewards it observed, so a search resumes by replaying its history: re-proposing, checking each
proposal against the stored one and feeding the stored rewards back without evaluating anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.agnn import controller as ctl
from jaxlab.agnn.space import SearchSpace

Arch = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Proposal:
  """A child to evaluate. AGNN fills ``parent`` (the best architecture it mutated, whose weights a homogeneous
  child may inherit) and ``action_class`` (the class it mutated); the other strategies leave them None."""

  arch: Arch
  parent: Arch | None = None
  action_class: str | None = None


class Strategy(Protocol):
  best: tuple[Arch, float] | None

  def propose(self, n: int) -> list[Proposal]:
    ...

  def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
    ...


class _Seeded:
  """The key schedule shared by the strategies, and the best architecture observed."""

  def __init__(self, space: SearchSpace, seed: int):
    self.space = space
    self.seed = int(seed)
    self._root = jax.random.key(self.seed)
    self._step = 0
    self._best: tuple[Arch, float] | None = None

  def _next_key(self) -> jax.Array:
    key = jax.random.fold_in(self._root, self._step)
    self._step += 1
    return key

  @property
  def best(self) -> tuple[Arch, float] | None:
    return self._best

  def _track_best(self, proposals: Sequence[Proposal], rewards: Sequence[float]) -> list[float]:
    if len(proposals) != len(rewards):
      raise ValueError(f"{len(proposals)} proposals but {len(rewards)} rewards")
    rewards = [float(r) for r in rewards]
    if not all(math.isfinite(r) for r in rewards):
      raise ValueError(f"rewards must be finite, got {rewards}")
    for p, r in zip(proposals, rewards):
      if self._best is None or r > self._best[1]:
        self._best = (tuple(p.arch), r)
    return rewards


def _child_keys(key: jax.Array, n: int, parts: int) -> np.ndarray:
  """``(n, parts)`` keys; child ``i`` of a batch draws from ``split(fold_in(key, i), parts)``. A child's draws do
  not depend on the batch's size, so a batch cut short at the end of a budget is a prefix of the full batch."""
  return _keys(key, 1 << (n - 1).bit_length(), parts)[:n]  # a power of two: few compilations


@functools.partial(jax.jit, static_argnames=("n", "parts"))
def _keys(key, n, parts):
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n, dtype=jnp.uint32))
  return jax.vmap(lambda k: jax.random.split(k, parts))(keys)


@functools.partial(jax.jit, static_argnames=("sizes",))
def _uniform(keys: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.randint(k, (len(sizes),), 0, jnp.asarray(sizes)))(keys)


_categorical = jax.jit(jax.vmap(jax.random.categorical, in_axes=(0, None)))


def _arch(row) -> Arch:
  return tuple(int(a) for a in row)


class RandomSearch(_Seeded):
  """Every position uniform and independent."""

  def propose(self, n: int) -> list[Proposal]:
    draws = np.asarray(_uniform(_child_keys(self._next_key(), n, 1)[:, 0], tuple(self.space.sizes)))
    return [Proposal(_arch(row)) for row in draws]

  def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
    self._track_best(proposals, rewards)


class _Reinforced(_Seeded):
  """Stacked policies, their Adam states and one EMA baseline shared by all of them."""

  def __init__(self, space: SearchSpace, cfg: ctl.ControllerConfig, seed: int, num_policies: int):
    super().__init__(space, seed)
    self.cfg = cfg
    self._setup_key = self._next_key()
    self.params = ctl.init_policies(jax.random.fold_in(self._setup_key, 0), space, num_policies, cfg)
    self.opt_state = ctl.init_opt_state(self.params, cfg, stacked=True)
    self.baseline: float | None = None

  def _reinforce(self, which, archs, masks, rewards):
    advantages, self.baseline = ctl.ema_advantages(self.baseline, rewards, self.cfg.baseline_decay)
    self.params, self.opt_state, _ = ctl.reinforce_update_stacked(self.params, self.opt_state, self.space, which,
                                                                   archs, masks, advantages, self.cfg)


class GraphNASController(_Reinforced):
  """GraphNAS: one LSTM policy samples every position from scratch; REINFORCE with an EMA baseline."""

  def __init__(self, space: SearchSpace, cfg: ctl.ControllerConfig = ctl.DEFAULT_CONFIG, seed: int = 0):
    super().__init__(space, cfg, seed, num_policies=1)

  def propose(self, n: int) -> list[Proposal]:
    num = len(self.space.sizes)
    keys = _child_keys(self._next_key(), n, 1)[:, 0]
    archs, _, _ = ctl.sample_batch(self.params, keys, self.space, np.zeros(n, np.int32),
                                   np.zeros((n, num), np.int32), np.ones((n, num), bool), self.cfg)
    return [Proposal(_arch(row)) for row in np.asarray(archs)]

  def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
    rewards = self._track_best(proposals, rewards)
    n, num = len(proposals), len(self.space.sizes)
    self._reinforce(np.zeros(n, np.int32), np.array([p.arch for p in proposals]), np.ones((n, num), bool), rewards)


class AGNNController(_Reinforced):
  """AGNN's reinforced conservative controller: one policy per action class, always mutating the best architecture.

  For each child the action guider scores every class ``c`` by ``decision_entropy`` of controller ``c`` at the
  class's positions with ``A*`` teacher-forced (the sum over those positions, as AutoGL's ``sample_entropy``), then
  takes the argmax (first on ties) or samples from softmax(entropies), per ``cfg.guide``. Classes whose positions
  all have a single choice cannot change and are never picked. Controller ``c`` re-samples the positions of class
  ``c`` with every other position forced to ``A*``'s value.

  The explorer must move: a child equal to ``A*`` is re-sampled, up to ``max_resample`` more times, each with its
  own key; if every draw equals ``A*``, one uniformly chosen position of class ``c`` with more than one choice is
  set to a uniformly chosen different value. Such a forced child still trains controller ``c`` with its
  teacher-forced log-probability, like any other child.

  ``observe`` makes one REINFORCE step per controller over the children it produced. The baseline is shared by
  all controllers: every child is a one-class mutation of the same ``A*``, so the reward level is set by ``A*``
  rather than by the controller, and a per-controller baseline of a rarely guided class would lag behind every
  improvement of ``A*`` and reward that controller for it. Then ``A*`` becomes the batch's best child if its
  reward beats ``R*``. A random start (no ``initial``) is not evaluated: the first observed batch sets ``R*``.
  A given ``initial`` architecture (for example a handcrafted GNN) is the first proposal (no parent, no class,
  no policy update), so the explorer leaves it only for something better.
  """

  def __init__(self, space: SearchSpace, cfg: ctl.ControllerConfig = ctl.DEFAULT_CONFIG, seed: int = 0,
               initial: Sequence[int] | None = None, max_resample: int = 3):
    self.classes = space.classes
    super().__init__(space, cfg, seed, num_policies=len(self.classes))
    self.masks = np.array([space.class_mask(c) for c in self.classes])
    multi = np.asarray(space.sizes) > 1
    self.mutable = np.array([np.any(m & multi) for m in self.masks])
    if not self.mutable.any():
      raise ValueError("every position of this space has a single choice: there is nothing to search")
    self.max_resample = int(max_resample)
    self._evaluate_initial = initial is not None
    if initial is None:
      key = jax.random.fold_in(self._setup_key, 1)
      initial = np.asarray(jax.random.randint(key, (len(space.sizes),), 0, np.asarray(space.sizes)))
    self.best_arch: Arch = space.validate(initial)
    self.best_reward: float | None = None

  @property
  def best(self) -> tuple[Arch, float] | None:
    return None if self.best_reward is None else (self.best_arch, self.best_reward)

  def guider_entropies(self) -> np.ndarray:
    """The entropy of every class controller's decisions at its class, given ``A*``."""
    return np.asarray(ctl.decision_entropies(self.params, self.space, self.best_arch, self.masks, self.cfg))

  def propose(self, n: int) -> list[Proposal]:
    if self._evaluate_initial and self.best_reward is None:
      return [Proposal(self.best_arch)] + (self.propose_children(n - 1) if n > 1 else [])
    return self.propose_children(n)

  def propose_children(self, n: int) -> list[Proposal]:
    """``n`` one-class mutations of ``A*``."""
    keys = _child_keys(self._next_key(), n, 3 + self.max_resample)
    guide_keys, fix_keys, sample_keys = keys[:, 0], keys[:, 1], keys[:, 2:]
    scores = np.where(self.mutable, self.guider_entropies(), -np.inf)
    if self.cfg.guide == "argmax":
      which = np.full(n, int(np.argmax(scores)), np.int32)
    else:
      which = np.asarray(_categorical(guide_keys, scores), np.int32)

    parent = np.asarray(self.best_arch)
    children = self._sample(sample_keys[:, 0], which)
    same = np.flatnonzero(np.all(children == parent, axis=-1))
    for attempt in range(1, 1 + self.max_resample):
      if not same.size:
        break
      # The whole batch is redrawn (one compiled shape); only the unchanged children take the new draw.
      retry = self._sample(sample_keys[:, attempt], which)
      children[same] = retry[same]
      same = np.flatnonzero(np.all(children == parent, axis=-1))
    for i in same:
      children[i] = self._force_step(parent, which[i], fix_keys[i])
    return [Proposal(_arch(child), self.best_arch, self.classes[c]) for child, c in zip(children, which)]

  def _sample(self, keys: jax.Array, which: np.ndarray) -> np.ndarray:
    """Children of ``A*``: policy ``which[i]`` re-samples its class with ``keys[i]``."""
    contexts = np.tile(np.asarray(self.best_arch), (len(which), 1))
    archs, _, _ = ctl.sample_batch(self.params, keys, self.space, which, contexts, self.masks[which], self.cfg)
    return np.array(archs)

  def _force_step(self, parent: np.ndarray, c: int, key: jax.Array) -> np.ndarray:
    sizes = np.asarray(self.space.sizes)
    candidates = np.flatnonzero(self.masks[c] & (sizes > 1))
    pos_key, value_key = jax.random.split(key)
    pos = int(candidates[int(jax.random.randint(pos_key, (), 0, candidates.size))])
    shift = 1 + int(jax.random.randint(value_key, (), 0, sizes[pos] - 1))
    child = parent.copy()
    child[pos] = (parent[pos] + shift) % sizes[pos]
    return child

  def observe(self, proposals: list[Proposal], rewards: list[float]) -> None:
    rewards = self._track_best(proposals, rewards)
    mutated = [i for i, p in enumerate(proposals) if p.action_class is not None]
    if mutated:
      which = np.array([self.classes.index(proposals[i].action_class) for i in mutated], np.int32)
      self._reinforce(which, np.array([proposals[i].arch for i in mutated]), self.masks[which],
                      np.asarray(rewards)[mutated])
    i = int(np.argmax(rewards))
    if self.best_reward is None or rewards[i] > self.best_reward:
      self.best_arch, self.best_reward = tuple(proposals[i].arch), rewards[i]


# ---------------------------------------------------------------------------------------------------------- driver

@dataclasses.dataclass
class Record:
  """One evaluated architecture. ``info`` is what ``evaluate`` returned besides "reward" (JSON-normalised);
  ``seconds`` is the evaluation time of its batch divided by the batch's size."""

  index: int
  arch: Arch
  reward: float
  info: dict
  parent: Arch | None
  action_class: str | None
  seconds: float


def _to_json(value):
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _record_json(record: Record) -> str:
  return json.dumps(dataclasses.asdict(record), default=_to_json)


def _record_from(d: dict) -> Record:
  return Record(index=int(d["index"]), arch=_arch(d["arch"]), reward=float(d["reward"]), info=d["info"],
                parent=None if d["parent"] is None else _arch(d["parent"]), action_class=d["action_class"],
                seconds=float(d["seconds"]))


def load_history(path: str | os.PathLike) -> list[Record]:
  """The records of a JSONL history. A last line cut short by a crash (no newline) is dropped from the file."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  if len(complete) != len(data):
    with open(path, "r+b") as f:
      f.truncate(len(complete))
  records = []
  for number, line in enumerate(complete.decode().splitlines()):
    if not line.strip():
      continue
    try:
      record = _record_from(json.loads(line))
    except (ValueError, KeyError, TypeError) as err:
      raise ValueError(f"{path}: line {number + 1} is not a search record ({err})") from err
    if record.index != len(records):
      raise ValueError(f"{path}: record {record.index} found where record {len(records)} was expected")
    records.append(record)
  return records


def _append(path, records: Sequence[Record]) -> None:
  text = "".join(_record_json(r) + "\n" for r in records)
  with open(path, "a") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def run_search(strategy: Strategy, evaluate: Callable[[list[Proposal]], list[dict]], *, budget: int,
               batch_size: int = 1, history_path: str | os.PathLike | None = None,
               progress: Callable[[Record], None] | None = None, max_seconds: float | None = None) -> list[Record]:
  """Propose ``batch_size`` children at a time, evaluate them together, observe, until ``budget`` are evaluated.

  ``max_seconds`` also ends the search once the evaluations (stored ones included) have taken that long; the
  batch under way is finished first.

  With ``history_path`` every batch's records are appended (and fsynced) before the strategy observes them, and a
  run that finds a history replays it: the strategy re-proposes, each proposal must equal the stored one, and the
  stored rewards are observed without calling ``evaluate``. Replay needs the same strategy, seed and batch size;
  a batch that was only partly stored (the last one of a smaller budget) is completed by evaluating its missing
  children. ``progress`` is called
  with each newly evaluated record.
  """
  if budget < 0 or batch_size < 1:
    raise ValueError(f"need budget >= 0 and batch_size >= 1, got {budget} and {batch_size}")
  stored: list[Record] = []
  if history_path is not None:
    directory = os.path.dirname(os.fspath(history_path))
    if directory:
      os.makedirs(directory, exist_ok=True)
    stored = load_history(history_path)
  records: list[Record] = []
  while len(records) < budget:
    if max_seconds is not None and sum(r.seconds for r in records) >= max_seconds:
      break
    n = min(batch_size, budget - len(records))
    proposals = list(strategy.propose(n))
    if len(proposals) != n:
      raise ValueError(f"the strategy proposed {len(proposals)} children, {n} were asked for")
    start = len(records)
    batch = stored[start:start + n]
    for record, p in zip(batch, proposals):
      if (record.arch, record.parent, record.action_class) != (tuple(p.arch), p.parent, p.action_class):
        raise ValueError(f"{history_path}: record {record.index} is {record.arch} (parent {record.parent}, class "
                         f"{record.action_class}) but the replay proposes {p}: the history was made with another "
                         "strategy/seed (or batch size)")
    new = proposals[len(batch):]
    if new:
      tic = time.perf_counter()
      infos = list(evaluate(new))
      seconds = (time.perf_counter() - tic) / len(new)
      if len(infos) != len(new):
        raise ValueError(f"evaluate returned {len(infos)} results for {len(new)} proposals")
      fresh = []
      for p, info in zip(new, infos):
        if "reward" not in info:
          raise ValueError(f"evaluate's result has no 'reward': {info}")
        rest = json.loads(json.dumps({k: v for k, v in info.items() if k != "reward"}, default=_to_json))
        fresh.append(Record(start + len(batch) + len(fresh), tuple(p.arch), float(info["reward"]), rest, p.parent,
                            p.action_class, seconds))
      if history_path is not None:
        _append(history_path, fresh)
      batch = batch + fresh
    strategy.observe(proposals, [r.reward for r in batch])
    records.extend(batch)
    if new and progress is not None:
      for record in batch[n - len(new):]:
        progress(record)
  return records


def _field(record: Record, name: str):
  return getattr(record, name) if name in ("reward", "seconds", "index") else record.info[name]


def best_so_far(records: Sequence[Record], key: str = "reward", report: str = "test") -> list:
  """After each record, ``report`` of the record with the highest ``key`` so far (the earliest on ties).

  With the defaults: the test accuracy of the best-by-validation architecture against the number queried.
  """
  out, best = [], None
  for record in records:
    if best is None or _field(record, key) > _field(best, key):
      best = record
    out.append(_field(best, report))
  return out
