"""Train a model: python -m train --config=train/configs/NAME.py --workdir=runs/NAME [overrides]

  --config=FILE           a run config (train/configs/*.py); FILE:arg passes arg to get_config
  --config.a.b=value      override any key of it (an unknown key fails, with the closest ones)
  --workdir=DIR           config.json, tokenizer, checkpoints/, metrics.jsonl, TensorBoard
                          events; rerunning the same command resumes from the last checkpoint
  --distributed           multi-process: jax.distributed.initialize() detects the cluster
                          (TPU pod slice, SLURM, Open MPI, Kubernetes); the same command
                          in every process, the workdir on storage they all see
  --coordinator_address=host:port --num_processes=N --process_id=i
                          multi-process, explicitly (what --distributed leaves unset)

Exit status: 0 when the run completed, 1 on a bad config or input, 2 when the
loss diverged (the last good checkpoint is kept), 3 when writing to the workdir
failed (a full disk: the last good checkpoint is kept), 128 + signal number when
SIGINT/SIGTERM interrupted it (after saving). Errors are one line on stderr.
"""

from __future__ import annotations

import ast
import signal
import sys

from absl import app, flags, logging

from model import store
from train import config_lib, distributed, xla_flags
from train.checkpoints import SaveFailed
from train.corpus import CorpusError
from train.metrics import TrackerError
from train.trainer import TrainingDiverged, train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has a checkpoint).")
distributed.define_flags(FLAGS)

HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-?")
_config = None  # the run config, parsed with the flags


def _first_doc_line(path: str) -> str:
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
  """The module docstring and the configs that ship with the project."""
  lines = [__doc__.strip(), "", "Configs:"]
  for path in config_lib.available_configs():
    lines.append(f"  {path:34s} {_first_doc_line(path)}")
  return "\n".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
  global _config
  ours, config_args = config_lib.split_command_line(argv)
  if any(arg in HELP_ARGS for arg in ours[1:]):
    print(usage())
    sys.exit(0)
  try:
    rest = FLAGS(ours)
    _config = config_lib.from_command_line(config_args)
  except (flags.Error, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=runs/default)")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    store.quiet_orbax_errors()  # a failed save or restore is one line of ours
  xla_flags.apply()  # before JAX starts its backend: faster CPU kernels (train/xla_flags.py)
  try:
    distributed.initialize(FLAGS)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  background = store.BackgroundErrors().__enter__()
  try:
    summary = train_and_evaluate(_config, FLAGS.workdir)
  except (config_lib.ConfigError, CorpusError, store.WorkdirError, FileNotFoundError,
          TrackerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SaveFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: stop now
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third one must not cut this line short
    steps = store.all_steps(store.resolve(FLAGS.workdir))
    print("error: interrupted by Ctrl-C without saving; the last good checkpoint is step "
          f"{steps[-1] if steps else 'none'}", file=sys.stderr)
    return 128 + signal.SIGINT
  except OSError as e:  # metrics, events, config.json or summary.json could not be written
    steps = store.all_steps(store.resolve(FLAGS.workdir))
    print(f"error: writing {e.filename or FLAGS.workdir} failed ({store.error_cause(e)}); the "
          f"last good checkpoint is step {steps[-1] if steps else 'none'}", file=sys.stderr)
    return 3
  background.release()
  if summary["status"].startswith("interrupted"):
    name = summary["status"].rsplit(" ", 1)[-1]
    return 128 + int(getattr(signal, name, signal.SIGTERM))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
