"""Run a sweep: each run through train.trainer.train_and_evaluate, resumable after a kill.

  python -m experiments.sweep --sweep=experiments/sweeps/cpu.py --workdir=runs/sweeps/cpu
  python -m experiments.sweep --sweep=cpu --dry_run          # the plan: sizes, tokens, FLOPs
  python -m experiments.sweep --sweep=cpu --max_runs=1       # run at most one more run
  python -m experiments.sweep --sweep=tpu_v4_32 --distributed  # same command on every host

The sweep workdir:

  sweep.json        the sweep, its runs and the commands that ran it (first start time kept)
  results.jsonl     one record per finished run (schema: experiments/scaling/results.py)
  runs/NAME/        each run's training workdir (config.json, checkpoints/, metrics.jsonl)

Rerunning the same command skips runs that have a record, resumes a run that was killed
mid-way from its last checkpoint (the trainer's own resume), and starts the rest. A run
whose record or run directory holds a different config than the sweep file now asks for
(the file was edited) is an error rather than a silent mix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shlex
import sys
import time
from typing import Any

import jax
from absl import app, flags, logging

import model
from experiments.scaling import spec
from experiments.scaling.results import append_record, read_records, results_path
from model import store
from train import config_lib
from train.flops import measure_matmul_peak, total_peak
from train.metrics import METRICS_FILE, read_metrics
from train.signals import StopSignals
from train.trainer import TrainingDiverged, train_and_evaluate

SWEEPS_DIR = os.path.join("experiments", "sweeps")
SWEEP_META_FILE = "sweep.json"
RUNS_DIR = "runs"


def resolve_sweep_path(sweep: str) -> str:
  """'cpu' -> experiments/sweeps/cpu.py; a path is returned as is."""
  if os.sep in sweep or sweep.endswith(".py") or os.path.isfile(sweep):
    return sweep
  return os.path.join(SWEEPS_DIR, f"{sweep}.py")


# Keys that do not change what a run computes: the measured peak (for MFU) and console output.
VOLATILE_KEYS = ("peak_flops", "progress_bar")


def config_hash(config_dict: dict[str, Any]) -> str:
  """sha256 of a training config without its VOLATILE_KEYS."""
  kept = {k: v for k, v in config_dict.items() if k not in VOLATILE_KEYS}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
  return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    if m.get("kind") == "eval":
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
  """The results.jsonl record of a finished run (fields: experiments/scaling/results.py)."""
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
      "runner_wall_time_s": runner_wall_time_s, "finished_at": _now(),
      "load_average": list(os.getloadavg()), "config_hash": config_hash(config_dict),
      "config": config_dict, "summary": summary,
  }


def _check_run_dir(run_dir: str, config_dict: dict[str, Any], name: str) -> None:
  """A run directory left by a killed run must hold the same training config."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f).get("train")
  if stored is not None and config_hash(stored) != config_hash(config_dict):
    raise spec.SweepError(
        f"run {name!r}: {run_dir} was started with a different training config than the sweep "
        "file now gives (was the file edited?). Delete that run directory to start it afresh, "
        "or use another --workdir.")


