"""The KV cache: prefill + decode == the full forward, ragged prompts, overflow, init_cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import abstract_params
from tests import numpy_reference as ref
from tests.conftest import tiny_config

_apply = jax.jit(model.apply, static_argnums=0)
T, PROMPT, SLOTS = 11, 5, 16

CONFIGS = {
    "learned-mha": tiny_config(),
    "sinusoidal-mqa-strided": tiny_config(position="sinusoidal", n_kv_heads=1,
                                          attention_pattern=("global", "strided"),
                                          sparse_stride=3),
    "rope-gqa-window": tiny_config(position="rope", n_kv_heads=2,
                                   attention_pattern=("local", "global"), window_size=3),
    "rope-chunked-window-strided": tiny_config(position="rope", n_kv_heads=2,
                                               attention_impl="chunked", attn_chunk_size=4,
                                               attention_pattern=("local", "strided"),
                                               window_size=3, sparse_stride=3),
    "nopos-unrolled-xla-post": tiny_config(position="none", scan_layers=False,
                                           attention_impl="xla", norm_placement="post"),
}


def _params(cfg, seed=0):
  return ref.random_params(abstract_params(cfg), seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
  cfg = CONFIGS[name]
  params = _params(cfg)
  tokens = np.random.RandomState(1).randint(0, 61, (2, T))
  full = np.asarray(_apply(cfg, params, tokens)[0])
  cache = model.init_cache(cfg, 2, SLOTS)
  logits, cache = _apply(cfg, params, tokens[:, :PROMPT], cache=cache)
  np.testing.assert_allclose(logits, full[:, :PROMPT], atol=1e-5)
  for t in range(PROMPT, T):
    logits, cache = _apply(cfg, params, tokens[:, t:t + 1], cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, err_msg=f"step {t}")
  np.testing.assert_array_equal(cache.lengths_B, [T, T])
  # Slots past the filled length were never written.
  assert (np.asarray(cache.k_LBSKH)[:, :, T:] == 0).all()


def test_prefill_in_chunks_across_a_sliding_window():
  """A second prompt chunk attends to the first chunk's cached keys within the window.
  (Shapes as in the test above, so most functions are already compiled.)"""
  cfg = CONFIGS["rope-gqa-window"]
  params = _params(cfg, seed=2)
  tokens = np.random.RandomState(3).randint(0, 61, (2, T))
  full = np.asarray(_apply(cfg, params, tokens)[0])
  cache = model.init_cache(cfg, 2, SLOTS)
  first, cache = _apply(cfg, params, tokens[:, :PROMPT], cache=cache)
  second, cache = _apply(cfg, params, tokens[:, PROMPT:PROMPT + 3], cache=cache)
  third, cache = _apply(cfg, params, tokens[:, PROMPT + 3:PROMPT + 4], cache=cache)
  np.testing.assert_allclose(np.concatenate([first, second, third], 1), full[:, :PROMPT + 4],
                             atol=1e-5)


@pytest.mark.parametrize("name", ["learned-mha", "rope-chunked-window-strided"])
def test_ragged_prompts_right_padded_then_lengths_replaced(name):
  """Prompts of 3 and 5 tokens prefilled right-padded to 5; with lengths_B = (3, 5) each row
  continues its own prompt: every decoded step equals the row's sequence run alone."""
  cfg = CONFIGS[name]
  params = _params(cfg, seed=4)
  rng = np.random.RandomState(5)
  lengths = np.array([3, PROMPT])
  prompts = rng.randint(0, 61, (2, PROMPT))
  prompts[0, 3:] = 0  # padding
  steps = rng.randint(0, 61, (2, 4))
  cache = model.init_cache(cfg, 2, SLOTS)
  _, cache = _apply(cfg, params, prompts, cache=cache)
  cache = cache.replace(lengths_B=jnp.asarray(lengths, jnp.int32))
  decoded = []
  for i in range(steps.shape[1]):
    logits, cache = _apply(cfg, params, steps[:, i:i + 1], cache=cache)
    decoded.append(np.asarray(logits[:, 0]))
  np.testing.assert_array_equal(cache.lengths_B, lengths + steps.shape[1])
  # Each row alone: its real prompt, then the decoded tokens (right-padded to one length).
  alone = np.zeros((2, T), np.int32)
  for b in range(2):
    alone[b, :lengths[b] + 4] = np.concatenate([prompts[b, :lengths[b]], steps[b]])
  full = np.asarray(_apply(cfg, params, alone)[0])
  for b in range(2):
    for i in range(steps.shape[1]):
      np.testing.assert_allclose(decoded[i][b], full[b, lengths[b] + i], atol=1e-5,
                                 err_msg=f"row {b} step {i}")


def test_bidirectional_prefill_sees_only_the_filled_slots():
  """Causal attention never looks past its own slot; a bidirectional model would, so only
  the cache's filled length keeps the empty slots out."""
  cfg = tiny_config(causal=False, position="rope")
  params = _params(cfg, seed=6)
  tokens = np.random.RandomState(7).randint(0, 61, (2, PROMPT))
  cached, cache = _apply(cfg, params, tokens, cache=model.init_cache(cfg, 2, SLOTS))
  np.testing.assert_allclose(cached, _apply(cfg, params, tokens)[0], atol=1e-5)


def test_overflow_raises_with_concrete_lengths():
  cfg = tiny_config(n_layers=1)
  params = _params(cfg)
  cache = model.init_cache(cfg, 2, 8)
  with pytest.raises(ValueError, match="overflow"):
    model.apply(cfg, params, np.zeros((2, 9), np.int32), cache=cache)
  cache = cache.replace(lengths_B=jnp.array([7, 3], jnp.int32))
  _, full = _apply(cfg, params, np.zeros((2, 1), np.int32), cache=cache)  # row 0 now holds 8
  with pytest.raises(ValueError, match="overflow: a row would hold 9 tokens"):
    model.apply(cfg, params, np.zeros((2, 1), np.int32), cache=full)
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply(cfg, params, np.zeros((2, 1), np.int32), cache=cache,
                segment_ids_BT=np.ones((2, 1), np.int32))


def test_init_cache_shapes_and_errors():
  cfg = tiny_config(n_kv_heads=2, head_dim=6, max_seq_len=32)
  cache = model.init_cache(cfg, 3)
  assert cache.k_LBSKH.shape == cache.v_LBSKH.shape == (2, 3, 32, 2, 6)
  assert cache.k_LBSKH.dtype == jnp.float32 and cache.lengths_B.dtype == jnp.int32
  assert cache.max_len == 32 and (np.asarray(cache.lengths_B) == 0).all()
  assert model.init_cache(cfg, 1, 8, dtype="bfloat16").k_LBSKH.dtype == jnp.bfloat16
  assert model.init_cache(cfg.replace(dtype="bfloat16"), 1, 8).v_LBSKH.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="exceeds the learned position table"):
    model.init_cache(cfg, 1, 33)
  assert model.init_cache(cfg.replace(position="rope"), 1, 33).max_len == 33  # no table
  with pytest.raises(ValueError, match="batch_size"):
    model.init_cache(cfg, 0, 8)
  axes = model.cache_logical_axes()
  assert tuple(axes.k_LBSKH) == ("layers", "batch", "length", "kv_heads", "head_dim")
  # The cache is a pytree: it crosses jit and lax.scan as a carry.
  assert len(jax.tree.leaves(cache)) == 3
