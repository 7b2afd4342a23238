"""Accelerator attention kernels: 'splash' (TPU), 'cudnn' (NVIDIA GPU), and 'auto'.

Both compute `attention.dense_attention`'s function of q, k, v and the model's
`Mask` (scores scaled by 1/sqrt(H)). What a kernel serves is decided when the
model is traced, from the mask's static facts (causal, window, stride,
queries_are_keys, segmented) and the layer kinds it may take.

  splash  Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
          flash attention that skips the [block x block] tiles the pattern rules out.
          Serves self-attention without a cache (`mask.queries_are_keys`): causal or
          bidirectional; global, local and strided layers; segment ids (packed
          documents); MQA/GQA, each query head reading the K/V of its kv head n // G
          (nothing repeated). The pattern of each kind is a static mask (splash's lazy
          causal and local masks; strided: a [T, T] NumPy array from `masks.allowed`,
          built at trace time); segment ids are data. q is scaled by 1/sqrt(H) before
          the kernel (splash does not scale). T is padded to the block, `attn_chunk_size`
          rounded up to a multiple of 128 (the TPU lane width splash requires); padded
          keys get a segment id of their own, padded queries are dropped. Under a mesh
          (`jax.set_mesh` and flax's logical axis rules, as the train step traces) it runs
          per shard in `shard_map`: batch over the 'batch' mesh axes, heads over 'heads'
          when the mesh divides both N and K.
          With a KV cache (the sampler's prefill and decode) the call runs the chunked
          kernel instead, which serves every mask.
  cudnn   cuDNN flash attention, `jax.nn.dot_product_attention(implementation='cudnn')`,
          with the mask in cuDNN's own terms: is_causal, a left window
          (local_window_size=(W - 1, 0)), key lengths; no [T, S] mask, except for segment
          ids, which cuDNN takes only as a boolean [B, 1, T, S] mask (added as a bias).
          Serves bfloat16/float16, H a multiple of 8 up to 256; without a cache: global
          layers (causal or bidirectional) and causal local layers, with or without
          segment ids; with a cache: one new token per row on global layers (decode).
          Anything else raises one ValueError naming what it serves (`cudnn_unsupported`).
  auto    by `jax.devices()[0].platform` when the model is traced (not stored in the
          config): 'tpu' -> splash; 'gpu' -> cudnn where it serves the call; otherwise,
          and on CPU, chunked.

A layer kind that is data (layers under `nn.scan`) selects among one static kernel per
kind the mask allows (`lax.switch`): global, local if it has a window, strided if it
has a stride (the model sets them only when some layer is of that kind).

INTERPRET is for tests only, never a config knob: when True, a kernel off its own
hardware runs emulated instead of raising: splash through the Pallas interpreter (the
same kernel code, run as XLA ops), cudnn as the same `jax.nn.dot_product_attention`
call with implementation='xla' (its arguments, i.e. the mask translation, are checked;
cuDNN itself is not). On a TPU (an NVIDIA GPU) splash (cudnn) runs natively whatever
it says.

Legend: B batch, T queries, S keys (S = T for splash), N query heads, K kv heads,
G = N / K, H head dim.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from model import flash
from model.masks import GLOBAL, LOCAL, STRIDED, Mask, allowed

INTERPRET = False  # tests only: see the module docstring
_LANES = 128  # splash's key blocks are a multiple of the TPU lane width
_CUDNN_SERVES = (
    "cudnn serves bfloat16/float16 with a head dim that is a multiple of 8 up to 256; "
    "without a KV cache: global layers (causal or bidirectional) and causal local layers, "
    "with or without segment ids; with a KV cache: one new token per row on global layers")


def platform() -> str:
  """Where the model runs: 'cpu', 'gpu' or 'tpu' (jax.devices()[0].platform)."""
  return jax.devices()[0].platform


def resolve(impl: str, q_BTNH, mask: Mask) -> str:
  """The kernel that runs for `impl`: 'auto' picks one for this platform and call."""
  if impl != "auto":
    return impl
  where = platform()
  if where == "tpu":
    return "splash"
  if where == "gpu" and cudnn_unsupported(q_BTNH, mask) is None:
    return "cudnn"
  return "chunked"


def _emulated(impl: str, own_platform: str, hardware: str) -> bool:
  """False on the kernel's own hardware; off it True under INTERPRET, else a clear error."""
  where = platform()
  if where == own_platform:
    return False
  if INTERPRET:
    return True
  raise ValueError(f"attention_impl={impl!r} needs {hardware} (platform is {where!r}); "
                   "use 'auto' (it picks the kernel for the platform), 'chunked' or 'dense'")


