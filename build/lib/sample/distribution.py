"""The step-by-step view: the logits of a prompt and the model's next-token distribution.

  probs, ids = top_next_tokens(cfg, params, tokenizer.encode("The capital of France is"), k=5)

One full forward pass (the prompt padded to a power of two so that prompts
of similar length share a compiled program); causal attention makes the
padding invisible to the real tokens. Legend: T tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import model
from model.config import ModelConfig
from sample.engine import MIN_PROMPT_BUCKET, bucket


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(cfg, params, tokens_1T):
  return model.apply(cfg, params, tokens_1T)[0][0]


def prompt_logits(cfg: ModelConfig, params, prompt_ids) -> np.ndarray:
  """[T, V] float32: row t holds the logits of the token after prompt_ids[:t + 1]."""
  ids = [int(i) for i in prompt_ids]
  if not ids:
    raise ValueError("prompt_logits: the prompt is empty")
  if not all(0 <= i < cfg.vocab_size for i in ids):
    raise ValueError(f"prompt_logits: token ids must lie in [0, {cfg.vocab_size})")
  if len(ids) > cfg.max_seq_len:
    raise ValueError(f"prompt_logits: {len(ids)} tokens exceed max_seq_len={cfg.max_seq_len}")
  t = min(bucket(len(ids), MIN_PROMPT_BUCKET), cfg.max_seq_len)
  tokens_1T = np.zeros((1, t), np.int32)
  tokens_1T[0, :len(ids)] = ids
  return np.asarray(_logits_jit(cfg, params, tokens_1T))[:len(ids)]


def top_next_tokens(cfg: ModelConfig, params, prompt_ids, k: int = 5, *,
                    temperature: float = 1.0):
  """The k most likely next tokens: (ids [k], probabilities [k]) under softmax(logits / t)."""
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0 for a distribution")
  logits_V = prompt_logits(cfg, params, prompt_ids)[-1]
  probs_V = np.asarray(jax.nn.softmax(jnp.asarray(logits_V) / temperature))
  k = min(int(k), cfg.vocab_size)
  ids = np.argsort(-probs_V, kind="stable")[:k]
  return ids, probs_V[ids]
