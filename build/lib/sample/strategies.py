"""Sampling strategies: small frozen dataclasses, and the one function that applies them.

Every strategy is a `Sampling(temperature, top_k, top_p)`; the named ones only
fix some of the fields:

  Greedy()                  argmax (temperature 0)
  Temperature(t)            softmax(logits / t)
  TopK(k, temperature=1)    sample among the k most likely tokens
  TopP(p, temperature=1)    nucleus: the smallest set of tokens with mass >= p
  Sampling(t, k, p)         any combination, applied in that order:
                            logits / t -> keep the top k -> keep the top-p nucleus

Temperature 0 is greedy whatever top_k and top_p say. Ties at a top-k or top-p
boundary keep every tied token (as Hugging Face does).

Inside the jitted decode loop the numbers (t, k, p) are traced arrays, so
changing them does not recompile; only the `kind` (greedy, top-k on, top-p on)
is static.

Legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature -> top-k -> top-p; temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
    if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns it off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 turns it off)")

  @property
  def is_greedy(self) -> bool:
    return self.temperature == 0

  @property
  def kind(self) -> SamplingKind:
    """The static part: what the compiled program has to do."""
    if self.is_greedy:
      return SamplingKind(greedy=True, top_k=False, top_p=False)
    return SamplingKind(greedy=False, top_k=self.top_k > 0, top_p=self.top_p < 1.0)

  def values(self) -> SamplingValues:
    """The traced part: the numbers, as arrays."""
    return SamplingValues(jnp.float32(self.temperature if self.temperature else 1.0),
                          jnp.int32(self.top_k), jnp.float32(self.top_p))


class Greedy(Sampling):
  """Always the most likely token."""

  def __init__(self):
    super().__init__(temperature=0.0)


class Temperature(Sampling):
  """Sample from softmax(logits / temperature)."""

  def __init__(self, temperature: float = 1.0):
    super().__init__(temperature=temperature)


class TopK(Sampling):
  """Sample among the k most likely tokens (after the temperature)."""

  def __init__(self, k: int, temperature: float = 1.0):
    super().__init__(temperature=temperature, top_k=k)


class TopP(Sampling):
  """Nucleus sampling: among the smallest set of most likely tokens with mass >= p."""

  def __init__(self, p: float, temperature: float = 1.0):
    super().__init__(temperature=temperature, top_p=p)


class SamplingKind(NamedTuple):
  greedy: bool
  top_k: bool
  top_p: bool


class SamplingValues(NamedTuple):
  temperature: jnp.ndarray  # f32 scalar (1 when greedy: unused)
  top_k: jnp.ndarray        # i32 scalar
  top_p: jnp.ndarray        # f32 scalar


def filter_logits(logits_BV, kind: SamplingKind, values: SamplingValues):
  """logits / t, with -inf outside the top-k and the top-p nucleus (float32 [B, V]).

  Top-p keeps sorted token i when the mass of the tokens before it is < p:
  exactly the smallest prefix of the sorted distribution with mass >= p.
  """
  logits_BV = logits_BV.astype(jnp.float32) / values.temperature
  if not (kind.top_k or kind.top_p):
    return logits_BV
  v = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  keep_sorted_BV = jnp.ones(sorted_BV.shape, bool)
  if kind.top_k:
    k = jnp.clip(values.top_k, 1, v)
    keep_sorted_BV &= jnp.arange(v) < k
  if kind.top_p:
    probs_BV = jax.nn.softmax(jnp.where(keep_sorted_BV, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV &= mass_before_BV < values.top_p
  n_kept_B = jnp.maximum(keep_sorted_BV.sum(-1), 1)
  cutoff_B1 = jnp.take_along_axis(sorted_BV, n_kept_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def next_tokens(logits_BV, keys_B, kind: SamplingKind, values: SamplingValues):
  """One token per row: argmax when greedy, else a draw from the filtered distribution.

  keys_B: one PRNG key per row (rows draw independently of the batch size).
  Returns int32 [B].
  """
  if kind.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, kind, values)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


def from_args(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampling:
  """The strategy that the keyword arguments of generate() describe."""
  return Sampling(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
