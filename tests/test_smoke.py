"""The package imports and a tiny model runs forward with 8 forced host devices."""

import jax
import numpy as np

import model


def test_eight_host_devices_are_forced():
  assert len(jax.devices()) == 8


def test_tiny_forward_shapes_and_finiteness(tiny_cfg):
  params = model.init(tiny_cfg, jax.random.PRNGKey(0))
  tokens_BT = np.arange(20).reshape(2, 10) % tiny_cfg.vocab_size
  logits_BTV, cache = model.apply(tiny_cfg, params, tokens_BT)
  assert logits_BTV.shape == (2, 10, tiny_cfg.vocab_size)
  assert logits_BTV.dtype == np.float32
  assert cache is None
  assert np.isfinite(np.asarray(logits_BTV)).all()
