"""Training checkpoints: the whole train state, the data position and the run's metadata.

  ckpt = Checkpointer(workdir, trained_item=task.collection, extra=task.checkpoint_items())
  ckpt.save(state, data_state=it.get_state(), meta={...})
  state, data_state, meta = ckpt.restore(abstract, shardings)

Items (model/store/checkpoint.py describes the layout every reader shares):
`trained_item` ('params', or 'lora' in a LoRA run) holds the state's params,
'opt_state' the optimizer state, 'meta' the step, PRNG key, tokens seen, best
validation loss and wall time, 'data' the grain iterator's state, and `extra`
whatever the task saves beside them (a LoRA run's frozen base as 'params').

Orbax writes each checkpoint into a temporary directory and renames it when
complete, and deletes old ones only after that, so a crash or a kill during a
save leaves the previous checkpoint intact (the half-written directory is
ignored and cleaned up). Saves are asynchronous: training continues while
the arrays are written; a save that fails (a full disk) raises `SaveFailed`
naming the step, the cause and the last good checkpoint, at the latest when
the next save starts or the run ends.

`restore` starts from the newest step; a step that cannot be read (a truncated
or corrupted file, a missing item) is moved aside to `<step>.damaged` and the
next older one is tried, so a run resumes from the newest readable checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from model import store
from train.state import TrainState


class SaveFailed(RuntimeError):
  """Writing a checkpoint failed; the earlier checkpoints are intact."""


class Checkpointer:
  """Save and restore a TrainState, the data iterator's state and metadata."""

  def __init__(self, workdir: str, *, trained_item: str = "params",
               extra: dict[str, Any] | None = None, keep: int = 3, async_save: bool = True):
    self.workdir = workdir
    self.trained_item = trained_item
    self.extra = dict(extra or {})
    self.mngr = store.checkpoint_manager(workdir, max_to_keep=keep, async_save=async_save)
    self.pending_step: int | None = None  # an asynchronous save not known to be complete

  @property
  def directory(self) -> str:
    return store.checkpoint_dir(self.workdir)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, state: TrainState, *, data_state: dict | None, meta: dict[str, Any],
           force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.mngr.all_steps():
      return False
    meta = {**meta, "step": step,
            "rng": np.asarray(jax.device_get(state.rng)).astype(np.int64).tolist()}
    items = {self.trained_item: ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state),
             "meta": ocp.args.JsonSave(meta)}
    items.update({name: ocp.args.StandardSave(tree) for name, tree in self.extra.items()})
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.wait()  # the previous asynchronous save first (orbax would wait for it anyway)
    try:
      saved = self.mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      raise self._failed(step, e) from None
    self.pending_step = step if saved else None
    return saved

  def _failed(self, step: int, error: BaseException) -> SaveFailed:
    good = [s for s in store.all_steps(self.workdir) if s != step]
    return SaveFailed(f"saving checkpoint {step} in {self.directory} failed "
                      f"({store.error_cause(error)}); the last good checkpoint is step "
                      f"{good[-1] if good else 'none'}; free the space (or fix the cause) and "
                      "rerun the same command to resume from it")

  def restore(self, abstract: TrainState, shardings: TrainState,
              log: Callable[[str], None] = print) -> tuple[TrainState, dict | None, dict]:
    """(state placed by `shardings`, data iterator state or None, meta) of the newest
    readable step; damaged steps are moved aside (said through `log`)."""
    problems = []
    for step in reversed(store.all_steps(self.workdir)):
      try:
        return self._restore(abstract, shardings, step)
      except store.CheckpointError as e:
        problems.append(str(e).split(";")[0])
        if jax.process_index() == 0:
          moved = store.quarantine(self.workdir, step)
          log(f"{problems[-1]}; moved it to {moved} and trying the step before")
        self.mngr.reload()
    raise store.CheckpointError(f"no readable checkpoint in {self.directory}: "
                                + "; ".join(problems))

  def _restore(self, abstract: TrainState, shardings: TrainState, step: int):
    targets = {self.trained_item: store.with_shardings(abstract.params, shardings.params),
               "opt_state": store.with_shardings(abstract.opt_state, shardings.opt_state)}
    ckpt = store.restore(self.workdir, step, items=(self.trained_item, "opt_state", "meta"),
                         optional=("data",), targets=targets)
    missing = sorted(set(self.extra) - store.checkpoint_items(self.workdir, step))
    if missing:  # what the task saves beside the state (a LoRA run's base) must be there too
      raise store.CheckpointError(f"checkpoint {step} of {self.workdir!r} is damaged: it holds "
                                  f"no {missing} item(s)", step)
    meta = dict(ckpt.items["meta"])
    rng = jax.device_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)), shardings.rng)
    step_arr = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step)
    state = TrainState(step=step_arr, params=ckpt.items[self.trained_item],
                       opt_state=ckpt.items["opt_state"], rng=rng)
    data = ckpt.items.get("data")
    return state, (dict(data) if data is not None else None), meta

  def wait(self) -> None:
    try:
      self.mngr.wait_until_finished()
    except Exception as e:
      raise self._failed(self.pending_step, e) from None
    if self.pending_step is not None:
      store.release_free_memory()  # what the save's writer threads freed
    self.pending_step = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.mngr.close()
