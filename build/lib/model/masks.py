"""One description of which keys each query may attend to.

Every attention kernel asks the same question through `allowed`: may the query
at key-axis slot t attend to the key at slot s? The answer combines

  causal:   s <= t                                   (eq. 8.33; off: bidirectional)
  local:    t - s < window                           (sliding window, itself included)
  strided:  t - s < stride  or  (t - s) % stride == 0  (Child et al. 2019)
  segments: segment[t] == segment[s]                 (packed documents stay apart)
  valid:    key s holds data (inside the KV cache's filled length, not padding)

Slots are indices along the key axis, not model positions: in a packed row the
positions restart per document but slots keep counting, so a document's
window is measured in the same units as its positions.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

GLOBAL, LOCAL, STRIDED = 0, 1, 2
KIND_IDS = {"global": GLOBAL, "local": LOCAL, "strided": STRIDED}


@flax.struct.dataclass
class Mask:
  """The mask of one attention call; a pytree so it can cross `jit` and `scan`.

  q_slot_BT: key-axis slot of each query (int32).
  kv_valid_BS: which keys hold data (bool).
  q_segment_BT, kv_segment_BS: document ids (int32); equal everywhere when
    the batch is not packed.
  kind: attention kind of this layer (GLOBAL, LOCAL or STRIDED); an array so
    that scanned layers can differ.
  queries_are_keys: the T queries are the T keys themselves (query t at slot t,
    every key valid): self-attention without a cache. Static, like `segmented`
    (segment ids were given), for the kernels that take their pattern as
    compile-time facts (model/kernels.py).
  Kernels may rely on kv_valid_BS being a prefix of each row (as `build` makes it).
  """

  q_slot_BT: jnp.ndarray
  kv_valid_BS: jnp.ndarray
  q_segment_BT: jnp.ndarray
  kv_segment_BS: jnp.ndarray
  kind: jnp.ndarray
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  window: int = flax.struct.field(pytree_node=False, default=0)
  stride: int = flax.struct.field(pytree_node=False, default=0)
  queries_are_keys: bool = flax.struct.field(pytree_node=False, default=False)
  segmented: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def build(cls, *, batch: int, q_slot_BT, kv_len: int, causal: bool = True,
            kind=GLOBAL, window: int = 0, stride: int = 0, segment_ids_BT=None,
            kv_length_B=None) -> Mask:
    """Mask for queries at `q_slot_BT` over `kv_len` keys at slots 0..kv_len-1.

    `q_slot_BT=None`: the queries are the keys (slots 0..kv_len-1).
    `segment_ids_BT` (self-attention only: T == kv_len) separates documents;
    `kv_length_B` marks keys at slots >= kv_length_B[b] as empty.
    """
    queries_are_keys = q_slot_BT is None and kv_length_B is None
    if q_slot_BT is None:
      q_slot_BT = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    kv_slot_S = jnp.arange(kv_len)
    if kv_length_B is None:
      kv_valid_BS = jnp.ones((batch, kv_len), bool)
    else:
      kv_valid_BS = kv_slot_S[None, :] < jnp.asarray(kv_length_B)[:, None]
    if segment_ids_BT is None:
      q_segment_BT = jnp.zeros(q_slot_BT.shape, jnp.int32)
      kv_segment_BS = jnp.zeros((batch, kv_len), jnp.int32)
    else:
      q_segment_BT = kv_segment_BS = jnp.asarray(segment_ids_BT, jnp.int32)
    return cls(jnp.asarray(q_slot_BT, jnp.int32), kv_valid_BS, q_segment_BT, kv_segment_BS,
               jnp.asarray(kind, jnp.int32), causal, window, stride, queries_are_keys,
               segment_ids_BT is not None)

  def with_kind(self, kind) -> Mask:
    return self.replace(kind=jnp.asarray(kind, jnp.int32))


def allowed(q_slot_BT, kv_slot_S, kv_valid_BS, q_segment_BT, kv_segment_BS, kind, *,
            causal: bool, window: int, stride: int) -> jnp.ndarray:
  """[B, T, S] bool: may query t attend to key s? (see the module docstring)."""
  dist_BTS = q_slot_BT[:, :, None] - kv_slot_S[None, None, :]
  ok = kv_valid_BS[:, None, :] & (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :])
  if causal:
    ok &= dist_BTS >= 0
  else:
    dist_BTS = jnp.abs(dist_BTS)
  local = dist_BTS < max(window, 1)
  strided = (dist_BTS < max(stride, 1)) | (dist_BTS % max(stride, 1) == 0)
  return ok & jnp.where(kind == LOCAL, local, jnp.where(kind == STRIDED, strided, True))


def dense_allowed(mask: Mask) -> jnp.ndarray:
  """The whole [B, T, S] boolean mask."""
  kv_slot_S = jnp.arange(mask.kv_valid_BS.shape[1])
  return allowed(mask.q_slot_BT, kv_slot_S, mask.kv_valid_BS, mask.q_segment_BT,
                 mask.kv_segment_BS, mask.kind, causal=mask.causal, window=mask.window,
                 stride=mask.stride)
