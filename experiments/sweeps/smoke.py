"""smoke: three tiny runs at one compute budget, seconds each (the test suite runs it).

  python -m experiments.sweep --sweep=smoke --workdir=runs/sweeps/smoke
  python -m experiments.scaling_fit --workdir=runs/sweeps/smoke

One isoFLOP budget with three one-layer models 16, 24 and 32 wide on the standard library's
`email` package (~0.4 MB): enough to exercise the runner, the record schema and every fit's
"too few points" path, nothing to conclude from.
"""

import os
import sysconfig

from experiments.scaling import spec

BASE_CONFIG = "train/configs/tiny.py"
BATCH_SIZE, SEQ_LEN = 8, 32
OVERRIDES = {
    "data.corpus": os.path.join(sysconfig.get_paths()["stdlib"], "email"),
    "data.val_fraction": 0.1,
    "tokenizer.kind": "byte",
    "eval_batches": 2,
    "sample_tokens": 0,
    "trackers": ("jsonl",),
    "progress_bar": False,
    "async_checkpoints": False,
    "peak_flops": 1e11,
}


def get_sweep() -> spec.Sweep:
  model = spec.base_model_config(BASE_CONFIG, OVERRIDES, SEQ_LEN)
  shapes = spec.ladder(max_layers=1, widths_per_layer=(16, 24, 32))
  runs = spec.isoflop_runs([4e8], shapes, model, per_budget=3, tokens_per_param=1.0,
                           lr=lambda shape, n: 1e-2, tokens_per_step=BATCH_SIZE * SEQ_LEN,
                           min_steps=10)
  return spec.Sweep("smoke", runs, base_config=BASE_CONFIG, batch_size=BATCH_SIZE,
                    seq_len=SEQ_LEN, overrides=OVERRIDES, checkpoints_per_run=4,
                    warmup_bounds=(2, 10), description=__doc__)
