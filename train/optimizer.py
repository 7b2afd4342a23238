"""The optimizer: AdamW or Muon + AdamW, a weight-decay mask, global-norm clipping, schedules.

  schedule = make_schedule(config.optim, num_steps)     # step -> learning rate
  tx = make_optimizer(config.optim, num_steps)           # optax.GradientTransformation

optim.name selects the update rule:
  adamw     AdamW on every parameter.
  muon      Muon (Jordan 2024, optax.contrib.scale_by_muon: Nesterov momentum whose update
            is orthogonalized by a Newton-Schulz iteration, U S V^T -> U V^T, scaled by
            sqrt(max(1, O / I))) on the hidden matrices, peak lr optim.muon_lr; AdamW
            (optim.lr) on everything else: embeddings, the LM head, norm gains, biases.
            `muon_labels` is the split. Scanned layers stack each matrix on a leading L
            axis ([L, I, O]): the L axis is a batch axis of the orthogonalization, so each
            layer's matrix is orthogonalized on its own, never the stack as one matrix.

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
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

NO_DECAY_LEAVES = ("bias", "scale")
EMBEDDING_LEAVES = ("embedding", "pos_embedding")


def make_schedule(ocfg: ml_collections.ConfigDict, num_steps: int, peak: float | None = None
                  ) -> optax.Schedule:
  """The schedule's shape with peak optim.lr (or `peak`: Muon's matrices use optim.muon_lr)."""
  peak = float(ocfg.lr if peak is None else peak)
  warmup = int(ocfg.warmup_steps)
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


def _in_block(path) -> bool:
  """Under a transformer block: 'layers' (scanned) or 'layers_<i>' (unrolled)."""
  return any(getattr(k, "key", "") == "layers" or str(getattr(k, "key", "")).startswith(
      "layers_") for k in path)


def muon_labels(params):
  """'muon' for the blocks' matrices (kernels with >= 2 axes), 'adamw' for everything else."""
  def label(path, x):
    name = getattr(path[-1], "key", str(path[-1]))
    return "muon" if name == "kernel" and x.ndim >= 2 and _in_block(path) else "adamw"

  return jax.tree_util.tree_map_with_path(label, params)


def muon_dimensions(params):
  """Each Muon matrix w_IO (or a stack w_LIO) as (I, O) = its last two axes; others batch."""
  return jax.tree.map(lambda x: MuonDimensionNumbers(reduction_axis=x.ndim - 2,
                                                     output_axis=x.ndim - 1), params)


def _adamw(ocfg: ml_collections.ConfigDict, schedule: optax.Schedule
           ) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                     weight_decay=float(ocfg.weight_decay),
                     mask=lambda p: weight_decay_mask(
                         p, decay_embeddings=bool(ocfg.decay_embeddings)))


def _muon(ocfg: ml_collections.ConfigDict, schedule: optax.Schedule
          ) -> optax.GradientTransformation:
  # Inside optax.partition the other leaves are MaskedNodes (empty subtrees), so the
  # dimension numbers computed from the updates cover exactly the Muon leaves.
  return optax.chain(
      scale_by_muon(beta=float(ocfg.muon_momentum), ns_steps=int(ocfg.muon_ns_steps),
                    weight_dimension_numbers=muon_dimensions),
      scale_by_shape(weight_dimension_numbers=muon_dimensions),
      optax.add_decayed_weights(float(ocfg.weight_decay)),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(ocfg: ml_collections.ConfigDict, num_steps: int
                   ) -> optax.GradientTransformation:
  schedule = make_schedule(ocfg, num_steps)
  parts = []
  if ocfg.grad_clip and ocfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(ocfg.grad_clip)))
  if ocfg.name == "adamw":
    parts.append(_adamw(ocfg, schedule))
  elif ocfg.name == "muon":
    muon_schedule = make_schedule(ocfg, num_steps, peak=float(ocfg.muon_lr))
    parts.append(optax.partition({"muon": _muon(ocfg, muon_schedule),
                                  "adamw": _adamw(ocfg, schedule)}, muon_labels))
  else:
    raise ValueError(f"unknown optim.name {ocfg.name!r}; choose from ('adamw', 'muon')")
  return optax.chain(*parts)

