"""Stress the default two-CPU-device training path under concurrent CPU load.

  python -m experiments.stress_devices                    # 5 runs, 2 busy processes
  python -m experiments.stress_devices --runs=10 --busy=3 --steps=1000

Each run is `python -m train` on the default two CPU devices (data parallel,
collectives between the devices) with the nanogpt-baby shape on ~1 MB of text
(the stdlib read as one document, cut into pieces), evaluating every 250 steps
(20 batches) and checkpointing asynchronously, while --busy processes spin on
the same cores. A run that aborts (XLA's CPU collectives give up after a
rendezvous timeout and abort the process) or fails is counted; the table gives
each run's exit status and wall time.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 5, "Training runs.")
flags.DEFINE_integer("busy", 2, "Busy-loop processes running beside each training run.")
flags.DEFINE_integer("steps", 1000, "Steps per run.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus(path: str, size: int = 1_000_000) -> str:
  """~1 MB of text from the stdlib's top-level modules (no download)."""
  parts, total = [], 0
  for name in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
    with open(name, encoding="utf-8", errors="ignore") as f:
      parts.append(f.read())
    total += len(parts[-1])
    if total >= size:
      break
  with open(path, "w") as f:
    f.write("".join(parts)[:size])
  return path


def command(workdir: str, text: str, cache: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "train", "--config=train/configs/shakespeare_char.py",
          f"--workdir={workdir}", f"--config.data.corpus={text}", "--config.data.val_fraction=0.02",
          "--config.data.split_chunk_chars=5000", "--config.model.preset=nanogpt-baby",
          "--config.model.max_seq_len=64", "--config.data.seq_len=64",
          "--config.model.dropout_rate=0.0", "--config.batch_size=12",
          f"--config.num_steps={steps}", "--config.eval_every=250", "--config.eval_batches=20",
          "--config.checkpoint_every=250", "--config.progress_bar=False",
          f"--config.data.cache_dir={cache}"]


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="stress-")
  text = corpus(os.path.join(root, "text.txt"))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  print(f"# {FLAGS.runs} runs of {FLAGS.steps} steps on 2 CPU devices beside {FLAGS.busy} "
        f"busy processes ({os.cpu_count()} cores)", flush=True)
  failures = 0
  for i in range(FLAGS.runs):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(FLAGS.busy)]
    start = time.time()
    try:
      out = subprocess.run(command(os.path.join(root, f"run{i}"), text,
                                   os.path.join(root, "cache"), FLAGS.steps),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    finally:
      for p in busy:
        p.kill()
    aborted = "rendezvous" in out.stderr or out.returncode < 0
    failures += out.returncode != 0
    print(f"run {i + 1}: exit {out.returncode}, {time.time() - start:.0f} s"
          + (" ABORTED (collective rendezvous)" if aborted else ""), flush=True)
    if out.returncode != 0:
      print("\n".join(out.stderr.splitlines()[-5:]), flush=True)
  print(f"# {failures} of {FLAGS.runs} runs failed")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
