"""model.hf.load: logits of imported tiny random HF models equal transformers' (float32, eager).

Covers GPT-2, Llama (GQA, MHA, MQA with biases and a tied head, Llama 3's RoPE
scaling), Mistral and Phi-3 (sliding windows shorter than the sequence), Qwen2
(q/k/v biases without an o bias; global and per-layer sliding layers), scanned and unrolled layers,
fused and split projections, sharded checkpoints, bfloat16 checkpoints, the
original GPT-2 naming, and placement straight onto a mesh.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import model
import model.hf
from model.config import RopeScaling
from model.sharding import make_mesh, param_shardings
from tests import hf_testlib as lib

TOL = 1e-4
CASES = {  # name: (arch, config overrides)
    "gpt2": ("gpt2", {}),
    "llama-gqa": ("llama", {"kv_heads": 2}),
    "llama-mha": ("llama", {"kv_heads": 4}),
    "llama-mqa-bias-tied": ("llama", {"kv_heads": 1, "attention_bias": True, "mlp_bias": True,
                                      "tie_word_embeddings": True}),
    "mistral-gqa": ("mistral", {"kv_heads": 2}),
    "mistral-mha": ("mistral", {"kv_heads": 4}),
    "phi3-gqa": ("phi3", {"kv_heads": 2}),
    "phi3-mha": ("phi3", {"kv_heads": 4}),
    "llama3-rope-scaling": ("llama", {"kv_heads": 2, **lib.LLAMA3}),
    "qwen2-gqa": ("qwen2", {"kv_heads": 2}),
    # layer 0 global, layer 1 a window of 4 keys (transformers: i >= max_window_layers slides)
    "qwen2-sliding-mqa-tied": ("qwen2", {"kv_heads": 1, "use_sliding_window": True,
                                         "sliding_window": 4, "max_window_layers": 1,
                                         "tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{case: (hf directory, reference logits on lib.tokens())}."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, (arch, overrides) in CASES.items():
    hf = lib.hf_model(arch, **overrides)
    out[name] = (lib.save(hf, str(root / name)), lib.logits(hf, lib.tokens()))
  return out


def max_diff(cfg, params, reference) -> float:
  logits_BTV, _ = lib.forward(cfg, params, lib.tokens())
  return float(np.abs(np.asarray(logits_BTV) - reference).max())


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints, case, scan):
  path, reference = checkpoints[case]
  cfg, params = model.hf.load(path, scan_layers=scan)
  assert cfg.scan_layers == scan
  assert ("layers" in params) == scan
  assert max_diff(cfg, params, reference) <= TOL


def test_imported_configs_say_what_the_checkpoints_are(checkpoints):
  gpt2 = model.hf.load_config(checkpoints["gpt2"][0])
  assert (gpt2.position, gpt2.norm, gpt2.ffn, gpt2.tie_embeddings) == (
      "learned", "layernorm", "gelu", True)
  llama = model.hf.load_config(checkpoints["llama-gqa"][0])
  assert (llama.position, llama.norm, llama.ffn, llama.kv_heads, llama.rope_theta) == (
      "rope", "rmsnorm", "swiglu", 2, 500.0)
  assert not llama.tie_embeddings and llama.layer_kinds == ("global", "global")
  mistral = model.hf.load_config(checkpoints["mistral-gqa"][0])
  assert mistral.layer_kinds == ("local", "local") and mistral.window_size == 4
  phi3 = model.hf.load_config(checkpoints["phi3-gqa"][0])
  assert phi3.fused_qkv and phi3.fused_gate_up and phi3.window_size == 5
  llama3 = model.hf.load_config(checkpoints["llama3-rope-scaling"][0])
  assert llama3.rope_theta == 500.0 and llama3.rope_scaling == RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
  assert llama.rope_scaling is None
  qwen2 = model.hf.load_config(checkpoints["qwen2-gqa"][0])
  assert (qwen2.attn_bias, qwen2.o_bias, qwen2.mlp_bias) == (True, False, False)
  assert qwen2.attention_pattern == ("global",)
  sliding = model.hf.load_config(checkpoints["qwen2-sliding-mqa-tied"][0])
  assert sliding.layer_kinds == ("global", "local") and sliding.window_size == 4


def test_llama3_rope_scaling_changes_the_logits(checkpoints):
  """The scaled frequencies, not the plain ones, give transformers' logits (so the parity
  above checks the scaling), and each band of it matters: a pretraining context that moves
  the band edges (16 or 64 instead of 32) gives other logits too."""
  path, reference = checkpoints["llama3-rope-scaling"]
  cfg, params = model.hf.load(path)
  assert max_diff(cfg, params, reference) <= TOL
  assert max_diff(cfg.replace(rope_scaling=None), params, reference) > 1e-2
  for context in (16, 64):
    moved = dataclasses.replace(cfg.rope_scaling, original_max_position_embeddings=context)
    assert max_diff(cfg.replace(rope_scaling=moved), params, reference) > 1e-2


def test_qwen2_sliding_layer_is_hf_window_exactly(checkpoints, tmp_path):
  """Only layer 1 slides, over exactly `sliding_window` keys. A config.json without
  layer_types (older transformers) gets them from transformers' rule: layer i slides when
  use_sliding_window and i >= max_window_layers."""
  path, reference = checkpoints["qwen2-sliding-mqa-tied"]
  cfg, params = model.hf.load(path)
  assert max_diff(cfg, params, reference) <= TOL
  for wrong in (cfg.replace(attention_pattern=("global",)),
                cfg.replace(attention_pattern=("local",)),
                cfg.replace(window_size=cfg.window_size + 1)):
    assert max_diff(wrong, params, reference) > 1e-2
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  assert hf.pop("layer_types") == ["full_attention", "sliding_attention"]
  for max_window_layers, kinds in ((1, ("global", "local")), (0, ("local", "local")),
                                   (2, ("global", "global"))):
    (tmp_path / "config.json").write_text(json.dumps({**hf,
                                                      "max_window_layers": max_window_layers}))
    assert model.hf.load_config(str(tmp_path)).layer_kinds == kinds


def test_sliding_window_is_hf_window_exactly(checkpoints):
  """HF's sliding_window W lets a query see W keys (itself included): window_size = W,
  and one key more or less gives different logits (the sequence is longer than W)."""
  path, reference = checkpoints["mistral-gqa"]
  cfg, params = model.hf.load(path)
  assert max_diff(cfg, params, reference) <= TOL
  for off_by_one in (cfg.window_size - 1, cfg.window_size + 1):
    assert max_diff(cfg.replace(window_size=off_by_one), params, reference) > 1e-2


@pytest.mark.parametrize("case,fused", [
    ("gpt2", {"fused_qkv": True}),
    ("llama-gqa", {"fused_qkv": True, "fused_gate_up": True}),
    ("phi3-gqa", {"fused_qkv": False, "fused_gate_up": False}),
])
def test_fused_and_split_layouts_load_the_same_model(checkpoints, case, fused):
  path, reference = checkpoints[case]
  cfg, params = model.hf.load(path, **fused)
  assert all(getattr(cfg, k) == v for k, v in fused.items())
  assert max_diff(cfg, params, reference) <= TOL


def test_sharded_checkpoint_with_index(tmp_path):
  hf = lib.hf_model("llama", kv_heads=2)
  path = lib.save(hf, str(tmp_path / "sharded"), max_shard_size="30KB")
  files = os.listdir(path)
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  cfg, params = model.hf.load(path)
  assert max_diff(cfg, params, lib.logits(hf, lib.tokens())) <= TOL


def test_bfloat16_checkpoint_is_read_exactly(tmp_path):
  hf = lib.hf_model("phi3").to(dtype=torch.bfloat16)
  path = lib.save(hf, str(tmp_path / "bf16"))
  cfg, params = model.hf.load(path)  # float32 params by default
  assert cfg.param_dtype == "float32"
  want = hf.model.layers[1].self_attn.qkv_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["qkv"]["kernel"][1]), want)
  cfg16, params16 = model.hf.load(path, dtype="bfloat16")
  assert cfg16.param_dtype == cfg16.dtype == "bfloat16"
  assert params16["embed"]["embedding"].dtype == jax.numpy.bfloat16


def test_original_gpt2_naming_without_prefix_and_with_mask_buffers(checkpoints, tmp_path):
  """The OpenAI upload names tensors 'h.0.attn...' (no 'transformer.') and stores the
  causal-mask buffers 'h.i.attn.bias'; both are handled."""
  src, reference = checkpoints["gpt2"]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  for i in range(2):
    renamed[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  os.makedirs(tmp_path / "openai")
  save_file(renamed, str(tmp_path / "openai" / "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    (tmp_path / "openai" / "config.json").write_text(f.read())
  cfg, params = model.hf.load(str(tmp_path / "openai"))
  assert max_diff(cfg, params, reference) <= TOL


def test_load_places_every_leaf_on_its_mesh_sharding(checkpoints):
  path, reference = checkpoints["llama-gqa"]
  mesh = make_mesh((2, 2, 2))
  cfg = model.hf.load_config(path)
  shardings = param_shardings(cfg, mesh)
  _, params = model.hf.load(path, shardings=shardings)
  placed = jax.tree.map(lambda leaf, want: leaf.sharding == want, params, shardings)
  assert all(jax.tree.leaves(placed))
  assert any(len(leaf.sharding.device_set) > 1 for leaf in jax.tree.leaves(params))
  _, via_mesh = model.hf.load(path, shardings=mesh)  # a Mesh is accepted too
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b.sharding, params, via_mesh))
  assert max_diff(cfg, params, reference) <= TOL


def test_config_json_spellings_of_rope(checkpoints, tmp_path):
  """transformers 4.x writes rope_theta at top level; 5.x writes rope_parameters."""
  path, _ = checkpoints["llama-gqa"]
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf.pop("rope_parameters")
  hf.update(rope_theta=1234.0, rope_scaling=None)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert model.hf.load_config(str(tmp_path)).rope_theta == 1234.0
  # Llama 3.x as transformers 4.x writes it (Llama-3.2-1B's config.json): rope_theta on top,
  # rope_scaling without it; the same config as 5.x's rope_parameters.
  path, _ = checkpoints["llama3-rope-scaling"]
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  scaling = {k: v for k, v in hf.pop("rope_parameters").items() if k != "rope_theta"}
  hf.update(rope_theta=500.0, rope_scaling=scaling)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert model.hf.load_config(str(tmp_path)) == model.hf.load_config(path)


def test_scanned_params_are_model_stack_layers_of_the_unrolled_ones(checkpoints):
  path, _ = checkpoints["phi3-gqa"]
  cfg, scanned = model.hf.load(path)
  _, unrolled = model.hf.load(path, scan_layers=False)
  same = jax.tree.map(np.array_equal, scanned, model.stack_layers(unrolled, cfg.n_layers))
  assert all(jax.tree.leaves(same))
