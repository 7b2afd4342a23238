"""model.hf refuses what it cannot represent, with errors that name the problem."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model
import model.hf
from model.hf import CheckpointError, UnsupportedModelError
from model.hf.safetensors_io import parse_size
from tests import hf_testlib as lib
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return lib.save(lib.hf_model("llama"), str(tmp_path_factory.mktemp("hf") / "llama"))


def edited_copy(src, dst, *, config=None, tensors=None):
  """A copy of the checkpoint in src with config.json and/or the tensors edited."""
  shutil.copytree(src, dst)
  if config is not None:
    with open(os.path.join(src, "config.json")) as f:
      hf = json.load(f)
    config(hf)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(hf, f)
  if tensors is not None:
    path = os.path.join(dst, "model.safetensors")
    weights = load_file(path)
    tensors(weights)
    save_file(weights, path)
  return str(dst)


def test_unknown_architecture(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / "bert", config=lambda hf: hf.update(
      architectures=["BertForMaskedLM"], model_type="bert"))
  with pytest.raises(UnsupportedModelError, match="BertForMaskedLM.*supported.*Llama"):
    model.hf.load(path)


def test_missing_tensor_is_named(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / "missing", tensors=lambda w: w.pop(
      "model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    model.hf.load(path)


def test_wrong_shape_is_named(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / "shape", tensors=lambda w: w.update({
      "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
  with pytest.raises(CheckpointError,
                     match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[8, 32\].*"
                           r"implies \[16, 32\]"):
    model.hf.load(path)


def test_config_that_disagrees_with_the_weights(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / "cfg", config=lambda hf: hf.update(
      intermediate_size=64))
  with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight' has shape \[48, 32\]"):
    model.hf.load(path)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / "extra", tensors=lambda w: w.update({
      "model.layers.0.self_attn.q_proj.bias": np.zeros((32,), np.float32)}))
  with pytest.raises(CheckpointError, match=r"does not use: \['model.layers.0.self_attn.q_proj"):
    model.hf.load(path)


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "RoPE scaling 'llama3'"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor=0.5"),
])
def test_unsupported_rope_is_rejected(llama_dir, tmp_path, rope, match):
  path = edited_copy(llama_dir, tmp_path / "rope", config=lambda hf: hf.update(
      rope_parameters=rope))
  with pytest.raises(UnsupportedModelError, match=match):
    model.hf.load_config(path)


def test_phi3_longrope_is_rejected(tmp_path):
  hf = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
        "hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 8192, "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                     "long_factor": [1.0]}}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(UnsupportedModelError, match="Phi-3: RoPE scaling 'longrope'"):
    model.hf.load_config(str(tmp_path))


def test_no_weights_and_no_directory(llama_dir, tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    model.hf.load(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  shutil.copy(os.path.join(llama_dir, "config.json"), tmp_path / "empty")
  (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="no model.safetensors.*pytorch_model.bin.*convert"):
    model.hf.load(str(tmp_path / "empty"))


@pytest.mark.parametrize("cfg,arch,match", [
    (tiny_config(norm_placement="post"), None, "norm_placement must be 'pre'"),
    (tiny_config(position="rope", norm="rmsnorm", ffn="swiglu"), "GPT2LMHeadModel",
     "position must be 'learned'.*norm must be 'layernorm'.*ffn must be gelu"),
    (tiny_config(position="rope", norm="rmsnorm", ffn="swiglu", attention_pattern=(
        "global", "local"), window_size=4), None,
     r"Mistral has no attention or MLP biases; per-layer attention \('global', 'local'\)"),
    (tiny_config(position="rope", norm="rmsnorm", ffn="swiglu", fused_qkv=True), None,
     "Phi-3 has no attention or MLP biases"),
    (tiny_config(), "BertForMaskedLM", "unsupported architecture 'BertForMaskedLM'"),
], ids=["post-norm", "not-gpt2", "mixed-windows", "phi3-bias", "unknown"])
def test_unexportable_configs_are_rejected(cfg, arch, match, tmp_path):
  with pytest.raises(UnsupportedModelError, match=match):  # before any parameter is read
    model.hf.save(cfg, {}, str(tmp_path), architecture=arch)
  assert not os.path.exists(tmp_path / "config.json")


def test_export_checks_params_against_config(tmp_path):
  cfg = tiny_config()
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match="params do not match the config's parameter tree"):
    model.hf.save(cfg.replace(d_model=64), params, str(tmp_path))


def test_parse_size():
  assert parse_size("5GB") == 5 * 10**9
  assert parse_size("200MiB") == 200 * 2**20
  assert parse_size(1234) == 1234
  with pytest.raises(ValueError, match="max_shard_size"):
    parse_size("big")


def test_a_mapping_that_leaves_a_parameter_unfilled_is_caught(llama_dir):
  """An architecture mapping must provide every parameter (all columns of it)."""
  from model.hf import layout, llama
  from model.hf.safetensors_io import SafetensorsReader

  cfg = model.hf.load_config(llama_dir)
  tensors = [t for t in llama.tensors(cfg) if t.name != "model.layers.1.self_attn.v_proj.weight"]
  with SafetensorsReader(llama_dir) as reader, pytest.raises(
      CheckpointError, match="no checkpoint tensor provides all of parameter layers_1/attn/v"):
    layout.check_checkpoint(tensors, layout.param_shapes(cfg), reader, lambda name: False)


def test_export_token_ids_must_be_in_the_vocabulary(tmp_path):
  cfg = tiny_config()
  with pytest.raises(ValueError, match=r"eos_token_id=\[3, 500\] outside the vocabulary"):
    model.hf.save(cfg, {}, str(tmp_path), token_ids={"eos_token_id": [3, 500]})
  with pytest.raises(ValueError, match="unknown field"):
    model.hf.save(cfg, {}, str(tmp_path), token_ids={"eos": 3})
