"""The KV cache: an explicit pytree passed into `apply` and returned by it.

k_LBSKH, v_LBSKH hold the keys and values of every layer at key-axis slots
0..S-1; lengths_B counts the filled slots of each row. `apply` with a cache
writes its T new tokens at slots lengths_B .. lengths_B + T - 1 and returns
lengths_B + T. Slots are positions, so a row's prompt of length P followed by
decoded tokens occupies slots 0..P+n-1, whatever its padding.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  k_LBSKH: jnp.ndarray
  v_LBSKH: jnp.ndarray
  lengths_B: jnp.ndarray

  @property
  def max_len(self) -> int:
    """S: slots per row."""
    return self.k_LBSKH.shape[2]

  def check_room(self, new_tokens: int):
    """Raise if writing `new_tokens` more would overflow a row (when lengths are known)."""
    if new_tokens > self.max_len:
      raise ValueError(f"KV cache overflow: {new_tokens} new tokens do not fit in a cache of "
                       f"{self.max_len} slots")
    if isinstance(self.lengths_B, jax.core.Tracer):
      return  # Under jit the caller checks capacity (the sampler does, before decoding).
    longest = int(np.max(np.asarray(self.lengths_B))) + new_tokens
    if longest > self.max_len:
      raise ValueError(
          f"KV cache overflow: a row would hold {longest} tokens but the cache has "
          f"{self.max_len} slots; make the cache longer (init_cache(..., max_len=...)) "
          "or generate fewer tokens")


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None,
               dtype: str | None = None) -> KVCache:
  """An empty cache of [L, B, S, K, H] keys and values (S defaults to cfg.max_seq_len)."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  if max_len <= 0 or batch_size <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_len={max_len} must be > 0")
  if cfg.position == "learned" and max_len > cfg.max_seq_len:
    raise ValueError(f"init_cache: max_len={max_len} exceeds the learned position table "
                     f"(max_seq_len={cfg.max_seq_len})")
  shape = (cfg.n_layers, batch_size, max_len, cfg.kv_heads, cfg.head_size)
  dt = jnp.dtype(dtype or cfg.dtype)
  return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch_size,), jnp.int32))


def cache_logical_axes() -> KVCache:
  """Logical axis names of each cache array (leaves are PartitionSpecs of names)."""
  kv = P("layers", "batch", "length", "kv_heads", "head_dim")
  return KVCache(k_LBSKH=kv, v_LBSKH=kv, lengths_B=P("batch"))
