"""The optimizer: AdamW with a weight-decay mask, global-norm clipping, learning-rate schedules.

  schedule = make_schedule(config.optim, num_steps)     # step -> learning rate
  tx = make_optimizer(config.optim, num_steps)           # optax.GradientTransformation

Schedules (peak lr = optim.lr, floor = lr * optim.min_lr_ratio, linear warmup
from 0 over optim.warmup_steps in all of them):
  cosine    half-cosine decay from the peak to the floor at num_steps
  linear    linear decay from the peak to the floor at num_steps
  constant  the peak after warmup
  wsd       warmup-stable-decay: the peak until the last optim.decay_fraction
            of the steps, then linear decay to the floor
  rsqrt     lr * sqrt(warmup / step) after warmup (inverse square root)

Weight decay (decoupled, Loshchilov & Hutter 2019) applies to matrices only:
never to norm gains or biases, and to the embeddings only with
optim.decay_embeddings.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

NO_DECAY_LEAVES = ("bias", "scale")
EMBEDDING_LEAVES = ("embedding", "pos_embedding")


def make_schedule(ocfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  peak, warmup = float(ocfg.lr), int(ocfg.warmup_steps)
  floor = peak * float(ocfg.min_lr_ratio)
  kind = ocfg.schedule
  if warmup >= num_steps and kind != "constant":
    raise ValueError(f"optim.warmup_steps={warmup} must be below num_steps={num_steps}")
  decay_steps = max(num_steps - warmup, 1)
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else None
  if kind == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak)
  elif kind == "linear":
    main = optax.linear_schedule(peak, floor, decay_steps)
  elif kind == "constant":
    main = optax.constant_schedule(peak)
  elif kind == "wsd":
    decay = max(int(round(num_steps * float(ocfg.decay_fraction))), 1)
    stable = max(num_steps - warmup - decay, 0)
    main = optax.join_schedules([optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, floor, decay)], [stable])
  elif kind == "rsqrt":
    scale = max(warmup, 1)
    main = lambda step: peak * jax.lax.rsqrt((step + scale) / scale)
  else:
    raise ValueError(f"unknown optim.schedule {kind!r}")
  return optax.join_schedules([warm, main], [warmup]) if warm else main


def weight_decay_mask(params, *, decay_embeddings: bool = False):
  """A pytree of bools: True where weight decay applies (matrices; embeddings if asked)."""
  def decide(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in NO_DECAY_LEAVES:
      return False
    if name in EMBEDDING_LEAVES:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(ocfg: ml_collections.ConfigDict, num_steps: int
                   ) -> optax.GradientTransformation:
  schedule = make_schedule(ocfg, num_steps)
  parts = []
  if ocfg.grad_clip and ocfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(ocfg.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                           weight_decay=float(ocfg.weight_decay),
                           mask=lambda p: weight_decay_mask(
                               p, decay_embeddings=bool(ocfg.decay_embeddings))))
  return optax.chain(*parts)

