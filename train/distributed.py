"""Multi-process runs: `jax.distributed.initialize` from the command line's flags.

  --distributed                 detect the cluster: a TPU pod slice, SLURM, Open MPI (mpirun),
                                Kubernetes (JobSet), or JAX_COORDINATOR_ADDRESS and friends
  --coordinator_address=host:port --num_processes=N --process_id=i
                                say it explicitly (any machines; what --distributed leaves unset)

Every process runs the same command; each feeds its own rows of the global batch
(train/data.py), process 0 alone writes config.json, metrics and the summary, and every
process writes its own shards of each checkpoint, so the workdir must be storage that all
of them see. train/README.md has a recipe per platform.
"""

from __future__ import annotations

import jax
from absl import flags


class DistributedError(ValueError):
  """The multi-process flags are incomplete, or no cluster was detected."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--distributed, --coordinator_address, --num_processes, --process_id."""
  flags.DEFINE_bool("distributed", False,
                    "call jax.distributed.initialize(), detecting the cluster (TPU pod slice, "
                    "SLURM, Open MPI, Kubernetes): run the same command in every process",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)",
                       flag_values=flag_values)


def requested(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Whether the flags ask for a multi-process run."""
  f = flag_values
  return bool(f.distributed or f.coordinator_address or f.num_processes is not None
              or f.process_id is not None)


def initialize(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Join the processes of a multi-process run (before anything starts a JAX backend).

  Returns False (and does nothing) when no flag asks for one.
  """
  f = flag_values
  if not requested(f):
    return False
  explicit = (f.coordinator_address, f.num_processes, f.process_id)
  if not f.distributed and None in explicit:
    raise DistributedError(
        "give --coordinator_address, --num_processes and --process_id together, or "
        "--distributed to detect them (TPU pod slice, SLURM, Open MPI, Kubernetes)")
  # CPU processes exchange arrays through gloo; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(*explicit)
  except ValueError as e:  # a bad value, or auto-detection found nothing to fill in
    hint = (" (no TPU pod, SLURM, Open MPI or Kubernetes environment was detected: give "
            "--coordinator_address, --num_processes and --process_id)"
            if f.distributed and None in explicit else "")
    raise DistributedError(f"jax.distributed.initialize: {e}{hint}") from None
  return True
