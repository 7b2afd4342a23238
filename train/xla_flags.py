"""XLA flags that make training on CPU faster, applied before JAX starts its backend.

  from train import xla_flags
  xla_flags.apply()          # first thing in a CLI: before any jax array exists

What they do (measured with `python -m experiments.bench_train`, see train/README.md):
  --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE
      lets XLA hand dots and reductions (with the elementwise work around them)
      to YNNPACK. Without it the weight-gradient matmuls get their operand
      transposed by a loop fusion that also recomputes the elementwise backward
      (GELU, LayerNorm) in column order: a cache-miss-bound copy that took ~40%
      of a nanogpt-baby step. CPU time per nanogpt-baby step (remat='full'):
      115 ms without the flag, 89 ms with DOT,ELTWISE,REDUCE, 77 ms with
      DOT,REDUCE (YNNPACK's own elementwise kernels are slower than XLA's).

  --xla_force_host_platform_device_count=2   (on machines with 2 or more cores)
      two CPU "devices", so the default mesh (-1, 1, 1) runs data parallel with
      one half-batch per device: the two halves' ops run side by side, where a
      single device leaves a core idle between small ops. nanogpt-baby step:
      42 ms -> 35 ms; shakespeare-char: 8.5 s -> 7.3 s. Batches must then be
      even (a clear error says so). Only the CPU backend is affected.
      TRANSFORMER_LAB_CPU_DEVICES=N chooses another count.

  --xla_cpu_collective_call_terminate_timeout_seconds=1200
  --xla_cpu_collective_call_warn_stuck_timeout_seconds=120
      how long a CPU device thread waits at a collective (the data-parallel gradient
      all-reduce, the eval's) for the other device before XLA aborts the process. The
      default, 40 s, is shorter than a busy laptop can starve one thread: with other
      CPU-heavy processes running, the default two-device run aborted at a rendezvous in
      1 of 3 runs (issue 12). A late thread is not an error, so it waits; a deadlocked
      program (a bug) still aborts, after 20 minutes. tests/test_xla_flags.py holds one
      device back at a collective and shows the abort without the flag and none with it.

Flags the user set in XLA_FLAGS win: a flag already present is not touched.
TRANSFORMER_LAB_NO_XLA_FLAGS=1 turns all of this off.
"""

from __future__ import annotations

import os

from jax._src import xla_bridge

CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
)


def cpu_device_flag() -> tuple[str, ...]:
  count = int(os.environ.get("TRANSFORMER_LAB_CPU_DEVICES") or min(os.cpu_count() or 1, 2))
  return (f"--xla_force_host_platform_device_count={count}",) if count > 1 else ()


def _backend_started() -> bool:
  """Whether JAX has started a backend (XLA_FLAGS are read then, and only then)."""
  try:
    return bool(xla_bridge.backends_are_initialized())
  except AttributeError:  # another JAX version: assume started, change nothing
    return True


def merged(existing: str, flags=CPU_FLAGS) -> str:
  """`existing` plus every flag of `flags` whose name it does not set yet."""
  names = {f.split("=", 1)[0] for f in existing.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in names]
  return " ".join([existing.strip(), *extra]).strip()


def apply(flags=None) -> bool:
  """Add `flags` (default: CPU_FLAGS and the CPU device count) to XLA_FLAGS; False (nothing
  done) once the JAX backend is running or when TRANSFORMER_LAB_NO_XLA_FLAGS is set."""
  if os.environ.get("TRANSFORMER_LAB_NO_XLA_FLAGS") or _backend_started():
    return False
  flags = CPU_FLAGS + cpu_device_flag() if flags is None else tuple(flags)
  os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""), flags)
  return True
