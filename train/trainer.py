"""train_and_evaluate: one whole training run, resumable, from a config and a workdir.

  summary = train_and_evaluate(load_config("train/configs/tiny.py"), "runs/tiny")

The loop: batches from the grain iterator are placed on the mesh, the jitted
train step updates the (donated, sharded) state, per-step metrics stay on
device and are reduced once per logging interval; every `eval_every` steps the
validation split is scored (loss, perplexity, bits per byte) and a short text
sample is written; every `checkpoint_every` steps and at the end the state,
the data iterator and the metadata are saved (asynchronously).

With config.init_from (train/configs/lora.py) the run fine-tunes LoRA adapters
on a frozen base workdir (train/finetune.py): the state holds the adapters,
the base's loss on the new text is evaluated before the first step, and the
summary reports trainable vs total parameters.

Restarting with the same workdir resumes from the latest checkpoint and
continues the same data stream. SIGINT/SIGTERM finish the current step, save,
and return (status "interrupted"). A non-finite loss stops the run with
`TrainingDiverged` without saving the broken state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import model
from model import lora as lora_lib
from train import config_lib, finetune, flops
from train import workdir as workdir_lib
from train.checkpoints import Checkpointer
from train.data import PreparedData, eval_batches, prepare_data, train_iterator
from train.metrics import IntervalAccumulator, MetricsWriter, Progress
from train.optimizer import make_optimizer, make_schedule
from train.state import create_state, make_run_mesh, put_batch, state_shardings
from train.steps import make_eval_step, make_train_step
from train.summary import format_summary, sample_command

SUMMARY_FILE = "summary.json"


class TrainingDiverged(RuntimeError):
  """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class _StopSignals:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


@dataclasses.dataclass
class _Clock:
  """Seconds spent stepping (evaluation, sampling and saving excluded)."""

  total: float = 0.0
  interval: float = 0.0
  steps: int = 0
  interval_steps: int = 0
  _start: float | None = None

  def start(self):
    self._start = time.perf_counter()

  def stop(self, count: bool = True):
    """End a timed step; `count=False` drops it (the first step, which compiles)."""
    if self._start is not None and count:
      dt = time.perf_counter() - self._start
      self.total += dt
      self.interval += dt
      self.steps += 1
      self.interval_steps += 1
    self._start = None

  def reset_interval(self):
    self.interval, self.interval_steps = 0.0, 0


def _check_batch_layout(config, mesh):
  micro = config.batch_size // config.grad_accum_steps
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, rows in (("batch_size / grad_accum_steps", micro),
                     ("eval_batch_size", config.eval_batch_size or micro)):
    if rows % dp or rows % jax.process_count():
      raise config_lib.ConfigError(
          f"{name} = {rows} rows must divide over the {dp} data-parallel devices "
          f"(mesh {dict(mesh.shape)}) and {jax.process_count()} processes")


def evaluate(eval_step, params, data: PreparedData, config, mesh) -> dict[str, float]:
  """Validation loss (nats/token), perplexity and bits per byte over the eval batches."""
  rows = config.eval_batch_size or config.batch_size // config.grad_accum_steps
  byte_lengths = jnp.asarray(data.byte_lengths, jnp.float32)
  totals = None
  for batch in eval_batches(data.val, batch_size=rows, max_batches=config.eval_batches):
    out = eval_step(params, put_batch(batch, mesh, rows), byte_lengths)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
          "val_bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
          "val_tokens": totals["tokens"], "val_bytes": totals["bytes"]}


def eval_sample(cfg, params, tokenizer, config, lora=None) -> str:
  """A short continuation of config.sample_prompt (the sampler of sample/, one jit)."""
  from sample.engine import generate_ids

  prompt = tokenizer.encode(config.sample_prompt)
  room = cfg.max_seq_len - len(prompt) if cfg.position == "learned" else config.sample_tokens
  new = max(0, min(config.sample_tokens, room))
  ids = generate_ids(cfg, params, [prompt], new, temperature=config.sample_temperature,
                     top_k=40, seed=0, stop_ids=(tokenizer.eos_id,), lora=lora)[0]
  return config.sample_prompt + tokenizer.decode(ids)


