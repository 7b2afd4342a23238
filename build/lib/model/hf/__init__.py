"""Hugging Face interop: read and write `config.json` + safetensors checkpoints.

  cfg, params = model.hf.load("path/to/Phi-3-mini-4k-instruct")       # float32
  cfg, params = model.hf.load(hf_dir, dtype="bfloat16", shardings=mesh)  # straight onto a mesh
  model.hf.save(cfg, params, "out/")            # loadable by transformers' from_pretrained

Architectures: GPT-2 (`GPT2LMHeadModel`), Llama 2/3.x (`LlamaForCausalLM`), Mistral
(`MistralForCausalLM`), Phi-3 (`Phi3ForCausalLM`), Qwen2/2.5 (`Qwen2ForCausalLM`); one
mapping module each (gpt2.py, llama.py, phi3.py, qwen2.py) built on layout.py. Only
safetensors, numpy and json are needed at run time (no torch, no transformers; huggingface_hub
only to fetch a model by hub id: `model.hf.resolve`). The command line
(`python -m model.hf import|export`) turns a model directory into a workdir and
back; see model/hf/README.md.
"""

from __future__ import annotations

import os
from types import ModuleType

import jax
import numpy as np

from model.config import ModelConfig
from model.hf import gpt2, hf_config, llama, phi3, qwen2
from model.hf.hf_config import UnsupportedModelError
from model.hf.hub import resolve
from model.hf.layout import check_checkpoint, param_shapes, read_params, tensor_entries
from model.hf.safetensors_io import (
  DEFAULT_MAX_SHARD_SIZE,
  CheckpointError,
  SafetensorsReader,
  read_json,
  write_safetensors,
)
from model.sharding import param_shardings
from model.store.files import write_json

_FAMILIES = (gpt2, llama, phi3, qwen2)
MODULES: dict[str, ModuleType] = {arch: module for module in _FAMILIES
                                  for arch in module.ARCHITECTURES}
MODEL_TYPES: dict[str, str] = {t: a for m in _FAMILIES for t, a in m.MODEL_TYPES.items()}

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

__all__ = ["MODULES", "CheckpointError", "UnsupportedModelError", "architecture_of",
           "export_architecture", "load", "load_config", "read_hf_config", "resolve", "save"]


def read_hf_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"Hugging Face model directory {hf_dir!r} does not exist")
  return read_json(os.path.join(hf_dir, "config.json"))


def architecture_of(hf: dict) -> str:
  """The supported architecture a config.json names (its `architectures`, else `model_type`)."""
  named = list(hf.get("architectures") or [])
  for arch in named:
    if arch in MODULES:
      return arch
  if not named and hf.get("model_type") in MODEL_TYPES:
    return MODEL_TYPES[hf["model_type"]]
  what = named or [f"model_type={hf.get('model_type')!r}"]
  raise UnsupportedModelError(f"unsupported architecture {what}; supported: {sorted(MODULES)}")


def _apply_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
  if dtype is None:
    return cfg
  name = np.dtype(dtype).name
  return cfg.replace(param_dtype=name, dtype=name)


def load_config(hf_dir: str, *, dtype: str | None = None, **overrides) -> ModelConfig:
  """The ModelConfig of a Hugging Face model directory (reads config.json only).

  `dtype` ('float32' default, 'bfloat16', 'float16') sets both the parameter and
  the compute dtype; `overrides` replace other ModelConfig fields (scan_layers,
  attention_impl, fused_qkv, ...; shape fields must still match the weights).
  """
  hf = read_hf_config(hf_dir)
  cfg = MODULES[architecture_of(hf)].config_from_hf(hf)
  return _apply_dtype(cfg, dtype).replace(**overrides)


