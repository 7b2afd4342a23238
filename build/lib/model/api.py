"""The model's functional surface: init, apply, abstract shapes, logical axes, readouts.

  params = init(cfg, rng)
  logits_BTV, cache = apply(cfg, params, tokens_BT, positions_BT=..., segment_ids_BT=...,
                            cache=..., deterministic=True, rng=None)
  shapes = abstract_params(cfg)               # ShapeDtypeStructs: nothing allocated
  logits_BTV = unembed(cfg, params, x_BTD)    # a residual stream read out as logits

`cfg` is hashable, so `jax.jit(apply, static_argnums=0)` works as is.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import positions as pos_lib
from model.cache import KVCache
from model.config import ModelConfig
from model.layers import Embed, dtype_of, make_linear, make_norm
from model.lora import without_lora
from model.masks import KIND_IDS, Mask
from model.transformer import Transformer


def _kinds_L(cfg: ModelConfig) -> jnp.ndarray:
  return jnp.array([KIND_IDS[k] for k in cfg.layer_kinds], jnp.int32)


def _mask(cfg: ModelConfig, **kw) -> Mask:
  """The model's mask; a window (stride) only where some layer is local (strided), so the
  kernels that build one pattern per kind (model/kernels.py) know which kinds can occur."""
  return Mask.build(causal=cfg.causal,
                    window=cfg.window_size if "local" in cfg.attention_pattern else 0,
                    stride=cfg.sparse_stride if "strided" in cfg.attention_pattern else 0, **kw)


def _init_variables(cfg: ModelConfig, rng):
  # Params do not depend on the kernel; the dense one lets a config for a GPU-only kernel
  # ('cudnn') be initialized, counted, summarized and sharded on any host.
  cfg = cfg.replace(attention_impl="dense")
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  mask = _mask(cfg, batch=1, q_slot_BT=None, kv_len=1)
  return Transformer(cfg).init({"params": rng}, tokens_BT, jnp.zeros((1, 1), jnp.int32), mask,
                               _kinds_L(cfg))


def init(cfg: ModelConfig, rng) -> dict:
  """Fresh parameters (a nested dict of arrays, layers stacked on axis 0 when scanned)."""
  return nn.unbox(_init_variables(without_lora(cfg), rng)["params"])


def init_lora(cfg: ModelConfig, rng) -> dict:
  """Fresh LoRA adapters for cfg.lora_targets: A ~ N(0, 1/r^2), B = 0."""
  if not cfg.lora_rank:
    raise ValueError("init_lora: cfg.lora_rank is 0; set lora_rank and lora_targets")
  return nn.unbox(_init_variables(cfg, rng)["lora"])


@functools.lru_cache(maxsize=64)
def _abstract_variables(cfg: ModelConfig, collection: str):
  """The boxed (logically partitioned) abstract variables of `collection`: one trace of init
  per config and collection in a process; shapes and logical axes both come from it."""
  if collection not in ("params", "lora"):
    raise ValueError(f"collection must be 'params' or 'lora', not {collection!r}")
  model_cfg = cfg if collection == "lora" else without_lora(cfg)
  return jax.eval_shape(lambda: _init_variables(model_cfg, jax.random.PRNGKey(0)))[collection]


def abstract_params(cfg: ModelConfig, collection: str = "params"):
  """The params (or 'lora') pytree as ShapeDtypeStructs (nothing is allocated)."""
  return jax.tree.map(lambda x: x, nn.unbox(_abstract_variables(cfg, collection)))


def logical_axes(cfg: ModelConfig, collection: str = "params"):
  """The params (or 'lora') pytree with a PartitionSpec of logical axis names per leaf."""
  return nn.get_partition_spec(_abstract_variables(cfg, collection))


def apply(cfg: ModelConfig, params, tokens_BT, *, positions_BT=None, segment_ids_BT=None,
          cache: KVCache | None = None, deterministic: bool = True, rng=None, lora=None,
          return_intermediates: bool = False, interventions=None):
  """Run the model on tokens_BT [B, T].

  Without a cache: causal (or bidirectional) attention over the T tokens;
  `segment_ids_BT` keeps packed documents apart, and positions then restart
  per document unless given.
  With a cache: the T tokens continue each row at slot cache.lengths_B (their
  positions by default); their K/V are written there and attention covers
  every filled slot. Returns the cache with lengths_B + T.

  `interventions` (a `model.interventions.Interventions`) scales or replaces
  chosen heads' outputs, MLP outputs or residual-stream positions.

  Returns (logits_BTV float32, cache or None), plus the sown intermediates
  (per-layer arrays stacked on a leading L axis) when return_intermediates.
  """
  tokens_BT = jnp.asarray(tokens_BT)
  if tokens_BT.ndim != 2:
    raise ValueError(f"apply: tokens_BT must be [batch, time], got shape {tokens_BT.shape}")
  b, t = tokens_BT.shape
  arange_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if cache is None:
    if cfg.position == "learned" and t > cfg.max_seq_len:
      raise ValueError(f"apply: {t} tokens exceed max_seq_len={cfg.max_seq_len} of the learned "
                       "position table")
    if positions_BT is None:
      positions_BT = arange_BT if segment_ids_BT is None else pos_lib.positions_from_segments(
          jnp.asarray(segment_ids_BT))
    mask = _mask(cfg, batch=b, q_slot_BT=None, kv_len=t, segment_ids_BT=segment_ids_BT)
    kv, cache_start_B = None, None
  else:
    if segment_ids_BT is not None:
      raise ValueError("apply: segment_ids_BT cannot be combined with a KV cache")
    cache.check_room(t)
    cache_start_B = cache.lengths_B
    slot_BT = cache_start_B[:, None] + arange_BT
    if positions_BT is None:
      positions_BT = slot_BT
    mask = _mask(cfg, batch=b, q_slot_BT=slot_BT, kv_len=cache.max_len,
                 kv_length_B=cache_start_B + t)
    kv = (cache.k_LBSKH, cache.v_LBSKH)
  positions_BT = jnp.asarray(positions_BT, jnp.int32)
  if cfg.position == "learned" and not isinstance(positions_BT, jax.core.Tracer):
    if np.asarray(positions_BT).max(initial=0) >= cfg.max_seq_len:
      raise ValueError(f"apply: a position reaches max_seq_len={cfg.max_seq_len} of the learned "
                       "position table")

  if interventions is not None:
    interventions.check(cfg, b, t)
  model_cfg = cfg if (lora is not None and cfg.lora_rank) else without_lora(cfg)
  variables = {"params": params}
  if model_cfg.lora_rank:
    variables["lora"] = lora
  rngs = {}
  if not deterministic:
    if rng is None and (cfg.dropout_rate > 0 or cfg.attn_dropout_rate > 0):
      raise ValueError("apply: deterministic=False with dropout needs an rng")
    if rng is not None:
      rngs["dropout"] = rng
  mutable = ["intermediates"] if return_intermediates else False
  out = Transformer(model_cfg, deterministic).apply(
      variables, tokens_BT, positions_BT, mask, _kinds_L(cfg), kv, cache_start_B, interventions,
      rngs=rngs, mutable=mutable)
  (logits_BTV, new_kv), state = out if return_intermediates else (out, None)
  new_cache = None
  if cache is not None:
    new_cache = KVCache(new_kv[0], new_kv[1], cache.lengths_B + t)
  if return_intermediates:
    return logits_BTV, new_cache, _flatten_sown(state["intermediates"])
  return logits_BTV, new_cache


def _flatten_sown(tree):
  """Sown values come as 1-tuples; unwrap them."""
  return jax.tree.map(lambda v: v[0] if isinstance(v, tuple) and len(v) == 1 else v, tree,
                      is_leaf=lambda v: isinstance(v, tuple))


def normalize(cfg: ModelConfig, norm_params, x_BTD):
  """One of the model's norms (LayerNorm or RMSNorm as cfg says) with its params
  (e.g. params['final_norm'], or a layer's ['attn_norm'])."""
  return make_norm(cfg, "norm").apply({"params": norm_params}, x_BTD)


def unembed(cfg: ModelConfig, params, x_BTD):
  """Logits [B, T, V] float32 of a residual stream [B, T, D]: the final norm (pre-norm
  models), then the LM head (x E^T when tied, eq. 8.46), as at the end of `apply`."""
  if cfg.norm_placement == "pre":
    x_BTD = normalize(cfg, params["final_norm"], x_BTD)
  if cfg.tie_embeddings:
    embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype_of(cfg.dtype),
                  dtype_of(cfg.param_dtype))
    return embed.apply({"params": params["embed"]}, x_BTD, method=Embed.attend)
  head = make_linear(without_lora(cfg).replace(dtype="float32"), "lm_head", cfg.vocab_size,
                     ("embed", "vocab"), use_bias=False)
  return head.apply({"params": params["lm_head"]}, x_BTD.astype(jnp.float32))


def layer_params(cfg: ModelConfig, params, layer: int):
  """The params of one block (sliced out of the stacked tree when the layers are scanned)."""
  if not 0 <= layer < cfg.n_layers:
    raise ValueError(f"layer {layer} outside [0, {cfg.n_layers})")
  if cfg.scan_layers:
    return jax.tree.map(lambda a: a[layer], params["layers"])
  return params[f"layers_{layer}"]


def unstack_layers(params, n_layers: int):
  """Scanned params ('layers' stacked on axis 0) -> unrolled ('layers_0', ..., 'layers_{L-1}')."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def stack_layers(params, n_layers: int):
  """Unrolled params ('layers_i') -> scanned ('layers' stacked on axis 0)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"layers_{i}"]
                                                           for i in range(n_layers)])
  return out
