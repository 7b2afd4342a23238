"""A jax.profiler trace of chosen training steps (config.profile) into WORKDIR/profile/.

  profiler = StepProfiler(workdir, start_step=5, num_steps=3)
  with profiler.step(step):          # starts the trace before step `start_step`, annotates
    state, metrics = train_step(state, batch)
  profiler.done(step + 1, metrics)   # after the last traced step: wait for it, stop the trace
  profiler.close()                   # stops a trace still running (a run ended or interrupted)

Steps are numbered as the state counts them: the update that turns step s into s + 1 is
step s, annotated `StepTraceAnnotation("train", step_num=s)` (TensorBoard's profile plugin
and xprof group the trace by these). Every step is annotated (free when no trace runs);
steps [start_step, start_step + num_steps) are traced. With several processes each traces
its own devices into profile/process_<i>/ (processes on one host would otherwise write the
same file name).
"""

from __future__ import annotations

import os

import jax

PROFILE_DIR = "profile"


class StepProfiler:
  """Traces steps [start_step, start_step + num_steps) of this session (num_steps=0: never)."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.directory = os.path.join(workdir, PROFILE_DIR)
    if jax.process_count() > 1:
      self.directory = os.path.join(self.directory, f"process_{jax.process_index()}")
    self.start, self.stop = int(start_step), int(start_step) + int(num_steps)
    self.active = False

  def step(self, step: int):
    """The context of one training step: starts the trace at start_step; annotates it."""
    if not self.active and step == self.start and self.stop > self.start:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def done(self, step: int, outputs) -> None:
    """After a step (`step` = the steps done): at the window's end, wait for `outputs` (so the
    device work is in the trace) and stop."""
    if self.active and step >= self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
