"""Fault injection: kill, interrupt, damage and starve a training run; check nothing is lost.

  python -m experiments.faults                       # every fault, 20 random kills
  python -m experiments.faults --kills=5 --faults=sigterm,disk_full

Runs a small job (train/configs/tiny.py, checkpoints every 3 steps, asynchronous
saves) once without faults, then once per fault, and reruns the same command
after each fault until the run completes. A fault is recovered when the final
parameters equal the uninterrupted run's bit for bit. Its error output is the
lines the faulted command printed that start with 'error:' or belong to a
Python traceback: one line means one clear message.

Faults: kill -9 at random moments (a share of them while a checkpoint is being
written), SIGTERM, SIGINT, a double SIGINT, a truncated params file, an empty
data item, a deleted opt_state item, a full disk (a 1 MB tmpfs where mounting
is allowed, otherwise skipped) and a read-only workdir (the same). Prints a
table and writes it as JSON with --out.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from model import store

FLAGS = flags.FLAGS
flags.DEFINE_integer("kills", 20, "Random kill -9 faults.")
flags.DEFINE_list("faults", [], "Only these faults (default: all).")
flags.DEFINE_integer("steps", 24, "Steps of the job.")
flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
flags.DEFINE_string("out", None, "Write the table here as JSON.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMER_LAB_CPU_DEVICES": "1"}
FAULTS = ("kill", "sigterm", "sigint", "double_sigint", "truncated_params", "empty_data_item",
          "deleted_opt_state", "disk_full", "read_only")


def command(workdir: str, cache: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "train", "--config=train/configs/tiny.py", f"--workdir={workdir}",
          f"--config.num_steps={steps}", "--config.checkpoint_every=3", "--config.eval_every=12",
          "--config.keep_checkpoints=3", "--config.log_every=1", "--config.trackers=('jsonl',)",
          f"--config.data.cache_dir={cache}"]


def resumed_from(stderr: str) -> int | None:
  for line in stderr.splitlines():
    if line.startswith("resumed from "):
      return int(line.rsplit("/", 1)[1])
  return None


def error_lines(stderr: str) -> int:
  """Lines of error output: 'error: ...' lines and every line of a traceback."""
  count, in_traceback = 0, False
  for line in stderr.splitlines():
    if line.startswith("Traceback (most recent call last)"):
      in_traceback = True
    if in_traceback or line.startswith("error:"):
      count += 1
    if in_traceback and line and not line.startswith(" ") and not line.startswith("Traceback"):
      in_traceback = False
  return count


def final_params(workdir: str):
  return [np.asarray(x) for x in jax.tree.leaves(store.load_params(workdir).params)]


class Job:
  """One workdir's job: start it, wait for it, rerun it until it completes."""

  def __init__(self, root: str, name: str, steps: int, cache: str):
    self.workdir = os.path.join(root, name)
    self.cmd = command(self.workdir, cache, steps)

  def start(self) -> subprocess.Popen:
    return subprocess.Popen(self.cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  def run(self, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(self.cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)

  def finish(self) -> tuple[bool, int | None]:
    """Rerun until the job completes; (completed, the step the first rerun resumed from)."""
    resumed = None
    for attempt in range(3):
      out = self.run()
      if attempt == 0:
        resumed = resumed_from(out.stderr)
      if out.returncode == 0:
        return True, resumed
    return False, resumed


def wait_for_step(workdir: str, proc: subprocess.Popen, step: int, timeout: float = 300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if any(s >= step for s in store.all_steps(workdir)):
      return
    time.sleep(0.05)


def mid_save(workdir: str, proc: subprocess.Popen, timeout: float = 300) -> bool:
  """Wait until a checkpoint is being written (its temporary directory exists)."""
  path = store.checkpoint_dir(workdir)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(path) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(path)):
      return True
    time.sleep(0.002)
  return False


def _mount_tmpfs(path: str, options: str) -> bool:
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                          capture_output=True)
  return result.returncode == 0


def inject(fault: str, job: Job, rng: random.Random, duration: float) -> dict:
  """Run the job with `fault`; returns what happened before the recovery."""
  row = {"fault": fault}
  if fault in ("kill", "sigterm", "sigint", "double_sigint"):
    proc = job.start()
    if fault == "kill" and rng.random() < 0.5:
      row["moment"] = "mid-save" if mid_save(job.workdir, proc) else "after the run"
    else:
      delay = rng.uniform(0.2, 1.0) * duration
      time.sleep(delay)
      row["moment"] = f"{delay:.1f} s in"
    sig = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(fault, signal.SIGINT)
    proc.send_signal(sig)
    if fault == "double_sigint":
      time.sleep(0.05)
      proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=300)[1]
    row.update(exit=proc.returncode, error_lines=error_lines(stderr))
    return row
  # Damage a finished job's newest checkpoint, or starve its disk, then rerun.
  if fault in ("truncated_params", "empty_data_item", "deleted_opt_state"):
    proc = job.start()
    wait_for_step(job.workdir, proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    step = store.latest_step(job.workdir)
    step_dir = os.path.join(store.checkpoint_dir(job.workdir), str(step))
    if fault == "truncated_params":
      files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params"))
               for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
      for path in files:  # every data file: OCDBT may keep one the manifest no longer uses
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
    elif fault == "empty_data_item":
      open(os.path.join(step_dir, "data", "metadata"), "w").close()
    else:
      shutil.rmtree(os.path.join(step_dir, "opt_state"))
    row["moment"] = f"checkpoint {step} damaged"
    out = job.run()  # the rerun itself is the recovery: it must fall back and finish
    row.update(exit=out.returncode, error_lines=error_lines(out.stderr),
               resumed_from=resumed_from(out.stderr),
               said=[line for line in out.stderr.splitlines() if "damaged" in line][:1])
    return row
  mount = job.workdir + "-mount"
  options = "size=1m" if fault == "disk_full" else "size=4m,ro"
  if not _mount_tmpfs(mount, options):
    return {**row, "skipped": "cannot mount a tmpfs here (needs root)"}
  try:
    starved = Job(mount, "run", FLAGS.steps, job.cmd[-1].split("=", 1)[1])
    out = starved.run()
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    row.update(exit=out.returncode, error_lines=error_lines(out.stderr), said=errors[:1],
               moment="1 MB disk" if fault == "disk_full" else "read-only disk")
    if fault == "disk_full":  # copy what survived to real disk and recover there
      if os.path.isdir(starved.workdir):
        shutil.copytree(starved.workdir, job.workdir,
                        ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
  finally:
    subprocess.run(["umount", mount], capture_output=True)
  return row


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO: keep the table
  rng = random.Random(FLAGS.seed)
  root = tempfile.mkdtemp(prefix="faults-")
  cache = os.path.join(root, "cache")
  faults = FLAGS.faults or list(FAULTS)
  unknown = sorted(set(faults) - set(FAULTS))
  if unknown:
    raise app.UsageError(f"unknown fault(s) {unknown}; known: {FAULTS}")
  reference = Job(root, "reference", FLAGS.steps, cache)
  start = time.time()
  out = reference.run()
  if out.returncode != 0:
    raise RuntimeError(f"the uninterrupted run failed:\n{out.stderr[-3000:]}")
  duration = time.time() - start
  want = final_params(reference.workdir)
  plan = [f for f in faults if f != "kill"] + (["kill"] * FLAGS.kills if "kill" in faults else [])
  rows = []
  print(f"# reference: {FLAGS.steps} steps in {duration:.1f} s; {len(plan)} faults", flush=True)
  print(f"{'fault':20s} {'moment':22s} {'exit':>5s} {'err lines':>9s} {'resumed':>8s} "
        f"{'recovered':>9s} {'bitwise':>8s}")
  for i, fault in enumerate(plan):
    job = Job(root, f"{fault}-{i}", FLAGS.steps, cache)
    row = inject(fault, job, rng, duration)
    if "skipped" not in row:
      recovered, resumed = job.finish()
      got = final_params(job.workdir) if recovered else None
      row.setdefault("resumed_from", resumed)
      row.update(recovered=recovered,
                 bitwise_equal=bool(got is not None and all(
                     np.array_equal(a, b) for a, b in zip(want, got, strict=True))))
    rows.append(row)
    print(f"{row['fault']:20s} {row.get('moment', ''):22s} {str(row.get('exit', '')):>5s} "
          f"{str(row.get('error_lines', '')):>9s} {str(row.get('resumed_from', '')):>8s} "
          f"{str(row.get('recovered', row.get('skipped', ''))):>9s} "
          f"{str(row.get('bitwise_equal', '')):>8s}", flush=True)
  done = [r for r in rows if "skipped" not in r]
  lost = [r for r in done if not (r["recovered"] and r["bitwise_equal"])]
  noisy = [r for r in done if r["error_lines"] > 1]
  print(f"# {len(done)} faults injected, {len(done) - len(lost)} recovered bit for bit, "
        f"{len(lost)} lost data; {len(noisy)} printed more than one error line; "
        f"{len(rows) - len(done)} skipped")
  if FLAGS.out:
    store.write_json(FLAGS.out, {"steps": FLAGS.steps, "reference_s": duration, "rows": rows})
  shutil.rmtree(root, ignore_errors=True)
  return 1 if lost or noisy else 0


if __name__ == "__main__":
  app.run(main)
