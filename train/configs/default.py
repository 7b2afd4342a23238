"""The default run: a small GPT on the Python standard library, ~10 minutes on 2 CPU cores.

  python -m train --config=train/configs/default.py --workdir=runs/default
  python -m train --config=train/configs/default.py --workdir=runs/x --config.num_steps=200

Every key of a run config is defined here (other configs start from this one
and change a few); an override of a key that does not exist fails loudly.
"""

import ml_collections

from train.config_lib import model_section


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""              # a base workdir to LoRA-fine-tune (train/configs/lora.py)
  c.num_steps = 1500
  c.batch_size = 16             # sequences per optimizer step (global; even: 2 CPU devices)
  c.grad_accum_steps = 1        # micro-batches per step (lax.scan inside the jitted step)
  c.mesh_shape = (-1, 1, 1)     # (data, fsdp, tensor); -1 takes the remaining devices

  c.log_every = 50
  c.eval_every = 250
  c.eval_batches = 0            # 0: the whole validation split; n: n batches spread over it
  c.eval_batch_size = 0         # 0: the micro-batch size
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.progress_bar = True
  c.trackers = ("jsonl", "tensorboard")  # metrics.jsonl always; also 'tensorboard', 'wandb'
  c.peak_flops = 0.0            # FLOP/s for MFU; 0: a float32 matmul timed at start on CPU,
                                # the bf16 spec of the chip on TPU/GPU (train/flops.py)
  c.sample_prompt = "def "
  c.sample_tokens = 64          # tokens of text sampled at each eval (0: none)
  c.sample_temperature = 0.8

  c.wandb = ml_collections.ConfigDict()  # used when trackers has 'wandb' (pip install .[wandb])
  c.wandb.project = "transformer-lab"
  c.wandb.entity = ""           # '' -> the logged-in user's default
  c.wandb.name = ""             # '' -> the workdir's name

  c.profile = ml_collections.ConfigDict()  # a jax.profiler trace into WORKDIR/profile/
  c.profile.start_step = 5      # the first traced step (after compilation and warm-up)
  c.profile.num_steps = 0       # steps traced (0: no trace)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "stdlib"      # 'stdlib', files, directories, globs, URLs, hf:NAME (comma list)
  c.data.val_corpus = ""        # a validation corpus ('' -> a hash split of data.corpus)
  c.data.prepared = ""          # shards from `python -m train.prepare` ('' -> prepared here)
  c.data.jsonl_field = "text"   # the text field of .jsonl records, parquet columns, hf datasets
  c.data.val_fraction = 0.05    # by a hash of each document piece's name
  c.data.split_chunk_chars = 0  # > 0: cut longer documents into pieces before the split
  c.data.seq_len = 256
  c.data.document_masking = True
  c.data.workers = 0            # tokenizer processes when preparing (0: one per CPU core)
  c.data.cache_dir = ""         # '' -> $TRANSFORMER_LAB_CACHE or ~/.cache/transformer-lab

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"   # or 'byte' (no training)
  c.tokenizer.model_type = "bpe"       # bpe | unigram | char
  c.tokenizer.vocab_size = 2048
  c.tokenizer.byte_fallback = True
  c.tokenizer.character_coverage = 0.9995
  c.tokenizer.max_train_chars = 20_000_000

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"               # adamw | muon (Muon on the blocks' matrices, AdamW else)
  c.optim.lr = 3e-3                    # AdamW's peak (with muon: embeddings, head, norms, biases)
  c.optim.muon_lr = 0.02               # muon: the peak lr of the blocks' matrices
  c.optim.muon_momentum = 0.95         # muon: Nesterov momentum before orthogonalization
  c.optim.muon_ns_steps = 5            # muon: Newton-Schulz iterations per update
  c.optim.schedule = "cosine"          # cosine | linear | constant | wsd | rsqrt
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 0.1
  c.optim.decay_fraction = 0.2         # wsd: the final fraction of steps that decays
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False
  c.optim.grad_clip = 1.0

  # remat='dots' and the chunked attention kernel change no number, only speed: on CPU,
  # recomputing each block's elementwise work in the backward pass beats storing the
  # scanned layers' residuals, and the chunked kernel skips the masked (future) blocks.
  c.model = model_section(
      None, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, position="rope",
      norm="rmsnorm", ffn="gelu", attn_bias=False, mlp_bias=False, tie_embeddings=True,
      remat="dots", attention_impl="chunked")
  return c
