"""Metrics: per-interval reduction, step timing, metrics.jsonl, TensorBoard, console output.

  writer = MetricsWriter(workdir)                   # only process 0 writes
  writer.write(step, "train", {"loss": 2.1, ...})   # one JSON line + TensorBoard scalars
  acc = IntervalAccumulator(); acc.add(metrics); acc.reduce_and_reset()
  timer = StepTimer(); timer.start(); ...; timer.stop(outputs); steps, seconds = timer.interval()

Every line of metrics.jsonl is one JSON object with "step", "kind" ("train",
"eval", "sample" or "summary"), "time" (seconds since the epoch) and the
metrics: train lines carry loss, lr, grad_norm, param_norm, tokens_seen,
tokens_per_sec, step_time_s, mfu; eval lines val_loss, val_ppl, val_bpb.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl (those of `kind` only, if given)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if kind is None or r.get("kind") == kind]


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable
  return value


class MetricsWriter:
  """Appends to metrics.jsonl and writes TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{kind}/{name}", float(value), int(step))
        elif isinstance(value, str) and kind == "sample":
          self._tb.add_text(f"{kind}/{name}", value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class IntervalAccumulator:
  """Collects per-step device metrics; reduces them on the host once per interval.

  Per-step values stay on device until `reduce_and_reset` (one transfer per
  interval, no sync per step). Means for loss/grad_norm, the last value for
  lr/param_norm, sums for tokens and nonfinite steps.

  `snapshot()` is the interval so far as host totals (JSON: a checkpoint's meta
  carries it), and `IntervalAccumulator(carried=snapshot)` continues it, so the
  row that spans a restart averages the same steps as an uninterrupted run's.
  """

  SUMS = ("tokens", "nonfinite")
  LAST = ("lr", "param_norm")

  def __init__(self, carried: dict | None = None):
    self._pending: list[dict] = []
    self._carried = carried if carried and carried.get("steps") else None

  def __len__(self) -> int:
    return len(self._pending) + (self._carried["steps"] if self._carried else 0)

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def count_nonfinite(self) -> int:
    """Steps of the pending interval whose loss or gradient was not finite (a host sync)."""
    return int(sum(jax.device_get([m["nonfinite"] for m in self._pending])))

  def snapshot(self) -> dict:
    """{'steps', 'sums', 'last'}: the interval so far, carried part included (a host sync)."""
    steps, sums, last = 0, {}, {}
    if self._carried:
      steps, sums, last = (self._carried["steps"], dict(self._carried["sums"]),
                           dict(self._carried["last"]))
    for m in jax.device_get(self._pending):
      steps += 1
      for key, value in m.items():
        if key in self.LAST:
          last[key] = float(value)
        else:
          sums[key] = sums.get(key, 0.0) + float(value)
    return {"steps": steps, "sums": sums, "last": last}

  def reduce_and_reset(self) -> dict[str, float]:
    totals = self.snapshot()
    self._pending, self._carried = [], None
    if not totals["steps"]:
      return {}
    out = {key: (value if key in self.SUMS else value / totals["steps"])
           for key, value in totals["sums"].items()}
    out.update(totals["last"])
    out["steps"] = totals["steps"]
    return out


class StepTimer:
  """Wall-clock seconds of training steps, read only where the device has finished them.

  JAX dispatches asynchronously: a step returns before its work is done, so timing
  the Python call measures dispatch. `stop(outputs)` first blocks until `outputs`
  (the latest step's metrics) are computed, then adds the seconds since `start()`
  and the steps counted since then. Whatever happens between a stop and the next
  start (evaluation, sampling, saving, the compiling first step) is not counted.
  """

  def __init__(self):
    self.total_s = self.interval_s = 0.0
    self.total_steps = self.interval_steps = 0
    self._since: float | None = None
    self._pending = 0

  @property
  def running(self) -> bool:
    return self._since is not None

  def start(self) -> None:
    self._since, self._pending = time.perf_counter(), 0

  def count(self, steps: int = 1) -> None:
    """Steps dispatched since start() (they are timed once a stop() has seen them finish)."""
    self._pending += steps

  def stop(self, outputs) -> None:
    jax.block_until_ready(outputs)
    if self._since is None or not self._pending:  # no step ran: nothing to time
      self._since, self._pending = None, 0
      return
    seconds = time.perf_counter() - self._since
    self.total_s += seconds
    self.interval_s += seconds
    self.total_steps += self._pending
    self.interval_steps += self._pending
    self._since, self._pending = None, 0

  def interval(self) -> tuple[int, float]:
    """(steps, seconds) timed since the last call."""
    out = (self.interval_steps, self.interval_s)
    self.interval_s, self.interval_steps = 0.0, 0
    return out


def say(message: str) -> None:
  """A console line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class Progress:
  """A console progress bar with ETA (tqdm) plus log lines that do not break it."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.bar = None
    if self.enabled:
      tty = sys.stderr.isatty()
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                      mininterval=0.5 if tty else 30.0, file=sys.stderr, smoothing=0.1,
                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                 "{rate_fmt}{postfix}]")

  def update(self, n: int = 1, **postfix) -> None:
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(n)

  def log(self, message: str) -> None:
    if self.bar is not None:
      self.bar.write(message, file=sys.stderr)
    else:
      say(message)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
