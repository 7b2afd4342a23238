"""ModelConfig: validation names the field, serialization round trips, hashing, presets."""

import dataclasses
import json

import jax
import pytest

from model import PRESETS, ModelConfig, get_preset
from model.config import RopeScaling
from tests.conftest import tiny_config

LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # Llama 3.2's
# (overrides, the field the error must name, words of the message)
INVALID = [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads", "divisible"),
    (dict(d_model=30, n_heads=4), "n_heads", "d_model=30 must be divisible"),
    (dict(vocab_size=0), "vocab_size", "positive integer"),
    (dict(d_model=-8), "d_model", "positive integer"),
    (dict(n_layers=0), "n_layers", "positive integer"),
    (dict(n_heads=0), "n_heads", "positive integer"),
    (dict(max_seq_len=0), "max_seq_len", "positive integer"),
    (dict(attn_chunk_size=0), "attn_chunk_size", "positive integer"),
    (dict(n_layers=2.5), "n_layers", "positive integer"),
    (dict(vocab_size=True), "vocab_size", "positive integer"),
    (dict(n_kv_heads=0), "n_kv_heads", "positive integer or None"),
    (dict(head_dim=-1), "head_dim", "positive integer or None"),
    (dict(d_ff=0), "d_ff", "positive integer or None"),
    (dict(position="alibi"), "position", "must be one of"),
    (dict(norm="batchnorm"), "norm", "must be one of"),
    (dict(norm_placement="sandwich"), "norm_placement", "must be one of"),
    (dict(ffn="tanh"), "ffn", "must be one of"),
    (dict(attention_impl="flash"), "attention_impl", "must be one of"),
    (dict(remat="everything"), "remat", "must be one of"),
    (dict(dtype="float64"), "dtype", "must be one of"),
    (dict(param_dtype="int8"), "param_dtype", "must be one of"),
    (dict(position="rope", n_heads=4, head_dim=5), "head_dim", "even head size"),
    (dict(position="sinusoidal", d_model=33, n_heads=3), "d_model", "even d_model"),
    (dict(rope_theta=0.0), "rope_theta", "positive"),
    (dict(rope_scaling=dict(LLAMA3, factor=0.0), position="rope"), r"rope_scaling\.factor",
     "positive number"),
    (dict(rope_scaling=dict(LLAMA3, high_freq_factor=1.0), position="rope"),
     r"rope_scaling\.high_freq_factor", "exceed low_freq_factor"),
    (dict(rope_scaling=dict(LLAMA3, original_max_position_embeddings=8.5), position="rope"),
     r"rope_scaling\.original_max_position_embeddings", "positive integer"),
    (dict(rope_scaling=dict(LLAMA3, rope_type="yarn"), position="rope"),
     r"rope_scaling\.rope_type", "llama3"),
    (dict(rope_scaling={"factor": 8.0}, position="rope"), "rope_scaling",
     r"missing key\(s\) \['low_freq_factor', 'high_freq_factor', 'original_max_position_"),
    (dict(rope_scaling=dict(LLAMA3, theta=1.0), position="rope"), "rope_scaling",
     r"unknown key\(s\) \['theta'\]; keys"),
    (dict(rope_scaling=8.0, position="rope"), "rope_scaling", "mapping"),
    (dict(rope_scaling=LLAMA3), "rope_scaling", "position='learned' has none"),
    (dict(norm_eps=0.0), "norm_eps", "positive"),
    (dict(attention_pattern=()), "attention_pattern", "at least one"),
    (dict(attention_pattern=("global", "sparse")), "attention_pattern", "unknown kind 'sparse'"),
    (dict(attention_pattern=("local",)), "window_size", "window_size >= 1"),
    (dict(window_size=-1), "window_size", ">= 0"),
    (dict(attention_pattern=("strided",)), "sparse_stride", "sparse_stride >= 1"),
    (dict(sparse_stride=-2), "sparse_stride", ">= 0"),
    (dict(dropout_rate=1.0), "dropout_rate", r"\[0, 1\)"),
    (dict(attn_dropout_rate=-0.1), "attn_dropout_rate", r"\[0, 1\)"),
    (dict(attn_dropout_rate=0.1, attention_impl="chunked"), "attn_dropout_rate", "dense"),
    (dict(attn_dropout_rate=0.1, attention_impl="xla"), "attn_dropout_rate", "dense"),
    (dict(fused_gate_up=True, ffn="gelu"), "fused_gate_up", "gated ffn"),
    (dict(init_std=0.0), "init_std", "positive"),
    (dict(lora_rank=-1), "lora_rank", ">= 0"),
    (dict(lora_rank=4, lora_targets=("q", "attention")), "lora_targets", "unknown projection"),
    (dict(lora_rank=4), "lora_targets", "at least one target"),
]


