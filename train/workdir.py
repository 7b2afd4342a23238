"""The workdir: the unit of exchange between train, sample, experiments and the HF importer.

  workdir/
    config.json        {"model": ModelConfig fields, "tokenizer": tokenizer spec,
                        "train": training config (when trained), "source": provenance}
    tokenizer.model    (or tokenizer.json; none for the byte tokenizer)
    checkpoints/<step>/{params, opt_state, meta, data, lora}   orbax items
    metrics.jsonl      one JSON object per logging/eval event
    events.*           TensorBoard

Checkpoints hold separate orbax items so a reader restores only what it needs:
the sampler and the experiments restore 'params' (and 'lora' if present);
training restores everything.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from model.config import ModelConfig
from train.tokenizer import Tokenizer, tokenizer_from_spec

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class WorkdirError(ValueError):
  """A workdir is missing, empty or inconsistent."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def write_config(workdir: str, model_cfg: ModelConfig, tokenizer: Tokenizer,
                 **sections: Any) -> None:
  """Write config.json (atomically: a crash never leaves half a file)."""
  os.makedirs(workdir, exist_ok=True)
  payload = {"model": model_cfg.to_dict(), "tokenizer": tokenizer.spec(), **sections}
  tmp = config_path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, config_path(workdir))


def read_config(workdir: str) -> dict[str, Any]:
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} does not exist; train a model first "
                       "(python -m train --config=train/configs/default.py --workdir=...) "
                       "or import one (python -m model.hf import ...)")
  path = config_path(workdir)
  if not os.path.exists(path):
    raise WorkdirError(f"workdir {workdir!r} has no {CONFIG_FILE}: it is empty or not a "
                       "workdir written by `python -m train` or `python -m model.hf import`")
  with open(path) as f:
    return json.load(f)


def load_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_dict(read_config(workdir)["model"])


def load_tokenizer(workdir: str) -> Tokenizer:
  return tokenizer_from_spec(read_config(workdir)["tokenizer"], workdir)


def checkpoint_manager(workdir: str, *, max_to_keep: int | None = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """The orbax manager of workdir/checkpoints (creates the directory)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(workdir: str) -> int | None:
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path) as mngr:
    return mngr.latest_step()


def checkpoint_items(workdir: str, step: int) -> set[str]:
  """The items (params, opt_state, lora, ...) that checkpoint `step` of workdir holds.

  Read from the step's directory: orbax's item_metadata would log a warning for
  every item it has no handler for.
  """
  path = os.path.join(checkpoint_dir(workdir), str(step))
  return {name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name))}


def _abstract(tree, shardings):
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def restore_params(workdir: str, step: int | None = None, *, shardings=None,
                   with_lora: bool = True):
  """(model config, params, lora or None, step) from a workdir's checkpoint.

  `shardings` (a pytree of NamedSharding matching the params) places the
  arrays straight onto a mesh; by default they land on the first device.
  """
  from model.api import init, init_lora

  cfg = load_model_config(workdir)
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise WorkdirError(f"workdir {workdir!r} has no checkpoint under {CHECKPOINT_DIR}/")
  abstract_params = _abstract(jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0))),
                              shardings)
  items = {"params": ocp.args.StandardRestore(abstract_params)}
  has_lora = bool(with_lora and cfg.lora_rank) and "lora" in checkpoint_items(workdir, step)
  with ocp.CheckpointManager(checkpoint_dir(workdir)) as mngr:
    if has_lora:
      abstract_lora = _abstract(jax.eval_shape(lambda: init_lora(cfg, jax.random.PRNGKey(0))),
                                None)
      items["lora"] = ocp.args.StandardRestore(abstract_lora)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return cfg, restored["params"], restored.get("lora") if has_lora else None, step


def save_params(workdir: str, params, step: int = 0, lora=None) -> None:
  """Write a params-only checkpoint (what an import or an export of weights needs)."""
  items = {"params": ocp.args.StandardSave(params)}
  if lora is not None:
    items["lora"] = ocp.args.StandardSave(lora)
  with checkpoint_manager(workdir, max_to_keep=None, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
