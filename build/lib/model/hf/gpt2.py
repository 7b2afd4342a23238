"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with bias, GELU (tanh), tied head.

Checkpoint layout (per layer i, prefix `transformer.`; the original OpenAI
upload has no prefix):

  wte.weight [V, D]    -> embed/embedding         wpe.weight [P, D] -> pos_embedding
  h.i.ln_1.{weight,bias}  -> attn_norm/{scale,bias}
  h.i.attn.c_attn.weight [D, 3D] = [q | k | v] kernels; .bias [3D] = [q | k | v] biases
  h.i.attn.c_proj.{weight [D, D], bias} -> attn/o
  h.i.ln_2.{weight,bias}  -> mlp_norm/{scale,bias}
  h.i.mlp.c_fc.{weight [D, F], bias}   -> mlp/up
  h.i.mlp.c_proj.{weight [F, D], bias} -> mlp/down
  ln_f.{weight,bias} -> final_norm/{scale,bias}
  lm_head.weight [V, D] (only when tie_word_embeddings is false)

GPT-2's Conv1D stores weights [in, out] like our kernels: nothing is transposed
but the untied head. c_attn is split into our q/k/v (or kept whole with
fused_qkv=True). Exporting a config without biases writes zero biases, which is
the same function, so e.g. a nanoGPT-style model exports as GPT-2.
"""

from __future__ import annotations

import re

from model.config import ModelConfig
from model.hf import hf_config
from model.hf.layout import HFTensor, Piece, projection, whole

ARCHITECTURES = ("GPT2LMHeadModel",)
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}
PREFIX = "transformer."
# The causal-mask buffers older checkpoints carry; not weights.
_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def config_from_hf(hf: dict) -> ModelConfig:
  where = "GPT-2"
  hf_config.require(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions", where=where)
  if hf.get("add_cross_attention"):
    raise hf_config.UnsupportedModelError(f"{where}: add_cross_attention (an encoder-decoder "
                                          "GPT-2) is not a decoder-only language model")
  if hf.get("scale_attn_by_inverse_layer_idx"):
    raise hf_config.UnsupportedModelError(f"{where}: scale_attn_by_inverse_layer_idx=true "
                                          "(scores divided by layer index) is not supported")
  if hf.get("scale_attn_weights", True) is False:
    raise hf_config.UnsupportedModelError(f"{where}: scale_attn_weights=false (no 1/sqrt(d_k)) "
                                          "is not supported")
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
      n_heads=hf["n_head"], d_ff=hf.get("n_inner"), max_seq_len=hf["n_positions"],
      position="learned", norm="layernorm", norm_placement="pre",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      ffn=hf_config.activation(hf.get("activation_function", "gelu_new"), gated=False,
                               where=where),
      attn_bias=True, mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      init_std=float(hf.get("initializer_range", 0.02)))


def config_to_hf(cfg: ModelConfig, architecture: str = "GPT2LMHeadModel") -> dict:
  hf_config.check_exportable(cfg, architecture, {
      f"position must be 'learned', not {cfg.position!r}": cfg.position == "learned",
      f"norm must be 'layernorm', not {cfg.norm!r}": cfg.norm == "layernorm",
      "norm_placement must be 'pre'": cfg.norm_placement == "pre",
      "attention must be causal": cfg.causal,
      f"ffn must be gelu, gelu_exact or relu, not {cfg.ffn!r}":
          cfg.ffn in hf_config.ACTIVATION_NAMES and not cfg.gated_ffn,
      "n_kv_heads must equal n_heads (no grouped-query attention in GPT-2)":
          cfg.kv_heads == cfg.n_heads,
      "head_dim * n_heads must equal d_model": cfg.head_size * cfg.n_heads == cfg.d_model,
      "every layer must be global": set(cfg.layer_kinds) == {"global"},
  })
  return {
      "architectures": [architecture], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
      "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
      "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_inner": cfg.d_ff,
      "activation_function": hf_config.ACTIVATION_NAMES[cfg.ffn],
      "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
      "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
      "attn_pdrop": cfg.attn_dropout_rate, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
      "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
  }


def tensors(cfg: ModelConfig, checkpoint_names=()) -> list[HFTensor]:
  names = list(checkpoint_names)
  prefix = "" if names and not any(n.startswith(PREFIX) for n in names) else PREFIX
  d = cfg.d_model

  def norm(name, ours, layer=None):
    return [HFTensor(f"{prefix}{name}.weight", (whole((ours, "scale"), d),), layer),
            HFTensor(f"{prefix}{name}.bias", (whole((ours, "bias"), d),), layer)]

  out = [HFTensor(f"{prefix}wte.weight", (whole(("embed", "embedding"), d),)),
         HFTensor(f"{prefix}wpe.weight", (whole(("pos_embedding",), d),))]
  for i in range(cfg.n_layers):
    h = f"h.{i}"
    out += norm(f"{h}.ln_1", "attn_norm", i)
    for param, suffix in (("kernel", "weight"), ("bias", "bias")):
      qkv = tuple(projection(cfg, p, param) for p in ("q", "k", "v"))
      out += [HFTensor(f"{prefix}{h}.attn.c_attn.{suffix}", qkv, i),
              HFTensor(f"{prefix}{h}.attn.c_proj.{suffix}", (projection(cfg, "o", param),), i),
              HFTensor(f"{prefix}{h}.mlp.c_fc.{suffix}", (projection(cfg, "up", param),), i),
              HFTensor(f"{prefix}{h}.mlp.c_proj.{suffix}", (projection(cfg, "down", param),), i)]
    out += norm(f"{h}.ln_2", "mlp_norm", i)
  out += norm("ln_f", "final_norm")
  if not cfg.tie_embeddings:
    out.append(HFTensor("lm_head.weight", (Piece(("lm_head", "kernel"), 0, cfg.vocab_size),),
                        transpose=True))
  return out


def ignored(name: str, cfg: ModelConfig) -> bool:
  return bool(_BUFFERS.search(name)) or (cfg.tie_embeddings and name == "lm_head.weight")