def _write_meta(workdir: str, sweep: spec.Sweep, sweep_path: str, command: str,
                rows: list[dict[str, Any]]) -> dict[str, Any]:
  path = os.path.join(workdir, SWEEP_META_FILE)
  meta: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      meta = json.load(f)
  invocation = {"started_at": _now(), "command": command}
  meta.update({
      "sweep": sweep.name, "sweep_file": sweep_path, "description": sweep.description,
      "budget_flops": sweep.budget_flops,
      "command": meta.get("command", command), "started_at": meta.get("started_at",
                                                                      invocation["started_at"]),
      "invocations": [*meta.get("invocations", []), invocation],
      "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()], "runs": rows})
  store.write_json(path, meta)
  return meta


def _train(config, run_dir: str, row: dict[str, Any]) -> tuple[dict[str, Any], str]:
  """(the trainer's summary, 'completed'), or a stand-in summary and 'diverged: ...'."""
  try:
    return train_and_evaluate(config, run_dir), "completed"
  except TrainingDiverged as e:
    status = f"diverged: {e}"
    return {"status": status, "n_params": row["n_params"],
            "n_params_non_embedding": row["n_params_non_embedding"],
            "flops_per_token": row["flops"] / row["tokens"], "tokens_seen": None}, status


def run_sweep(sweep: spec.Sweep, workdir: str, *, sweep_path: str = "", command: str = "",
              max_runs: int | None = None, only: list[str] | None = None, log=print
              ) -> list[dict[str, Any]]:
  """Run every unfinished run of `sweep` (or of `only`), at most `max_runs` of them.

  Returns the records written by this call. A run the trainer reports as interrupted
  (SIGINT/SIGTERM: it saved a checkpoint) stops the sweep without a record; rerunning
  resumes it. A signal outside a run's training loop stops the sweep after that run.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  runs = list(sweep.runs) if not only else [sweep.run(name) for name in only]
  rows = plan(sweep)
  done = {r["name"]: r for r in read_records(results_path(workdir))}
  if lead:
    _write_meta(workdir, sweep, sweep_path, command, rows)
  log(format_plan(rows, set(done)))
  peak = None
  if not sweep.overrides.get("peak_flops"):
    peak = total_peak(measure_matmul_peak())  # once, not at the start of every run
  written = []
  todo = [r for r in runs if r.name not in done]
  # A signal outside the trainer (compiling, loading data, between runs; a background
  # shell even starts us with SIGINT ignored) stops the sweep after the current run;
  # inside a run the trainer's own handler saves a checkpoint and returns at once.
  with StopSignals() as stop:
    for run in runs:
      config = sweep.training_config(run)
      if peak is not None:
        config_lib.set_values(config, {"peak_flops": peak})
      config_dict = config_lib.to_dict(config)
      if run.name in done:
        if done[run.name].get("config_hash") != config_hash(config_dict):
          raise spec.SweepError(
              f"run {run.name!r} has a record made with a different config (was the sweep file "
              f"edited?). Use a new --workdir, or remove its line from {results_path(workdir)} "
              f"and its directory {os.path.join(workdir, RUNS_DIR, run.name)}.")
        continue
      if max_runs is not None and len(written) >= max_runs:
        log(f"stopping after {max_runs} run(s) (--max_runs); rerun to continue")
        break
      run_dir = os.path.join(workdir, RUNS_DIR, run.name)
      _check_run_dir(run_dir, config_dict, run.name)
      index = len(written) + 1
      log(f"[{index}/{len(todo)}] {run.name}: {run.shape.name}, {config.num_steps} steps, "
          f"lr {run.lr:.2e} -> {run_dir}")
      start = time.time()
      summary, status = _train(config, run_dir, next(r for r in rows if r["name"] == run.name))
      if status != "completed":
        log(f"  {run.name} diverged; recorded without a loss")
      elif summary.get("status") != "completed":
        log(f"  {run.name}: {summary.get('status')}; stopping the sweep (rerun to resume)")
        break
      record = make_record(sweep, run, config, summary, workdir=workdir, run_dir=run_dir,
                           runner_wall_time_s=time.time() - start, status=status)
      if lead:
        append_record(results_path(workdir), record)
      written.append(record)
      log(f"  {run.name}: val_loss {record['final_val_loss']:.4f}, bpb "
          f"{record['final_val_bpb']:.4f}, {record['runner_wall_time_s']:.0f} s")
      if stop.received is not None:
        log("  a stop signal arrived: stopping after this run (rerun to continue)")
        break
  return written


def main(argv):
  del argv
  try:
    return _main(flags.FLAGS)
  except (spec.SweepError, config_lib.ConfigError, store.WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _main(f):
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    store.quiet_orbax_errors()  # a failed save is one line of ours
  if f.distributed or f.coordinator_address:
    if f.coordinator_address:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # TPU pods and SLURM clusters are detected without arguments.
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  path = resolve_sweep_path(f.sweep)
  sweep = spec.load_sweep(path)
  workdir = f.workdir or os.path.join("runs", "sweeps", sweep.name)
  command = "python -m experiments.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  if f.dry_run:
    done = {r["name"] for r in read_records(results_path(workdir))}
    print(format_plan(plan(sweep), done))
    return
  only = [s for s in (f.only or "").split(",") if s]
  run_sweep(sweep, workdir, sweep_path=path, command=command, max_runs=f.max_runs, only=only)
  records = read_records(results_path(workdir))
  remaining = [r.name for r in sweep.runs if r.name not in {x["name"] for x in records}]
  print(f"{len(records)} of {len(sweep.runs)} runs finished in {workdir}"
        + (f"; not yet: {', '.join(remaining)}" if remaining else
           f"; fit them: python -m experiments.scaling_fit --workdir={workdir}"))
  if remaining and not f.max_runs and not only:
    sys.exit(1)


def _define_flags():
  flags.DEFINE_string("sweep", "cpu", "a sweep file, or the name of one in experiments/sweeps/")
  flags.DEFINE_string("workdir", None, "sweep workdir (default: runs/sweeps/<sweep name>)")
  flags.DEFINE_integer("max_runs", None, "run at most this many unfinished runs, then stop")
  flags.DEFINE_string("only", None, "comma-separated run names to run (default: all)")
  flags.DEFINE_bool("dry_run", False, "print the plan (sizes, steps, tokens, FLOPs) and exit")
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, SLURM): "
                    "run the same command on every host")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
  flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's index (with coordinator_address)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
