"""One member of a sweep: its training config, the trainer, its record in its run directory.

  peak = measured_peak(sweep)                       # once per process (None: the sweep sets it)
  record = run_member(sweep, run, workdir, peak=peak)   # None: interrupted, rerun resumes it

The same function runs a member wherever a launcher puts it: in the sweep command's own
process (`--launcher=local`, a job-array shard) or in a Ray task (launch_ray.py), so the
numbers do not depend on the launcher. A member's run directory is WORKDIR/runs/NAME; a
killed member resumes there from its last checkpoint (the trainer's resume), and its
record (results.py) is written there when it finishes.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import time
from typing import Any

import jax

import model
from experiments.scaling import spec
from experiments.scaling.results import RUNS_DIR, read_run_record, write_run_record
from model import store
from train import config_lib
from train.flops import device_peak, total_peak
from train.metrics import METRICS_FILE, read_metrics
from train.trainer import TrainingDiverged, train_and_evaluate

# Keys that do not change what a run computes: the measured peak (for MFU) and console output.
VOLATILE_KEYS = ("peak_flops", "progress_bar")


def config_hash(config_dict: dict[str, Any]) -> str:
  """sha256 of a training config without its VOLATILE_KEYS."""
  kept = {k: v for k, v in config_dict.items() if k not in VOLATILE_KEYS}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def now() -> str:
  return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, RUNS_DIR, name)


def _vocab_size(config) -> int:
  if config.model.vocab_size:
    return int(config.model.vocab_size)
  return store.ByteTokenizer.vocab_size if config.tokenizer.kind == "byte" else int(
      config.tokenizer.vocab_size)


def plan(sweep: spec.Sweep) -> list[dict[str, Any]]:
  """Per run: its shape, N, steps, D and FLOPs as the trainer will count them."""
  rows = []
  for run in sweep.runs:
    config = sweep.training_config(run)
    cfg = config_lib.model_config(config, vocab_size=_vocab_size(config))
    counts = model.count_params(cfg)
    tokens = config.num_steps * sweep.tokens_per_step
    rows.append({
        "name": run.name, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
        "n_heads": cfg.n_heads, "n_params": counts.total,
        "n_params_non_embedding": counts.non_embedding, "steps": config.num_steps,
        "tokens": tokens, "flops_6nd": 6.0 * counts.non_embedding * tokens,
        "flops": model.flops_per_token(cfg, sweep.seq_len) * tokens, "lr": run.lr,
        "budget": run.budget})
  return rows


def format_plan(rows: list[dict[str, Any]], done: set[str]) -> str:
  lines = [f"{'run':<22} {'L':>2} {'d':>4} {'N':>9} {'steps':>6} {'D':>9} {'C=6ND':>9} "
           f"{'C':>9} {'lr':>8}  status"]
  for r in rows:
    lines.append(
        f"{r['name']:<22} {r['n_layers']:>2} {r['d_model']:>4} {r['n_params_non_embedding']:>9,} "
        f"{r['steps']:>6} {r['tokens']:>9.3g} {r['flops_6nd']:>9.3g} {r['flops']:>9.3g} "
        f"{r['lr']:>8.2e}  {'done' if r['name'] in done else 'to run'}")
  total = sum(r["flops"] for r in rows)
  left = sum(r["flops"] for r in rows if r["name"] not in done)
  lines.append(f"{len(rows)} runs, {total:.3g} training FLOPs in all, {left:.3g} still to run: "
               f"{left / 1e10 / 60:.3g} minutes at 10 GFLOP/s (2 busy CPU cores), "
               f"{left / 1e15 / 3600:.3g} hours at 1 PFLOP/s (8 GPUs at ~40% MFU)")
  return "\n".join(lines)


def _curves(run_dir: str, tokens_per_step: int):
  """(val_curve, train_curve) from the run's metrics.jsonl; after a resume a re-logged step
  replaces the earlier line."""
  evals, trains = {}, {}
  for m in read_metrics(run_dir):
    if m.get("kind") == "eval" and "evaluated_by" not in m:  # not a later train.evaluate
      evals[m["step"]] = [m["step"], m["step"] * tokens_per_step, m.get("val_loss"),
                          m.get("val_bpb")]
    elif m.get("kind") == "train":
      trains[m["step"]] = [m["step"], m.get("tokens_seen"), m.get("loss")]
  return [evals[s] for s in sorted(evals)], [trains[s] for s in sorted(trains)]


def _as_float(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def make_record(sweep: spec.Sweep, run: spec.Run, config, summary: dict[str, Any], *,
                workdir: str, run_dir: str, runner_wall_time_s: float,
                status: str = "completed") -> dict[str, Any]:
  """The record of a finished run (fields: experiments/scaling/results.py)."""
  config_dict = config_lib.to_dict(config)
  val_curve, train_curve = _curves(run_dir, sweep.tokens_per_step)
  finite_evals = [e for e in val_curve if _as_float(e[2]) == _as_float(e[2])]
  best = min(finite_evals, key=lambda e: e[2]) if finite_evals else None
  n = summary.get("n_params_non_embedding")
  tokens = summary.get("tokens_seen")
  fpt = summary.get("flops_per_token")
  return {
      "schema_version": 1, "sweep": sweep.name, "name": run.name, "status": status,
      "budget": run.budget, "budget_flops": sweep.budget_flops,
      "n_layers": run.shape.n_layers, "d_model": run.shape.d_model, "n_heads": run.shape.n_heads,
      "n_params": summary.get("n_params"), "n_params_non_embedding": n, "tokens": tokens,
      "flops_6nd": 6.0 * n * tokens if n and tokens else None,
      "flops": fpt * tokens if fpt and tokens else None,
      "final_val_loss": _as_float(summary.get("val_loss")),
      "best_val_loss": _as_float(summary.get("best_val_loss")),
      "final_val_bpb": _as_float(summary.get("val_bpb")),
      "best_val_bpb": _as_float(best[3]) if best else float("nan"),
      "val_curve": val_curve, "train_curve": train_curve,
      "steps": summary.get("step", config.num_steps), "seq_len": sweep.seq_len,
      "batch_size": sweep.batch_size, "lr": run.lr, "seed": run.seed,
      "metrics_path": os.path.relpath(os.path.join(run_dir, METRICS_FILE), workdir),
      "run_dir": os.path.relpath(run_dir, workdir),
      "wall_time_s": summary.get("total_wall_time_s", summary.get("wall_time_s")),
      "runner_wall_time_s": runner_wall_time_s, "finished_at": now(),
      "load_average": list(os.getloadavg()), "config_hash": config_hash(config_dict),
      "config": config_dict, "summary": summary,
  }


@functools.cache
def _process_peak() -> float:
  return total_peak(device_peak())


def measured_peak(sweep: spec.Sweep) -> float | None:
  """This process's matmul peak for MFU, measured once per process; None when the sweep
  sets `peak_flops` itself."""
  return None if sweep.overrides.get("peak_flops") else _process_peak()


def member_config(sweep: spec.Sweep, run: spec.Run, peak: float | None = None):
  config = sweep.training_config(run)
  if peak is not None:
    config_lib.set_values(config, {"peak_flops": peak})
  return config


def finished(sweep: spec.Sweep, runs: list[spec.Run], workdir: str) -> dict[str, dict[str, Any]]:
  """The records of the `runs` that have finished; an error if one was made with another
  training config than the sweep file now gives (an edited sweep)."""
  done = {}
  for run in runs:
    record = read_run_record(workdir, run.name)
    if record is None:
      continue
    if record.get("config_hash") != config_hash(config_lib.to_dict(member_config(sweep, run))):
      raise spec.SweepError(
          f"run {run.name!r} has a record made with a different config (was the sweep file "
          f"edited?). Use a new --workdir, or delete its directory {run_dir(workdir, run.name)} "
          "to run it again.")
    done[run.name] = record
  return done


def check_run_dir(path: str, config_dict: dict[str, Any], name: str) -> None:
  """A run directory left by a killed run must hold the same training config."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    return
  with open(config_path) as f:
    stored = json.load(f).get("train")
  if stored is not None and config_hash(stored) != config_hash(config_dict):
    raise spec.SweepError(
        f"run {name!r}: {path} was started with a different training config than the sweep "
        "file now gives (was the file edited?). Delete that run directory to start it afresh, "
        "or use another --workdir.")


