"""Sampling strategies on crafted distributions: top-k and top-p keep exactly the right
tokens, and sampled frequencies match the distribution (chi-square, fixed seed)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sample.strategies import Greedy, Sampling, Temperature, TopK, TopP, filter_logits, next_tokens

PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05


def kept(sampling, probs=PROBS):
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  out = filter_logits(logits, sampling.kind, sampling.values())
  return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())


@pytest.mark.parametrize("p, expected", [
    (0.4, {1}), (0.5, {1}), (0.75, {1, 3}), (0.79, {1, 3}), (0.85, {1, 3, 2}),
    (0.9, {1, 3, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p, expected):
  assert kept(TopP(p)) == expected


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 2}), (4, {0, 1, 2, 3}),
                                         (10, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(k, expected):
  assert kept(TopK(k)) == expected


def test_top_k_then_top_p_renormalizes_between_them():
  # After top-2 the distribution is (0.625, 0.375): p=0.6 keeps one token, p=0.7 both.
  assert kept(Sampling(1.0, top_k=2, top_p=0.6)) == {1}
  assert kept(Sampling(1.0, top_k=2, top_p=0.7)) == {1, 3}
  # Temperature comes first: at t=0.5 the probabilities become p^2 / sum p^2 =
  # (0.0068, 0.6757, 0.0608, 0.2432), so p=0.9 now keeps only two tokens.
  assert kept(Sampling(0.5, top_p=0.9)) == {1, 3}


@functools.partial(jax.jit, static_argnums=(1, 3))
def draws(logits_V, kind, values, n, seed=0):
  keys_N = jax.random.split(jax.random.PRNGKey(seed), n)
  return next_tokens(jnp.broadcast_to(logits_V, (n, logits_V.shape[0])), keys_N, kind, values)


def sample_counts(sampling, logits_V, n=20000, seed=0):
  tokens = draws(jnp.asarray(logits_V, jnp.float32), sampling.kind, sampling.values(), n, seed)
  return np.bincount(np.asarray(tokens), minlength=len(logits_V))


def test_top_k_never_emits_outside_the_k_most_likely():
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (50,))) * 2
  top5 = set(np.argsort(-logits)[:5].tolist())
  counts = sample_counts(TopK(5, temperature=2.0), logits, n=5000)
  assert set(np.flatnonzero(counts).tolist()) == top5


@pytest.mark.parametrize("sampling, expected", [
    (Temperature(1.0), PROBS),
    (Temperature(0.5), PROBS ** 2 / (PROBS ** 2).sum()),
    (TopK(2), np.array([0, 0.5, 0, 0.3]) / 0.8),
    (TopP(0.85), np.array([0, 0.5, 0.15, 0.3]) / 0.95),
])
def test_sampled_frequencies_match_the_distribution(sampling, expected):
  n = 20000
  counts = sample_counts(sampling, np.log(PROBS), n=n)
  support = expected > 0
  assert (counts[~support] == 0).all()
  _, p_value = stats.chisquare(counts[support], n * expected[support])
  assert p_value > 1e-3, (counts, n * expected)


def test_greedy_is_the_argmax():
  logits = np.log(PROBS)
  assert (sample_counts(Greedy(), logits, n=16) == [0, 16, 0, 0]).all()


def test_same_seed_same_draws_other_seed_other_draws():
  logits = jnp.zeros((7,))
  kind, values = Temperature().kind, Temperature().values()
  a, b, c = (np.asarray(draws(logits, kind, values, 64, s)) for s in (0, 0, 1))
  assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_values_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sampling(**kwargs)


def test_strategies_are_frozen_and_hashable():
  assert TopK(5) == TopK(5) and hash(TopK(5)) == hash(TopK(5))
  assert TopK(5).top_k == 5 and TopP(0.9).top_p == 0.9 and Greedy().is_greedy
  with pytest.raises(AttributeError):
    TopK(5).top_k = 3
