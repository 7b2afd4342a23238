"""A pure-function decoder-only transformer language model (JAX + Flax Linen).

  from model import ModelConfig, get_preset, init, apply, init_cache
  cfg = get_preset("nanogpt-baby")
  params = init(cfg, jax.random.PRNGKey(0))
  logits_BTV, _ = apply(cfg, params, tokens_BT)

Shape legend used across the package: B batch, T query positions, S key
positions, D d_model, N query heads, K kv heads, G = N/K, H head dim,
F ffn hidden, V vocab, L layers.
"""

from model.api import apply, init, init_lora, logical_axes, stack_layers, unstack_layers
from model.cache import KVCache, cache_logical_axes, init_cache
from model.config import ModelConfig
from model.counting import ParamCount, count_params, estimate_params, flops_per_token
from model.presets import PRESETS, get_preset
from model.summary import summary

__all__ = [
    "KVCache", "ModelConfig", "PRESETS", "ParamCount", "apply", "cache_logical_axes",
    "count_params", "estimate_params", "flops_per_token", "get_preset", "init", "init_cache",
    "init_lora", "logical_axes", "stack_layers", "summary", "unstack_layers",
]
