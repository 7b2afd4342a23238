"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the Llama block with biases on q, k, v only.

  model.layers.i.self_attn.{q,k,v}_proj.bias -> attn/{q,k,v}/bias (attn_bias=True)
  model.layers.i.self_attn.o_proj            no bias (o_bias=False)
  model.layers.i.mlp.*                       no biases (mlp_bias=False)

(the rest is named as in Llama; see llama.py). Sliding windows: transformers
gives layer i a window of `sliding_window` keys when `layer_types[i]` is
"sliding_attention" (derived, when absent, as i >= max_window_layers under
use_sliding_window); the import sets that layer "local" with window_size =
sliding_window (the Mistral rule, hf_config.window_fields) and the others
"global", as a per-layer attention_pattern. Released Qwen2/2.5 checkpoints set
use_sliding_window=false: every layer global. Export writes layer_types and, for
4.x, max_window_layers, so it needs the global layers first.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.hf import hf_config, llama
from model.hf.layout import HFTensor

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM"}
KINDS = {"full_attention": "global", "sliding_attention": "local"}
_BIASED = ("q_proj", "k_proj", "v_proj")


def layer_kinds(hf: dict) -> tuple[str, ...]:
  """Our attention kind of each layer: layer_types, or transformers' rule when it is absent."""
  n = hf["num_hidden_layers"]
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  types = hf.get("layer_types")
  if types is None:
    first_sliding = hf.get("max_window_layers", n) if window is not None else n
    types = ["full_attention" if i < first_sliding else "sliding_attention" for i in range(n)]
  unknown = sorted(set(types) - set(KINDS))
  if unknown or len(types) != n:
    raise hf_config.UnsupportedModelError(
        f"Qwen2: layer_types={types} must name {n} layers, each one of {sorted(KINDS)}")
  if "sliding_attention" in types and window is None:
    raise hf_config.UnsupportedModelError(
        "Qwen2: layer_types has 'sliding_attention' layers but use_sliding_window is false or "
        "sliding_window is null")
  return tuple(KINDS[t] for t in types)


def config_from_hf(hf: dict) -> ModelConfig:
  hf_config.require(hf, "num_hidden_layers", where="Qwen2")
  kinds = layer_kinds(hf)
  window = {}
  if "local" in kinds:
    window = hf_config.window_fields({"sliding_window": hf["sliding_window"]})
  pattern = kinds[:1] if len(set(kinds)) == 1 else kinds
  rest = {k: v for k, v in hf.items() if k not in ("layer_types", "sliding_window")}
  return llama.llama_like_config(rest, where="Qwen2", rope_scaling=True, attn_bias=True,
                                 o_bias=False, mlp_bias=False,
                                 **{**window, "attention_pattern": pattern})


def config_to_hf(cfg: ModelConfig, architecture: str = "Qwen2ForCausalLM") -> dict:
  kinds = cfg.layer_kinds
  n_global = kinds.index("local") if "local" in kinds else len(kinds)
  out = llama.llama_like_hf(cfg, architecture, "qwen2", {
      "Qwen2 has no bias on o_proj (o_bias must be False, or attn_bias False: zero q/k/v "
      "biases are written)": not (cfg.attn_bias and cfg.o_bias),
      "Qwen2 has no MLP biases": not cfg.mlp_bias,
      f"Qwen2's layers are global, then local (sliding window); not {kinds}":
          set(kinds) <= {"global", "local"} and all(k == "local" for k in kinds[n_global:]),
  })
  sliding = n_global < len(kinds)
  out.update(layer_types=[{"global": "full_attention", "local": "sliding_attention"}[k]
                          for k in kinds],
             use_sliding_window=sliding, sliding_window=cfg.window_size if sliding else None,
             max_window_layers=n_global)
  return out


def tensors(cfg: ModelConfig, checkpoint_names=()) -> list[HFTensor]:
  del checkpoint_names
  attn = {f"{p}_proj": (p,) for p in ("q", "k", "v", "o")}
  mlp = {f"{p}_proj": (p,) for p in ("gate", "up", "down")}
  out = llama.outer_tensors(cfg)
  for i in range(cfg.n_layers):
    out += llama.layer_tensors(cfg, i, attn, mlp, biased=_BIASED)
  return out


ignored = llama.ignored
