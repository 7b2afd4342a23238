"""Whole forward passes against the NumPy reference (tests/numpy_reference.py), same params.

Each config switches on a different set of features; together they cover every position kind,
norm, norm placement, FFN, head layout (MHA/GQA/MQA, fused qkv), tied and untied heads,
attention patterns, bidirectional attention, Llama 3 RoPE scaling and q/k/v-only biases. float32
vs float64, tolerance 1e-5.
"""

import jax
import numpy as np
import pytest

import model
from model import abstract_params
from tests import numpy_reference as ref
from tests.conftest import tiny_config

CONFIGS = {
    "gpt2": tiny_config(),  # learned positions, pre-LayerNorm, GELU, biases, tied
    "relu-post-sinusoidal": tiny_config(ffn="relu", norm_placement="post", position="sinusoidal",
                                        tie_embeddings=False),
    "llama": tiny_config(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2,
                         attn_bias=False, mlp_bias=False, tie_embeddings=False),
    "phi3-mqa-fused": tiny_config(position="rope", rope_theta=500.0, norm="rmsnorm",
                                  ffn="swiglu", n_kv_heads=1, fused_qkv=True, fused_gate_up=True,
                                  tie_embeddings=False, attn_bias=False, mlp_bias=False),
    "nopos-gelu_exact-head_dim": tiny_config(position="none", ffn="gelu_exact", n_heads=6,
                                             head_dim=6, n_kv_heads=2),  # N H != D, G != K
    "patterns-geglu": tiny_config(n_layers=3, attention_pattern=("global", "local", "strided"),
                                  window_size=3, sparse_stride=3, ffn="geglu", position="rope"),
    # Llama 3's rescaled RoPE frequencies; Qwen2's biases on q/k/v but not o.
    "llama3-rope-qkv-bias": tiny_config(
        position="rope", rope_theta=500.0, norm="rmsnorm", ffn="swiglu", n_kv_heads=2,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        attn_bias=True, o_bias=False, mlp_bias=False, tie_embeddings=False),
    "bidirectional": tiny_config(causal=False, n_layers=3,
                                 attention_pattern=("global", "local", "strided"),
                                 window_size=2, sparse_stride=4),
}
TOKENS_BT = np.random.RandomState(0).randint(0, 61, (2, 11))
_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_intermediates")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy_reference(name):
  cfg = CONFIGS[name]
  params = ref.random_params(abstract_params(cfg), seed=1)
  logits, _, inter = _apply(cfg, params, TOKENS_BT, return_intermediates=True)
  expected, alphas = ref.forward(cfg, ref.convert_params(cfg, params), TOKENS_BT,
                                 return_alphas=True)
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  # The attention weights the model used are the reference's alpha_ij, layer by layer.
  np.testing.assert_allclose(inter["layers"]["attn"]["attn_weights"], alphas, atol=1e-5)


def test_o_bias_false_keeps_the_qkv_biases_only():
  """Qwen2's layout: q, k, v have biases, the output projection o has none."""
  attn = abstract_params(CONFIGS["llama3-rope-qkv-bias"])["layers"]["attn"]
  assert [name for name in ("q", "k", "v", "o") if "bias" in attn[name]] == ["q", "k", "v"]


def test_forward_with_params_from_model_init():
  """The params model.init makes (biases 0, gains 1) run the reference forward; unrolled
  layers; and count_params counts exactly the arrays init makes."""
  cfg = CONFIGS["phi3-mqa-fused"].replace(attn_bias=True, scan_layers=False)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(3))
  expected = ref.forward(cfg, ref.convert_params(cfg, params), TOKENS_BT)
  np.testing.assert_allclose(_apply(cfg, params, TOKENS_BT)[0], expected, atol=1e-5)
  assert model.count_params(cfg).total == sum(x.size for x in jax.tree.leaves(params))
