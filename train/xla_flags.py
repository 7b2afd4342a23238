"""XLA flags that make training on CPU faster, applied before JAX starts its backend.

  from train import xla_flags
  xla_flags.apply()          # first thing in a CLI: before any jax array exists

What they do (measured with `python -m experiments.bench_train`, see train/README.md):
  --xla_cpu_experimental_ynn_fusion_type=...DOT,ELTWISE,REDUCE
      lets XLA hand whole dot + elementwise + reduction subgraphs to YNNPACK.
      Without it the weight-gradient matmuls get their operand transposed by a
      loop fusion that also recomputes the elementwise backward (GELU, LayerNorm)
      in column order, a cache-miss-bound copy that took ~40% of a nanogpt-baby
      step.

Flags the user set in XLA_FLAGS win: a flag already present is not touched.
TRANSFORMER_LAB_NO_XLA_FLAGS=1 turns this off.
"""

from __future__ import annotations

import os

CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type="
    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
)


def _backend_started() -> bool:
  import sys

  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge._backends)
  except (ImportError, AttributeError):
    return True  # unknown: assume started, do nothing


def merged(existing: str, flags=CPU_FLAGS) -> str:
  """`existing` plus every flag of `flags` whose name it does not set yet."""
  names = {f.split("=", 1)[0] for f in existing.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in names]
  return " ".join([existing.strip(), *extra]).strip()


def apply(flags=CPU_FLAGS) -> bool:
  """Add `flags` to XLA_FLAGS; False (nothing done) once the JAX backend is running."""
  if os.environ.get("TRANSFORMER_LAB_NO_XLA_FLAGS") or _backend_started():
    return False
  os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""), flags)
  return True
