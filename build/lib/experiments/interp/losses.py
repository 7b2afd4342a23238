"""Jitted forward passes and per-token next-token losses for the analyses.

  losses_BT = token_losses(cfg, params, tokens_BT, interventions=...)
  # losses_BT[b, t] = -log p(tokens[b, t + 1] | tokens[b, :t + 1]), shape [B, T - 1]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import model
from model.interventions import layer_intermediates


@functools.partial(jax.jit, static_argnums=0)
def _run(cfg, params, tokens_BT, interventions):
  logits_BTV, _, sown = model.apply(cfg, params, tokens_BT, interventions=interventions,
                                    return_intermediates=True)
  return logits_BTV, layer_intermediates(cfg, sown)


def run_with_intermediates(cfg, params, tokens_BT, *, interventions=None):
  """(logits_BTV, {name: [L, ...]}) from one jitted forward (see model.interventions)."""
  return _run(cfg, params, jnp.asarray(tokens_BT, jnp.int32), interventions)


def next_token_losses(logits_BTV, tokens_BT):
  """Cross-entropy of each next token: [B, T - 1] (position t predicts token t + 1)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], tokens_BT[:, 1:])


@functools.partial(jax.jit, static_argnums=0)
def _losses(cfg, params, tokens_BT, interventions):
  logits_BTV, _ = model.apply(cfg, params, tokens_BT, interventions=interventions)
  return next_token_losses(logits_BTV, tokens_BT)


def token_losses(cfg, params, tokens_BT, *, interventions=None):
  """Per-token next-token losses [B, T - 1] of the (possibly intervened on) model."""
  return _losses(cfg, params, jnp.asarray(tokens_BT, jnp.int32), interventions)