def _kinds(mask: Mask) -> tuple[int, ...]:
  """The kinds mask.kind can take: its value when known at trace time, else global plus
  local if the mask has a window and strided if it has a stride (a local layer needs a
  window and a strided one a stride, as ModelConfig checks)."""
  if not isinstance(mask.kind, jax.core.Tracer):
    return (int(mask.kind),)
  return (GLOBAL,) + ((LOCAL,) if mask.window else ()) + ((STRIDED,) if mask.stride else ())


def _per_kind(mask: Mask, run):
  """run(kind) for the layer's kind: one static branch per kind it may take."""
  kinds = _kinds(mask)
  if len(kinds) == 1:
    return run(kinds[0])
  index = jnp.argmax(jnp.asarray(kinds) == mask.kind)
  return lax.switch(index, [functools.partial(run, kind) for kind in kinds])


# ---- splash (TPU) --------------------------------------------------------------------------
def _splash_pattern(kind: int, t: int, *, causal: bool, window: int, stride: int):
  """The static [T, T] pattern of one kind, as a splash mask."""
  if kind == GLOBAL:
    return splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
  if kind == LOCAL:
    w = max(window, 1) - 1  # keys a query sees besides itself, on each allowed side
    return splash.LocalMask((t, t), window_size=(w, 0 if causal else w), offset=0)
  with jax.ensure_compile_time_eval():  # a NumPy array while the model is being traced
    slot_1T = jnp.arange(t)[None]
    ok_TS = allowed(slot_1T, slot_1T[0], jnp.ones((1, t), bool), jnp.zeros((1, t), jnp.int32),
                    jnp.zeros((1, t), jnp.int32), kind, causal=causal, window=window,
                    stride=stride)[0]
  return splash.NumpyMask(np.asarray(ok_TS))


def _splash_local(q_BNTH, k_BKSH, v_BKSH, *seg_BT, kind, causal, window, stride, block,
                  interpret):
  """Splash on one shard's arrays (all of them without a mesh); seg_BT optional."""
  n, t = q_BNTH.shape[1], q_BNTH.shape[2]
  pattern = _splash_pattern(kind, t, causal=causal, window=window, stride=stride)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([pattern] * n), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  if not seg_BT:
    return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
      q_BNTH, k_BKSH, v_BKSH, seg_BT[0])


