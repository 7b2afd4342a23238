"""Llama and Mistral (`LlamaForCausalLM`, `MistralForCausalLM`).

RoPE (rope_theta, "rotate half" layout: HF checkpoints are stored that way,
which is model/positions.py's layout, so q/k need no permutation), RMSNorm,
SwiGLU, grouped-query attention, untied head unless tie_word_embeddings;
Llama's attention_bias / mlp_bias flags; Mistral's sliding_window (every layer
local, window_size = sliding_window; see hf_config.window_fields).

Checkpoint layout (per layer i; torch Linear weights are [out, in], ours [in, out]):

  model.embed_tokens.weight [V, D]                  -> embed/embedding
  model.layers.i.input_layernorm.weight             -> attn_norm/scale
  model.layers.i.self_attn.{q,k,v,o}_proj.weight^T  -> attn/{q,k,v,o}/kernel (+ .bias)
  model.layers.i.post_attention_layernorm.weight    -> mlp_norm/scale
  model.layers.i.mlp.{gate,up,down}_proj.weight^T   -> mlp/{gate,up,down}/kernel (+ .bias)
  model.norm.weight -> final_norm/scale;  lm_head.weight^T -> lm_head/kernel
"""

from __future__ import annotations

import re
from collections.abc import Collection

from model.config import ModelConfig
from model.hf import hf_config
from model.hf.layout import HFTensor, Piece, has_projection_bias, projection, whole

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")


def llama_like_config(hf: dict, *, where: str, rope_scaling: bool = False,
                      **fields) -> ModelConfig:
  """The ModelConfig of a Llama-family config.json (fields: what the family fixes).

  `rope_scaling`: whether this architecture may carry Llama 3's RoPE scaling (Llama and
  Qwen2, whose transformers configs accept it in 4.x and 5.x; Mistral's and Phi-3's do not).
  """
  hf_config.require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", where=where)
  if hf.get("layer_types") is not None:
    raise hf_config.UnsupportedModelError(
        f"{where}: per-layer attention types (layer_types={hf['layer_types']}) are not supported")
  rope = hf_config.rope_config(hf, where=where)
  if rope["rope_scaling"] is not None and not rope_scaling:
    raise hf_config.UnsupportedModelError(
        f"{where}: RoPE scaling 'llama3' is supported for LlamaForCausalLM and Qwen2ForCausalLM "
        "only")
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
  base = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      position="rope", **rope, norm="rmsnorm",
      norm_placement="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      ffn=hf_config.activation(hf.get("hidden_act", "silu"), gated=True, where=where),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)), **hf_config.window_fields(hf))
  return ModelConfig(**{**base, **fields})


def config_from_hf(hf: dict) -> ModelConfig:
  mistral = hf.get("model_type") == "mistral" or "MistralForCausalLM" in hf.get("architectures",
                                                                                 ())
  if not mistral:
    # transformers' Llama has no sliding window and ignores the field; so does the import.
    hf = {k: v for k, v in hf.items() if k != "sliding_window"}
  return llama_like_config(hf, where="Mistral" if mistral else "Llama", rope_scaling=not mistral,
                           attn_bias=bool(hf.get("attention_bias", False)),
                           mlp_bias=bool(hf.get("mlp_bias", False)))


def llama_like_hf(cfg: ModelConfig, architecture: str, model_type: str,
                  conditions: dict[str, bool]) -> dict:
  """config.json fields shared by the Llama family; raises naming every failed condition
  (the family's and the caller's)."""
  hf_config.check_exportable(cfg, architecture, {
      f"position must be 'rope', not {cfg.position!r}": cfg.position == "rope",
      f"norm must be 'rmsnorm', not {cfg.norm!r}": cfg.norm == "rmsnorm",
      "norm_placement must be 'pre'": cfg.norm_placement == "pre",
      "attention must be causal": cfg.causal,
      f"ffn must be swiglu or geglu, not {cfg.ffn!r}": cfg.gated_ffn,
      **conditions,
  })
  out = {
      "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_size,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "hidden_act": hf_config.ACTIVATION_NAMES[cfg.ffn],
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": cfg.attn_dropout_rate, "use_cache": True,
      **hf_config.rope_fields(cfg),
  }
  if cfg.head_size * cfg.n_heads != cfg.d_model:
    out["head_dim"] = cfg.head_size
  return out


