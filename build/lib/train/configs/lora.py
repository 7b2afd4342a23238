"""LoRA fine-tuning of a trained or imported model on new text (train/finetune.py).

  python -m train --config=train/configs/lora.py --config.init_from=runs/default \
      --workdir=runs/default_lora
  python -m train --config=train/configs/lora.py --config.init_from=runs/llama \
      --config.data.corpus=notes/ --workdir=... \
      --config.model.lora_targets="('q','k','v','o','up','gate','down')"

The base (`init_from`) gives the architecture, the weights (frozen) and the
tokenizer (config.tokenizer is not used); only rank-r adapters on the chosen
projections train. `model.lora_targets` unset adapts the base's attention
projections (q, k, v, o; qkv, o when fused); any of q, k, v, o, qkv, up, gate,
gate_up, down that the base has may be named. Other model fields may only be
the runtime ones (attention_impl, attn_chunk_size, remat, dtype, dropout). The
sequence length is the base run's unless --config.data.seq_len sets one.

The default text is the stdlib's `pydoc_data/topics.py`, which exists in every
Python install: the language reference's English prose that `help()` shows,
cut into 4000-character pieces for the split. For a base trained on code (the
default run) it is a shift from code to prose. Pass your own text with
--config.data.corpus=PATH (files, directories, globs, .jsonl).
"""

import os

import ml_collections
from ml_collections import config_dict

from train.config_lib import model_section
from train.configs import default
from train.corpus import stdlib_root


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.init_from = ""              # required: the base workdir
  c.num_steps = 300
  c.log_every = 25
  c.eval_every = 100            # and once before the first step: the base's loss on the text
  c.checkpoint_every = 100
  c.sample_prompt = "The "
  c.data.corpus = os.path.join(stdlib_root(), "pydoc_data", "topics.py")
  c.data.split_chunk_chars = 4000
  c.data.seq_len = config_dict.placeholder(int)  # None: the base run's (train/finetune.py)
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0    # decay would pull A toward 0 while B starts there
  # None keeps the base's value; LoRA fields and the runtime fields are all a run may set.
  c.model = model_section(None, lora_rank=8, lora_alpha=16.0)
  return c
