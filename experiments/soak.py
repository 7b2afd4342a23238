"""Memory soak: resident memory of a long training run with frequent checkpoints and evals.

  python -m experiments.soak --minutes=30                     # the tiny config, 1 device
  python -m experiments.soak --minutes=5 --checkpoint_every=5 --out=runs/soak.json

Starts `python -m train` (train/configs/tiny.py, effectively endless) in a
subprocess, samples its resident set size (VmRSS) every --interval seconds, and
stops it with SIGTERM after --minutes. Prints the samples and the slope of a
least-squares line through those after the warm-up (--warmup_minutes): MB per
minute and KB per checkpoint. A flat run has a slope near zero; a leak grows
with every checkpoint or evaluation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from model import store

FLAGS = flags.FLAGS
flags.DEFINE_float("minutes", 30.0, "How long the run goes on.")
flags.DEFINE_float("warmup_minutes", 2.0, "Samples before this are left out of the slope.")
flags.DEFINE_float("interval", 10.0, "Seconds between memory samples.")
flags.DEFINE_integer("checkpoint_every", 5, "Steps between checkpoints.")
flags.DEFINE_integer("eval_every", 10, "Steps between evaluations.")
flags.DEFINE_string("workdir", None, "Where the run writes (default: a temporary directory).")
flags.DEFINE_string("out", None, "Write the samples and the slope here as JSON.")
flags.DEFINE_multi_string("set", [], "More training overrides, e.g. --set=eval_every=1000000.")


def rss_mb(pid: int) -> float | None:
  """Resident set size of process `pid` in MB (None once it is gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def slope(samples: list[tuple[float, float]], warmup_s: float) -> float:
  """MB per minute of a least-squares line through the samples after the warm-up."""
  points = np.asarray([(t, m) for t, m in samples if t >= warmup_s])
  if len(points) < 3:
    return float("nan")
  return float(np.polyfit(points[:, 0] / 60.0, points[:, 1], 1)[0])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO: keep the figures
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="soak-")
  command = [sys.executable, "-m", "train", "--config=train/configs/tiny.py",
             f"--workdir={workdir}", "--config.num_steps=100000000", "--config.log_every=5",
             f"--config.eval_every={FLAGS.eval_every}",
             f"--config.checkpoint_every={FLAGS.checkpoint_every}",
             "--config.keep_checkpoints=2", "--config.trackers=('jsonl','tensorboard')",
             *(f"--config.{item}" for item in FLAGS.set)]
  env = {**os.environ, "TRANSFORMER_LAB_CPU_DEVICES": "1"}
  proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  start = time.time()
  samples = []
  try:
    while time.time() - start < FLAGS.minutes * 60 and proc.poll() is None:
      mb = rss_mb(proc.pid)
      if mb is not None:
        samples.append((time.time() - start, mb))
        print(f"{samples[-1][0]:7.0f} s  {mb:8.1f} MB", flush=True)
      time.sleep(FLAGS.interval)
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  steps = store.latest_step(workdir) or 0
  checkpoints = steps // FLAGS.checkpoint_every
  per_minute = slope(samples, FLAGS.warmup_minutes * 60)
  minutes_after_warmup = max(samples[-1][0] / 60 - FLAGS.warmup_minutes, 1e-9)
  per_checkpoint_kb = per_minute * minutes_after_warmup * 1024 / max(
      checkpoints * (1 - FLAGS.warmup_minutes / max(samples[-1][0] / 60, 1e-9)), 1)
  print(f"# {steps} steps, ~{checkpoints} checkpoints in {samples[-1][0] / 60:.1f} min; "
        f"RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB; slope after "
        f"{FLAGS.warmup_minutes:g} min: {per_minute:+.2f} MB/min "
        f"(~{per_checkpoint_kb:+.1f} KB per checkpoint)")
  if FLAGS.out:
    store.write_json(FLAGS.out, {"command": command, "samples": samples, "steps": steps,
                                 "slope_mb_per_min": per_minute,
                                 "slope_kb_per_checkpoint": per_checkpoint_kb})


if __name__ == "__main__":
  app.run(main)