def no_rope_scaling(cfg: ModelConfig) -> dict[str, bool]:
  """The export condition of architectures whose transformers config has no llama3 RoPE."""
  return {"RoPE scaling (rope_scaling) exports as LlamaForCausalLM or Qwen2ForCausalLM only":
          cfg.rope_scaling is None}


def config_to_hf(cfg: ModelConfig, architecture: str = "LlamaForCausalLM") -> dict:
  if architecture == "MistralForCausalLM":
    out = llama_like_hf(cfg, architecture, "mistral", {
        "Mistral has no attention or MLP biases": not (cfg.attn_bias or cfg.mlp_bias),
        **hf_config.uniform_attention(cfg), **no_rope_scaling(cfg)})
    out["head_dim"] = cfg.head_size
    out["sliding_window"] = hf_config.window_of(cfg, where=architecture)
    return out
  out = llama_like_hf(cfg, architecture, "llama", {
      "every layer must be global (sliding windows: MistralForCausalLM)":
          set(cfg.layer_kinds) == {"global"},
      "Llama's attention_bias covers o_proj too (q/k/v biases only, o_bias=False: "
      "Qwen2ForCausalLM)": cfg.o_bias or not cfg.attn_bias})
  out.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, head_dim=cfg.head_size)
  return out


def layer_tensors(cfg: ModelConfig, i: int, attn: dict, mlp: dict,
                  biased: Collection[str] | None = None) -> list[HFTensor]:
  """One layer's tensors: norms plus `attn`/`mlp` {HF module name: our projections}.

  `biased`: the HF modules that carry a `.bias` (Qwen2: q/k/v_proj); by default those of
  our projections that have one (attn_bias, mlp_bias). A bias our config lacks is zeros.
  """
  d, layer = cfg.d_model, f"model.layers.{i}"
  if biased is None:
    biased = {m for m, names in {**attn, **mlp}.items() if has_projection_bias(cfg, names[0])}
  out = [HFTensor(f"{layer}.input_layernorm.weight", (whole(("attn_norm", "scale"), d),), i),
         HFTensor(f"{layer}.post_attention_layernorm.weight", (whole(("mlp_norm", "scale"), d),),
                  i)]
  for group, modules in (("self_attn", attn), ("mlp", mlp)):
    for module, names in modules.items():
      out.append(HFTensor(f"{layer}.{group}.{module}.weight",
                          tuple(projection(cfg, n) for n in names), i, transpose=True))
      if module in biased:
        out.append(HFTensor(f"{layer}.{group}.{module}.bias",
                            tuple(projection(cfg, n, "bias") for n in names), i))
  return out


def outer_tensors(cfg: ModelConfig) -> list[HFTensor]:
  d = cfg.d_model
  out = [HFTensor("model.embed_tokens.weight", (whole(("embed", "embedding"), d),)),
         HFTensor("model.norm.weight", (whole(("final_norm", "scale"), d),))]
  if not cfg.tie_embeddings:
    out.append(HFTensor("lm_head.weight", (Piece(("lm_head", "kernel"), 0, cfg.vocab_size),),
                        transpose=True))
  return out


def tensors(cfg: ModelConfig, checkpoint_names=()) -> list[HFTensor]:
  del checkpoint_names
  attn = {f"{p}_proj": (p,) for p in ("q", "k", "v", "o")}
  mlp = {f"{p}_proj": (p,) for p in ("gate", "up", "down")}
  out = outer_tensors(cfg)
  for i in range(cfg.n_layers):
    out += layer_tensors(cfg, i, attn, mlp)
  return out


def ignored(name: str, cfg: ModelConfig) -> bool:
  return bool(_BUFFERS.search(name)) or (cfg.tie_embeddings and name == "lm_head.weight")
