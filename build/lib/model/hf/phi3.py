"""Phi-3 (`Phi3ForCausalLM`): the Llama block with fused projections.

  model.layers.i.self_attn.qkv_proj.weight [(N + 2K) H, D] = [q | k | v]^T -> attn/qkv/kernel
  model.layers.i.mlp.gate_up_proj.weight   [2F, D]         = [gate | up]^T -> mlp/gate_up/kernel

(the rest is named as in Llama; see llama.py). Imports keep the fused layout
(fused_qkv, fused_gate_up, like the phi3-mini preset); a split config exports
too. Phi-3-mini-4k's config sets sliding_window=2047, which transformers
applies to every layer, so the import makes every layer local with
window_size=2047. Only the plain RoPE is supported: the 128k models'
'longrope' scaling and a partial_rotary_factor below 1 raise a clear error.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.hf import hf_config, llama
from model.hf.layout import HFTensor

ARCHITECTURES = ("Phi3ForCausalLM",)
MODEL_TYPES = {"phi3": "Phi3ForCausalLM"}


def config_from_hf(hf: dict) -> ModelConfig:
  return llama.llama_like_config(hf, where="Phi-3", attn_bias=False, mlp_bias=False,
                                 fused_qkv=True, fused_gate_up=True)


def config_to_hf(cfg: ModelConfig, architecture: str = "Phi3ForCausalLM") -> dict:
  out = llama.llama_like_hf(cfg, architecture, "phi3", {
      "Phi-3 has no attention or MLP biases": not (cfg.attn_bias or cfg.mlp_bias),
      **hf_config.uniform_attention(cfg), **llama.no_rope_scaling(cfg)})
  out.update(original_max_position_embeddings=cfg.max_seq_len, resid_pdrop=cfg.dropout_rate,
             embd_pdrop=cfg.dropout_rate,
             sliding_window=hf_config.window_of(cfg, where=architecture))
  out["rope_parameters"]["partial_rotary_factor"] = 1.0
  return out


def tensors(cfg: ModelConfig, checkpoint_names=()) -> list[HFTensor]:
  del checkpoint_names
  attn = {"qkv_proj": ("q", "k", "v"), "o_proj": ("o",)}
  mlp = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
  out = llama.outer_tensors(cfg)
  for i in range(cfg.n_layers):
    out += llama.layer_tensors(cfg, i, attn, mlp)
  return out


ignored = llama.ignored
