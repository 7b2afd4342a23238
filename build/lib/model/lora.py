"""LoRA (Hu et al. 2021): the adapters' arithmetic: merge, unmerge, count.

The forward pass with adapters is h = x W + (alpha / r) x A B (eq. 8.54):
A [I, R] random, B [R, O] zero at init, so a fresh adapter is the base model.
Adapters live in their own pytree (the 'lora' collection, mirroring the params
tree: {..., 'q': {'a': [L, D, R], 'b': [L, R, N H]}}), made by
`model.init_lora(cfg, rng)` and used by `model.apply(..., lora=adapters)`.

  merged = merge(cfg, params, lora)           # W + (alpha / r) A B: a plain model
  base = unmerge(cfg, merged, lora)           # back, within float32 rounding
  counts = count(params, lora)                # trainable (adapters) vs total

Consumers (the sampler, interpretability, export) read a LoRA workdir through
`model.store.load_params`, which merges once at load; training the adapters is
train/tasks.py's LoraTask; sharing them as a file is model/store/adapters.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from model.config import ModelConfig

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def without_lora(cfg: ModelConfig) -> ModelConfig:
  """The base model's config: no adapters."""
  return cfg.replace(lora_rank=0, lora_targets=()) if cfg.lora_rank else cfg


def _scale(cfg: ModelConfig) -> float:
  if not cfg.lora_rank:
    raise ValueError("LoRA: cfg.lora_rank is 0; the config has no adapters")
  return cfg.lora_alpha / cfg.lora_rank


def _fold(cfg: ModelConfig, params, lora, sign: float):
  """params with each adapted kernel W replaced by W + sign (alpha / r) A B."""
  scale = sign * _scale(cfg)
  flat = traverse_util.flatten_dict(params)
  adapters = traverse_util.flatten_dict(lora)
  for path, a in adapters.items():
    if path[-1] != "a":
      continue
    kernel_path = path[:-1] + ("kernel",)
    if kernel_path not in flat:
      raise ValueError(f"LoRA: adapter {'/'.join(path[:-1])} has no kernel in the params")
    b = adapters[path[:-1] + ("b",)]
    kernel = flat[kernel_path]
    delta = jnp.einsum("...IR,...RO->...IO", a.astype(jnp.float32), b.astype(jnp.float32))
    flat[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def merge(cfg: ModelConfig, params, lora):
  """A new params tree with every adapter folded in: W <- W + (alpha / r) A B.

  The merged tree runs with `without_lora(cfg)` (or with lora=None) and gives
  the adapted model's logits; the input params are left untouched.
  """
  return _fold(cfg, params, lora, +1.0)


def unmerge(cfg: ModelConfig, merged, lora):
  """The base params back from merged ones: W <- W - (alpha / r) A B (float32 rounding)."""
  return _fold(cfg, merged, lora, -1.0)


class LoraCount(NamedTuple):
  trainable: int  # adapter parameters
  total: int      # base + adapters

  @property
  def fraction(self) -> float:
    return self.trainable / self.total

  def __str__(self) -> str:
    return (f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.fraction:.3f}%)")


def count(params, lora) -> LoraCount:
  """Trainable (adapter) vs total (base + adapter) parameter counts; shapes suffice."""
  def n(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

  return LoraCount(trainable=n(lora), total=n(params) + n(lora))
