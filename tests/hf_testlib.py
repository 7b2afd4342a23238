"""Tiny random Hugging Face models and a tiny BPE tokenizer for the model.hf tests.

Every model is 2 layers, 32 wide, 4 query heads, vocab VOCAB; weights (norm gains
and biases included) are redrawn from N(0, WEIGHT_STD^2) so that a mapping that
swaps, drops or transposes any tensor changes the logits by far more than the
1e-4 tolerance, and so that greedy decoding has clear winners.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import torch
import transformers

import model

VOCAB = 96
WEIGHT_STD = 0.35
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2 of the tiny tokenizer
BOS, EOS = 1, 2
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "Paris is in France and Rome is in Italy; both are capitals.",
] * 8


# Compiled once per config (eager scanned layers re-trace at every call).
forward = jax.jit(model.apply, static_argnums=0)
init = jax.jit(model.init, static_argnums=0)


# Llama 3's RoPE scaling for the tiny models: head size 8 and theta 500 give wavelengths 6.3,
# 29.7, 140 and 664 positions; a pretraining context of 32 puts them in all three of its bands
# (< 8 kept, 8..32 interpolated, > 32 stretched 8x). transformers wants max_position_embeddings
# above the original context.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LLAMA3 = {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 128}


def hf_config(arch: str, *, kv_heads: int = 2, **overrides):
  """A tiny transformers config of `arch` ('gpt2', 'llama', 'mistral', 'phi3', 'qwen2')."""
  if arch == "gpt2":
    base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**base, **overrides})
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
  if arch == "llama":
    return transformers.LlamaConfig(**{**common, "rope_theta": 500.0, **overrides})
  if arch == "mistral":
    return transformers.MistralConfig(**{**common, "sliding_window": 4, **overrides})
  if arch == "phi3":
    return transformers.Phi3Config(**{**common, "sliding_window": 5, **overrides})
  if arch == "qwen2":
    return transformers.Qwen2Config(**{**common, "rope_theta": 500.0, **overrides})
  raise ValueError(arch)


MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def hf_model(arch: str, *, seed: int = 0, **config_overrides):
  """A random tiny model in eval mode with eager attention."""
  torch.manual_seed(seed)
  config = hf_config(arch, **config_overrides)
  config._attn_implementation = "eager"
  model = getattr(transformers, MODEL_CLASSES[arch])(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, WEIGHT_STD)
  return model


def save(model, path: str, **kwargs) -> str:
  model.save_pretrained(path, **kwargs)
  return path


def reload(arch: str, path: str):
  return getattr(transformers, MODEL_CLASSES[arch]).from_pretrained(
      path, attn_implementation="eager").eval()


def logits(model, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.float().numpy()


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
  """transformers generate(do_sample=False), never stopping early."""
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def train_tokenizer(path: str):
  """A byte-level BPE with VOCAB entries trained on CORPUS, saved as tokenizer.json at path."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tok.save(path)
  return tok
