"""The logit lens (nostalgebraist 2020): read every layer's residual stream as logits.

  lens = logit_lens(cfg, params, tokens_BT, targets_BT=...)
  lens.logits_RBTV  [R, B, T, V]   R = L + 1 readouts: the embeddings (the stream entering
                                   layer 0), then the stream after each of the L layers
  lens.target_rank_RBT, lens.target_prob_RBT, lens.top_ids_RBTK, lens.top_probs_RBTK

Each readout goes through the model's own final norm (pre-norm models) and
unembedding: logits_r = LN_f(x_r) W_U. The last readout is therefore exactly
the model's output logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.interp.losses import run_with_intermediates
from model.config import ModelConfig
from model.layers import Embed, dtype_of, make_linear, make_norm


def unembed(cfg: ModelConfig, params, resid_BTD):
  """Logits [..., T, V] float32 of a residual stream [..., T, D]: final norm (pre-norm) then
  the LM head, the model's own modules."""
  lead = resid_BTD.shape[:-2]
  x = resid_BTD.reshape((-1,) + resid_BTD.shape[-2:])
  return _unembed_BTD(cfg, params, x).reshape(lead + (x.shape[1], cfg.vocab_size))


def _unembed_BTD(cfg: ModelConfig, params, x):
  if cfg.norm_placement == "pre":
    x = make_norm(cfg, "final_norm").apply({"params": params["final_norm"]}, x)
  if cfg.tie_embeddings:
    embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype_of(cfg.dtype),
                  dtype_of(cfg.param_dtype))
    return embed.apply({"params": params["embed"]}, x, method=Embed.attend)
  head = make_linear(cfg.replace(dtype="float32", lora_rank=0), "lm_head", cfg.vocab_size,
                     ("embed", "vocab"), use_bias=False)
  return head.apply({"params": params["lm_head"]}, x.astype(jnp.float32))


@dataclasses.dataclass
class LogitLens:
  """Readouts of the residual stream; row r = 0 is the embeddings, r = l + 1 after layer l."""

  labels: list[str]
  logits_RBTV: np.ndarray
  target_rank_RBT: np.ndarray   # 0 = the target is the top token
  target_prob_RBT: np.ndarray
  top_ids_RBTK: np.ndarray
  top_probs_RBTK: np.ndarray


def readout_labels(n_layers: int) -> list[str]:
  return ["embed"] + [f"layer {i}" for i in range(n_layers)]


def logit_lens(cfg: ModelConfig, params, tokens_BT, *, targets_BT=None, lora=None,
               top_k: int = 5) -> LogitLens:
  """Logit lens of tokens_BT; targets_BT default to the next tokens (the last position's
  target is the model's own final prediction)."""
  logits_BTV, sown = run_with_intermediates(cfg, params, tokens_BT, lora=lora)
  resid_RBTD = jnp.concatenate([sown["resid_pre"][:1], sown["resid_post"]], axis=0)
  logits_RBTV = jax.jit(unembed, static_argnums=0)(cfg, params, resid_RBTD)
  if targets_BT is None:
    tokens_BT = jnp.asarray(tokens_BT)
    targets_BT = jnp.concatenate([tokens_BT[:, 1:], logits_BTV[:, -1:].argmax(-1)], axis=1)
  targets_BT = jnp.asarray(targets_BT)
  logprobs_RBTV = jax.nn.log_softmax(logits_RBTV, axis=-1)
  target_logit_RBT = jnp.take_along_axis(logits_RBTV, targets_BT[None, ..., None], -1)[..., 0]
  rank_RBT = (logits_RBTV > target_logit_RBT[..., None]).sum(-1)
  target_prob_RBT = jnp.exp(jnp.take_along_axis(logprobs_RBTV, targets_BT[None, ..., None],
                                                -1)[..., 0])
  top_logprobs, top_ids = jax.lax.top_k(logprobs_RBTV, top_k)
  return LogitLens(readout_labels(cfg.n_layers), np.asarray(logits_RBTV), np.asarray(rank_RBT),
                   np.asarray(target_prob_RBT), np.asarray(top_ids),
                   np.exp(np.asarray(top_logprobs)))
