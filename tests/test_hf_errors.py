"""model.hf refuses what it cannot represent, with errors that name the problem."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model
import model.hf
from model.hf import CheckpointError, UnsupportedModelError, safetensors_io
from model.hf.convert import export_workdir, import_to_workdir
from model.hf.hub import is_hub_id
from model.hf.safetensors_io import INDEX_NAME, WEIGHTS_NAME, parse_size
from model.hf.tokenizer import special_ids
from tests import hf_testlib as lib
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ROPE_MODEL = tiny_config(position="rope", norm="rmsnorm", ffn="swiglu", attn_bias=False,
                         mlp_bias=False)
SCALING = {k: v for k, v in lib.LLAMA3_ROPE.items() if k != "rope_theta"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return lib.save(lib.hf_model("llama"), str(tmp_path_factory.mktemp("hf") / "llama"))


@pytest.fixture(scope="module")
def llama_workdir(llama_dir, tmp_path_factory):
  """A workdir imported from llama_dir (with the tiny BPE tokenizer), for export."""
  root = tmp_path_factory.mktemp("workdir")
  lib.train_tokenizer(str(root / "tokenizer.json"))
  workdir = str(root / "llama")
  import_to_workdir(llama_dir, workdir, tokenizer_path=str(root / "tokenizer.json"))
  return workdir


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
    ({"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}, "RoPE scaling 'yarn'.*'llama3'"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor=0.5"),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
     r"RoPE scaling 'llama3' .* lacks \['low_freq_factor', 'high_freq_factor', "
     r"'original_max_position_embeddings'\]"),
    ({**lib.LLAMA3_ROPE, "high_freq_factor": 1.0},
     r"Llama: RoPE scaling 'llama3': ModelConfig.rope_scaling.high_freq_factor=1.0: must "
     "exceed low_freq_factor"),
], ids=["yarn", "partial", "llama3-incomplete", "llama3-empty-band"])
def test_unsupported_rope_is_rejected(llama_dir, tmp_path, rope, match):
  path = edited_copy(llama_dir, tmp_path / "rope", config=lambda hf: hf.update(
      rope_parameters=rope))
  with pytest.raises(UnsupportedModelError, match=match):
    model.hf.load_config(path)


def test_llama3_rope_on_mistral_is_rejected(llama_dir, tmp_path):
  """transformers' Mistral and Phi-3 configs do not carry Llama 3's scaling (4.x)."""
  path = edited_copy(llama_dir, tmp_path / "mistral", config=lambda hf: hf.update(
      architectures=["MistralForCausalLM"], model_type="mistral",
      rope_parameters=lib.LLAMA3_ROPE))
  with pytest.raises(UnsupportedModelError, match="Mistral: RoPE scaling 'llama3' is supported "
                     "for LlamaForCausalLM and Qwen2ForCausalLM only"):
    model.hf.load_config(path)


@pytest.mark.parametrize("edit,match", [
    ({"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": False},
     "layer_types has 'sliding_attention' layers but use_sliding_window is false"),
    ({"layer_types": ["full_attention", "chunked_attention"]},
     r"layer_types=.* must name 2 layers, each one of \['full_attention', 'sliding_attention'\]"),
], ids=["sliding-without-window", "unknown-kind"])
def test_qwen2_layer_types_are_checked(llama_dir, tmp_path, edit, match):
  path = edited_copy(llama_dir, tmp_path / "qwen2", config=lambda hf: hf.update(
      architectures=["Qwen2ForCausalLM"], model_type="qwen2", **edit))
  with pytest.raises(UnsupportedModelError, match=f"Qwen2: {match}"):
    model.hf.load_config(path)


def test_phi3_longrope_is_rejected(tmp_path):
  hf = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
        "hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 8192, "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                     "long_factor": [1.0]}}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(UnsupportedModelError, match="Phi-3: RoPE scaling 'longrope'"):
    model.hf.load_config(str(tmp_path))


def test_hub_ids_and_paths(llama_dir, tmp_path, monkeypatch):
  """A directory is used as is, and so is what cannot be a hub id (loading it then names the
  missing path); an id without huggingface_hub installed says how to install it."""
  assert model.hf.resolve(llama_dir) == llama_dir
  for path in (str(tmp_path / "nowhere"), "./runs/x", "~/models/x", "a/../b", "a/b/c"):
    assert not is_hub_id(path) and model.hf.resolve(path) == path
  assert is_hub_id("meta-llama/Llama-3.2-1B") and is_hub_id("gpt2")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
  with pytest.raises(CheckpointError, match=r"^'meta-llama/Llama-3.2-1B' is not a local "
                     r"directory; .*install huggingface_hub \(pip install huggingface_hub\)$"):
    model.hf.resolve("meta-llama/Llama-3.2-1B")


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
    (ROPE_MODEL.replace(attn_bias=True, o_bias=False), "LlamaForCausalLM",
     r"Llama's attention_bias covers o_proj too \(q/k/v biases only, o_bias=False: "
     "Qwen2ForCausalLM"),
    (ROPE_MODEL.replace(attn_bias=True, mlp_bias=True), "Qwen2ForCausalLM",
     "Qwen2 has no bias on o_proj.*Qwen2 has no MLP biases"),
    (ROPE_MODEL.replace(attention_pattern=("local", "global"), window_size=4),
     "Qwen2ForCausalLM", r"Qwen2's layers are global, then local .*; not \('local', 'global'\)"),
    (ROPE_MODEL.replace(rope_scaling=SCALING, attention_pattern=("local",),
                        window_size=4), None,
     r"cannot export as MistralForCausalLM: RoPE scaling \(rope_scaling\) exports as "
     "LlamaForCausalLM or Qwen2ForCausalLM only"),
    (ROPE_MODEL.replace(rope_scaling=SCALING), "Phi3ForCausalLM",
     "RoPE scaling .* exports as LlamaForCausalLM or Qwen2ForCausalLM only"),
], ids=["post-norm", "not-gpt2", "mixed-windows", "phi3-bias", "unknown", "llama-no-o-bias",
        "qwen2-o-bias", "qwen2-local-first", "mistral-llama3-rope", "phi3-llama3-rope"])
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


BAD_JSON = {"invalid": ('{"vocab_size": 96,', r"is not valid JSON: Expecting"),
            "array": ("[1, 2]", "must hold a JSON object, not an array")}


@pytest.mark.parametrize("content", list(BAD_JSON))
@pytest.mark.parametrize("file", ["config.json", INDEX_NAME, "generation_config.json",
                                  "tokenizer_config.json"])
def test_malformed_json_names_the_file(llama_dir, tmp_path, file, content):
  path = edited_copy(llama_dir, tmp_path / "hf")
  text, problem = BAD_JSON[content]
  (tmp_path / "hf" / file).write_text(text)
  with pytest.raises(CheckpointError, match=re.escape(os.path.join(path, file)) + " " + problem):
    if file.endswith(("generation_config.json", "tokenizer_config.json")):
      special_ids(path, lambda text: None, lib.VOCAB)
    else:
      model.hf.load(path)


@pytest.mark.parametrize("keep", [0.5, 5], ids=["half", "5-bytes"])
def test_truncated_safetensors_names_the_file(llama_dir, tmp_path, keep):
  path = edited_copy(llama_dir, tmp_path / "hf")
  weights = os.path.join(path, WEIGHTS_NAME)
  os.truncate(weights, int(os.path.getsize(weights) * keep) if keep < 1 else keep)
  with pytest.raises(CheckpointError, match=f"cannot read {re.escape(weights)} \\(truncated"):
    model.hf.load(path)


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-parent", "no-weight-map"])
def test_index_weight_map_is_checked_before_any_shard_is_opened(llama_dir, tmp_path, where,
                                                                monkeypatch):
  """Shards named outside --hf_dir are refused; the file does exist there, so only the check
  stops it from being read."""
  path = edited_copy(llama_dir, tmp_path / "hf")
  os.makedirs(tmp_path / "x")
  outside = str(tmp_path / "x" / WEIGHTS_NAME)
  shutil.move(os.path.join(path, WEIGHTS_NAME), outside)
  file = {"parent": f"../x/{WEIGHTS_NAME}", "absolute": outside,
          "nested-parent": f"sub/../../x/{WEIGHTS_NAME}", "no-weight-map": None}[where]
  with safetensors_io.safe_open(outside, framework="numpy") as handle:
    tensors = list(handle.keys())
  index = {"metadata": {}} if file is None else {"weight_map": {n: file for n in tensors}}
  with open(os.path.join(path, INDEX_NAME), "w") as f:
    json.dump(index, f)

  def no_open(*args, **kwargs):
    raise AssertionError(f"opened {args[0]}")

  monkeypatch.setattr(safetensors_io, "safe_open", no_open)
  match = ("'weight_map' must be an object" if file is None else
           re.escape(f"= {file!r} is not a file inside the model directory"))
  with pytest.raises(CheckpointError, match=re.escape(os.path.join(path, INDEX_NAME)) + ".*"
                     + match):
    model.hf.load(path)


def test_export_refuses_a_non_empty_out_dir(llama_workdir, tmp_path):
  out = tmp_path / "out"
  os.makedirs(out)
  (out / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=f"{re.escape(str(out))} is not empty.*--overwrite"):
    export_workdir(llama_workdir, str(out))
  assert os.listdir(out) == ["notes.txt"]
  assert export_workdir(llama_workdir, str(out), overwrite=True) == "LlamaForCausalLM"
  assert {"notes.txt", "config.json", WEIGHTS_NAME} <= set(os.listdir(out))
  os.makedirs(tmp_path / "empty")  # an existing empty directory is fine
  export_workdir(llama_workdir, str(tmp_path / "empty"))
  assert os.path.exists(tmp_path / "empty" / WEIGHTS_NAME)
  with pytest.raises(FileExistsError, match="is a file"):
    export_workdir(llama_workdir, str(out / "notes.txt"), overwrite=True)


def cli_error(*args) -> str:
  """Run `python -m model.hf ARGS`; check exit 1 and one `error:` line, no traceback."""
  out = subprocess.run([sys.executable, "-m", "model.hf", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
  return lines[0]


def test_cli_bad_input_is_one_error_line(llama_dir, llama_workdir, tmp_path):
  truncated = edited_copy(llama_dir, tmp_path / "truncated")
  weights = os.path.join(truncated, WEIGHTS_NAME)
  os.truncate(weights, os.path.getsize(weights) // 2)
  line = cli_error("import", f"--hf_dir={truncated}", f"--workdir={tmp_path / 'w1'}")
  assert f"cannot read {weights}" in line
  bad_json = edited_copy(llama_dir, tmp_path / "bad_json")
  (tmp_path / "bad_json" / "config.json").write_text("{")
  line = cli_error("import", f"--hf_dir={bad_json}", f"--workdir={tmp_path / 'w2'}")
  assert f"{bad_json}/config.json is not valid JSON" in line
  unreadable = edited_copy(llama_dir, tmp_path / "unreadable")  # an OSError, not a ValueError
  os.remove(os.path.join(unreadable, "config.json"))
  os.makedirs(os.path.join(unreadable, "config.json"))
  line = cli_error("import", f"--hf_dir={unreadable}", f"--workdir={tmp_path / 'w3'}")
  assert "Is a directory" in line and f"{unreadable}/config.json" in line
  assert not any(os.path.exists(tmp_path / w) for w in ("w1", "w2", "w3"))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  line = cli_error("export", f"--workdir={llama_workdir}", f"--out_dir={tmp_path / 'out'}")
  assert "is not empty" in line and "--overwrite" in line
  assert os.listdir(tmp_path / "out") == ["notes.txt"]
