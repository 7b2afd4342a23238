"""Each component against the NumPy reference of its textbook equation (tests/numpy_reference.py).

Norms (8.22-8.25, RMSNorm), feed-forward networks (8.21, GELU, SwiGLU/GeGLU, fused), one head
(8.10-8.14), multi-head/grouped/multi-query attention (8.15-8.19, 8.35-8.37), the causal mask
in matrix form (8.32-8.34), pre- and post-norm blocks (8.26-8.31), embedding and LM head
(8.46-8.47). Params are random (gains and biases far from their init), float32, tolerance 1e-5.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import model
from model import abstract_params
from model.layers import FeedForward, LayerNorm, RMSNorm
from model.masks import Mask
from model.transformer import Block, SelfAttention
from tests import numpy_reference as ref
from tests.conftest import tiny_config

B, T = 2, 7
ATOL = 1e-5


def _x(d=32, seed=0, t=T):
  return np.random.RandomState(seed).standard_normal((B, t, d)).astype(np.float32)


def _module_params(module, *args, seed=0):
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]
  return ref.random_params(shapes, seed)


def _run(module, params, *args):
  """module.apply under jit: one compile instead of an op-by-op dispatch of every primitive."""
  return jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, *args)


def _causal_mask(t=T, **kw):
  slots = np.broadcast_to(np.arange(t), (B, t))
  return Mask.build(batch=B, q_slot_BT=slots, kv_len=t, **kw)


def test_layer_norm_eq_8_22_to_8_25():
  x = _x() * 3 + 1
  norm = LayerNorm(eps=1e-5)
  p = _module_params(norm, x)
  y = _run(norm, p, x)
  np.testing.assert_allclose(y, ref.layer_norm(x, p["scale"], p["bias"], 1e-5), atol=ATOL)
  # With gamma = 1, beta = 0 every row has mean 0 and standard deviation 1.
  unit = _run(norm, {"scale": np.ones(32), "bias": np.zeros(32)}, x)
  np.testing.assert_allclose(unit.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(unit.std(-1), 1, atol=1e-3)


def test_rms_norm():
  x = _x() * 3 + 1
  norm = RMSNorm(eps=1e-6)
  p = _module_params(norm, x)
  assert set(p) == {"scale"}
  np.testing.assert_allclose(_run(norm, p, x), ref.rms_norm(x, p["scale"], 1e-6),
                             atol=ATOL)


@pytest.mark.parametrize("overrides", [
    dict(ffn="relu", mlp_bias=True),  # eq. 8.21 exactly: max(0, x W1 + b1) W2 + b2
    dict(ffn="gelu", mlp_bias=False, d_ff=40),
    dict(ffn="gelu_exact"),
    dict(ffn="swiglu", mlp_bias=False),
    dict(ffn="geglu", mlp_bias=True, fused_gate_up=True),
    dict(ffn="swiglu", fused_gate_up=True, d_ff=24),
], ids=["relu-bias", "gelu", "gelu_exact", "swiglu", "geglu-fused-bias", "swiglu-fused"])
def test_feed_forward(overrides):
  cfg = tiny_config(**overrides)
  x = _x()
  ffn = FeedForward(cfg)
  p = _module_params(ffn, x)
  names = {"gate_up", "down"} if cfg.fused_gate_up else (
      {"gate", "up", "down"} if cfg.gated_ffn else {"up", "down"})
  assert set(p) == names
  assert all(("bias" in p[k]) == cfg.mlp_bias for k in names)
  hidden = p["down"]["kernel"].shape[0]
  assert hidden == cfg.ffn_size
  expected = ref.ffn(x, ref.convert_mlp(cfg, p), cfg.ffn)
  np.testing.assert_allclose(_run(ffn, p, x), expected, atol=ATOL)


def test_default_ffn_widths():
  assert tiny_config(ffn="gelu").ffn_size == 4 * 32
  # Gated FFNs keep the 4D parameter count: 3 D F ~ 2 D (4D), F = 8D/3 rounded up to 32.
  assert tiny_config(ffn="swiglu", d_model=96, n_heads=4).ffn_size == 256


def test_single_head_eq_8_10_to_8_14():
  """One head (N = 1, H = D): a_i = (sum_j softmax_j(q_i . k_j / sqrt(d_k)) v_j) W^O."""
  cfg = tiny_config(n_heads=1, attn_bias=False)
  x, mask = _x(), _causal_mask()
  attn = SelfAttention(cfg)
  p = _module_params(attn, x, np.zeros((B, T), np.int32), mask)
  out, _ = _run(attn, p, x, np.zeros((B, T), np.int32), mask)
  w = ref.convert_attention(cfg, p)
  ok = ref.allowed(np.arange(T), T)
  for b in range(B):
    head, alpha = ref.single_head_attention(x[b], x[b], w["q"][0], w["k"][0], w["v"][0], ok)
    np.testing.assert_allclose(out[b], head @ w["o"][0], atol=ATOL)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("overrides", [
    dict(),  # multi-head with biases
    dict(n_kv_heads=2, attn_bias=False),  # grouped-query
    dict(n_kv_heads=1, fused_qkv=True),  # multi-query, fused W_QKV with bias
    dict(head_dim=5, n_heads=3, n_kv_heads=3),  # N H != D
    dict(position="rope", n_kv_heads=2, fused_qkv=True),
], ids=["mha", "gqa", "mqa-fused", "head_dim", "rope-gqa"])
def test_multi_head_attention_eq_8_15_to_8_19(overrides):
  cfg = tiny_config(**overrides)
  x, mask = _x(), _causal_mask()
  positions = np.broadcast_to(np.arange(3, 3 + T), (B, T))
  attn = SelfAttention(cfg)
  p = _module_params(attn, x, positions, mask)
  out, _ = _run(attn, p, x, positions, mask)
  w = ref.convert_attention(cfg, p)
  assert w["k"][0].shape == (32, cfg.kv_heads * cfg.head_size)
  for b in range(B):
    expected, _ = ref.self_attention(cfg, w, x[b].astype(np.float64), positions[b],
                                     ref.allowed(np.arange(T), T))
    np.testing.assert_allclose(out[b], expected, atol=ATOL)


def test_causal_mask_matrix_form_eq_8_33():
  """softmax(Q K^T / sqrt(d_k) + M) with M = -inf above the diagonal (eq. 8.33-8.34)."""
  rng = np.random.RandomState(1)
  q, k, v = (rng.standard_normal((B, T, 2, 8)).astype(np.float32) for _ in range(3))
  dense = jax.jit(model.attention.dense_attention, static_argnames="return_weights")
  out, weights_BNTS = dense(q, k, v, _causal_mask(), return_weights=True)
  for b in range(B):
    for c in range(2):
      scores = q[b, :, c] @ k[b, :, c].T / np.sqrt(8) + ref.causal_mask(T)
      alpha = ref.softmax(scores.astype(np.float64))
      np.testing.assert_allclose(weights_BNTS[b, c], alpha, atol=1e-6)
      np.testing.assert_allclose(out[b, :, c], alpha @ v[b, :, c], atol=ATOL)
  assert (np.asarray(weights_BNTS)[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]]
          == 0).all()


@pytest.mark.parametrize("overrides", [
    dict(norm_placement="pre", norm="layernorm", ffn="gelu"),
    dict(norm_placement="post", norm="layernorm", ffn="relu"),
    dict(norm_placement="pre", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, attn_bias=False,
         mlp_bias=False),
    dict(norm_placement="post", norm="rmsnorm", ffn="gelu", attention_pattern=("local",),
         window_size=3),
], ids=["pre-ln", "post-ln", "pre-rms-swiglu-gqa", "post-rms-local"])
def test_block_eq_8_26_to_8_31(overrides):
  cfg = tiny_config(**overrides)
  x, mask = _x(), _causal_mask(window=cfg.window_size)
  kind = model.masks.KIND_IDS[cfg.attention_pattern[0]]
  positions = np.broadcast_to(np.arange(T), (B, T))
  block = Block(cfg)
  args = (x, {"kind": np.int32(kind)}, positions, mask, None)
  p = _module_params(block, *args)
  out, _ = _run(block, p, *args)
  lp = ref.convert_layer(cfg, p)
  ok = ref.allowed(np.arange(T), T, kind=cfg.attention_pattern[0], window=cfg.window_size)
  for b in range(B):
    expected, _ = ref.block(cfg, lp, x[b].astype(np.float64), positions[b], ok)
    np.testing.assert_allclose(out[b], expected, atol=ATOL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_and_lm_head_eq_8_46_8_47(tied):
  """x_t = E[w_t] + P[t]; u = h_L E^T (tied) or h_L W_head; y = softmax(u)."""
  cfg = tiny_config(tie_embeddings=tied, n_layers=1)
  params = ref.random_params(abstract_params(cfg))
  assert ("lm_head" in params) == (not tied)
  tokens_BT = np.random.RandomState(2).randint(0, cfg.vocab_size, (B, T))
  logits, _, inter = jax.jit(model.apply, static_argnums=0, static_argnames="return_intermediates")(
      cfg, params, tokens_BT, return_intermediates=True)
  x0 = params["embed"]["embedding"][tokens_BT] + params["pos_embedding"][np.arange(T)]
  np.testing.assert_allclose(inter["layers"]["resid_pre"][0], x0, atol=1e-6)
  h = np.asarray(inter["final_resid"], np.float64)
  head = params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]
  np.testing.assert_allclose(logits, h @ head, atol=ATOL)
  assert logits.dtype == np.float32
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(probs, ref.softmax(h @ head), atol=1e-6)
