"""Model FLOPs utilization: achieved model FLOP/s over the hardware's peak.

  peak = measure_matmul_peak()                    # f32 matmul FLOP/s of one device, measured
  mfu = tokens_per_sec * model.flops_per_token(cfg, T) / total_peak

The peak is measured, not looked up: the best of a few timed square float32
matmuls (2 n^3 FLOPs each) on one device. On a CPU the forced "devices" of
one process share the same cores, so the machine's peak is one device's; on
accelerators it is per device times the device count.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import model


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


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
  return tokens_per_sec * flops_per_token / peak_flops if peak_flops > 0 else float("nan")


def lora_flops_per_token(cfg, seq_len: int, n_adapter_params: int) -> float:
  """Training FLOPs per token of a LoRA fine-tune: 4 N + 6 n_lora + the attention term.

  The frozen weights' matmuls run forward (2 N) and backward for their inputs
  only (2 N; no weight gradients), the adapters forward and backward in full
  (6 n_lora); N as in model.flops_per_token.
  """
  n = model.count_params(cfg).non_embedding + cfg.d_model * cfg.vocab_size
  return model.flops_per_token(cfg, seq_len) - 2.0 * n + 6.0 * n_adapter_params
