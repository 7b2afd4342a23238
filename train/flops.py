"""Model FLOPs utilization: achieved model FLOP/s over the hardware's peak.

  peak = device_peak()                    # one device's peak FLOP/s (0.0: unknown)
  mfu = tokens_per_sec * model.flops_per_token(cfg, T) / total_peak(peak)

On a CPU the peak is measured, not looked up: the best of a few timed square
float32 matmuls (2 n^3 FLOPs each) on one device (`measure_matmul_peak`). On a
TPU or GPU it is the vendor's dense bfloat16 peak per chip (PEAK_BF16, looked
up by `jax.devices()[0].device_kind`; MFU's usual reference, whatever the run's
compute dtype); an accelerator missing from the table has no MFU (logged
once) rather than a wrong one. On a CPU the forced
"devices" of one process share the same cores, so the machine's peak is one
device's; on accelerators it is per device times the device count.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import model
from train.metrics import say

# Dense (no structured sparsity) bfloat16 matmul peak FLOP/s per chip, from the vendors' specs;
# (device_kind pattern, FLOP/s), the first whose pattern matches the whole kind wins. TPU kinds
# as JAX reports them ("TPU v5" is v5p, "lite" the e chips; the marketing names too), GPU kinds
# are the CUDA device names ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", ...).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    (r"TPU v4", 275e12),             # cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16
    (r"TPU v5( lite|e)", 197e12),    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16
    (r"TPU v5p?", 459e12),           # cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16
    (r"TPU v6( lite|e)", 918e12),    # cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16
    (r"NVIDIA A100\b.*", 312e12),    # A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 sparse)
    (r"NVIDIA H100 PCIe.*", 756e12),  # H100 datasheet, PCIe: 1,513 TFLOPS with sparsity
    (r"NVIDIA H[12]00 NVL.*", 835e12),  # H100 NVL / H200 NVL datasheets: 1,671 with sparsity
    (r"NVIDIA H100\b.*", 989e12),    # H100 datasheet, SXM: 1,979 TFLOPS with sparsity
    (r"NVIDIA H200\b.*", 989e12),    # H200 datasheet, SXM: 1,979 TFLOPS with sparsity
)
_UNKNOWN_LOGGED: set[str] = set()


def table_peak(device_kind: str) -> float | None:
  """PEAK_BF16's FLOP/s for `device_kind`, or None when the table does not know the chip."""
  for pattern, peak in PEAK_BF16:
    if re.fullmatch(pattern, device_kind.strip()):
      return peak
  return None


def device_peak(device=None, *, log: Callable[[str], None] = say) -> float:
  """One device's peak FLOP/s: measured float32 on a CPU, the bf16 table on an accelerator,
  0.0 (no MFU; logged once per kind) for an accelerator the table does not know."""
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return measure_matmul_peak(device=device)
  peak = table_peak(device.device_kind)
  if peak is None:
    if device.device_kind not in _UNKNOWN_LOGGED:
      _UNKNOWN_LOGGED.add(device.device_kind)
      log(f"MFU unavailable: no bf16 peak FLOP/s known for device kind "
          f"{device.device_kind!r} ({device.platform}); set config.peak_flops to get one")
    return 0.0
  return peak


def measure_matmul_peak(*, size: int | None = None, dtype=jnp.float32, seconds: float = 0.3,
                        repeats: int = 3, device=None) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul on `device` (best of `repeats` timings)."""
  device = device or jax.local_devices()[0]
  n = size or (1024 if device.platform == "cpu" else 8192)
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  t0 = time.perf_counter()
  matmul(a, a).block_until_ready()
  one = max(time.perf_counter() - t0, 1e-6)
  iters = max(1, int(seconds / one))
  best = 0.0
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = matmul(a, a)
    out.block_until_ready()
    best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - t0))
  return best


def total_peak(per_device: float) -> float:
  """The whole run's peak from one device's: CPU devices of a process share its cores."""
  local = 1 if jax.local_devices()[0].platform == "cpu" else jax.local_device_count()
  return per_device * local * jax.process_count()


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float | None:
  """Achieved over peak FLOP/s; None when the peak is unknown (0)."""
  return tokens_per_sec * flops_per_token / peak_flops if peak_flops > 0 else None


def lora_flops_per_token(cfg, seq_len: int, n_adapter_params: int) -> float:
  """Training FLOPs per token of a LoRA fine-tune: 4 N + 6 n_lora + the attention term.

  The frozen weights' matmuls run forward (2 N) and backward for their inputs
  only (2 N; no weight gradients), the adapters forward and backward in full
  (6 n_lora); N as in model.flops_per_token.
  """
  n = model.count_params(cfg).non_embedding + cfg.d_model * cfg.vocab_size
  return model.flops_per_token(cfg, seq_len) - 2.0 * n + 6.0 * n_adapter_params
