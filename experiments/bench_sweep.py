"""A sweep's wall time, one run after another vs as Ray tasks on W workers, same results.

  python -m experiments.bench_sweep                       # smoke sweep, 2 workers
  python -m experiments.bench_sweep --sweep=pilot --workers=8 --repeats=2

Each mode is the sweep command itself, in a subprocess on a fresh workdir and a fresh token
cache, so each pays what a user pays (imports, the token cache, Ray's local cluster start,
one JAX start per worker):

  python -m experiments.sweep --sweep=S --workdir=A --launcher=local
  python -m experiments.sweep --sweep=S --workdir=B --launcher=ray --address=local \\
      --max_concurrent=W

and the two results.jsonl must hold the same numbers. Printed: each wall time, the ratio
local / ray, the ideal ratio for these runs (their FLOPs packed on W workers, longest
first), the load average, and per mode the runs' own wall times (summed, and from the
first start to the last finish) to show what the launch itself costs. Measured on this
repository's 2-core machine, shared with other work, so the figures move from one run to
the next; experiments/scaling/README.md has them and how they scale with cores.
"""

from __future__ import annotations

import datetime as dt
import heapq
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import sweep as sweep_lib
from experiments.scaling import runner, spec
from experiments.scaling.results import read_records, results_path

# What a run computed; the two launchers must agree on these exactly.
RESULT_KEYS = ("final_val_loss", "best_val_loss", "final_val_bpb", "val_curve", "train_curve",
               "tokens", "flops", "config_hash")


def ideal_ratio(flops: list[float], workers: int) -> float:
  """Sequential time over the longest worker's, runs taking time in proportion to FLOPs and
  placed longest first on the least-loaded worker (what a scheduler can at best do)."""
  loads = [0.0] * workers
  for f in sorted(flops, reverse=True):
    heapq.heapreplace(loads, loads[0] + f)
  return sum(flops) / max(loads)


def run_mode(sweep_path: str, launcher: str, workers: int, root: str) -> float:
  """Wall seconds of one sweep command (a fresh workdir and token cache under `root`)."""
  workdir = os.path.join(root, launcher, "sweep")
  cmd = [sys.executable, "-m", "experiments.sweep", f"--sweep={sweep_path}",
         f"--workdir={workdir}", f"--launcher={launcher}"]
  if launcher == "ray":
    cmd += ["--address=local", f"--max_concurrent={workers}"]
  env = {**os.environ, "TRANSFORMER_LAB_CACHE": os.path.join(root, launcher, "cache")}
  start = time.perf_counter()
  result = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
  return wall


def _records(root: str, launcher: str) -> list[dict]:
  return read_records(results_path(os.path.join(root, launcher, "sweep")))


def _results(root: str, launcher: str) -> dict[str, dict]:
  return {r["name"]: {k: r[k] for k in RESULT_KEYS} for r in _records(root, launcher)}


def run_times(records: list[dict]) -> tuple[float, float]:
  """(the runs' summed wall time, first start to last finish): inside runs, not around them."""
  ends = [dt.datetime.fromisoformat(r["finished_at"]).timestamp() for r in records]
  starts = [end - r["runner_wall_time_s"] for end, r in zip(ends, records, strict=True)]
  return sum(r["runner_wall_time_s"] for r in records), max(ends) - min(starts)


def main(argv):
  del argv
  f = flags.FLAGS
  path = sweep_lib.resolve_sweep_path(f.sweep)
  sweep = spec.load_sweep(path)
  flops = [r["flops"] for r in runner.plan(sweep)]
  print(f"sweep {sweep.name}: {len(flops)} runs, {sum(flops):.3g} training FLOPs; "
        f"{os.cpu_count()} CPU cores, {f.workers} Ray workers; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
  walls: dict[str, list[float]] = {"local": [], "ray": []}
  for repeat in range(f.repeats):
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as root:
      for launcher in ("local", "ray") if repeat % 2 == 0 else ("ray", "local"):
        walls[launcher].append(run_mode(path, launcher, f.workers, root))
        summed, span = run_times(_records(root, launcher))
        print(f"  {launcher:5s} {walls[launcher][-1]:7.1f} s wall; the runs: {summed:.1f} s "
              f"summed, {span:.0f} s from the first start to the last finish", flush=True)
      same = _results(root, "local") == _results(root, "ray")
      print(f"  same results: {'yes' if same else 'NO'}")
      if not same:
        return 1
  local, ray = statistics.median(walls["local"]), statistics.median(walls["ray"])
  print(f"local (one run after another)     : {local:7.1f} s")
  print(f"ray ({f.workers} workers, max_concurrent={f.workers}): {ray:7.1f} s")
  print(f"ratio local / ray                 : {local / ray:.2f}x (ideal for these runs on "
        f"{f.workers} workers: {ideal_ratio(flops, f.workers):.2f}x); load average now "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  flags.DEFINE_string("sweep", "smoke", "a sweep file, or the name of one in experiments/sweeps/")
  flags.DEFINE_integer("workers", 2, "Ray workers (members at a time)")
  flags.DEFINE_integer("repeats", 1, "pairs of runs (alternating which goes first); medians")
  app.run(main)
