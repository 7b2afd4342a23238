"""The logit lens (nostalgebraist 2020): read every layer's residual stream as logits.

  lens = logit_lens(cfg, params, tokens_BT, targets_BT=...)
  lens.logits_UBTV  [U, B, T, V]   U = L + 1 readouts: the embeddings (the stream entering
                                   layer 0), then the stream after each of the L layers
  lens.target_rank_UBT, lens.target_prob_UBT, lens.top_ids_UBTZ, lens.top_probs_UBTZ

Each readout goes through the model's own final norm (pre-norm models) and
unembedding: logits_r = LN_f(x_r) W_U. The last readout is therefore exactly
the model's output logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import model
from experiments.interp.losses import run_with_intermediates
from model.config import ModelConfig


def unembed(cfg: ModelConfig, params, resid_BTD):
  """Logits [..., T, V] float32 of a residual stream [..., T, D]: the model's own final norm
  (pre-norm) and LM head (model.unembed)."""
  lead = resid_BTD.shape[:-2]
  x = resid_BTD.reshape((-1,) + resid_BTD.shape[-2:])
  return model.unembed(cfg, params, x).reshape(lead + (x.shape[1], cfg.vocab_size))


@dataclasses.dataclass
class LogitLens:
  """Readouts of the residual stream; row r = 0 is the embeddings, r = l + 1 after layer l."""

  labels: list[str]
  logits_UBTV: np.ndarray
  target_rank_UBT: np.ndarray   # 0 = the target is the top token
  target_prob_UBT: np.ndarray
  top_ids_UBTZ: np.ndarray
  top_probs_UBTZ: np.ndarray


def readout_labels(n_layers: int) -> list[str]:
  return ["embed"] + [f"layer {i}" for i in range(n_layers)]


def logit_lens(cfg: ModelConfig, params, tokens_BT, *, targets_BT=None,
               top_k: int = 5) -> LogitLens:
  """Logit lens of tokens_BT; targets_BT default to the next tokens (the last position's
  target is the model's own final prediction)."""
  logits_BTV, sown = run_with_intermediates(cfg, params, tokens_BT)
  resid_UBTD = jnp.concatenate([sown["resid_pre"][:1], sown["resid_post"]], axis=0)
  logits_UBTV = jax.jit(unembed, static_argnums=0)(cfg, params, resid_UBTD)
  if targets_BT is None:
    tokens_BT = jnp.asarray(tokens_BT)
    targets_BT = jnp.concatenate([tokens_BT[:, 1:], logits_BTV[:, -1:].argmax(-1)], axis=1)
  targets_BT = jnp.asarray(targets_BT)
  logprobs_UBTV = jax.nn.log_softmax(logits_UBTV, axis=-1)
  target_logit_UBT = jnp.take_along_axis(logits_UBTV, targets_BT[None, ..., None], -1)[..., 0]
  rank_UBT = (logits_UBTV > target_logit_UBT[..., None]).sum(-1)
  target_prob_UBT = jnp.exp(jnp.take_along_axis(logprobs_UBTV, targets_BT[None, ..., None],
                                                -1)[..., 0])
  top_logprobs, top_ids = jax.lax.top_k(logprobs_UBTV, top_k)
  return LogitLens(readout_labels(cfg.n_layers), np.asarray(logits_UBTV), np.asarray(rank_UBT),
                   np.asarray(target_prob_UBT), np.asarray(top_ids),
                   np.exp(np.asarray(top_logprobs)))
