"""Induction heads (Olsson et al. 2022): scores on repeated random token sequences.

A repeated sequence is [bos?] r_1 .. r_h r_1 .. r_h with h distinct random
tokens. In the second copy the token at position t last occurred at t - h;
an induction head attends from t to the token right after that occurrence,
t - h + 1, and copies it, predicting the next token.

  induction score  mean attention weight from each second-copy position t to
                   t - h + 1                                          [L, N]
  previous-token   mean attention weight from t to t - 1 (the first half
  score            of the induction circuit)                          [L, N]
  copying score    how much the head's OV circuit raises the logit of the
                   token it attends to: the eigenvalue score
                   sum(lambda) / sum(|lambda|) of W_E' W_V W_O W_U'
                   (+1: a pure copier, -1: an anti-copier)            [L, N]
  in-context       loss at a late token minus loss at an early token;
  learning score   negative when the context helps
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import model
from model.config import ModelConfig


@dataclasses.dataclass
class Repeated:
  """tokens_BT = [bos?] r r: the first copy starts at `start`, the second at start + half."""

  tokens_BT: np.ndarray
  half: int
  start: int

  @property
  def second_copy(self) -> slice:
    return slice(self.start + self.half, self.start + 2 * self.half)


def repeated_tokens(rng: np.random.Generator, batch: int, half: int, token_ids,
                    bos_id: int | None = None) -> Repeated:
  """`batch` rows of `half` distinct tokens drawn from token_ids, repeated twice."""
  token_ids = np.asarray(token_ids)
  if len(token_ids) < half:
    raise ValueError(f"repeated_tokens: {half} distinct tokens per row need at least that many "
                     f"token ids, got {len(token_ids)}")
  rows = np.stack([rng.choice(token_ids, half, replace=False) for _ in range(batch)])
  tokens = np.concatenate([rows, rows], axis=1)
  if bos_id is not None:
    tokens = np.concatenate([np.full((batch, 1), bos_id), tokens], axis=1)
  return Repeated(tokens.astype(np.int32), half, 0 if bos_id is None else 1)


def induction_scores(attn_weights_LBNTS, rep: Repeated) -> np.ndarray:
  """[L, N]: mean weight from second-copy positions t to t - half + 1."""
  t_Q = np.arange(rep.second_copy.start, rep.second_copy.stop)
  w = np.asarray(attn_weights_LBNTS)[:, :, :, t_Q, t_Q - rep.half + 1]  # [L, B, N, Q]
  return w.mean(axis=(1, 3))


def previous_token_scores(attn_weights_LBNTS, start: int = 0) -> np.ndarray:
  """[L, N]: mean weight from every position t > start to t - 1."""
  t = np.asarray(attn_weights_LBNTS).shape[-2]
  t_Q = np.arange(start + 1, t)
  return np.asarray(attn_weights_LBNTS)[:, :, :, t_Q, t_Q - 1].mean(axis=(1, 3))


def head_ov_factors(cfg: ModelConfig, params, layer: int, head: int, token_ids=None):
  """(A [V', H], B [H, V']): the head's OV circuit from token to logits is A B [V', V'].

  A = attn_norm(E) W_V[head]: what the head reads from a position holding each token;
  B = W_O[head] LN_f W_U: what writing that value does to each logit, with the final
  norm linearized (its centering and gain; the 1/sigma factor is positive and omitted).
  V' = token_ids (all tokens by default). A's rows and B's columns are centred over V'.
  """
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size
  lp = model.layer_params(cfg, params, layer)
  embed_VD = jnp.asarray(params["embed"]["embedding"], jnp.float32)
  if token_ids is not None:
    embed_VD = embed_VD[jnp.asarray(token_ids)]
  x_VD = embed_VD
  if cfg.norm_placement == "pre":
    x_VD = model.normalize(cfg, lp["attn_norm"], embed_VD[None])[0]
  attn = lp["attn"]
  w_v = attn["qkv"]["kernel"][:, (n + k) * h:] if cfg.fused_qkv else attn["v"]["kernel"]
  kv = head // (n // k)
  w_v_DH = jnp.asarray(w_v, jnp.float32)[:, kv * h:(kv + 1) * h]
  w_o_HD = jnp.asarray(attn["o"]["kernel"], jnp.float32)[head * h:(head + 1) * h]
  if cfg.norm_placement == "pre":
    if cfg.norm == "layernorm":
      w_o_HD = w_o_HD - w_o_HD.mean(-1, keepdims=True)
    w_o_HD = w_o_HD * jnp.asarray(params["final_norm"]["scale"], jnp.float32)
  if cfg.tie_embeddings:
    w_u_DV = jnp.asarray(params["embed"]["embedding"], jnp.float32).T
  else:
    w_u_DV = jnp.asarray(params["lm_head"]["kernel"], jnp.float32)
  if token_ids is not None:
    w_u_DV = w_u_DV[:, jnp.asarray(token_ids)]
  a_VH = np.asarray(x_VD @ w_v_DH, np.float64)
  b_HV = np.asarray(w_o_HD @ w_u_DV, np.float64)
  # Centred over the tokens: softmax ignores a logit shift shared by all tokens, and a push
  # towards "any of these tokens" is not copying.
  return a_VH - a_VH.mean(0), b_HV - b_HV.mean(1, keepdims=True)


def copying_scores(cfg: ModelConfig, params, token_ids=None) -> np.ndarray:
  """[L, N] eigenvalue copying scores sum(lambda) / sum(|lambda|) of each head's OV circuit.

  The nonzero eigenvalues of A B [V', V'] are those of B A [H, H], so V never
  has to be squared. For a LoRA run, pass its merged params (model.store.load_params).
  """
  scores = np.zeros((cfg.n_layers, cfg.n_heads))
  for layer in range(cfg.n_layers):
    for head in range(cfg.n_heads):
      a_VH, b_HV = head_ov_factors(cfg, params, layer, head, token_ids)
      eig = np.linalg.eigvals(b_HV @ a_VH)
      total = np.abs(eig).sum()
      scores[layer, head] = eig.real.sum() / total if total > 0 else 0.0
  return scores


def copying_zscores(cfg: ModelConfig, params, resid_pre_LBTD, tokens_BT, token_ids) -> np.ndarray:
  """[L, N] measured copying: what each head would write if it attended only to position s,
  read as logits over token_ids (final norm linearized, centred), as a z-score of the logit of
  the token at s; averaged over every position of tokens_BT.

  Unlike `copying_scores`, the head reads the real residual stream at s (its value includes
  what earlier layers wrote there), so a layer-1 head copying through V-composition counts.
  """
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size
  ids = np.asarray(token_ids)
  lookup = np.full(cfg.vocab_size, -1)
  lookup[ids] = np.arange(len(ids))
  where = lookup[np.asarray(tokens_BT)]  # position -> index into token_ids (-1: not one)
  scores = np.zeros((cfg.n_layers, n))
  for layer in range(cfg.n_layers):
    lp = model.layer_params(cfg, params, layer)
    x_BTD = jnp.asarray(resid_pre_LBTD[layer])
    if cfg.norm_placement == "pre":
      x_BTD = model.normalize(cfg, lp["attn_norm"], x_BTD)
    attn = lp["attn"]
    w_v = attn["qkv"]["kernel"][:, (n + k) * h:] if cfg.fused_qkv else attn["v"]["kernel"]
    v_BTKH = np.asarray(x_BTD @ jnp.asarray(w_v, jnp.float32)).reshape(*x_BTD.shape[:2], k, h)
    if cfg.attn_bias:
      b_v = attn["qkv"]["bias"][(n + k) * h:] if cfg.fused_qkv else attn["v"]["bias"]
      v_BTKH = v_BTKH + np.asarray(b_v).reshape(k, h)
    for head in range(n):
      _, b_HV = head_ov_factors(cfg, params, layer, head, ids)
      logits_BTV = v_BTKH[:, :, head // (n // k)] @ b_HV
      z_BTV = (logits_BTV - logits_BTV.mean(-1, keepdims=True)) / (
          logits_BTV.std(-1, keepdims=True) + 1e-9)
      ok = where >= 0
      scores[layer, head] = np.take_along_axis(z_BTV, np.maximum(where, 0)[..., None],
                                               -1)[..., 0][ok].mean()
  return scores


def icl_score(losses_BT, early: int, late: int) -> float:
  """Olsson et al.'s in-context-learning score: mean loss at token `late` minus at `early`.

  losses_BT[:, t] is the loss of predicting token t + 1 (experiments.interp.losses).
  """
  losses_BT = np.asarray(losses_BT)
  if not 0 <= early < late < losses_BT.shape[1]:
    raise ValueError(f"icl_score: need 0 <= early < late < {losses_BT.shape[1]}, got "
                     f"early={early}, late={late}")
  return float(losses_BT[:, late].mean() - losses_BT[:, early].mean())