def load(hf_dir: str, *, dtype: str | None = None, shardings=None,
         **overrides) -> tuple[ModelConfig, dict]:
  """(cfg, params) from a Hugging Face model directory of config.json + safetensors.

  Tensors are read one at a time (only the slices each parameter needs), cast
  to the parameter dtype and put on the default device, or, with `shardings`
  (a pytree like `model.sharding.param_shardings(cfg, mesh)` for
  cfg = load_config(hf_dir, ...), or just the `Mesh`), straight onto the mesh.
  Missing tensors, wrong shapes and tensors the mapping does not use raise
  CheckpointError naming the tensor.
  """
  hf = read_hf_config(hf_dir)
  module = MODULES[architecture_of(hf)]
  cfg = load_config(hf_dir, dtype=dtype, **overrides)
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = param_shardings(cfg, shardings)
  with SafetensorsReader(hf_dir) as reader:
    tensors = module.tensors(cfg, reader.names())
    check_checkpoint(tensors, param_shapes(cfg), reader, lambda n: module.ignored(n, cfg))
    params = read_params(cfg, tensors, reader, shardings=shardings)
  return cfg, params


def export_architecture(cfg: ModelConfig) -> str:
  """The HF architecture a config exports as by default.

  learned positions -> GPT-2; biases on q/k/v but not o -> Qwen2; RoPE with fused
  projections -> Phi-3; RoPE with sliding-window layers -> Mistral; other RoPE models -> Llama.
  """
  if cfg.position == "learned":
    return "GPT2LMHeadModel"
  if cfg.attn_bias and not cfg.o_bias:
    return "Qwen2ForCausalLM"
  if cfg.fused_qkv or cfg.fused_gate_up:
    return "Phi3ForCausalLM"
  if "local" in cfg.layer_kinds:
    return "MistralForCausalLM"
  return "LlamaForCausalLM"


def save(cfg: ModelConfig, params, out_dir: str, *, architecture: str | None = None,
         dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
         token_ids: dict | None = None) -> str:
  """Write cfg + params as a Hugging Face model directory; returns the architecture used.

  config.json (+ generation_config.json with the token ids) and safetensors in
  shards of at most `max_shard_size` (model.safetensors.index.json when there
  are several). `dtype` defaults to cfg.param_dtype. `token_ids` may give
  bos_token_id / eos_token_id / pad_token_id. A config the architecture cannot
  represent raises UnsupportedModelError naming what differs.
  """
  architecture = architecture or export_architecture(cfg)
  if architecture not in MODULES:
    raise UnsupportedModelError(f"unsupported architecture {architecture!r}; supported: "
                                f"{sorted(MODULES)}")
  module = MODULES[architecture]
  dtype = np.dtype(dtype or cfg.param_dtype).name
  hf = module.config_to_hf(cfg, architecture)
  unknown = sorted(set(token_ids or {}) - set(TOKEN_ID_FIELDS))
  if unknown:
    raise ValueError(f"token_ids: unknown field(s) {unknown}; known: {TOKEN_ID_FIELDS}")
  # Written even when unknown (null): some HF configs default them to ids outside a small vocab.
  ids = {name: (token_ids or {}).get(name) for name in TOKEN_ID_FIELDS}
  for name, value in ids.items():
    if any(not 0 <= int(i) < cfg.vocab_size for i in np.atleast_1d(value or [])):
      raise ValueError(f"token_ids: {name}={value} outside the vocabulary [0, {cfg.vocab_size})")
  hf.update(ids, **hf_config.dtype_fields(dtype))
  entries = tensor_entries(cfg, params, module.tensors(cfg), dtype)
  os.makedirs(out_dir, exist_ok=True)
  for stale in os.listdir(out_dir):
    if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
      os.remove(os.path.join(out_dir, stale))
  write_safetensors(out_dir, entries, max_shard_size)
  write_json(os.path.join(out_dir, "config.json"), hf, sort_keys=True)
  write_json(os.path.join(out_dir, "generation_config.json"),
             {k: v for k, v in ids.items() if v is not None}, sort_keys=True)
  return architecture
