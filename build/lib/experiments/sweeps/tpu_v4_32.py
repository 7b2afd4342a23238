"""tpu_v4_32: an isoFLOP sweep for a TPU v4-32 slice, 4 hosts (documented; not run here).

  # on every host of the slice, the same command (process 0 writes results.jsonl):
  SCALING_CORPUS=gs://bucket/corpus/*.jsonl \
    python -m experiments.sweep --sweep=tpu_v4_32 --workdir=/mnt/runs/sweeps/tpu_v4_32 \
      --distributed
  python -m experiments.scaling_fit --workdir=/mnt/runs/sweeps/tpu_v4_32

Five budgets C = 6 N D from 1e18 to 1e20 FLOPs (half a decade apart) with seven ladder
rungs each (L = 8, 16, 32, 64; d = 32 L, 40 L, ..., 64 L, rungs ~1.3x apart; 64-wide
heads from d = 1024), centred on 20 tokens per parameter: 35 runs. 2048-token
sequences, 256 per step (0.5M tokens), bfloat16 compute, 32k sentencepiece BPE, FSDP over
the 16 chips (mesh (1, 16, 1)), learning rate from Kaplan et al.'s LR(N) rule. The
workdir must be on storage every host sees (orbax writes checkpoints from all hosts).

Cost: 1.33e21 FLOPs with attention and the LM head (`--dry_run` prints it); at 40% MFU of
16 x 275 TFLOP/s that is about 210 hours, so run the lower budgets first (--only) and add
the top budget when the fits ask for it.
SCALING_CORPUS must hold at least 80B tokens, the largest D, so that no run repeats data.
"""

from experiments.scaling import spec
from experiments.sweeps.gpu_8x import corpus

BASE_CONFIG = "train/configs/default.py"
BATCH_SIZE, SEQ_LEN = 256, 2048
BUDGETS = (1e18, 3e18, 1e19, 3e19, 1e20)
WIDTHS = (32, 40, 48, 56, 64)  # a finer ladder: rungs ~1.3x apart in N
MAX_TOKENS = 8e10


def heads(d_model: int) -> int:
  return d_model // 64 if d_model >= 1024 else d_model // 32


def get_sweep() -> spec.Sweep:
  overrides = {
      "data.corpus": corpus(), "tokenizer.kind": "sentencepiece", "tokenizer.vocab_size": 32000,
      "model.dtype": "bfloat16", "model.attention_impl": "xla", "mesh_shape": (1, 16, 1),
      "eval_batches": 32, "eval_batch_size": 64, "sample_tokens": 0, "progress_bar": False,
      "keep_checkpoints": 1, "log_every": 50,
  }
  model = spec.base_model_config(BASE_CONFIG, overrides, SEQ_LEN)
  shapes = spec.ladder(max_layers=64, widths_per_layer=WIDTHS, min_layers=8, heads=heads)
  runs = spec.isoflop_runs(BUDGETS, shapes, model, per_budget=7, tokens_per_param=20.0,
                           lr=spec.lr_kaplan, tokens_per_step=BATCH_SIZE * SEQ_LEN,
                           max_tokens=MAX_TOKENS)
  return spec.Sweep("tpu_v4_32", runs, base_config=BASE_CONFIG, batch_size=BATCH_SIZE,
                    seq_len=SEQ_LEN, overrides=overrides, warmup_bounds=(100, 1000),
                    evals_per_run=4, description=__doc__)