def _param_counts(cfg):
  counts = model.count_params(cfg)
  return counts.total, counts.non_embedding


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) the training run `config` in `workdir`; returns the final summary."""
  config = copy.deepcopy(config)
  config_lib.validate(config)
  session_start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  progress = Progress(config.num_steps, enabled=False)  # real bar once the start step is known
  log = progress.log

  mesh = make_run_mesh(config.mesh_shape)
  _check_batch_layout(config, mesh)
  base = finetune.load_base(config, workdir, mesh) if config.get("init_from") else None
  data = prepare_data(config, workdir, tokenizer=base.tokenizer if base else None)
  log(data.description)
  cfg = base.cfg if base else config_lib.model_config(config,
                                                      vocab_size=data.tokenizer.vocab_size)
  if cfg.vocab_size < data.tokenizer.vocab_size:
    raise config_lib.ConfigError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
                                 f"tokenizer's {data.tokenizer.vocab_size} ids")
  if cfg.position == "learned" and config.data.seq_len > cfg.max_seq_len:
    raise config_lib.ConfigError(f"config.data.seq_len={config.data.seq_len} exceeds "
                                 f"model.max_seq_len={cfg.max_seq_len}")
  if lead:
    workdir_lib.write_config(workdir, cfg, data.tokenizer, train=config_lib.to_dict(config),
                             **(base.sections if base else {}))

  tx = make_optimizer(config.optim, config.num_steps)
  schedule = make_schedule(config.optim, config.num_steps)
  # A LoRA run trains the adapters ('lora'); the base params stay frozen, outside the state.
  collection, frozen = ("lora", base.params) if base else ("params", None)
  abstract, shardings = state_shardings(cfg, tx, mesh, collection)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints,
                      frozen_params=frozen)
  it = train_iterator(data.train, batch_size=config.batch_size,
                      accum=config.grad_accum_steps, seed=config.seed)
  meta = {"tokens_seen": 0.0, "best_val_loss": None, "wall_time_s": 0.0, "base_val_loss": None}
  if ckpt.latest_step() is not None:
    state, data_state, restored_meta = ckpt.restore(abstract, shardings)
    if data_state is not None:
      it.set_state(data_state)
    meta.update({k: restored_meta[k] for k in meta if k in restored_meta})
    log(f"resumed from {ckpt.directory}/{restored_meta['step']}")
  else:
    state, _ = create_state(cfg, tx, mesh, jax.random.PRNGKey(config.seed), collection)
  start_step = int(jax.device_get(state.step))

  train_step = make_train_step(cfg, tx, schedule, document_masking=config.data.document_masking,
                               mesh=mesh, shardings=shardings, frozen_params=frozen)
  eval_step = make_eval_step(cfg, document_masking=config.data.document_masking, mesh=mesh,
                             params_shardings=shardings.params, frozen_params=frozen)
  peak = (float(config.peak_flops) if config.peak_flops else
          flops.total_peak(flops.measure_matmul_peak()))
  n_params, n_params_non_embedding = _param_counts(cfg)
  if base:
    counts = lora_lib.count(frozen, abstract.params)
    flops_per_token = flops.lora_flops_per_token(cfg, config.data.seq_len, counts.trainable)
  else:
    counts = lora_lib.LoraCount(trainable=n_params, total=n_params)
    flops_per_token = model.flops_per_token(cfg, config.data.seq_len)
  if start_step == 0:
    log(f"model: {n_params:,} parameters ({n_params_non_embedding:,} non-embedding), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token; mesh {dict(mesh.shape)}; "
        f"peak {peak / 1e9:.0f} GFLOP/s")
    if base:
      log(f"LoRA: {counts}: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on "
          f"{', '.join(cfg.lora_targets)} of {base.workdir} (step {base.step})")

  writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
  acc = IntervalAccumulator()
  clock = _Clock()
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  tokens_seen = float(meta["tokens_seen"])
  best_val = meta["best_val_loss"]
  status = "completed"
  step = start_step
  batch_tokens = float(config.batch_size * config.data.seq_len)

  def save(force=False):
    ckpt.save(state, data_state=it.get_state(), force=force, meta={
        "tokens_seen": tokens_seen, "best_val_loss": best_val,
        "base_val_loss": meta["base_val_loss"],
        "wall_time_s": meta["wall_time_s"] + time.time() - session_start})

  def check_finite():
    bad = acc.count_nonfinite()
    if bad:
      ckpt.wait()
      last_ok = ckpt.latest_step()
      raise TrainingDiverged(
          f"the loss became non-finite (NaN/inf) in {bad} step(s) before step {step}; the run "
          f"stopped without saving the broken state. The last good checkpoint is step "
          f"{last_ok} in {ckpt.directory}. Lower optim.lr, raise optim.warmup_steps or keep "
          "optim.grad_clip on, then rerun.")

  def log_train():
    nonlocal last_train
    check_finite()
    reduced = acc.reduce_and_reset()
    if not reduced:
      return
    dt = clock.interval  # None below: only the compiling first step in this interval
    tok_s = clock.interval_steps * batch_tokens / dt if dt > 0 else None
    last_train = {"loss": reduced["loss"], "lr": reduced["lr"],
                  "grad_norm": reduced["grad_norm"], "param_norm": reduced["param_norm"],
                  "tokens_seen": tokens_seen, "tokens_per_sec": tok_s,
                  "step_time_s": dt / clock.interval_steps if dt > 0 else None,
                  "mfu": flops.mfu(tok_s, flops_per_token, peak) if tok_s else None}
    clock.reset_interval()
    writer.write(step, "train", last_train)
    progress.update(0, loss=f"{reduced['loss']:.3f}", tok_s=f"{tok_s or 0:,.0f}")

  def run_eval():
    nonlocal last_eval, best_val
    last_eval = evaluate(eval_step, state.params, data, config, mesh)
    best_val = last_eval["val_loss"] if best_val is None else min(best_val,
                                                                  last_eval["val_loss"])
    writer.write(step, "eval", last_eval)
    log(f"step {step}: val_loss {last_eval['val_loss']:.4f}  val_bpb "
        f"{last_eval['val_bpb']:.4f}  val_ppl {last_eval['val_ppl']:.2f}")
    if config.sample_tokens > 0 and jax.process_count() == 1:
      params, lora = (frozen, state.params) if base else (state.params, None)
      text = eval_sample(cfg, params, data.tokenizer, config, lora=lora)
      writer.write(step, "sample", {"text": text})
      log(f"sample: {text!r}")

  def _loop() -> str:
    nonlocal state, step, tokens_seen, prev
    status = "completed"
    while step < config.num_steps:
      clock.start()
      batch = put_batch(next(it), mesh, config.batch_size // config.grad_accum_steps)
      state, metrics = train_step(state, batch)
      if prev is not None:
        jax.block_until_ready(prev["loss"])  # keep one step in flight, no more
      else:
        jax.block_until_ready(metrics["loss"])
      clock.stop(count=prev is not None)  # the first step compiles: keep it out of the rates
      prev = metrics
      acc.add(metrics)
      step += 1
      tokens_seen += batch_tokens
      progress.update(1)
      final = step == config.num_steps
      if step % config.log_every == 0 or final:
        log_train()
      if step % config.eval_every == 0 or final:
        check_finite()
        run_eval()
      if step % config.checkpoint_every == 0 or final:
        check_finite()
        save(force=final)
      if signals.received is not None:
        check_finite()
        status = f"interrupted by {signal.Signals(signals.received).name}"
        log_train()
        save(force=True)
        log(f"{status} at step {step}: checkpoint saved; rerun the same command to resume")
        break
    if step == start_step and not last_eval:  # nothing to train: report the restored state
      run_eval()
    return status

  progress = Progress(config.num_steps, initial=start_step, enabled=config.progress_bar)
  log = progress.log
  prev = None
  try:
    if base and start_step == 0:  # the base's loss on the new text, before any update
      run_eval()
      meta["base_val_loss"] = last_eval["val_loss"]
    with _StopSignals() as signals:
      status = _loop()
  except BaseException:  # finish pending saves and flush the event files, then re-raise
    progress.close()
    ckpt.close()
    writer.close()
    raise
  progress.close()
  ckpt.wait()

  if not last_train:
    last_train = {"loss": None}
  session_tok_s = clock.steps * batch_tokens / clock.total if clock.total > 0 else None
  summary = {
      "status": status, "step": step, "num_steps": config.num_steps,
      "tokens_seen": tokens_seen, "train_loss": last_train["loss"],
      "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
      "val_bpb": last_eval.get("val_bpb"), "best_val_loss": best_val,
      "tokens_per_sec": session_tok_s,
      "mfu": flops.mfu(session_tok_s, flops_per_token, peak) if session_tok_s else None,
      "peak_flops": peak, "flops_per_token": flops_per_token,
      "n_params": n_params, "n_params_non_embedding": n_params_non_embedding,
      "trainable_params": counts.trainable, "total_params": counts.total,
      "init_from": base.workdir if base else None, "init_step": base.step if base else None,
      "lora": ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)}
               if base else None),
      "base_val_loss": meta["base_val_loss"],
      "wall_time_s": time.time() - session_start,
      "total_wall_time_s": meta["wall_time_s"] + time.time() - session_start,
      "checkpoint_dir": ckpt.directory, "checkpoint_step": ckpt.latest_step(),
      "workdir": workdir, "tokenizer": data.tokenizer.spec(),
      "vocab_size": cfg.vocab_size, "seq_len": config.data.seq_len,
      "batch_size": config.batch_size, "devices": jax.device_count(),
      "sample_command": sample_command(workdir, config.sample_prompt),
  }
  ckpt.close()
  writer.write(step, "summary", summary)
  writer.close()
  if lead:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2, default=str)
    log(format_summary(summary))
  return summary

