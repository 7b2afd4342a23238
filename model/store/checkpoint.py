"""Checkpoints of a workdir (orbax): one restore for every reader, params-only saves.

  workdir/checkpoints/<step>/
    params     the model parameters (the frozen base, in a LoRA run)
    lora       a LoRA run's adapters
    opt_state  the optimizer state            (training only)
    meta       JSON: step, PRNG key, tokens seen, best validation loss, wall time
    data       JSON: the data iterator's position

  ckpt = restore(workdir, items=("params",), optional=("lora",))    # latest step
  ckpt.step, ckpt.items["params"]
  loaded = load_params(workdir, shardings=mesh)   # cfg + params with LoRA adapters merged
  save_params(workdir, params, step=0)

Each item is read only when asked for. Array items are restored onto abstract
targets (shapes, dtypes and shardings); 'params' and 'lora' get theirs from the
workdir's config.json, any other array item from `targets`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorstore
from absl import logging as absl_logging
from jax.sharding import Mesh
from orbax.checkpoint._src.serialization import tensorstore_utils

from model import lora as lora_lib
from model import quant
from model.api import abstract_params
from model.config import ModelConfig
from model.sharding import param_shardings
from model.store.workdir import (
    CHECKPOINT_DIR,
    WorkdirError,
    checkpoint_dir,
    load_model_config,
    load_quantization,
)

JSON_ITEMS = ("meta", "data")
DAMAGED_SUFFIX = ".damaged"


def _no_raw_byte_count(direction=None) -> int:
  """Stands in for orbax's raw-throughput probe. It calls TensorStore's
  `experimental_collect_matching_metrics`, whose result is never freed (0.1.75-0.1.86:
  ~3 KB of Python objects per call, two calls per saved item), so a run that checkpoints
  often grew by ~60 KB per checkpoint. Returning 0 only skips orbax's raw-bytes log line."""
  del direction
  return 0


class _KvStoreSpec:
  """A lazy ts.KvStore.Spec whose to_json() of a local file spec is the spec itself (what
  TensorStore returns for one): TensorStore's JSON-to-Python conversion never frees its
  result, and orbax converts one spec per array it saves."""

  def __init__(self, spec):
    self.spec = spec

  def to_json(self, *args, **kwargs):
    if isinstance(self.spec, dict) and self.spec.get("driver") == "file" and not (args or kwargs):
      return dict(self.spec)
    return tensorstore.KvStore.Spec(self.spec).to_json(*args, **kwargs)


class _KvStore:
  Spec = _KvStoreSpec

  @staticmethod
  def open(spec, *args, **kwargs):
    if isinstance(spec, _KvStoreSpec):
      spec = tensorstore.KvStore.Spec(spec.spec)
    return tensorstore.KvStore.open(spec, *args, **kwargs)

  def __getattr__(self, name):
    return getattr(tensorstore.KvStore, name)


class _TensorStore:
  """The tensorstore module as orbax's tensorstore_utils sees it, with _KvStore."""

  KvStore = _KvStore()

  def __getattr__(self, name):
    return getattr(tensorstore, name)


tensorstore_utils.get_tensorstore_raw_bytes = _no_raw_byte_count
tensorstore_utils.ts = _TensorStore()

try:
  _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, musl): nothing to trim
  _LIBC = None


