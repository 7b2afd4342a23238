"""Parameter and FLOP counts: known model sizes, embeddings, 12 L d^2, FLOPs per token.

count_params against the arrays model.init really makes: test_model_reference.py (untied,
unrolled, fused) and test_model_transformer.py (tied, scanned).
"""

import math

import jax
import pytest

import model
from model import count_params, estimate_params, flops_per_token, get_preset
from tests.conftest import tiny_config


def test_gpt2_small_matches_hugging_face():
  # sum(p.numel() for p in GPT2LMHeadModel.from_pretrained("gpt2").parameters()), tied head.
  assert count_params(get_preset("gpt2-small")).total == 124_439_808


def test_phi3_mini_matches_hugging_face():
  # microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters (untied head).
  counts = count_params(get_preset("phi3-mini"))
  assert counts.total == 3_821_079_552
  assert counts.non_embedding == 3_821_079_552 - 2 * 32064 * 3072


def test_llama_tiny_by_hand():
  v, d, n_layers, h, k, f = 32000, 256, 4, 32, 2, 704
  per_layer = d * 8 * h + 2 * d * k * h + 8 * h * d + 3 * d * f + 2 * d  # q, k v, o, ffn, norms
  assert count_params(get_preset("llama-tiny")).total == 2 * v * d + n_layers * per_layer + d


@pytest.mark.parametrize("overrides,embedding", [
    (dict(position="learned", tie_embeddings=True), lambda c: (c.vocab_size + c.max_seq_len)
     * c.d_model),
    (dict(position="sinusoidal", tie_embeddings=True), lambda c: c.vocab_size * c.d_model),
    (dict(position="rope", tie_embeddings=False), lambda c: 2 * c.vocab_size * c.d_model),
    (dict(position="learned", tie_embeddings=False), lambda c: (2 * c.vocab_size
                                                                + c.max_seq_len) * c.d_model),
], ids=["learned-tied", "sinusoidal-tied", "rope-untied", "learned-untied"])
def test_non_embedding_excludes_exactly_embeddings_positions_and_untied_head(overrides, embedding):
  cfg = tiny_config(**overrides)
  counts = count_params(cfg)
  assert counts.total - counts.non_embedding == embedding(cfg)
  # The blocks and the final norm are what remains.
  shapes = model.abstract_params(cfg)
  blocks = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["layers"]))
  assert counts.non_embedding == blocks + sum(math.prod(x.shape)
                                              for x in jax.tree.leaves(shapes["final_norm"]))


def test_12_l_d_squared_estimate_and_its_assumptions():
  """Eq. 8.52 counts 4 d^2 (attention) + 8 d^2 (FFN with d_ff = 4d) per layer and drops biases
  and norms. For a config meeting its assumptions (K = N, N H = d, d_ff = 4d, non-gated)
  the exact count differs by exactly those terms."""
  gpt2 = get_preset("gpt2-small")
  d, n_layers = gpt2.d_model, gpt2.n_layers
  assert estimate_params(gpt2) == 12 * n_layers * d ** 2 == 84_934_656
  # biases: q, k, v, o (4d), up (4d), down (d); LayerNorm gains and biases: 2 x 2d per layer;
  # the final LayerNorm: 2d.
  assert count_params(gpt2).non_embedding == estimate_params(gpt2) + n_layers * 13 * d + 2 * d
  bare = gpt2.replace(attn_bias=False, mlp_bias=False, norm="rmsnorm")
  assert count_params(bare).non_embedding == estimate_params(bare) + n_layers * 2 * d + d
  # Off its assumptions the estimate is only an estimate (phi3-mini: gated FFN of 8192).
  phi = get_preset("phi3-mini")
  assert estimate_params(phi) != count_params(phi).non_embedding


def test_flops_per_token():
  """6 N (N: non-embedding params + the d x V unembedding matmul) + 12 L T N_heads H."""
  gpt2 = get_preset("gpt2-small")
  n = 85_056_000 + 768 * 50257
  assert flops_per_token(gpt2, 1024) == 6 * n + 12 * 12 * 1024 * 12 * 64
  assert flops_per_token(gpt2, 1024, lm_head=False) == 6 * 85_056_000 + 12 * 12 * 1024 * 768
  # The attention term grows linearly with the context.
  assert (flops_per_token(gpt2, 2048) - flops_per_token(gpt2, 1024)
          == 12 * 12 * 1024 * 12 * 64)
