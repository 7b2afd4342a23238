"""Chunked attention with an online softmax (FlashAttention, Dao et al. 2022).

The same function as `attention.dense_attention`, computed one
[block x block] tile at a time so that nothing of size [T, S] is ever held:

  for each query block i, for each key block j it may see:
    s   = q_i k_j^T / sqrt(H)                  (masked entries -> -inf)
    m'  = max(m, rowmax(s))
    l   = l e^(m - m') + rowsum(e^(s - m'))
    acc = acc e^(m - m') + e^(s - m') v_j
  o_i = acc / l,  lse_i = m + log l

The backward pass (FlashAttention-2) recomputes the tiles from q, k, v and
the saved row log-sum-exp instead of storing the weights:

  p = e^(s - lse),  D = rowsum(dO * O),  ds = p (dO v^T - D)
  dq = ds k / sqrt(H),  dk = ds^T q / sqrt(H),  dv = p^T dO

Key blocks that the mask rules out for a whole query block (the future under
a causal mask, the far past of a sliding window) are skipped by the loop
bounds, so causal attention does about half the dense work and a window of
W keys costs O(T * W).

Legend: B batch, T queries, S keys, K kv heads, G query heads per kv head,
H head dim, Q = query block, C = key block, nq/nk numbers of blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from model.masks import LOCAL, Mask, allowed

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without NaNs


def chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, block: int = 128):
  """Same contract as `dense_attention`, with O(T * block) memory."""
  b, t, n, h = q_BTNH.shape
  s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
  bq, bk = min(block, t), min(block, s)
  tp, sp = math.ceil(t / bq) * bq, math.ceil(s / bk) * bk
  nq = tp // bq

  def pad_to(x, length, axis, mode="constant"):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)

  q_BTKGH = pad_to(q_BTNH, tp, 1).reshape(b, nq, bq, kh, n // kh, h)
  q_nBKGQH = q_BTKGH.transpose(1, 0, 3, 4, 2, 5)
  # Padded queries copy the last real slot so they do not widen the loop bounds.
  q_slot_nBQ = pad_to(mask.q_slot_BT, tp, 1, "edge").reshape(b, nq, bq).transpose(1, 0, 2)
  q_seg_nBQ = pad_to(mask.q_segment_BT, tp, 1, "edge").reshape(b, nq, bq).transpose(1, 0, 2)
  k = pad_to(k_BSKH, sp, 1)
  v = pad_to(v_BSKH, sp, 1)
  kv_valid_BS = pad_to(mask.kv_valid_BS, sp, 1)
  kv_seg_BS = pad_to(mask.kv_segment_BS, sp, 1)

  statics = (mask.causal, mask.window, mask.stride, bk)
  o_nBKGQH = _flash(statics, q_nBKGQH, k, v, q_slot_nBQ, q_seg_nBQ, kv_valid_BS, kv_seg_BS,
                    mask.kind)
  o_BTNH = o_nBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, h)
  return o_BTNH[:, :t]


def _key_block_range(q_slot_BQ, kind, *, nk, bk, causal, window):
  """[lo, hi): the key blocks that can hold an allowed key for this query block."""
  first, last = q_slot_BQ.min(), q_slot_BQ.max()
  w = max(window, 1)
  if causal:
    hi = last // bk + 1
  else:
    hi = jnp.where(kind == LOCAL, (last + w - 1) // bk + 1, nk)
  lo = jnp.where(kind == LOCAL, jnp.maximum((first - w + 1) // bk, 0), 0)
  hi = jnp.clip(hi, 0, nk)
  return lo, jnp.maximum(hi, lo)


def _tile(statics, q_BKGQH, k_BSKH, q_slot_BQ, q_seg_BQ, kv_valid_BS, kv_seg_BS, kind, j):
  """Scores and mask of query block vs key block j: s_BKGQC (float32), ok_B11QC."""
  causal, window, stride, bk = statics
  h = q_BKGQH.shape[-1]
  k_BCKH = lax.dynamic_slice_in_dim(k_BSKH, j * bk, bk, axis=1)
  s_BKGQC = jnp.einsum("BKGQH,BCKH->BKGQC", q_BKGQH, k_BCKH,
                       preferred_element_type=jnp.float32) / math.sqrt(h)
  ok_BQC = allowed(q_slot_BQ, j * bk + jnp.arange(bk),
                   lax.dynamic_slice_in_dim(kv_valid_BS, j * bk, bk, axis=1), q_seg_BQ,
                   lax.dynamic_slice_in_dim(kv_seg_BS, j * bk, bk, axis=1), kind,
                   causal=causal, window=window, stride=stride)
  return s_BKGQC, ok_BQC[:, None, None], k_BCKH


def _forward(statics, q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS,
             kv_seg_BS, kind):
  causal, window, _, bk = statics
  nk = k_BSKH.shape[1] // bk

  def one_query_block(args):
    q_BKGQH, q_slot_BQ, q_seg_BQ = args
    qf = q_BKGQH.astype(jnp.float32)

    def step(j, carry):
      m_BKGQ, l_BKGQ, acc_BKGQH = carry
      s, ok, _ = _tile(statics, q_BKGQH, k_BSKH, q_slot_BQ, q_seg_BQ, kv_valid_BS, kv_seg_BS,
                       kind, j)
      s = jnp.where(ok, s, _NEG)
      m_new = jnp.maximum(m_BKGQ, s.max(-1))
      p_BKGQC = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m_BKGQ - m_new)
      v_BCKH = lax.dynamic_slice_in_dim(v_BSKH, j * bk, bk, axis=1)
      pv = jnp.einsum("BKGQC,BCKH->BKGQH", p_BKGQC, v_BCKH.astype(jnp.float32))
      return m_new, l_BKGQ * correction + p_BKGQC.sum(-1), acc_BKGQH * correction[..., None] + pv

    init = (jnp.full(qf.shape[:-1], _NEG), jnp.zeros(qf.shape[:-1]), jnp.zeros(qf.shape))
    lo, hi = _key_block_range(q_slot_BQ, kind, nk=nk, bk=bk, causal=causal, window=window)
    m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(lo, hi, step, init)
    seen = l_BKGQ > 0
    denom_BKGQ = jnp.where(seen, l_BKGQ, 1.0)
    o_BKGQH = jnp.where(seen[..., None], acc_BKGQH / denom_BKGQ[..., None], 0.0)
    lse_BKGQ = jnp.where(seen, m_BKGQ + jnp.log(denom_BKGQ), 0.0)
    return o_BKGQH, lse_BKGQ

  return lax.map(one_query_block, (q_nBKGQH, q_slot_nBQ, q_seg_nBQ))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(statics, q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS, kv_seg_BS,
           kind):
  o, _ = _forward(statics, q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS,
                  kv_seg_BS, kind)
  return o.astype(q_nBKGQH.dtype)


def _flash_fwd(statics, q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS, kv_seg_BS,
               kind):
  o, lse = _forward(statics, q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS,
                    kv_seg_BS, kind)
  residuals = (q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS, kv_seg_BS, kind,
               o, lse)
  return o.astype(q_nBKGQH.dtype), residuals


def _flash_bwd(statics, residuals, do_nBKGQH):
  (q_nBKGQH, k_BSKH, v_BSKH, q_slot_nBQ, q_seg_nBQ, kv_valid_BS, kv_seg_BS, kind, o_nBKGQH,
   lse_nBKGQ) = residuals
  causal, window, _, bk = statics
  nk = k_BSKH.shape[1] // bk
  h = q_nBKGQH.shape[-1]
  scale = 1.0 / math.sqrt(h)
  vf = v_BSKH.astype(jnp.float32)

  def one_query_block(dkv, args):
    q_BKGQH, q_slot_BQ, q_seg_BQ, o_BKGQH, lse_BKGQ, do_BKGQH = args
    qf, dof = q_BKGQH.astype(jnp.float32), do_BKGQH.astype(jnp.float32)
    d_BKGQ = jnp.sum(dof * o_BKGQH, -1)

    def step(j, carry):
      dq_BKGQH, (dk_BSKH, dv_BSKH) = carry
      s, ok, k_BCKH = _tile(statics, q_BKGQH, k_BSKH, q_slot_BQ, q_seg_BQ, kv_valid_BS,
                            kv_seg_BS, kind, j)
      p_BKGQC = jnp.where(ok, jnp.exp(s - lse_BKGQ[..., None]), 0.0)
      v_BCKH = lax.dynamic_slice_in_dim(vf, j * bk, bk, axis=1)
      dv_BCKH = jnp.einsum("BKGQC,BKGQH->BCKH", p_BKGQC, dof)
      dp_BKGQC = jnp.einsum("BKGQH,BCKH->BKGQC", dof, v_BCKH)
      ds_BKGQC = p_BKGQC * (dp_BKGQC - d_BKGQ[..., None]) * scale
      dq_BKGQH = dq_BKGQH + jnp.einsum("BKGQC,BCKH->BKGQH", ds_BKGQC,
                                       k_BCKH.astype(jnp.float32))
      dk_BCKH = jnp.einsum("BKGQC,BKGQH->BCKH", ds_BKGQC, qf)

      def add(acc, delta):
        return lax.dynamic_update_slice_in_dim(
            acc, lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=1) + delta, j * bk, axis=1)

      return dq_BKGQH, (add(dk_BSKH, dk_BCKH), add(dv_BSKH, dv_BCKH))

    lo, hi = _key_block_range(q_slot_BQ, kind, nk=nk, bk=bk, causal=causal, window=window)
    dq_BKGQH, dkv = lax.fori_loop(lo, hi, step, (jnp.zeros_like(qf), dkv))
    return dkv, dq_BKGQH

  zeros = jnp.zeros(k_BSKH.shape, jnp.float32)
  (dk, dv), dq = lax.scan(
      one_query_block, (zeros, zeros),
      (q_nBKGQH, q_slot_nBQ, q_seg_nBQ, o_nBKGQH, lse_nBKGQ, do_nBKGQH))
  return (dq.astype(q_nBKGQH.dtype), dk.astype(k_BSKH.dtype), dv.astype(v_BSKH.dtype),
          None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
