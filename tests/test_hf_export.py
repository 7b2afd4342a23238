"""model.hf.save: exported directories load in transformers with the same logits, and
import -> export -> import gives back the same config and parameters bit for bit."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

import model
import model.hf
from model import store
from model.hf.convert import export_workdir
from tests import hf_testlib as lib
from tests.conftest import tiny_config

TOL = 1e-4
CASES = {  # name: (arch, config overrides, import overrides)
    "gpt2": ("gpt2", {}, {}),
    "llama-bias-tied": ("llama", {"kv_heads": 1, "attention_bias": True, "mlp_bias": True,
                                  "tie_word_embeddings": True}, {}),
    "llama-fused": ("llama", {"kv_heads": 2}, {"fused_qkv": True, "fused_gate_up": True}),
    "mistral": ("mistral", {"kv_heads": 2}, {"scan_layers": False}),
    "phi3-split": ("phi3", {"kv_heads": 2}, {"fused_qkv": False, "fused_gate_up": False}),
    "llama3-rope-scaling": ("llama", {"kv_heads": 2, **lib.LLAMA3}, {}),
    "qwen2-sliding": ("qwen2", {"kv_heads": 2, "use_sliding_window": True, "sliding_window": 4,
                                "max_window_layers": 1}, {"scan_layers": False}),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{case: (cfg, params, reference logits)} imported from tiny random HF models."""
  root = tmp_path_factory.mktemp("src")
  out = {}
  for name, (arch, overrides, load_overrides) in CASES.items():
    hf = lib.hf_model(arch, **overrides)
    cfg, params = model.hf.load(lib.save(hf, str(root / name)), **load_overrides)
    out[name] = (cfg, params, lib.logits(hf, lib.tokens()))
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_in_transformers_with_the_same_logits(imported, case, tmp_path):
  cfg, params, reference = imported[case]
  arch = lib.MODEL_CLASSES[CASES[case][0]]
  assert model.hf.save(cfg, params, str(tmp_path), architecture=arch,
                       max_shard_size="40KB") == arch
  assert os.path.exists(tmp_path / "model.safetensors.index.json")  # several shards
  hf = lib.reload(CASES[case][0], str(tmp_path))
  assert np.abs(lib.logits(hf, lib.tokens()) - reference).max() <= TOL


def test_default_export_architecture(imported):
  chosen = {case: model.hf.export_architecture(imported[case][0]) for case in CASES}
  assert chosen == {"gpt2": "GPT2LMHeadModel", "llama-bias-tied": "LlamaForCausalLM",
                    "llama-fused": "Phi3ForCausalLM",  # a fused, bias-free Llama is a Phi-3
                    "mistral": "MistralForCausalLM", "phi3-split": "MistralForCausalLM",
                    "llama3-rope-scaling": "LlamaForCausalLM",
                    "qwen2-sliding": "Qwen2ForCausalLM"}  # q/k/v biases without an o bias


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_import_round_trip_is_exact(imported, case, tmp_path):
  cfg, params, _ = imported[case]
  model.hf.save(cfg, params, str(tmp_path), architecture=lib.MODEL_CLASSES[CASES[case][0]])
  overrides = CASES[case][2]
  cfg2, params2 = model.hf.load(str(tmp_path), **overrides)
  assert cfg2 == cfg
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, params2)
  assert all(jax.tree.leaves(same))


