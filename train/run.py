"""setup(config, workdir) -> Run: everything a training run needs, built once.

  run = setup(load_config("train/configs/tiny.py"), "runs/tiny")
  run.state, run.train_step, run.eval_step, run.iterator, run.checkpointer, run.task

In order: the mesh; the base model of a LoRA run; the data (corpus, tokenizer,
packed splits); the model config and the task (train/tasks.py); the optimizer;
the state's abstract shapes and shardings (computed once, from one trace of the
model's init); the state itself, restored from the latest checkpoint with the
data iterator's position, or created in its shards; the jitted steps; the peak
FLOP/s for MFU. config.json is written once the state exists.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from model import store
from model.sharding import make_mesh
from train import config_lib, finetune, flops
from train.checkpoints import Checkpointer
from train.config_lib import ConfigError
from train.data import PreparedData, prepare_data, train_iterator
from train.metrics import say
from train.optimizer import make_optimizer, make_schedule
from train.state import TrainState, create_state, state_shardings
from train.steps import make_eval_step, make_train_step
from train.tasks import LoraFinetune, Pretrain

# What a fresh run's metadata starts as; checkpoints carry it forward.
FRESH_META = {"tokens_seen": 0.0, "best_val_loss": None, "wall_time_s": 0.0,
              "base_val_loss": None, "interval": None}


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict   # as resolved (a LoRA run's seq_len filled in)
  workdir: str                        # absolute
  mesh: Mesh
  data: PreparedData
  task: Any                           # Pretrain or LoraFinetune
  base: finetune.Base | None          # a LoRA run's base model
  schedule: optax.Schedule
  shardings: TrainState
  state: TrainState
  iterator: Any                       # grain iterator of [A, b_local, T] batches
  checkpointer: Checkpointer
  train_step: Callable
  eval_step: Callable
  peak_flops: float
  meta: dict                          # FRESH_META, or what the latest checkpoint carried
  resumed_step: int | None            # the checkpoint this session started from


def check_batch_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  micro = config.batch_size // config.grad_accum_steps
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, rows in (("batch_size / grad_accum_steps", micro),
                     ("eval_batch_size", config.eval_batch_size or micro)):
    if rows % dp or rows % jax.process_count():
      raise ConfigError(
          f"{name} = {rows} rows must divide over the {dp} data-parallel devices "
          f"(mesh {dict(mesh.shape)}) and {jax.process_count()} processes")


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse, before anything is written, to resume a workdir with a config that would change
  its weights, token ids or data stream (config_lib.RESUMABLE_KEYS may change)."""
  if not store.has_config(workdir):
    return
  saved = store.read_config(workdir)
  if "train" not in saved:
    raise ConfigError(
        f"workdir {workdir} holds a model that was not trained here (an import or a hand-made "
        "one), not a training run to resume; fine-tune it with --config=train/configs/lora.py "
        f"--config.init_from={workdir} --workdir=NEW, or train into a new workdir")
  conflicts = config_lib.resume_conflicts(saved["train"], config)
  if conflicts:
    listed = ", ".join(f"{key}={theirs!r} (this command: {ours!r})"
                       for key, theirs, ours in conflicts)
    raise ConfigError(
        f"workdir {workdir} was trained with {listed}; these change the weights, the token ids "
        "or the data stream, so the run cannot resume with them. Rerun with the workdir's "
        "values to resume, or pass another --workdir to start a new run. Keys that may change "
        f"on resume: {', '.join(config_lib.RESUMABLE_KEYS)}")


def _model_config(config, data: PreparedData, base: finetune.Base | None):
  cfg = base.cfg if base else config_lib.model_config(
      config, vocab_size=data.tokenizer.vocab_size)
  check_model_fits_data(cfg, data.tokenizer.vocab_size, config.data.seq_len)
  return cfg


def check_model_fits_data(cfg, tokenizer_vocab_size: int, seq_len: int) -> None:
  """ConfigError unless the model has an embedding row for every token id and (learned
  positions) a position row for every window slot."""
  if cfg.vocab_size < tokenizer_vocab_size:
    raise ConfigError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer_vocab_size} ids")
  if cfg.position == "learned" and seq_len > cfg.max_seq_len:
    raise ConfigError(f"config.data.seq_len={seq_len} exceeds "
                      f"model.max_seq_len={cfg.max_seq_len}")


def setup(config: ml_collections.ConfigDict, workdir: str, *,
          log: Callable[[str], None] = say) -> Run:
  """Build (or restore) the run `config` (validated: load_config or from_command_line)."""
  config = copy.deepcopy(config)
  workdir = store.resolve(workdir)
  store.ensure_writable(workdir)
  check_resume(config, workdir)
  mesh = make_mesh(tuple(int(s) for s in config.mesh_shape))
  check_batch_layout(config, mesh)
  base = finetune.load_base(config, workdir, mesh) if config.init_from else None
  if base is not None and config.data.seq_len is None:
    config.data.seq_len = base.seq_len
  log("config:\n" + config_lib.describe(config))
  data = prepare_data(config, workdir, tokenizer=base.tokenizer if base else None)
  log(data.description)
  cfg = _model_config(config, data, base)
  task = (LoraFinetune(cfg, base.params, config.data.document_masking) if base else
          Pretrain(cfg, config.data.document_masking))

  tx = make_optimizer(config.optim, config.num_steps)
  schedule = make_schedule(config.optim, config.num_steps)
  abstract, shardings = state_shardings(task, tx, mesh)
  checkpointer = Checkpointer(workdir, trained_item=task.collection,
                              extra=task.checkpoint_items(), keep=config.keep_checkpoints,
                              async_save=config.async_checkpoints)
  iterator = train_iterator(data.train, batch_size=config.batch_size,
                            accum=config.grad_accum_steps, seed=config.seed)
  try:
    meta = dict(FRESH_META)
    resumed_step = checkpointer.latest_step()
    if resumed_step is not None:
      state, data_state, restored = checkpointer.restore(abstract, shardings, log=log)
      resumed_step = restored["step"]
      if data_state is not None:
        iterator.set_state(data_state)
      meta.update({k: restored[k] for k in meta if k in restored})
      log(f"resumed from {checkpointer.directory}/{restored['step']}")
    else:
      state = create_state(task, tx, mesh, jax.random.PRNGKey(config.seed), shardings)
    if jax.process_index() == 0:
      store.write_config(workdir, cfg, data.tokenizer, train=config_lib.to_dict(config),
                         **(base.sections if base else {}))
    train_step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
    eval_step = make_eval_step(task, mesh=mesh, params_shardings=shardings.params)
    peak = (float(config.peak_flops) if config.peak_flops else
            flops.total_peak(flops.device_peak()))
  except BaseException:
    checkpointer.close()
    raise
  return Run(config=config, workdir=workdir, mesh=mesh, data=data, task=task, base=base,
             schedule=schedule, shardings=shardings, state=state, iterator=iterator,
             checkpointer=checkpointer, train_step=train_step, eval_step=eval_step,
             peak_flops=peak, meta=meta, resumed_step=resumed_step)
