"""int8 weight-only quantization: per-output-channel symmetric int8 weights, float32 scales.

  qparams = quantize(params)                      # every matmul kernel -> int8 + scale
  qparams = quantize(params, embeddings=True)     # the token embedding too (per row)
  params = dequantize(qparams)                    # float32 again (within rounding)
  logits_BTV, _ = model.apply(cfg, qparams, tokens_BT)   # runs as is

A kernel W [..., I, O] becomes `kernel` int8 [..., I, O] and `kernel_scale`
float32 [..., 1, O] with s_O = max_I |W_IO| / 127 and W_q = round(W / s): the
layers compute y = (x W_q) s_O, the scale applied after the dot, exact per
output channel. The embedding E [V, D] gets one scale per row (`embedding_scale`
[V, 1]): a row scale for the lookup and an output-channel scale for the tied
LM head x E^T alike. Biases, norms and position tables stay float (small).

A quantized tree keeps the model's structure (scanned layers stack the scales
like the kernels), so `model.apply`, the sampler and `model.store` take it as is;
a workdir records its quantization in config.json ("quantize" section, written
by `model.hf import --quantize=int8`). The weights use a quarter of the memory;
the compute converts them to the compute dtype inside the matmul (native int8
and bf16 dots on accelerators; on CPU see sample/README.md for the measured cost).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8")
SCALE_SUFFIX = "_scale"


def _quantize_leaf(w, axis: int):
  """(int8 weights, float32 scales with `axis` kept as 1): symmetric, absmax / 127."""
  w = jnp.asarray(w, jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


_quantize_jit = jax.jit(_quantize_leaf, static_argnums=1)


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
  return mode


def quantize(params, *, embeddings: bool = False):
  """Every matmul `kernel` (and the `embedding` when asked) as int8 + a float32 scale.

  Kernels [..., I, O] get a scale per output channel ([..., 1, O]); the embedding
  [V, D] one per row ([V, 1]). Works on arrays and on ShapeDtypeStructs (under
  jax.eval_shape: the abstract tree a quantized checkpoint restores into).
  """
  if is_quantized(params):
    raise ValueError("quantize: the params are already quantized")

  def walk(tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        out[key] = walk(value)
      elif key == "kernel" and value.ndim >= 2:
        out[key], out[key + SCALE_SUFFIX] = _quantize_jit(value, value.ndim - 2)
      elif key == "embedding" and embeddings:
        out[key], out[key + SCALE_SUFFIX] = _quantize_jit(value, value.ndim - 1)
      else:
        out[key] = value
    return out

  return walk(params)


def dequantize(params):
  """The float32 tree back: W = W_q * s (a no-op on a tree that is not quantized)."""

  def walk(tree):
    out = {}
    for key, value in tree.items():
      if key.endswith(SCALE_SUFFIX) and key[:-len(SCALE_SUFFIX)] in tree:
        continue
      if isinstance(value, Mapping):
        out[key] = walk(value)
      elif key + SCALE_SUFFIX in tree:
        out[key] = value.astype(jnp.float32) * tree[key + SCALE_SUFFIX]
      else:
        out[key] = value
    return out

  return walk(params)


def is_quantized(params) -> bool:
  """Whether any weight of the tree is int8 with a scale."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(str(getattr(path[-1], "key", "")).endswith(SCALE_SUFFIX) for path, _ in flat)


def param_bytes(params) -> int:
  """Bytes the tree's arrays occupy."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(params)))
