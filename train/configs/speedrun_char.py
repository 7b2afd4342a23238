"""The speedrun recipe: nanoGPT's char-level validation loss in a fraction of its time.

  python -m experiments.speedrun      # against nanoGPT's own loop, same data, same windows

Draft.
"""

import ml_collections

from train.config_lib import model_section
from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 2000
  c.batch_size = 12
  c.eval_every = 100
  c.data.seq_len = 64
  c.data.document_masking = False
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.muon_lr = 0.02
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = True
  c.model = model_section(
      "nanogpt-baby", dropout_rate=0.0, attn_dropout_rate=0.0, remat="dots",
      attention_impl="chunked")
  return c
