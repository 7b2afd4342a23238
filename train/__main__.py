"""Train a model: `python -m train --config=train/configs/default.py --workdir=runs/NAME`.

  --config.a.b=value     override any config key (unknown keys fail before anything runs)
  --workdir              where config.json, tokenizer.model, checkpoints/, metrics.jsonl and
                         TensorBoard events go; rerunning the same command resumes
  --coordinator_address  multi-process runs: host:port of process 0 (with --num_processes,
                         --process_id); calls jax.distributed.initialize

Exit status: 0 when the run completed, 1 on a bad config or input, 2 when the
loss diverged (the last good checkpoint is kept), 128 + signal number when
SIGINT/SIGTERM interrupted it (after saving).
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import xla_flags

xla_flags.apply()  # before JAX starts its backend: faster CPU kernels (train/xla_flags.py)

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (train/configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has a checkpoint).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def _parse_flags(argv):
  """absl parsing, after checking --config.* keys ourselves for a readable error."""
  from train import config_lib

  config_path = None
  overrides = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      config_path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      config_path = argv[i + 1]
    elif arg.startswith("--config."):
      overrides.append(arg)
  if config_path is None:
    print("error: --config is required, e.g. --config=train/configs/default.py", file=sys.stderr)
    sys.exit(1)
  try:
    config_lib.load_config(config_path, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  return FLAGS(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=runs/default)")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax

  if FLAGS.coordinator_address:
    # CPU processes exchange arrays through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  from train import config_lib
  from train.corpus import CorpusError
  from train.trainer import TrainingDiverged, train_and_evaluate

  try:
    summary = train_and_evaluate(_CONFIG.value, FLAGS.workdir)
  except (config_lib.ConfigError, CorpusError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if summary["status"].startswith("interrupted"):
    name = summary["status"].rsplit(" ", 1)[-1]
    return 128 + int(getattr(signal, name, signal.SIGTERM))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