def test_llama3_rope_scaling_is_written_in_both_spellings(imported, tmp_path):
  """5.x reads rope_parameters, 4.x rope_theta + rope_scaling; 5.x also lets rope_scaling
  replace rope_parameters (rope_theta then from the top level): all three agree."""
  cfg, params, _ = imported["llama3-rope-scaling"]
  model.hf.save(cfg, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    hf_cfg = json.load(f)
  assert hf_cfg["rope_parameters"] == lib.LLAMA3_ROPE and hf_cfg["rope_theta"] == 500.0
  assert hf_cfg["rope_scaling"] == {k: v for k, v in lib.LLAMA3_ROPE.items() if k != "rope_theta"}
  assert lib.reload("llama", str(tmp_path)).config.rope_parameters == lib.LLAMA3_ROPE


@pytest.mark.parametrize("arch,cfg", [
    # A nanoGPT-style model (no biases: exported as zero biases) as GPT-2.
    ("gpt2", tiny_config(vocab_size=lib.VOCAB, attn_bias=False, mlp_bias=False, init_std=0.3)),
    # A Llama-style model of this project (GQA, RoPE, untied) as Llama.
    ("llama", tiny_config(vocab_size=lib.VOCAB, position="rope", norm="rmsnorm", ffn="swiglu",
                          n_kv_heads=2, attn_bias=False, mlp_bias=False, tie_embeddings=False,
                          init_std=0.3, rope_theta=100.0)),
    # GPT-2 always has a c_proj bias: written as zeros for a model without one.
    ("gpt2", tiny_config(vocab_size=lib.VOCAB, o_bias=False, init_std=0.3)),
    # Biases on q/k/v only (o_bias=False) are Qwen2's layout.
    ("qwen2", tiny_config(vocab_size=lib.VOCAB, position="rope", norm="rmsnorm", ffn="swiglu",
                          n_kv_heads=2, o_bias=False, mlp_bias=False, tie_embeddings=False,
                          init_std=0.3)),
], ids=["gpt2", "llama", "gpt2-no-o-bias", "qwen2"])
def test_models_of_this_project_export(arch, cfg, tmp_path):
  params = lib.init(cfg, jax.random.PRNGKey(1))
  assert model.hf.save(cfg, params, str(tmp_path)) == lib.MODEL_CLASSES[arch]
  ours, _ = lib.forward(cfg, params, lib.tokens())
  hf = lib.reload(arch, str(tmp_path))
  assert np.abs(lib.logits(hf, lib.tokens()) - np.asarray(ours)).max() <= TOL


def test_bfloat16_export(imported, tmp_path):
  cfg, params, reference = imported["llama-fused"]
  model.hf.save(cfg, params, str(tmp_path), architecture="LlamaForCausalLM", dtype="bfloat16",
                token_ids={"eos_token_id": 2})
  with open(tmp_path / "config.json") as f:
    hf_cfg = json.load(f)
  assert hf_cfg["dtype"] == "bfloat16" and hf_cfg["eos_token_id"] == 2
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  hf = lib.reload("llama", str(tmp_path))
  assert hf.model.norm.weight.dtype == torch.bfloat16
  # bfloat16 rounding of the weights: close to, not equal to, the float32 logits
  assert np.abs(lib.logits(hf.float(), lib.tokens()) - reference).max() < 0.5


def test_export_of_a_workdir_with_lora_adapters_merges_them(imported, tmp_path):
  """A fine-tuned workdir (base params + 'lora' item) exports as one plain HF model whose
  logits are the adapted model's."""
  base_cfg, params, _ = imported["llama-bias-tied"]
  cfg = base_cfg.replace(lora_rank=2, lora_targets=("q", "v", "up"))
  lora = jax.tree.map(lambda x: x + 0.1,  # B starts at zero; make the adapters matter
                      jax.jit(model.init_lora, static_argnums=0)(cfg, jax.random.PRNGKey(1)))
  workdir = str(tmp_path / "finetuned")
  store.write_config(workdir, cfg, store.ByteTokenizer())
  store.save_params(workdir, params, step=7, lora=lora)
  assert export_workdir(workdir, str(tmp_path / "out")) == "LlamaForCausalLM"
  adapted, _ = lib.forward(cfg, params, lib.tokens(), lora=lora)
  base, _ = lib.forward(base_cfg, params, lib.tokens())
  assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-2
  hf = lib.reload("llama", str(tmp_path / "out"))
  assert np.abs(lib.logits(hf, lib.tokens()) - np.asarray(adapted)).max() <= TOL