class _OrbaxErrorLogs(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    # asyncio reports orbax's failed write tasks when they are garbage-collected ("Task
    # exception was never retrieved"); the task's repr names orbax's coroutine.
    from_orbax = "orbax" in record.pathname or (
        record.name == "asyncio" and "orbax" in record.getMessage())
    return not from_orbax


def quiet_orbax_errors() -> None:
  """Drop orbax's own ERROR logs (tracebacks from its threads): the command lines report a
  checkpoint that cannot be read or written once, as a CheckpointError/SaveFailed line."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OrbaxErrorLogs) for f in handler.filters):
    handler.addFilter(_OrbaxErrorLogs())


class BackgroundErrors:
  """Holds back exceptions of background threads (orbax's writers and readers, TensorStore
  callbacks) while a command runs. After a failure they are its echoes (a full disk makes
  every writer thread fail; a damaged checkpoint's pending reads find their event loop
  closed) and the command's one error line says what happened; after a success `release`
  shows them."""

  def __enter__(self):
    self.held = []
    self._hooks = (sys.unraisablehook, threading.excepthook)
    sys.unraisablehook = lambda args: self.held.append(("unraisable", args))
    threading.excepthook = lambda args: self.held.append(("thread", args))
    return self

  def __exit__(self, exc_type, *exc) -> bool:
    return False

  def release(self) -> None:
    """Restore the hooks and show what was held back."""
    sys.unraisablehook, threading.excepthook = self._hooks
    for kind, args in self.held:
      (sys.unraisablehook if kind == "unraisable" else threading.excepthook)(args)


def release_free_memory() -> None:
  """Give free heap memory back to the OS (glibc's malloc_trim). Each asynchronous save runs
  in fresh threads whose malloc arenas keep their freed blocks: without this, a run that
  checkpoints often grows by ~20 KB per checkpoint that nothing uses."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


class CheckpointError(WorkdirError):
  """A checkpoint step cannot be read (a damaged or missing item) or written."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


def error_cause(error: BaseException) -> str:
  """The root of a storage error in a few words: 'No space left on device', or the first line
  of the innermost exception (orbax wraps TensorStore's own message)."""
  chain = [error]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
    chain.append(nxt)
  for e in chain:
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return os.strerror(int(code.group(1)))
  root = chain[-1]
  if isinstance(root, OSError) and root.strerror:
    return root.strerror
  text = " ".join((str(root).strip().splitlines() or [type(root).__name__])[0].split())
  return text if len(text) <= 200 else text[:197] + "..."


def checkpoint_manager(workdir: str, *, max_to_keep: int | None = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """The orbax manager of workdir/checkpoints (creates the directory)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def all_steps(workdir: str) -> list[int]:
  """The steps of the workdir's complete checkpoints, ascending."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return []
  with ocp.CheckpointManager(path) as mngr:
    return sorted(mngr.all_steps())


def latest_step(workdir: str) -> int | None:
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def checkpoint_items(workdir: str, step: int) -> set[str]:
  """The items (params, opt_state, lora, ...) that checkpoint `step` of workdir holds.

  Read from the step's directory: orbax's item_metadata would log a warning for
  every item it has no handler for.
  """
  path = os.path.join(checkpoint_dir(workdir), str(step))
  return {name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name))}


@dataclasses.dataclass
class Checkpoint:
  step: int
  items: dict[str, Any]


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` placed by `shardings` (None: the first device)."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings)


def _model_target(cfg: ModelConfig, name: str, shardings, quantization=None):
  collection = "lora" if name == "lora" else "params"
  if quantization and collection == "params":
    if shardings is not None:
      raise ValueError("restore: an int8-quantized checkpoint loads onto one device only "
                       "(shardings=None)")
    return with_shardings(jax.eval_shape(functools.partial(
        quant.quantize, embeddings=bool(quantization.get("embeddings"))),
        abstract_params(cfg, collection)), None)
  placement = shardings
  if isinstance(shardings, Mapping):
    if not set(shardings) <= {"params", "lora"}:
      raise ValueError("restore: shardings must be a Mesh, None, or a dict of 'params' / "
                       f"'lora' -> Mesh or sharding pytree; got keys {sorted(shardings)}")
    placement = shardings.get(name)
  if isinstance(placement, Mesh):
    placement = param_shardings(cfg, placement, collection=collection)
  return with_shardings(abstract_params(cfg, collection), placement)


def restore(workdir: str, step: int | None = None, *, items: Sequence[str] = ("params",),
            optional: Sequence[str] = (), targets: Mapping[str, Any] | None = None,
            shardings=None) -> Checkpoint:
  """Items of checkpoint `step` (default: the latest) of `workdir`.

  items: read these; a checkpoint without one of them raises WorkdirError.
  optional: read these when the checkpoint has them.
  targets: abstract pytrees (ShapeDtypeStruct with shardings) of array items.
  shardings: where 'params'/'lora' without a target land: a Mesh (the model's
    sharding rules), None (the first device), or {'params': ..., 'lora': ...}
    with a Mesh or a sharding pytree each.
  JSON items ('meta', 'data') come back as dicts.
  """
  targets = dict(targets or {})
  steps = all_steps(workdir)
  if step is None:
    if not steps:
      raise WorkdirError(f"workdir {workdir!r} has no checkpoint under {CHECKPOINT_DIR}/")
    step = steps[-1]
  elif step not in steps:
    raise WorkdirError(f"workdir {workdir!r} has no checkpoint at step {step}; its steps are "
                       f"{steps or 'none'}")
  present = checkpoint_items(workdir, step)
  missing = [name for name in items if name not in present]
  if missing:
    raise CheckpointError(f"checkpoint {step} of {workdir!r} is damaged: it holds no "
                          f"{missing} item(s), only {sorted(present)}; complete steps: {steps}",
                          step)
  wanted = list(items) + [name for name in optional if name in present and name not in items]
  cfg = None
  args = {}
  for name in wanted:
    if name in JSON_ITEMS:
      args[name] = ocp.args.JsonRestore()
      continue
    target = targets.get(name)
    if target is None:
      if name not in ("params", "lora"):
        raise ValueError(f"restore: item {name!r} needs an abstract target")
      cfg = cfg or load_model_config(workdir)
      target = _model_target(cfg, name, shardings, load_quantization(workdir))
    args[name] = ocp.args.StandardRestore(target)
  restored = {}
  with ocp.CheckpointManager(checkpoint_dir(workdir)) as mngr:
    for name, arg in args.items():  # one at a time: an error names the item
      try:
        restored[name] = mngr.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
      except Exception as e:  # orbax and TensorStore raise many kinds for a damaged file
        raise CheckpointError(f"checkpoint {step} of {workdir!r} is damaged: item {name!r} "
                              f"cannot be read ({error_cause(e)}); complete steps: {steps}",
                              step) from None
  return Checkpoint(step, restored)


def quarantine(workdir: str, step: int) -> str:
  """Move a damaged step aside (checkpoints/<step>.damaged): kept for inspection, invisible
  to orbax, so the step number is free again. Returns the new path."""
  path = os.path.join(checkpoint_dir(workdir), str(step))
  target, n = path + DAMAGED_SUFFIX, 1
  while os.path.exists(target):
    target, n = f"{path}{DAMAGED_SUFFIX}.{n}", n + 1
  os.replace(path, target)
  return target


@dataclasses.dataclass
class LoadedParams:
  cfg: ModelConfig   # without LoRA fields: the params are a plain model
  params: Any
  step: int
  adapted: bool      # LoRA adapters were merged into the params


def load_params(workdir: str, step: int | None = None, *, shardings=None,
                merge_lora: bool = True) -> LoadedParams:
  """A workdir's model as a consumer runs it: cfg and params, LoRA adapters merged once.

  `merge_lora=False` returns the base params of a LoRA run (the adapters ignored).
  """
  cfg = load_model_config(workdir)
  adapters = ("lora",) if cfg.lora_rank and merge_lora else ()
  ckpt = restore(workdir, step, items=("params",), optional=adapters, shardings=shardings)
  params, lora = ckpt.items["params"], ckpt.items.get("lora")
  if lora is not None and quant.is_quantized(params):
    raise WorkdirError(f"workdir {workdir!r}: LoRA adapters cannot be merged into int8 weights")
  if lora is not None:
    params = lora_lib.merge(cfg, params, lora)
  return LoadedParams(lora_lib.without_lora(cfg), params, ckpt.step, lora is not None)


def save_params(workdir: str, params, step: int = 0, lora=None) -> None:
  """Write a params-only checkpoint (what an import or a hand-built model needs)."""
  items = {"params": ocp.args.StandardSave(params)}
  if lora is not None:
    items["lora"] = ocp.args.StandardSave(lora)
  with checkpoint_manager(workdir, max_to_keep=None, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
