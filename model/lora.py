"""LoRA (Hu et al. 2021): merge, unmerge, count, train and share low-rank adapters.

The forward pass with adapters is h = x W + (alpha / r) x A B (eq. 8.54):
A [in, r] random, B [r, out] zero at init, so a fresh adapter is the base
model. Adapters live in their own pytree (the 'lora' collection, mirroring the
params tree: {..., 'q': {'a': [L, D, r], 'b': [L, r, N H]}}), made by
`model.init_lora(cfg, rng)` and used by `model.apply(..., lora=adapters)`.

  merged = merge(cfg, params, lora)           # W + (alpha / r) A B: a plain model
  base = unmerge(cfg, merged, lora)           # back, within float32 rounding
  counts = count(params, lora)                # trainable (adapters) vs total
  step = make_train_step(loss_fn, optax.adam(1e-3))
  lora, opt_state, loss = step(params, lora, opt_state, batch)   # only adapters move
  save_adapters(path, cfg, lora); cfg, lora = load_adapters(path, cfg)
  lora = restore_adapters(workdir)            # the 'lora' item of a workdir checkpoint
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from model.config import ModelConfig

ADAPTERS_FILE = "adapters.safetensors"
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


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
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    flat[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def merge(cfg: ModelConfig, params, lora):
  """A new params tree with every adapter folded in: W <- W + (alpha / r) A B.

  The merged tree runs with cfg.replace(lora_rank=0) (or with lora=None) and
  gives the adapted model's logits; the input params are left untouched.
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


# ---- training only the adapters -------------------------------------------------------
LossFn = Callable[..., jax.Array]  # loss_fn(params, lora, batch) -> scalar


def value_and_grad(loss_fn: LossFn):
  """(params, lora, batch) -> (loss, grads w.r.t. lora only); the base params are constants."""
  def fn(params, lora, batch):
    frozen = jax.lax.stop_gradient(params)
    return jax.value_and_grad(lambda adapters: loss_fn(frozen, adapters, batch))(lora)

  return fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
  """A jitted step (params, lora, opt_state, batch) -> (lora, opt_state, loss).

  The optimizer state is `optimizer.init(lora)`: it exists for adapters only.
  """
  grad_fn = value_and_grad(loss_fn)

  @jax.jit
  def step(params, lora, opt_state, batch):
    loss, grads = grad_fn(params, lora, batch)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step


# ---- sharing adapters apart from the base model ----------------------------------------
def _adapter_path(path: str) -> str:
  return os.path.join(path, ADAPTERS_FILE) if not path.endswith(".safetensors") else path


def save_adapters(path: str, cfg: ModelConfig, lora) -> str:
  """Write the adapters alone to `path` (a directory, or a .safetensors file).

  Tensors are named by their tree path ('layers/attn/q/a'); the metadata
  holds the LoRA fields and the base model's config, so `load_adapters`
  can refuse adapters made for another model. Returns the file written.
  """
  from safetensors.numpy import save_file

  _scale(cfg)
  file = _adapter_path(path)
  os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
  tensors = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(lora).items()}
  base = cfg.replace(lora_rank=0, lora_targets=()).to_dict()
  metadata = {"lora": json.dumps({f: cfg.to_dict()[f] for f in LORA_FIELDS}),
              "base_model": json.dumps(base, sort_keys=True)}
  save_file(tensors, file, metadata=metadata)
  return file


def load_adapters(path: str, cfg: ModelConfig | None = None):
  """(cfg with the adapters' LoRA fields, adapters) from `save_adapters` output.

  With `cfg` (the base model's config), a mismatch of any architectural
  field raises a ValueError naming the fields; without it, the config
  recorded in the file is returned.
  """
  import ml_dtypes  # noqa: F401  (registers bfloat16 for numpy)
  from safetensors import safe_open

  file = _adapter_path(path)
  if not os.path.exists(file):
    raise FileNotFoundError(f"load_adapters: no adapter file at {file}")
  with safe_open(file, framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {tuple(name.split("/")): f.get_tensor(name) for name in f.keys()}
  if "lora" not in metadata or "base_model" not in metadata:
    raise ValueError(f"load_adapters: {file} has no LoRA metadata; was it written by "
                     "model.lora.save_adapters?")
  recorded = ModelConfig.from_dict(json.loads(metadata["base_model"]))
  if cfg is not None:
    ours = cfg.replace(lora_rank=0, lora_targets=()).to_dict()
    differ = sorted(k for k, v in recorded.to_dict().items()
                    if k not in LORA_FIELDS and ours[k] != v and k not in _NUMERICS_FIELDS)
    if differ:
      raise ValueError(f"load_adapters: the adapters in {file} were made for another model; "
                       f"fields that differ: {differ}")
    recorded = cfg
  adapted = recorded.replace(**json.loads(metadata["lora"]))
  return adapted, traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in tensors.items()})


# Fields that change how a model runs, not which weights it has.
_NUMERICS_FIELDS = ("attention_impl", "attn_chunk_size", "dropout_rate", "attn_dropout_rate",
                    "scan_layers", "remat", "dtype")


def restore_adapters(workdir: str, step: int | None = None):
  """(cfg, adapters, step) from the 'lora' item of a workdir checkpoint, without the base."""
  import orbax.checkpoint as ocp

  from model.api import init_lora
  from train import workdir as wd

  cfg = wd.load_model_config(workdir)
  _scale(cfg)
  step = wd.latest_step(workdir) if step is None else step
  if step is None:
    raise wd.WorkdirError(f"workdir {workdir!r} has no checkpoint")
  abstract = jax.eval_shape(lambda: init_lora(cfg, jax.random.PRNGKey(0)))
  if "lora" not in wd.checkpoint_items(workdir, step):
    raise wd.WorkdirError(f"checkpoint {step} of {workdir!r} holds no 'lora' item")
  with ocp.CheckpointManager(wd.checkpoint_dir(workdir)) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        lora=ocp.args.StandardRestore(abstract)))
  return cfg, restored["lora"], step
