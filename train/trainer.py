"""train_and_evaluate: one whole training run, resumable, from a config and a workdir.

  summary = train_and_evaluate(load_config("train/configs/tiny.py"), "runs/tiny")

`setup` (train/run.py) builds the run; a `Trainer` owns what changes while it
trains (the state, the interval's metrics, the clock, the writers) and offers
one method per thing the loop does:

  step()      one optimizer update on the next batch (one step kept in flight)
  log()       the interval's mean loss, lr, norms, tokens/s and MFU -> metrics.jsonl
  evaluate()  validation loss, perplexity, bits per byte (and a text sample)
  save()      a checkpoint of the state, the data position and the metadata
  finish()    wait for saves, write the summary, close the writers

Restarting with the same workdir resumes from the latest checkpoint and
continues the same data stream. SIGINT/SIGTERM finish the current step, save,
and return (status "interrupted by SIGINT"). A non-finite loss stops the run
with `TrainingDiverged` without saving the broken state.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import ml_collections

import model
from model import store
from sample.engine import generate_ids
from train import config_lib, flops
from train.data import eval_batches
from train.metrics import IntervalAccumulator, MetricsWriter, Progress, StepTimer
from train.profiling import StepProfiler
from train.run import Run, setup
from train.signals import StopSignals
from train.state import put_batch
from train.steps import evaluate_windows
from train.summary import format_summary, sample_command

SUMMARY_FILE = "summary.json"


class TrainingDiverged(RuntimeError):
  """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class Trainer:
  """The mutable side of a run: state, step count, interval metrics, timing, writers."""

  def __init__(self, run: Run):
    self.run, self.config = run, run.config
    self.state = run.state
    self.global_step = int(jax.device_get(run.state.step))
    self.start_step = self.global_step
    self.started_at = time.time()
    self.tokens_seen = float(run.meta["tokens_seen"])
    self.best_val = run.meta["best_val_loss"]
    self.base_val = run.meta["base_val_loss"]
    self.batch_tokens = float(self.config.batch_size * self.config.data.seq_len)
    self.micro_rows = self.config.batch_size // self.config.grad_accum_steps
    self.n_params = model.count_params(run.task.cfg)
    self.counts = run.task.counts()
    self.flops_per_token = run.task.flops_per_token(self.config.data.seq_len)
    self.last_train: dict[str, Any] = {}
    self.last_eval: dict[str, Any] = {}
    self.acc = IntervalAccumulator(carried=run.meta["interval"])  # a row spanning a restart
    self.timer = StepTimer()
    self.in_flight = None  # the latest step's metrics, possibly not computed yet
    try:  # a tracker that cannot start (W&B) ends the run before its first step
      self.writer = MetricsWriter(run.workdir, trackers=tuple(self.config.trackers),
                                  config=config_lib.to_dict(self.config))
    except BaseException:
      run.checkpointer.close()
      raise
    self.profiler = StepProfiler(run.workdir, self.config.profile.start_step,
                                 self.config.profile.num_steps)
    self.progress = Progress(self.config.num_steps, initial=self.global_step,
                             enabled=self.config.progress_bar)

  def __enter__(self) -> Trainer:
    return self

  def __exit__(self, exc_type, *exc) -> bool:
    if exc_type is not None:  # finish pending saves and flush the event files, then re-raise
      with contextlib.suppress(Exception):  # the first error is the one to report
        self.close()
    return False

  # ---- the loop's operations --------------------------------------------------------------
  def say(self, message: str) -> None:
    self.progress.log(message)

  def step(self) -> None:
    """One optimizer update. The first step of a session compiles: it runs alone, untimed."""
    with self.profiler.step(self.global_step):
      batch = put_batch(next(self.run.iterator), self.run.mesh, self.micro_rows)
      self.state, metrics = self.run.train_step(self.state, batch)
    if self.in_flight is None:
      self.timer.stop(metrics)
      self.timer.start()
    else:
      self.timer.count()
      jax.block_until_ready(self.in_flight["loss"])  # keep one step in flight, no more
    self.in_flight = metrics
    self.acc.add(metrics)
    self.global_step += 1
    self.tokens_seen += self.batch_tokens
    self.progress.update(1)
    self.profiler.done(self.global_step, metrics)

  def _pause(self) -> None:
    """Wait for the dispatched steps and stop the clock (before evaluating or saving)."""
    if self.in_flight is not None and self.timer.running:
      self.timer.stop(self.in_flight)

  def _resume(self) -> None:
    if self.in_flight is not None and not self.timer.running:
      self.timer.start()

  def _check_finite(self) -> None:
    bad = self.acc.count_nonfinite()
    if bad:
      self.run.checkpointer.wait()
      raise TrainingDiverged(
          f"the loss became non-finite (NaN/inf) in {bad} step(s) before step "
          f"{self.global_step}; the run stopped without saving the broken state. The last good "
          f"checkpoint is step {self.run.checkpointer.latest_step()} in "
          f"{self.run.checkpointer.directory}. Lower optim.lr, raise optim.warmup_steps or "
          "keep optim.grad_clip on, then rerun.")

  def log(self) -> None:
    """Reduce the interval's metrics and write a 'train' row; rates come from wall time
    between points where the device had finished."""
    self._pause()
    self._resume()  # writing the row belongs to the next interval's time
    self._check_finite()
    reduced = self.acc.reduce_and_reset()
    if not reduced:
      return
    steps, seconds = self.timer.interval()
    tok_s = steps * self.batch_tokens / seconds if steps and seconds > 0 else None
    self.last_train = {
        "loss": reduced["loss"], "lr": reduced["lr"], "grad_norm": reduced["grad_norm"],
        "param_norm": reduced["param_norm"], "tokens_seen": self.tokens_seen,
        "tokens_per_sec": tok_s, "step_time_s": seconds / steps if tok_s else None,
        "mfu": flops.mfu(tok_s, self.flops_per_token, self.run.peak_flops) if tok_s else None}
    self.writer.write(self.global_step, "train", self.last_train)
    self.progress.update(0, loss=f"{reduced['loss']:.3f}", tok_s=f"{tok_s or 0:,.0f}")

  def evaluate(self, record: bool = True) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte over the eval batches;
    `record=False` (a finished run rerun: its rows exist) writes no metrics rows."""
    self._pause()
    self._check_finite()
    rows = self.config.eval_batch_size or self.micro_rows
    self.last_eval = evaluate_windows(
        self.run.eval_step, self.state.params,
        eval_batches(self.run.data.val, batch_size=rows, max_batches=self.config.eval_batches),
        mesh=self.run.mesh, rows=rows, byte_lengths_V=self.run.data.byte_lengths)
    loss = self.last_eval["val_loss"]
    if self.global_step == 0 and self.run.base is not None:
      self.base_val = loss  # a LoRA run's base, before any update
    self.best_val = loss if self.best_val is None else min(self.best_val, loss)
    if record:
      self.writer.write(self.global_step, "eval", self.last_eval)
    self.say(f"step {self.global_step}: val_loss {loss:.4f}  val_bpb "
             f"{self.last_eval['val_bpb']:.4f}  val_ppl {self.last_eval['val_ppl']:.2f}")
    if record and self.config.sample_tokens > 0 and jax.process_count() == 1:
      text = self.sample_text()
      self.writer.write(self.global_step, "sample", {"text": text})
      self.say(f"sample: {text!r}")
    self._resume()
    return self.last_eval

  def sample_text(self) -> str:
    """A short continuation of config.sample_prompt by the model as trained so far."""
    cfg, params = self.run.task.inference(self.state.params)
    tokenizer, prompt = self.run.data.tokenizer, self.config.sample_prompt
    ids = tokenizer.encode(prompt)
    room = (cfg.max_seq_len - len(ids) if cfg.position == "learned" else
            self.config.sample_tokens)
    new = max(0, min(self.config.sample_tokens, room))
    out = generate_ids(cfg, params, [ids], new, temperature=self.config.sample_temperature,
                       top_k=40, seed=0, stop_ids=(tokenizer.eos_id,))[0]
    return prompt + tokenizer.decode(out)

  def save(self, force: bool = False) -> None:
    self._pause()
    self._check_finite()
    wall = self.run.meta["wall_time_s"] + time.time() - self.started_at
    self.run.checkpointer.save(
        self.state, data_state=self.run.iterator.get_state(), force=force,
        meta={"tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
              "base_val_loss": self.base_val, "wall_time_s": wall,
              "interval": self.acc.snapshot()})
    self._resume()

  # ---- the end -----------------------------------------------------------------------------
  def close(self) -> None:
    self.profiler.close()  # a trace whose window the run did not finish
    self.progress.close()
    self.run.checkpointer.close()
    self.writer.close()

  def finish(self, status: str) -> dict[str, Any]:
    """Wait for the saves, write the summary (metrics.jsonl, summary.json, console)."""
    self.progress.close()
    self.run.checkpointer.wait()
    summary = self.summary(status)
    self.close()
    if self.global_step > self.start_step:  # a rerun of a finished run adds no rows
      self.writer.write(self.global_step, "summary", summary)
    if jax.process_index() == 0:
      store.write_json(os.path.join(self.run.workdir, SUMMARY_FILE), summary)
      self.say(format_summary(summary))
    return summary

  def summary(self, status: str) -> dict[str, Any]:
    run, config, cfg = self.run, self.config, self.run.task.cfg
    timer = self.timer
    tok_s = (timer.total_steps * self.batch_tokens / timer.total_s
             if timer.total_steps and timer.total_s > 0 else None)
    wall = time.time() - self.started_at
    counts = self.counts
    open_interval = self.acc.snapshot() if len(self.acc) else None  # an interrupted interval
    train_loss = (open_interval["sums"]["loss"] / open_interval["steps"] if open_interval
                  else self.last_train.get("loss"))
    return {
        "status": status, "step": self.global_step, "num_steps": config.num_steps,
        "tokens_seen": self.tokens_seen, "train_loss": train_loss,
        "val_loss": self.last_eval.get("val_loss"), "val_ppl": self.last_eval.get("val_ppl"),
        "val_bpb": self.last_eval.get("val_bpb"), "best_val_loss": self.best_val,
        "tokens_per_sec": tok_s,
        "mfu": flops.mfu(tok_s, self.flops_per_token, run.peak_flops) if tok_s else None,
        "peak_flops": run.peak_flops, "flops_per_token": self.flops_per_token,
        "n_params": self.n_params.total, "n_params_non_embedding": self.n_params.non_embedding,
        "trainable_params": counts.trainable, "total_params": counts.total,
        "init_from": run.base.workdir if run.base else None,
        "init_step": run.base.step if run.base else None,
        "lora": ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                  "targets": list(cfg.lora_targets)} if run.base else None),
        "base_val_loss": self.base_val,
        "wall_time_s": wall, "total_wall_time_s": run.meta["wall_time_s"] + wall,
        "checkpoint_dir": run.checkpointer.directory,
        "checkpoint_step": run.checkpointer.latest_step(),
        "workdir": run.workdir, "tokenizer": run.data.tokenizer.spec(),
        "vocab_size": cfg.vocab_size, "seq_len": config.data.seq_len,
        "batch_size": config.batch_size, "devices": jax.device_count(),
        "sample_command": sample_command(run.workdir, config.sample_prompt),
    }



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) the training run `config` in `workdir`; returns the final summary."""
  run = setup(config, workdir)
  config = run.config
  status = "completed"
  with Trainer(run) as trainer, StopSignals() as stop:
    if trainer.start_step == 0:
      trainer.say(f"model: {trainer.n_params.total:,} parameters "
                  f"({trainer.n_params.non_embedding:,} non-embedding), "
                  f"{trainer.flops_per_token / 1e6:.1f} MFLOPs/token; mesh {dict(run.mesh.shape)};"
                  + (f" peak {run.peak_flops / 1e9:.0f} GFLOP/s" if run.peak_flops else
                     " no peak FLOP/s (MFU unavailable)"))
      if run.base is not None:  # the base's loss on the new text, before any update
        cfg = run.task.cfg
        trainer.say(f"LoRA: {trainer.counts}: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} "
                    f"on {', '.join(cfg.lora_targets)} of {run.base.workdir} "
                    f"(step {run.base.step})")
        trainer.evaluate()
    while trainer.global_step < config.num_steps:
      trainer.step()
      step, final = trainer.global_step, trainer.global_step == config.num_steps
      if step % config.log_every == 0 or final:
        trainer.log()
      if step % config.eval_every == 0 or final:
        trainer.evaluate()
      if step % config.checkpoint_every == 0 or final:
        trainer.save(force=final)
      if stop.received is not None:
        status = f"interrupted by {stop.name}"
        trainer.save(force=True)  # the open logging interval goes on after the resume
        trainer.say(f"{status} at step {step}: checkpoint saved; rerun the same command to "
                    "resume")
        break
    if not trainer.last_eval:  # nothing to train: report the restored state
      trainer.evaluate(record=trainer.global_step > trainer.start_step)
    return trainer.finish(status)
