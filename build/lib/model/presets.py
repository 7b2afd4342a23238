"""Named model configurations: `get_preset("gpt2-small")`, `PRESETS`."""

from __future__ import annotations

from model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # nanoGPT's CPU "baby GPT" (README: 4 layers, 4 heads, 128 wide, context 64).
    "nanogpt-baby": ModelConfig(
        vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64, position="learned",
        norm="layernorm", ffn="gelu", attn_bias=False, mlp_bias=False, tie_embeddings=True),
    # nanoGPT's config/train_shakespeare_char.py.
    "shakespeare-char": ModelConfig(
        vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_seq_len=256, position="learned",
        norm="layernorm", ffn="gelu", attn_bias=False, mlp_bias=False, tie_embeddings=True,
        dropout_rate=0.2),
    # GPT-2 124M (Radford et al. 2019), the Hugging Face "gpt2" checkpoint's shape.
    "gpt2-small": ModelConfig(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
        position="learned", norm="layernorm", ffn="gelu", attn_bias=True, mlp_bias=True,
        tie_embeddings=True),
    # A small Llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head.
    "llama-tiny": ModelConfig(
        vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=704,
        max_seq_len=512, position="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5,
        ffn="swiglu", attn_bias=False, mlp_bias=False, tie_embeddings=False),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv and gate/up projections.
    "phi3-mini": ModelConfig(
        vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=8192,
        max_seq_len=4096, position="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5,
        ffn="swiglu", attn_bias=False, mlp_bias=False, fused_qkv=True, fused_gate_up=True,
        tie_embeddings=False),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset called `name`, with any field replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
