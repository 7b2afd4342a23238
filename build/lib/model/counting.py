"""Parameter and FLOP counts, exact (from shapes) and textbook estimates."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from model.api import abstract_params
from model.config import ModelConfig


class ParamCount(NamedTuple):
  total: int
  non_embedding: int  # without token/position embeddings and an untied LM head (Kaplan et al.)


def count_params(cfg: ModelConfig) -> ParamCount:
  """Exact parameter counts of `cfg`, computed from its abstract params (shapes only)."""
  shapes = abstract_params(cfg)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  embedding = math.prod(shapes["embed"]["embedding"].shape)
  if "pos_embedding" in shapes:
    embedding += math.prod(shapes["pos_embedding"].shape)
  if "lm_head" in shapes:
    embedding += math.prod(shapes["lm_head"]["kernel"].shape)
  return ParamCount(total=total, non_embedding=total - embedding)


def estimate_params(cfg: ModelConfig) -> int:
  """The textbook estimate N ~ 12 L d^2 (eq. 8.52).

  Assumes d_attn = d_model (N H = D, K = N), d_ff = 4 d_model, a non-gated
  FFN and no biases or norms: attention 4 d^2 + FFN 8 d^2 per layer.
  """
  return 12 * cfg.n_layers * cfg.d_model ** 2


def flops_per_token(cfg: ModelConfig, seq_len: int, *, lm_head: bool = True) -> float:
  """Training FLOPs per token: 6 N + 12 L T N_heads H (Kaplan et al. 2020; PaLM appendix B).

  N counts the non-embedding parameters (every matmul weight a token passes
  through), plus the D x V unembedding when `lm_head` (it is a matmul even
  when tied). The attention term counts q k^T and the weighted sum of v over
  `seq_len` keys, forward (x2) and backward (x2 more), without discounting
  the causal mask. Forward only is a third of this.
  """
  n = count_params(cfg).non_embedding
  if lm_head:
    n += cfg.d_model * cfg.vocab_size
  return 6.0 * n + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
