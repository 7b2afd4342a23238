"""nanoGPT's shakespeare-char run on any plain-text file (character-level tokenizer).

  python -m train --config=train/configs/shakespeare_char.py --workdir=runs/shakespeare \
      --config.data.corpus=path/to/input.txt

The model is the `shakespeare-char` preset (6 layers, 6 heads, 384 wide,
context 256, dropout 0.2; remat and the chunked kernel only for speed); the
text is one continuous stream (no document masking), cut into 20k-character
pieces for the train/validation split.
"""

import ml_collections

from train.config_lib import model_section
from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 5000
  c.batch_size = 64
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 20
  c.checkpoint_every = 250
  c.sample_prompt = "\n"
  c.sample_tokens = 200
  c.data.corpus = "input.txt"
  c.data.split_chunk_chars = 20_000
  c.data.val_fraction = 0.1
  c.data.seq_len = 256
  c.data.document_masking = False
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.model_type = "char"
  c.tokenizer.vocab_size = 512        # an upper bound: char models keep only the characters seen
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.model = model_section("shakespeare-char", remat="dots", attention_impl="chunked")
  return c
