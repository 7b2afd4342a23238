"""Metrics: per-interval reduction, step timing, metrics.jsonl, trackers, console output.

  writer = MetricsWriter(workdir, trackers=("tensorboard", "wandb"), config=config_dict)
  writer.write(step, "train", {"loss": 2.1, ...})   # one JSON line + each tracker's scalars
  acc = IntervalAccumulator(); acc.add(metrics); acc.reduce_and_reset()
  timer = StepTimer(); timer.start(); ...; timer.stop(outputs); steps, seconds = timer.interval()

Every line of metrics.jsonl is one JSON object with "step", "kind" ("train",
"eval", "sample" or "summary"), "time" (seconds since the epoch) and the
metrics: train lines carry loss, lr, grad_norm, param_norm, tokens_seen,
tokens_per_sec, step_time_s, mfu; eval lines val_loss, val_ppl, val_bpb.

Trackers (config.trackers) receive the same rows: metrics.jsonl is always written
("jsonl" may be listed, for clarity); "tensorboard" writes event files into the
workdir (scalars as KIND/NAME, samples as text); "wandb" logs to Weights & Biases
with the resolved config attached, under a run id kept in WORKDIR/wandb_run.json so
a resumed run continues the same W&B run. Only process 0 writes to any of them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from model import store

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_FILE = "wandb_run.json"
TRACKERS = ("jsonl", "tensorboard", "wandb")


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


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  return {name: float(value) for name, value in metrics.items()
          if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}


class TensorBoardTracker:
  """Event files in the workdir (`tensorboard --logdir runs/`): scalars KIND/NAME, samples."""

  def __init__(self, workdir: str, config: dict | None = None):
    del config
    self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
    for name, value in _scalars(metrics).items():
      self._tb.add_scalar(f"{kind}/{name}", value, step)
    if kind == "sample":
      for name, value in metrics.items():
        if isinstance(value, str):
          self._tb.add_text(f"{kind}/{name}", value, step)

  def close(self) -> None:
    self._tb.close()


class TrackerError(RuntimeError):
  """A tracker that config.trackers asks for cannot start."""


def wandb_run_id(workdir: str) -> str | None:
  """The W&B run id a workdir's run logs to (None before its first start with 'wandb')."""
  path = os.path.join(workdir, WANDB_RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["id"]


class WandbTracker:
  """Weights & Biases: one W&B run per workdir, resumed by id; scalars KIND/NAME at `step`.

  The id is drawn once and written to WORKDIR/wandb_run.json before the run starts, so a
  restarted run (same workdir) continues the same W&B run (`resume="allow"`). The client's
  own files go to WORKDIR/wandb/ (WANDB_MODE=offline keeps everything there, for
  `wandb sync`). `config` (the resolved run config) is attached to the run; its `wandb`
  section names the project, entity and run name.
  """

  def __init__(self, workdir: str, config: dict | None = None):
    try:
      import wandb
    except ImportError as e:
      raise TrackerError("config.trackers includes 'wandb' but the wandb package is not "
                         "installed: pip install -e '.[wandb]' (or pip install wandb)") from e
    config = config or {}
    settings = config.get("wandb") or {}
    run_id = wandb_run_id(workdir)
    if run_id is None:
      run_id = secrets.token_hex(4)  # W&B's id format: short, lowercase, alphanumeric
      store.write_json(os.path.join(workdir, WANDB_RUN_FILE), {"id": run_id})
    try:
      self._run = wandb.init(
          id=run_id, resume="allow", dir=workdir, config=config,
          project=settings.get("project") or None, entity=settings.get("entity") or None,
          name=settings.get("name") or os.path.basename(os.path.normpath(workdir)))
    except wandb.errors.Error as e:  # not logged in, no network, a bad entity
      raise TrackerError(f"Weights & Biases did not start: {e} (`wandb login`, or "
                         "WANDB_MODE=offline to keep the run in WORKDIR/wandb/)") from e

  def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
    row = {f"{kind}/{name}": value for name, value in _scalars(metrics).items()}
    if kind == "sample":
      row.update({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, str)})
    if row:
      self._run.log(row, step=step)

  def close(self) -> None:
    self._run.finish()


_TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class MetricsWriter:
  """Appends to metrics.jsonl and passes every row to the trackers (process 0 only).

  trackers: names from TRACKERS ("jsonl" is implied); config: the resolved run config as a
  dict, attached to trackers that keep one (W&B).
  """

  def __init__(self, workdir: str, *, trackers=("jsonl",), config: dict | None = None,
               enabled: bool | None = None):
    unknown = sorted(set(trackers) - set(TRACKERS))
    if unknown:
      raise ValueError(f"unknown trackers {unknown}; known: {TRACKERS}")
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._trackers = []
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        for name in dict.fromkeys(trackers):  # in order, once each
          if name in _TRACKER_CLASSES:
            self._trackers.append(_TRACKER_CLASSES[name](workdir, config))
      except BaseException:
        self.close()
        raise

  def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for tracker in self._trackers:
      tracker.write(int(step), kind, metrics)

  def close(self) -> None:
    trackers, self._trackers = self._trackers, []
    for tracker in trackers:
      tracker.close()


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
