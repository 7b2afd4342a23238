"""Shared test set-up: 8 forced CPU devices (set before jax is imported) and tiny configs."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from model.config import ModelConfig  # noqa: E402

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def tiny_config(**overrides) -> ModelConfig:
  """A 2-layer, 32-wide model: compiles in about a second on a CPU core."""
  return ModelConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_cfg():
  return tiny_config()


@pytest.fixture
def make_tiny_cfg():
  return tiny_config