@pytest.mark.parametrize("overrides,field,words", INVALID,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_values_raise_naming_the_field(overrides, field, words):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*{words}"):
    tiny_config(**overrides)


def test_valid_edge_cases():
  assert tiny_config(d_model=30, n_heads=4, head_dim=8).head_size == 8  # head_dim frees D
  assert tiny_config(n_kv_heads=1).kv_heads == 1
  assert tiny_config().kv_heads == 4 and tiny_config().head_size == 8
  cfg = tiny_config(n_layers=5, attention_pattern=["global", "local"], window_size=2)
  assert cfg.attention_pattern == ("global", "local")  # lists become tuples
  assert cfg.layer_kinds == ("global", "local", "global", "local", "global")
  assert tiny_config(attention_pattern="strided", sparse_stride=2).attention_pattern == (
      "strided",)


def test_round_trips_through_dict_and_json():
  cfg = tiny_config(n_kv_heads=2, attention_pattern=("global", "local"), window_size=4,
                    lora_rank=2, lora_targets=("q", "v"), dtype="bfloat16", position="rope",
                    rope_scaling=LLAMA3, o_bias=False)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert json.loads(json.dumps(cfg.to_dict()))["attention_pattern"] == ["global", "local"]
  assert cfg.to_dict()["rope_scaling"] == {**LLAMA3, "rope_type": "llama3"}
  for name, preset in PRESETS.items():
    assert ModelConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset, name
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['d_modle'\]"):
    ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


def test_frozen_hashable_and_a_static_jit_argument():
  a, b = tiny_config(n_kv_heads=2), tiny_config(n_kv_heads=2)
  assert a == b and hash(a) == hash(b) and a != a.replace(n_kv_heads=1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.d_model = 64
  traces = []

  def f(cfg, x):
    traces.append(cfg)
    return x * cfg.d_model

  jitted = jax.jit(f, static_argnums=0)
  assert float(jitted(a, 1.0)) == 32.0
  assert float(jitted(b, 2.0)) == 64.0
  assert len(traces) == 1  # an equal config reuses the compiled function
  jitted(a.replace(d_model=64, n_heads=4), 1.0)
  assert len(traces) == 2
  assert a.replace(d_ff=100).ffn_size == 100 and a.ffn_size == 128  # no stale derived values
  # rope_scaling: a dict becomes a frozen RopeScaling (an int factor is the same config)
  scaled = tiny_config(position="rope", rope_scaling={**LLAMA3, "factor": 32})
  assert isinstance(scaled.rope_scaling, RopeScaling) and scaled.rope_scaling.factor == 32.0
  assert scaled == tiny_config(position="rope", rope_scaling=RopeScaling(**LLAMA3))
  assert hash(scaled) == hash(tiny_config(position="rope", rope_scaling=LLAMA3))
  assert scaled != scaled.replace(rope_scaling=None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    scaled.rope_scaling.factor = 8.0


def test_presets_have_the_issue_shapes():
  baby = get_preset("nanogpt-baby")
  assert (baby.n_layers, baby.n_heads, baby.d_model, baby.max_seq_len, baby.vocab_size) == (
      4, 4, 128, 64, 65)
  assert (baby.ffn, baby.norm, baby.position, baby.tie_embeddings) == (
      "gelu", "layernorm", "learned", True)
  char = get_preset("shakespeare-char")
  assert (char.n_layers, char.n_heads, char.d_model, char.max_seq_len, char.vocab_size) == (
      6, 6, 384, 256, 65)
  gpt2 = get_preset("gpt2-small")
  assert (gpt2.n_layers, gpt2.n_heads, gpt2.d_model, gpt2.max_seq_len, gpt2.vocab_size) == (
      12, 12, 768, 1024, 50257)
  llama = get_preset("llama-tiny")
  assert (llama.position, llama.norm, llama.ffn, llama.tie_embeddings) == (
      "rope", "rmsnorm", "swiglu", False)
  assert 1 < llama.kv_heads < llama.n_heads
  phi = get_preset("phi3-mini")
  assert (phi.n_layers, phi.d_model, phi.n_heads, phi.ffn_size, phi.vocab_size) == (
      32, 3072, 32, 8192, 32064)
  assert phi.fused_qkv and phi.fused_gate_up
  assert get_preset("gpt2-small", n_layers=2).n_layers == 2
  with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
    get_preset("gpt5")