def _mesh_axes(logical: str, size: int, mesh) -> tuple[str, ...] | None:
  """The mesh axes the logical rules give `logical`, or None if they do not divide `size`."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if not names or any(a not in mesh.axis_names for a in names):
    return None
  return names if size % math.prod(mesh.shape[a] for a in names) == 0 else None


def _on_mesh(fn, q_BNTH, k_BKSH, v_BKSH, *seg_BT):
  """fn per shard under the current mesh and logical rules (batch, heads); else fn itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return fn(q_BNTH, k_BKSH, v_BKSH, *seg_BT)
  batch = _mesh_axes("batch", q_BNTH.shape[0], mesh)
  heads = _mesh_axes("heads", q_BNTH.shape[1], mesh)
  if heads != _mesh_axes("kv_heads", k_BKSH.shape[1], mesh):
    heads = None  # a query head and its kv head must land on the same shard
  heads_spec = P(batch, heads, None, None)
  specs = (heads_spec,) * 3 + (P(batch, None),) * len(seg_BT)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=heads_spec, check_vma=False)(
      q_BNTH, k_BKSH, v_BKSH, *seg_BT)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, block: int = 128):
  """Same contract as `dense_attention`; with a KV cache, the chunked kernel's result."""
  if not mask.queries_are_keys:
    return flash.chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask, block=block)
  interpret = _emulated("splash", "tpu", "a TPU")
  b, t, n, h = q_BTNH.shape
  blk = _LANES * math.ceil(min(block, t) / _LANES)
  pad = blk * math.ceil(t / blk) - t

  def heads_major(x_BTXH):  # [B, T, X, H] -> [B, X, T + pad, H]
    return jnp.pad(x_BTXH, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q_BNTH = heads_major(q_BTNH * jnp.asarray(1 / math.sqrt(h), q_BTNH.dtype))
  k_BKSH, v_BKSH = heads_major(k_BSKH), heads_major(v_BSKH)
  seg_BT = ()
  if mask.segmented or pad:
    seg_BT = mask.q_segment_BT
    if pad:  # padded keys in a document of their own: no real query sees them
      pad_BT = jnp.broadcast_to(seg_BT.max(axis=1, keepdims=True) + 1, (b, pad))
      seg_BT = jnp.concatenate([seg_BT, pad_BT], axis=1)
    seg_BT = (seg_BT,)

  def run(kind):
    fn = functools.partial(_splash_local, kind=kind, causal=mask.causal, window=mask.window,
                           stride=mask.stride, block=blk, interpret=interpret)
    return _on_mesh(fn, q_BNTH, k_BKSH, v_BKSH, *seg_BT)

  o_BNTH = _per_kind(mask, run)
  return o_BNTH.transpose(0, 2, 1, 3)[:, :t].astype(q_BTNH.dtype)


# ---- cuDNN (NVIDIA GPU) --------------------------------------------------------------------
def cudnn_unsupported(q_BTNH, mask: Mask) -> str | None:
  """Why cudnn cannot serve this call, in one line naming what it serves; None if it can."""
  t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
  kinds = _kinds(mask)
  problem = None
  if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
    problem = f"dtype {q_BTNH.dtype}"
  elif h % 8 or h > 256:
    problem = f"head dim {h}"
  elif mask.queries_are_keys:
    if STRIDED in kinds:
      problem = "strided layers"
    elif LOCAL in kinds and not mask.causal:
      problem = "bidirectional local layers"
  elif t != 1:
    problem = f"{t} new tokens per row with a KV cache"
  elif kinds != (GLOBAL,):
    problem = "local or strided layers with a KV cache"
  elif mask.segmented:
    problem = "segment ids with a KV cache"
  if problem is None:
    return None
  return f"attention_impl='cudnn' does not serve {problem}: {_CUDNN_SERVES}; 'chunked' serves all"


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask):
  """Same contract as `dense_attention`, on cuDNN (see the module docstring)."""
  implementation = "xla" if _emulated("cudnn", "gpu", "an NVIDIA GPU") else "cudnn"
  problem = cudnn_unsupported(q_BTNH, mask)
  if problem:
    raise ValueError(problem)
  if not mask.queries_are_keys:
    # One new token per row at slot p: it sees the valid keys (a prefix) up to p.
    kv_len_B = mask.kv_valid_BS.sum(-1, dtype=jnp.int32)
    if mask.causal:
      kv_len_B = jnp.minimum(kv_len_B, mask.q_slot_BT[:, 0] + 1)
    o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, key_value_seq_lengths=kv_len_B,
                                          implementation=implementation)
    return jnp.where((kv_len_B > 0)[:, None, None, None], o_BTNH, 0).astype(q_BTNH.dtype)
  same_doc_B1TS = None
  if mask.segmented:
    same_doc_B1TS = (mask.q_segment_BT[:, :, None] == mask.kv_segment_BS[:, None, :])[:, None]

  def run(kind):
    window = None if kind == GLOBAL else (max(mask.window, 1) - 1, 0)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=same_doc_B1TS,
                                        is_causal=mask.causal, local_window_size=window,
                                        implementation=implementation)

  return _per_kind(mask, run).astype(q_BTNH.dtype)
