"""MFU's peak: the bf16 table by device kind on accelerators (kinds as JAX reports them), the
measured float32 matmul on CPU, and no MFU (logged once) for an accelerator the table lacks."""

import types

import jax
import pytest

from train import flops
from train.summary import format_summary


def fake_device(kind: str, platform: str = "gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    # Chips the table does not know, some of them prefixes of known names: no peak.
    ("TPU v4 lite", None), ("TPU v3", None), ("TPU7x", None), ("NVIDIA A1000", None),
    ("NVIDIA GeForce RTX 4090", None), ("NVIDIA L4", None)])
def test_table_peak_matches_the_device_kinds_jax_reports(kind, peak):
  assert flops.table_peak(kind) == peak


def test_accelerator_peak_comes_from_the_table_and_an_unknown_one_logs_once(monkeypatch):
  monkeypatch.setattr(flops, "_UNKNOWN_LOGGED", set())
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda **_: pytest.fail("measured on a TPU"))
  lines = []
  assert flops.device_peak(fake_device("TPU v5 lite", "tpu"), log=lines.append) == 197e12
  assert flops.device_peak(fake_device("NVIDIA H200"), log=lines.append) == 989e12
  assert lines == []
  for _ in range(3):
    assert flops.device_peak(fake_device("NVIDIA B200"), log=lines.append) == 0.0
  assert len(lines) == 1 and "MFU unavailable" in lines[0] and "'NVIDIA B200'" in lines[0]
  assert flops.mfu(1e6, 1e9, 0.0) is None  # no wrong number either


def test_cpu_peak_is_measured_not_looked_up(monkeypatch):
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda device: 123e9)
  cpu = jax.devices("cpu")[0]
  assert flops.device_peak(cpu) == 123e9
  assert flops.device_peak(fake_device("NVIDIA H200", "cpu")) == 123e9  # the platform decides


def test_summary_says_mfu_is_unavailable_without_a_peak():
  s = {"status": "completed", "step": 1, "num_steps": 1, "tokens_seen": 8, "n_params": 1,
       "n_params_non_embedding": 1, "vocab_size": 2, "seq_len": 4, "train_loss": 1.0,
       "val_loss": 1.0, "val_ppl": 2.7, "best_val_loss": 1.0, "val_bpb": 1.0,
       "tokens_per_sec": 100.0, "mfu": None, "peak_flops": 0.0, "devices": 1,
       "wall_time_s": 1.0, "checkpoint_dir": "c", "checkpoint_step": 1, "sample_command": "s"}
  assert "MFU unavailable (no peak FLOP/s for this device) (1 device(s))" in format_summary(s)
  s.update(mfu=0.25, peak_flops=2e9)
  assert "MFU 25.0% of 2 GFLOP/s (1 device(s))" in format_summary(s)