def _stand_in_summary(sweep: spec.Sweep, run: spec.Run, status: str) -> dict[str, Any]:
  """What a diverged run records instead of the trainer's summary."""
  row = next(r for r in plan(sweep) if r["name"] == run.name)
  return {"status": status, "n_params": row["n_params"],
          "n_params_non_embedding": row["n_params_non_embedding"],
          "flops_per_token": row["flops"] / row["tokens"], "tokens_seen": None}


def run_member(sweep: spec.Sweep, run: spec.Run, workdir: str, *, peak: float | None = None,
               log=print) -> dict[str, Any] | None:
  """Train `run` (resuming its run directory) and write its record there; returns the record.

  A diverged run is recorded (status 'diverged: ...', nan losses) so it is not retried.
  None: the trainer stopped on SIGINT/SIGTERM after saving a checkpoint (no record).
  In a multi-process run every process trains; process 0 writes the record.
  """
  workdir = os.path.abspath(workdir)
  config = member_config(sweep, run, peak)
  path = run_dir(workdir, run.name)
  check_run_dir(path, config_lib.to_dict(config), run.name)
  start = time.time()
  try:
    summary, status = train_and_evaluate(config, path), "completed"
  except TrainingDiverged as e:
    status = f"diverged: {e}"
    summary = _stand_in_summary(sweep, run, status)
    log(f"  {run.name} diverged; recorded without a loss")
  if status == "completed" and summary.get("status") != "completed":
    log(f"  {run.name}: {summary.get('status')} (rerun to resume)")
    return None
  record = make_record(sweep, run, config, summary, workdir=workdir, run_dir=path,
                       runner_wall_time_s=time.time() - start, status=status)
  if jax.process_index() == 0:
    write_run_record(workdir, record)
  log(f"  {run.name}: val_loss {record['final_val_loss']:.4f}, bpb "
      f"{record['final_val_bpb']:.4f}, {record['runner_wall_time_s']:.0f} s")
  return record
