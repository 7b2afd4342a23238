"""A pure-function decoder-only transformer language model (JAX + Flax Linen).

  from model import ModelConfig, get_preset, init, apply, init_cache
  cfg = get_preset("nanogpt-baby")
  params = init(cfg, jax.random.PRNGKey(0))
  logits_BTV, _ = apply(cfg, params, tokens_BT)

Shape legend (the whole table: model/README.md): B batch, T query positions,
S key positions, D d_model, N query heads, K kv heads, G = N/K, H head dim,
F ffn hidden, V vocab, L layers.

The workdir format every package shares (config.json, tokenizers, checkpoints,
atomic writes) is the `model.store` subpackage; Hugging Face interop is `model.hf`.
"""

from model.api import (
    abstract_params,
    apply,
    init,
    init_lora,
    layer_params,
    logical_axes,
    normalize,
    stack_layers,
    unembed,
    unstack_layers,
)
from model.cache import KVCache, cache_logical_axes, init_cache
from model.config import ModelConfig
from model.counting import ParamCount, count_params, estimate_params, flops_per_token
from model.presets import PRESETS, get_preset
from model.summary import summary

__all__ = [
    "KVCache", "ModelConfig", "PRESETS", "ParamCount", "abstract_params", "apply",
    "cache_logical_axes", "count_params", "estimate_params", "flops_per_token", "get_preset",
    "init", "init_cache", "init_lora", "layer_params", "logical_axes", "normalize",
    "stack_layers", "summary", "unembed", "unstack_layers",
]
