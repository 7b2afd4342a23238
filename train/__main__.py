"""Train a model: python -m train --config=train/configs/NAME.py --workdir=runs/NAME [overrides]

  --config=FILE           a run config (train/configs/*.py); FILE:arg passes arg to get_config
  --config.a.b=value      override any key of it (an unknown key fails, with the closest ones)
  --workdir=DIR           config.json, tokenizer, checkpoints/, metrics.jsonl, TensorBoard
                          events; rerunning the same command resumes from the last checkpoint
  --coordinator_address=host:port --num_processes=N --process_id=i
                          one process per host: calls jax.distributed.initialize

Exit status: 0 when the run completed, 1 on a bad config or input, 2 when the
loss diverged (the last good checkpoint is kept), 128 + signal number when
SIGINT/SIGTERM interrupted it (after saving).
"""

from __future__ import annotations

import ast
import signal
import sys

import jax
from absl import app, flags, logging

from train import config_lib, xla_flags
from train.corpus import CorpusError
from train.trainer import TrainingDiverged, train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has a checkpoint).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")

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


def _split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(this module's flags, --config and --config.* arguments); '--config PATH' is joined."""
  ours, config_args = [argv[0]], []
  args = iter(argv[1:])
  for arg in args:
    if arg in ("--config", "-config"):
      config_args.append(f"--config={next(args, '')}")
    elif arg.lstrip("-").startswith(("config=", "config.")):
      config_args.append("--" + arg.lstrip("-"))
    else:
      ours.append(arg)
  return ours, config_args


def _parse_flags(argv: list[str]) -> list[str]:
  global _config
  ours, config_args = _split_config_args(argv)
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
  xla_flags.apply()  # before JAX starts its backend: faster CPU kernels (train/xla_flags.py)
  if FLAGS.coordinator_address:
    # CPU processes exchange arrays through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    summary = train_and_evaluate(_config, FLAGS.workdir)
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
