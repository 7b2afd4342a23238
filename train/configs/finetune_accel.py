"""LoRA fine-tuning of an imported Hugging Face model on a TPU or GPU: lora.py for accelerators.

  python -m model.hf import --hf_dir=microsoft/Phi-3-mini-4k-instruct --workdir=runs/phi3 \
      --dtype=bfloat16                  # optional: a bfloat16 base holds half the memory
  python -m train --config=train/configs/finetune_accel.py --config.init_from=runs/phi3 \
      --config.data.corpus='my_text/*.jsonl' --workdir=runs/phi3_mine
  python -m experiments.plan --preset=phi3-mini --mesh=1,8,1 --batch=8 --seq_len=1024 \
      --remat=full --dtype=bfloat16 --hbm=16GiB   # the full model's memory; LoRA needs less

Mixed precision: the forward and backward matmuls run in bfloat16 (`model.dtype`, a
runtime field a fine-tune may set), while norms, softmax, the LM head's logits and
the loss stay float32 (model/layers.py, model/attention.py). The adapters, the
only trained weights, are float32 masters with float32 AdamW moments, even when the
base was imported in bfloat16 (the frozen base needs no master copy: it never
updates). The frozen base and the adapters are sharded FSDP-style over every
device (mesh (1, -1, 1)), batches over the same axis; attention is the platform's
kernel ('auto': splash on a TPU, cuDNN on a GPU where it serves, else chunked) and
each block is recomputed in the backward pass (remat 'full') so 1024-token rows fit.

Rank 16, alpha 32 on the base's attention projections (`model.lora_targets` adds the
MLP's), 2,000 steps of 64 x 1024 tokens at 2e-4 with 100 warmup steps: common
settings for instruction or domain tuning of 1-8B models; tune them to the data.
The default text is lora.py's (the stdlib's language reference); pass your own
with --config.data.corpus.
"""

import ml_collections

from train.configs import lora


def get_config() -> ml_collections.ConfigDict:
  c = lora.get_config()
  c.num_steps = 2000
  c.batch_size = 64
  c.mesh_shape = (1, -1, 1)
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 20
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.data.seq_len = 1024
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 100
  c.model.lora_rank = 16
  c.model.lora_alpha = 32.0
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.attention_impl = "auto"
  return c
