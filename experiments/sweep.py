"""Run a sweep: each run through train.trainer.train_and_evaluate, resumable after a kill.

  python -m experiments.sweep --sweep=experiments/sweeps/cpu.py --workdir=runs/sweeps/cpu
  python -m experiments.sweep --sweep=cpu --dry_run          # the plan: sizes, tokens, FLOPs
  python -m experiments.sweep --sweep=cpu --max_runs=1       # run at most one more run
  python -m experiments.sweep --sweep=cpu --launcher=ray --address=auto --max_concurrent=8 \
      --resources_per_run='{"GPU": 1}'                       # members as Ray tasks
  python -m experiments.sweep --sweep=cpu --shard=3/8        # one job of a job array
  python -m experiments.sweep --merge --workdir=DIR          # collect the records
  python -m experiments.sweep --sweep=tpu_v4_32 --distributed  # same command on every host

The sweep workdir:

  sweep.json        the sweep, its runs and the commands that ran it (first start time kept)
  runs/NAME/        each run's training workdir (config.json, checkpoints/, metrics.jsonl) and,
                    once it finished, its record: result.json
  results.jsonl     the records of the finished runs, in plan order, rewritten from the run
                    directories (schema: experiments/scaling/results.py)

Rerunning the same command (with any launcher) skips runs that have a record, resumes a
run that was killed mid-way from its last checkpoint (the trainer's own resume), and
starts the rest. A run whose record or run directory holds a different config than the
sweep file now asks for (the file was edited) is an error rather than a silent mix.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shlex
import sys
from typing import Any

import jax
from absl import app, flags, logging

from experiments.scaling import launch_ray, spec
from experiments.scaling.results import (
    RUNS_DIR,
    SWEEP_META_FILE,
    ResultsError,
    merge_records,
    read_records,
    results_path,
)
from experiments.scaling.runner import (
    finished,
    format_plan,
    measured_peak,
    now,
    plan,
    run_dir,
    run_member,
)
from model import store
from train import config_lib, distributed
from train.signals import StopSignals

SWEEPS_DIR = os.path.join("experiments", "sweeps")
LAUNCHERS = ("local", "ray")


def resolve_sweep_path(sweep: str) -> str:
  """'cpu' -> experiments/sweeps/cpu.py; a path is returned as is."""
  if os.sep in sweep or sweep.endswith(".py") or os.path.isfile(sweep):
    return sweep
  return os.path.join(SWEEPS_DIR, f"{sweep}.py")


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n), 0 <= i < n."""
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
  if not match or not 0 <= int(match[1]) < int(match[2]):
    raise spec.SweepError(f"--shard={text!r}: write i/n with 0 <= i < n (job i of an array of "
                          "n), e.g. --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
  return int(match[1]), int(match[2])


def shard_names(rows: list[dict[str, Any]], index: int, count: int) -> list[str]:
  """The runs of shard `index` of `count`, in plan order: the plan's runs, largest FLOPs
  first, each to the shard with the fewest FLOPs so far (ties: the lower index), so the
  shards finish at about the same time. Deterministic: every job computes the same split."""
  loads = [(0.0, i) for i in range(count)]
  owner = {}
  for row in sorted(rows, key=lambda r: (-r["flops"], r["name"])):
    load, shard = heapq.heappop(loads)
    owner[row["name"]] = shard
    heapq.heappush(loads, (load + row["flops"], shard))
  return [r["name"] for r in rows if owner[r["name"]] == index]


def select_runs(sweep: spec.Sweep, rows: list[dict[str, Any]], *, only: list[str] | None = None,
                shard: tuple[int, int] | None = None) -> list[spec.Run]:
  """The runs this invocation owns: `only` (names), then this `shard` of them."""
  runs = [sweep.run(name) for name in only] if only else list(sweep.runs)
  if shard is not None:
    mine = set(shard_names(rows, *shard))
    runs = [r for r in runs if r.name in mine]
  return runs


def _write_meta(workdir: str, sweep: spec.Sweep, sweep_path: str, command: str,
                rows: list[dict[str, Any]]) -> dict[str, Any]:
  path = os.path.join(workdir, SWEEP_META_FILE)
  meta: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      meta = json.load(f)
  invocation = {"started_at": now(), "command": command}
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


def start_sweep(sweep: spec.Sweep, workdir: str, *, sweep_path: str = "", command: str = "",
                only: list[str] | None = None, shard: tuple[int, int] | None = None, log=print
                ) -> tuple[list[spec.Run], dict[str, dict[str, Any]]]:
  """Record the invocation, print the plan; (the runs this invocation owns, the finished)."""
  os.makedirs(workdir, exist_ok=True)
  rows = plan(sweep)
  runs = select_runs(sweep, rows, only=only, shard=shard)
  if jax.process_index() == 0:
    _write_meta(workdir, sweep, sweep_path, command, rows)
    merge_records(workdir)  # a workdir of an older version: its records into the run dirs
  done = finished(sweep, list(sweep.runs), workdir)
  mine = {run.name for run in runs}
  log(format_plan(rows if shard is None else [r for r in rows if r["name"] in mine], set(done)))
  return runs, done


def run_sweep(sweep: spec.Sweep, workdir: str, *, sweep_path: str = "", command: str = "",
              max_runs: int | None = None, only: list[str] | None = None,
              shard: tuple[int, int] | None = None, log=print) -> list[dict[str, Any]]:
  """Run every unfinished run of `sweep` (or of `only`, or of this `shard`) in this process,
  one after another, at most `max_runs` of them. Returns the records written by this call.

  A run the trainer reports as interrupted (SIGINT/SIGTERM: it saved a checkpoint) stops
  the sweep without a record; rerunning resumes it. A signal outside a run's training
  loop stops the sweep after that run.
  """
  workdir = os.path.abspath(workdir)
  runs, done = start_sweep(sweep, workdir, sweep_path=sweep_path, command=command, only=only,
                           shard=shard, log=log)
  peak = measured_peak(sweep)  # once, not at the start of every run
  todo = [r for r in runs if r.name not in done]
  written = []
  # A signal outside the trainer (compiling, loading data, between runs; a background
  # shell even starts us with SIGINT ignored) stops the sweep after the current run;
  # inside a run the trainer's own handler saves a checkpoint and returns at once.
  with StopSignals() as stop:
    for index, run in enumerate(todo, 1):
      if max_runs is not None and len(written) >= max_runs:
        log(f"stopping after {max_runs} run(s) (--max_runs); rerun to continue")
        break
      log(f"[{index}/{len(todo)}] {run.name}: {run.shape.name}, {sweep.steps(run)} steps, "
          f"lr {run.lr:.2e} -> {run_dir(workdir, run.name)}")
      record = run_member(sweep, run, workdir, peak=peak, log=log)
      if record is None:
        log("  stopping the sweep (rerun to resume)")
        break
      if jax.process_index() == 0:
        merge_records(workdir)
      written.append(record)
      if stop.received is not None:
        log("  a stop signal arrived: stopping after this run (rerun to continue)")
        break
  return written


def run_sweep_on_ray(sweep: spec.Sweep, workdir: str, *, sweep_path: str, command: str = "",
                     max_runs: int | None = None, only: list[str] | None = None,
                     shard: tuple[int, int] | None = None, address: str | None = None,
                     max_concurrent: int | None = None, resources: str | None = None,
                     retries: int = 2, log=print) -> tuple[list[str], dict[str, str]]:
  """run_sweep with each unfinished run as a Ray task (experiments/scaling/launch_ray.py);
  (the runs finished by this call, {run: error} of those that failed)."""
  workdir = os.path.abspath(workdir)
  with launch_ray.cluster(address):  # before JAX starts: Ray forks its processes
    runs, done = start_sweep(sweep, workdir, sweep_path=sweep_path, command=command, only=only,
                             shard=shard, log=log)
    todo = [r.name for r in runs if r.name not in done][:max_runs]
    finished_now, failed = launch_ray.run_on_ray(
        sweep_path, workdir, todo, max_concurrent=max_concurrent, resources=resources,
        retries=retries, on_finished=lambda name: merge_records(workdir), log=log)
  merge_records(workdir)
  return finished_now, failed


def main(argv):
  del argv
  try:
    return _main(flags.FLAGS)
  except (spec.SweepError, config_lib.ConfigError, store.WorkdirError, ResultsError,
          distributed.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _merge(workdir: str | None) -> None:
  if not workdir or not os.path.isdir(os.path.join(workdir, RUNS_DIR)):
    raise spec.SweepError(f"--merge: {workdir!r} holds no sweep runs (give the sweep's --workdir)")
  records = merge_records(workdir)
  print(f"{len(records)} records in {results_path(workdir)}; fit them: "
        f"python -m experiments.scaling_fit --workdir={workdir}")


def _main(f):
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    store.quiet_orbax_errors()  # a failed save is one line of ours
  if f.merge:
    return _merge(f.workdir)
  shard = parse_shard(f.shard) if f.shard else None
  if f.launcher == "ray":
    if distributed.requested(f):
      raise spec.SweepError("--launcher=ray runs each member as a one-process Ray task; "
                            "--distributed is for --launcher=local on every host of a pod")
    launch_ray.task_options(f.resources_per_run, f.retries, f.max_concurrent)  # bad flags: now
  distributed.initialize(f)
  path = resolve_sweep_path(f.sweep)
  sweep = spec.load_sweep(path)
  workdir = f.workdir or os.path.join("runs", "sweeps", sweep.name)
  command = "python -m experiments.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  if f.dry_run:
    print(format_plan(plan(sweep), set(finished(sweep, list(sweep.runs), workdir))))
    return
  only = [s for s in (f.only or "").split(",") if s]
  failed = {}
  if f.launcher == "ray":
    _, failed = run_sweep_on_ray(
        sweep, workdir, sweep_path=path, command=command, max_runs=f.max_runs, only=only,
        shard=shard, address=f.address, max_concurrent=f.max_concurrent,
        resources=f.resources_per_run, retries=f.retries)
  else:
    run_sweep(sweep, workdir, sweep_path=path, command=command, max_runs=f.max_runs, only=only,
              shard=shard)
  done = {r["name"] for r in read_records(results_path(workdir))}
  mine = [r.name for r in select_runs(sweep, plan(sweep), only=only, shard=shard)]
  remaining = [name for name in mine if name not in done]
  print(f"{len(done)} of {len(sweep.runs)} runs finished in {workdir}"
        + (f"; not yet: {', '.join(remaining)}" if remaining else
           f"; fit them: python -m experiments.scaling_fit --workdir={workdir}"))
  for name, error in failed.items():
    print(f"error: {name}: {error}", file=sys.stderr)
  if remaining and not f.max_runs:
    sys.exit(1)


def _define_flags():
  flags.DEFINE_string("sweep", "cpu", "a sweep file, or the name of one in experiments/sweeps/")
  flags.DEFINE_string("workdir", None, "sweep workdir (default: runs/sweeps/<sweep name>)")
  flags.DEFINE_integer("max_runs", None, "run at most this many unfinished runs, then stop")
  flags.DEFINE_string("only", None, "comma-separated run names to run (default: all)")
  flags.DEFINE_string("shard", None, "i/n: run shard i of n of the plan (a job array's job i); "
                      "the shards together run every run once")
  flags.DEFINE_bool("merge", False, "rewrite WORKDIR/results.jsonl from the run records, exit")
  flags.DEFINE_bool("dry_run", False, "print the plan (sizes, steps, tokens, FLOPs) and exit")
  flags.DEFINE_enum("launcher", "local", list(LAUNCHERS),
                    "local: one run after another in this process; ray: each run a Ray task")
  flags.DEFINE_string("address", None, "ray: the cluster ('auto': the one running here; "
                      "HOST:PORT; default: that one, or a new local one)")
  flags.DEFINE_integer("max_concurrent", None, "ray: at most this many runs at a time "
                       "(default: as many as the cluster's resources allow)")
  flags.DEFINE_string("resources_per_run", None, "ray: what each run needs, as JSON: "
                      '\'{"CPU": 1}\' (default), \'{"GPU": 1}\', \'{"TPU": 4}\'')
  flags.DEFINE_integer("retries", 2, "ray: times a failed or preempted run is retried (it "
                       "resumes from its checkpoint)")
  distributed.define_flags()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
