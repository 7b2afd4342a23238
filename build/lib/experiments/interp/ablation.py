"""Ablation study on repeated sequences: which heads does copying depend on?

  study = ablation_study(cfg, params, rep, top_heads=[(1, 0), (1, 3)])

Losses are means over the predictable tokens of the second copy (every
token of it but the first, which nothing in the context announces), for the
intact model, with each head zero-ablated in turn, with the chosen (top
induction) heads ablated together, and with as many of the heads scored
lowest ablated together as a control.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.interp.induction import Repeated
from experiments.interp.losses import token_losses
from model import interventions as iv_lib
from model.config import ModelConfig


def repeated_half(rep: Repeated) -> slice:
  """Loss indices (t predicts t + 1) of the second copy's predictable tokens."""
  return slice(rep.start + rep.half, rep.start + 2 * rep.half - 1)


def first_half(rep: Repeated) -> slice:
  """Loss indices of the first copy's tokens after its first (no repeat to copy from)."""
  return slice(rep.start, rep.start + rep.half - 1)


@dataclasses.dataclass
class AblationStudy:
  intact_loss: float            # second copy, intact model
  intact_first_half_loss: float  # first copy: what the model does without anything to copy
  head_loss_LN: np.ndarray      # second copy, head (l, n) ablated alone
  top_heads: list[tuple[int, int]]
  top_loss: float               # second copy, all top_heads ablated
  control_heads: list[tuple[int, int]]
  control_loss: float           # second copy, as many low-scoring heads ablated
  intact_curve_T: np.ndarray    # mean loss per position, intact
  top_curve_T: np.ndarray       # mean loss per position, top_heads ablated


@functools.partial(jax.jit, static_argnums=0)
def _each_head(cfg, params, tokens_BT, scales_by_head):
  def one(scale_LN):
    ivs = iv_lib.Interventions(head_scale_LN=scale_LN)
    return token_losses(cfg, params, tokens_BT, interventions=ivs).mean(0)

  return jax.lax.map(one, scales_by_head)


def each_head_ablated(cfg: ModelConfig, params, tokens_BT) -> np.ndarray:
  """Mean loss per position [L, N, T - 1] with each head zero-ablated alone (one compile)."""
  n_heads = cfg.n_layers * cfg.n_heads
  scales_by_head = 1.0 - jnp.eye(n_heads).reshape(n_heads, cfg.n_layers, cfg.n_heads)
  curves = _each_head(cfg, params, jnp.asarray(tokens_BT, jnp.int32), scales_by_head)
  return np.asarray(curves).reshape(cfg.n_layers, cfg.n_heads, -1)


def ablation_study(cfg: ModelConfig, params, rep: Repeated, top_heads, *,
                   scores_LN=None) -> AblationStudy:
  """Losses on rep's second copy, intact and ablated (see the module docstring).

  The control ablates as many other heads from the same layers as top_heads, those with
  the lowest scores_LN (default: the last in order); heads of other layers fill in when
  those layers have too few.
  """
  top_heads = [tuple(map(int, h)) for h in top_heads]
  second, first = repeated_half(rep), first_half(rep)
  intact_T = np.asarray(token_losses(cfg, params, rep.tokens_BT)).mean(0)
  per_head_LNT = each_head_ablated(cfg, params, rep.tokens_BT)
  top_T = np.asarray(token_losses(cfg, params, rep.tokens_BT,
                                  interventions=iv_lib.ablate_heads(cfg, top_heads))).mean(0)
  order = (np.argsort(np.asarray(scores_LN), axis=None) if scores_LN is not None
           else np.arange(cfg.n_layers * cfg.n_heads)[::-1])
  candidates = [tuple(int(i) for i in np.unravel_index(j, (cfg.n_layers, cfg.n_heads)))
                for j in order]
  top_layers = {layer for layer, _ in top_heads}
  others = [h for h in candidates if h not in top_heads]
  control = ([h for h in others if h[0] in top_layers] +
             [h for h in others if h[0] not in top_layers])[:len(top_heads)]
  control_T = np.asarray(token_losses(cfg, params, rep.tokens_BT,
                                      interventions=iv_lib.ablate_heads(cfg, control))).mean(0)
  return AblationStudy(
      intact_loss=float(intact_T[second].mean()),
      intact_first_half_loss=float(intact_T[first].mean()),
      head_loss_LN=per_head_LNT[:, :, second].mean(-1),
      top_heads=top_heads, top_loss=float(top_T[second].mean()),
      control_heads=control, control_loss=float(control_T[second].mean()),
      intact_curve_T=intact_T, top_curve_T=top_T)
