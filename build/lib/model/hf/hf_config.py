"""Reading and writing the config.json fields that several architectures share.

Rotary embeddings appear in two spellings: transformers 4.x writes
`rope_theta` (+ `rope_scaling`), 5.x writes `rope_parameters` = {"rope_type",
"rope_theta", ...}. Both are read; both are written, so an exported
directory loads in either version. rope_type "llama3" (Llama 3.x) maps to
`ModelConfig.rope_scaling`.
"""

from __future__ import annotations

import dataclasses

from model.config import ROPE_SCALING_TYPES, ModelConfig, RopeScaling


class UnsupportedModelError(ValueError):
  """The checkpoint (or the config to export) uses something this converter cannot represent."""


# HF activation name -> our ffn, for plain and for gated (GLU) feed-forward networks. All the
# tanh-approximation spellings are the same function, GPT-2's "gelu_new".
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")
PLAIN_ACTIVATIONS = {**{a: "gelu" for a in _TANH_GELUS}, "gelu": "gelu_exact",
                     "gelu_python": "gelu_exact", "relu": "relu"}
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", **{a: "geglu" for a in _TANH_GELUS}}
# our ffn -> the HF name written on export
ACTIVATION_NAMES = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "swiglu": "silu",
                    "geglu": "gelu_pytorch_tanh"}


def require(hf: dict, *fields: str, where: str) -> None:
  missing = [f for f in fields if hf.get(f) is None]
  if missing:
    raise UnsupportedModelError(f"{where}: config.json lacks {missing}")


def activation(name: str, *, gated: bool, where: str) -> str:
  table = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
  if name not in table:
    raise UnsupportedModelError(
        f"{where}: activation {name!r} is not supported for a {'gated' if gated else 'plain'} "
        f"feed-forward network; supported: {sorted(table)}")
  return table[name]


def rope_config(hf: dict, *, where: str) -> dict:
  """ModelConfig fields `rope_theta` and `rope_scaling` of a config.json.

  The RoPE dict is `rope_scaling` when set (4.x; 5.x lets it win too), else `rope_parameters`;
  rope_theta comes from it, else from the top level. rope_type 'default' is the plain RoPE,
  'llama3' Llama 3's frequency rescaling (model.config.RopeScaling); any other type, or a
  partial_rotary_factor below 1, raises.
  """
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_type = rope.get("rope_type") or rope.get("type") or "default"
  if rope_type not in ("default", *ROPE_SCALING_TYPES):
    raise UnsupportedModelError(
        f"{where}: RoPE scaling {rope_type!r} ({rope}) is not supported; model/positions.py "
        "has the plain RoPE (rope_type 'default': Phi-3-mini-4k, Llama 2, Mistral 7B, Qwen2) "
        "and Llama 3's 'llama3' scaling (Llama 3.1, 3.2, 3.3); not Phi-3-128k's 'longrope', "
        "nor 'linear', 'dynamic', 'yarn'")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise UnsupportedModelError(
        f"{where}: partial_rotary_factor={partial} (RoPE on part of each head) is not "
        "supported; RoPE here rotates the whole head dimension")
  fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "rope_scaling": None}
  if rope_type == "llama3":
    keys = [f.name for f in dataclasses.fields(RopeScaling) if f.name != "rope_type"]
    missing = [k for k in keys if rope.get(k) is None]
    if missing:
      raise UnsupportedModelError(f"{where}: RoPE scaling 'llama3' ({rope}) lacks {missing}")
    try:
      fields["rope_scaling"] = RopeScaling(**{k: rope[k] for k in keys})
    except ValueError as e:
      raise UnsupportedModelError(f"{where}: RoPE scaling 'llama3': {e}") from None
  return fields


def rope_fields(cfg: ModelConfig) -> dict:
  """config.json's RoPE fields in both spellings: 5.x's rope_parameters, 4.x's rope_theta
  (+ rope_scaling when scaled). transformers 5 lets a rope_scaling replace rope_parameters
  and takes rope_theta from the top level then, so all three are written and agree."""
  out = {"rope_theta": cfg.rope_theta,
         "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
  if cfg.rope_scaling is not None:
    scaling = cfg.rope_scaling.to_dict()
    out["rope_scaling"] = scaling
    out["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_theta}
  return out


def window_fields(hf: dict) -> dict:
  """ModelConfig fields for HF's `sliding_window` (every layer local when it is set).

  HF masks key j for query i unless i - W < j <= i (masking_utils.sliding_window_overlay:
  kv_idx > q_idx - sliding_window): a query sees W keys, itself included. model/masks.py's
  local rule t - s < window_size is the same set, so window_size = sliding_window exactly.
  """
  window = hf.get("sliding_window")
  if window is None:
    return {}
  if not isinstance(window, int) or window < 1:
    raise UnsupportedModelError(f"sliding_window={window!r} must be a positive integer or null")
  return {"attention_pattern": ("local",), "window_size": window}


def uniform_attention(cfg: ModelConfig) -> dict[str, bool]:
  """The export condition of `window_of`."""
  return {f"per-layer attention {cfg.attention_pattern} has no HF spelling: every layer must "
          "be global, or every layer local (sliding window)":
          set(cfg.layer_kinds) in ({"global"}, {"local"})}


def window_of(cfg: ModelConfig, *, where: str) -> int | None:
  """HF `sliding_window` of cfg: None if every layer is global, window_size if every one is
  local; anything else has no HF spelling in these architectures."""
  kinds = set(cfg.layer_kinds)
  if kinds == {"global"}:
    return None
  if kinds == {"local"}:
    return cfg.window_size
  raise UnsupportedModelError(
      f"{where}: per-layer attention {cfg.attention_pattern} cannot be exported; these "
      "architectures need every layer global or every layer local (sliding window)")


def check_exportable(cfg: ModelConfig, where: str, conditions: dict[str, bool]) -> None:
  """Raise naming every failed condition ({description: holds})."""
  failed = [text for text, ok in conditions.items() if not ok]
  if failed:
    raise UnsupportedModelError(f"cannot export as {where}: " + "; ".join(failed))


def dtype_fields(dtype: str) -> dict:
  # "dtype" is transformers 5's key, "torch_dtype" 4.x's.
  return {"dtype": dtype, "torch_dtype": dtype}
