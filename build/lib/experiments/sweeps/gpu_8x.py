"""gpu_8x: a Chinchilla-style isoFLOP sweep for one 8-GPU node (documented; not run here).

  SCALING_CORPUS=/data/pile/*.jsonl \
    python -m experiments.sweep --sweep=gpu_8x --workdir=runs/sweeps/gpu_8x
  python -m experiments.scaling_fit --workdir=runs/sweeps/gpu_8x

Five budgets C = 6 N D from 1e17 to 1e19 FLOPs (half a decade apart) with seven ladder
rungs each (L = 4, 8, 16, 32; d = 32 L, 40 L, ..., 64 L, so rungs ~1.3x apart; 32-wide
heads), centred on 20 tokens per parameter: 35 runs. 1024-token sequences, 256 per
step (262k tokens, the batch Kaplan et al. used), bfloat16 compute, a 32k sentencepiece
BPE vocabulary, data parallel over the 8 GPUs (mesh (8, 1, 1); use fsdp for the largest
rungs if memory runs short), learning rate from Kaplan et al.'s LR(N) rule.

Cost: 1.35e20 FLOPs with attention and the LM head (`--dry_run` prints it); at 40% MFU of
8 x 312 TFLOP/s (A100, bf16) that is about 38 hours. SCALING_CORPUS must name text files,
directories, globs or .jsonl (train/corpus.py) holding at least 20B tokens, the largest D,
so that no run repeats data.
"""

import os

from experiments.scaling import spec

BASE_CONFIG = "train/configs/default.py"
BATCH_SIZE, SEQ_LEN = 256, 1024
BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)
WIDTHS = (32, 40, 48, 56, 64)  # a finer ladder: rungs ~1.3x apart in N
MAX_TOKENS = 2e10


def corpus() -> str:
  path = os.environ.get("SCALING_CORPUS")
  if not path:
    raise spec.SweepError("set SCALING_CORPUS to a corpus of at least 20B tokens (files, "
                          "directories, globs or .jsonl; see train/corpus.py)")
  return path


def get_sweep() -> spec.Sweep:
  overrides = {
      "data.corpus": corpus(), "tokenizer.kind": "sentencepiece", "tokenizer.vocab_size": 32000,
      "model.dtype": "bfloat16", "model.attention_impl": "xla", "mesh_shape": (8, 1, 1),
      "eval_batches": 32, "eval_batch_size": 64, "sample_tokens": 0, "progress_bar": False,
      "keep_checkpoints": 1, "log_every": 50,
  }
  model = spec.base_model_config(BASE_CONFIG, overrides, SEQ_LEN)
  shapes = spec.ladder(max_layers=32, widths_per_layer=WIDTHS, min_layers=4,
                       heads=lambda d: d // 32)
  runs = spec.isoflop_runs(BUDGETS, shapes, model, per_budget=7, tokens_per_param=20.0,
                           lr=spec.lr_kaplan, tokens_per_step=BATCH_SIZE * SEQ_LEN,
                           max_tokens=MAX_TOKENS)
  return spec.Sweep("gpu_8x", runs, base_config=BASE_CONFIG, batch_size=BATCH_SIZE,
                    seq_len=SEQ_LEN, overrides=overrides, warmup_bounds=(100, 1000),
                    evals_per_run=4, description=__doc__)
