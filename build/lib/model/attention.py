"""Scaled dot-product attention: one entry point, several kernels.

Shape legend
  B batch            T query positions      S key positions
  N query heads      K key/value heads      G = N / K query heads per kv head
  H head dim (d_k)

Grouped-query attention reshapes the N query heads into (K, G) and contracts
each group with its own kv head ('BTKGH,BSKH->BKGTS'): K and V are never
repeated in memory. K == N is multi-head attention, K == 1 multi-query.

Kernels (ModelConfig.attention_impl):
  dense    the textbook, eq. 8.33-8.37: scores = q k^T / sqrt(d_k), mask,
           softmax, weighted sum of v. Materializes [B, N, T, S].
  chunked  flash-style online softmax over key blocks (`model/flash.py`):
           O(T * block) memory, same outputs and gradients.
  xla      `jax.nn.dot_product_attention(implementation='xla')` with the [B, T, S] mask.
  splash   the Pallas TPU splash kernel (`model/kernels.py`; TPU only).
  cudnn    cuDNN flash attention through `jax.nn.dot_product_attention`, the mask in
           cuDNN's own terms (`model/kernels.py`; NVIDIA GPUs only).
  auto     splash on TPU, cudnn on GPU where it serves the call, chunked otherwise;
           chosen from jax.devices()[0].platform when the model is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import flash, kernels
from model.masks import Mask, dense_allowed


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, dropout_fn=None,
                    return_weights: bool = False):
  """softmax(q k^T / sqrt(d_k) + mask) v, eq. 8.33-8.37, for all heads at once.

  Returns o_BTNH (and the attention weights w_BNTS when return_weights).
  A query that may attend to no key outputs zeros.
  """
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
  ok_B11TS = dense_allowed(mask)[:, None, None]
  scores_BKGTS = jnp.where(ok_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  weights_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
  weights_BKGTS = jnp.where(ok_B11TS, weights_BKGTS, 0.0)
  if dropout_fn is not None:
    weights_BKGTS = dropout_fn(weights_BKGTS)
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", weights_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                       preferred_element_type=jnp.float32)
  o_BTNH = o_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)
  if return_weights:
    return o_BTNH, weights_BKGTS.reshape(b, n, t, -1)
  return o_BTNH


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask):
  """`jax.nn.dot_product_attention(implementation='xla')` under the whole [B, T, S] mask."""
  ok_BTS = dense_allowed(mask)
  o_BTNH = jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=ok_BTS[:, None], implementation="xla")
  return jnp.where(ok_BTS.any(-1)[:, :, None, None], o_BTNH, 0).astype(q_BTNH.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, impl: str = "dense",
              chunk_size: int = 128, dropout_fn=None):
  """Multi-/grouped-query attention of q over (k, v) under `mask`, by `impl`."""
  impl = kernels.resolve(impl, q_BTNH, mask)
  if impl == "dense":
    return dense_attention(q_BTNH, k_BSKH, v_BSKH, mask, dropout_fn=dropout_fn)
  if impl == "chunked":
    return flash.chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask, block=chunk_size)
  if impl == "xla":
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask)
  if impl == "splash":
    return kernels.splash_attention(q_BTNH, k_BSKH, v_BSKH, mask, block=chunk_size)
  if impl == "cudnn":
    return kernels.cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask)
  raise ValueError(f"unknown attention impl {impl!r}")
