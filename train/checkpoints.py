"""Training checkpoints in workdir/checkpoints/<step>/ (orbax), one item per concern.

  params     the model parameters (what sample/ and experiments/ restore)
  opt_state  the optimizer state (AdamW moments, counts)
  meta       JSON: step, PRNG key, tokens seen, best validation loss, wall time
  data       JSON: the grain iterator state (the position in the data stream)
  lora       a LoRA fine-tune's adapters (the trained state); 'params' then holds the
             frozen base, so readers of 'params' (+ 'lora') need nothing new

Orbax writes each checkpoint into a temporary directory and renames it when
complete, and deletes old ones only after that, so a crash or a kill during a
save leaves the previous checkpoint intact (the half-written directory is
ignored and cleaned up). Saves are asynchronous: training continues while
the arrays are written.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from train import workdir as workdir_lib
from train.state import TrainState


class Checkpointer:
  """Save and restore TrainState + data iterator state + metadata.

  With `frozen_params` (a LoRA fine-tune) the state's params are saved and
  restored as the 'lora' item and `frozen_params` are saved as 'params'.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               frozen_params=None):
    self.workdir = workdir
    self.mngr = workdir_lib.checkpoint_manager(workdir, max_to_keep=keep, async_save=async_save)
    self.frozen_params = frozen_params
    self.trained_item = "params" if frozen_params is None else "lora"

  @property
  def directory(self) -> str:
    return workdir_lib.checkpoint_dir(self.workdir)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, state: TrainState, *, data_state: dict | None, meta: dict[str, Any],
           force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    meta = {**meta, "step": step,
            "rng": np.asarray(jax.device_get(state.rng)).astype(np.int64).tolist()}
    items = {self.trained_item: ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state),
             "meta": ocp.args.JsonSave(meta)}
    if self.frozen_params is not None:
      items["params"] = ocp.args.StandardSave(self.frozen_params)
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if step in self.mngr.all_steps():
      return False
    return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract: TrainState, shardings: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict | None, dict]:
    """(state placed by `shardings`, data iterator state or None, meta) of `step` (latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def target(tree, shard_tree):
      return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          tree, shard_tree)

    items = {self.trained_item: ocp.args.StandardRestore(target(abstract.params,
                                                                 shardings.params)),
             "opt_state": ocp.args.StandardRestore(target(abstract.opt_state,
                                                          shardings.opt_state)),
             "meta": ocp.args.JsonRestore()}
    has_data = "data" in workdir_lib.checkpoint_items(self.workdir, step)
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
    meta = dict(restored["meta"])
    rng = jax.device_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)), shardings.rng)
    step_arr = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step)
    state = TrainState(step=step_arr, params=restored[self.trained_item],
                       opt_state=restored["opt_state"], rng=rng)
    return state, (dict(restored["data"]) if has_data else None), meta

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
