"""The one checkpoint path: an orbax CheckpointManager holding the train state plus a JSON record.

The JSON record stores the config and the step so that a resumed run can refuse a checkpoint written by a
different configuration instead of silently mixing them.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  pass


class Checkpointer:

  def __init__(self, directory: str, keep: int = 2, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    self._manager.wait_until_finished()
    return saved

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def restore(self, like_state, step: int | None = None, expect_meta: dict | None = None):
    """Restores into the structure, dtypes and shardings of ``like_state``.

    ``expect_meta`` entries must equal the stored ones (e.g. the config), else a clear error names the key.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_meta(step)
    for key, want in (expect_meta or {}).items():
      if meta.get(key) != want:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} was written with a different '{key}'; "
            f"use a fresh --workdir or the original settings")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match the model's state structure: {e}") from e
    return restored["state"], meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
