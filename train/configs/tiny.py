"""A seconds-long run for tests: a 2-layer 32-wide model on the stdlib's json package, bytes."""

import os

import ml_collections

from train.config_lib import model_section
from train.configs import default
from train.corpus import stdlib_root


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 8
  c.batch_size = 8
  c.log_every = 2
  c.eval_every = 4
  c.eval_batches = 2
  c.checkpoint_every = 4
  c.progress_bar = False
  c.trackers = ("jsonl", "tensorboard")
  c.peak_flops = 1e11
  c.sample_tokens = 0
  c.data.corpus = os.path.join(stdlib_root(), "json", "*.py")  # ~50 kB of real code
  c.data.split_chunk_chars = 2000
  c.data.val_fraction = 0.2
  c.data.seq_len = 32
  c.tokenizer.kind = "byte"
  c.tokenizer.vocab_size = 320
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.model = model_section(None, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
  return c
