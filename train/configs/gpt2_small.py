"""GPT-2 small (124M) on an accelerator mesh: nanoGPT's GPT-2 reproduction, end to end.

  # 1. the corpus into shards, once (a local directory or gs://; --workers = CPU cores)
  python -m train.prepare --config=train/configs/gpt2_small.py --out=gs://BUCKET/owt \
      --config.data.corpus='gs://BUCKET/openwebtext/*.jsonl.zst' \
      --tokenizer=PATH/TO/gpt2 --workers=32        # a Hugging Face GPT-2 directory
  # 2. train on every host of the slice (FSDP over all devices; see train/README.md)
  python -m train --config=train/configs/gpt2_small.py --workdir=runs/gpt2 \
      --config.data.prepared=gs://BUCKET/owt
  # 3. sample / evaluate / export like any workdir
  python -m sample --workdir=runs/gpt2 --prompt="The "

0.5M tokens per step (512 x 1024), warmup 700 steps, cosine to 10%, AdamW (0.9, 0.95)
at 6e-4, as in nanoGPT's GPT-2 reproduction; bfloat16 compute with float32 parameters
and optimizer state; parameters and optimizer state are sharded over the 'fsdp' axis,
batches over 'data' x 'fsdp'. Without data.prepared the corpus is prepared implicitly
(fine for a few GB; the explicit step parallelizes and can be shared by many runs), with
a 32,000-piece sentencepiece BPE trained on it unless --tokenizer gives one.
"""

import ml_collections

from train.config_lib import model_section
from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 20_000
  c.batch_size = 512
  c.grad_accum_steps = 8
  c.mesh_shape = (1, -1, 1)
  c.log_every = 10
  c.eval_every = 1000
  c.eval_batches = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample_prompt = "The "
  c.data.corpus = "data/*.jsonl"
  c.data.seq_len = 1024
  c.tokenizer.vocab_size = 32_000
  c.tokenizer.model_type = "bpe"
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 700
  c.optim.b2 = 0.95
  c.model = model_section("gpt2-small", dtype="bfloat16", vocab_size=None, remat="dots",
                          attention_impl="chunked")
  return c
