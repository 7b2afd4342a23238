"""lr_probe: the learning-rate check behind the cpu sweep's rule LR = 0.5 / d_model.

  python -m experiments.sweep --sweep=lr_probe --workdir=runs/sweeps/lr_probe

Three of the cpu sweep's shapes, each at several peak learning rates, with the cpu sweep's
recipe otherwise (byte-level stdlib, 16 x 128 tokens per step, warmup 5%, cosine to 10%):
L1d32 and L1d48 for 600 steps (1.2M tokens), L2d128 for 250 steps (0.5M tokens). Validation
losses measured here (experiments/scaling/README.md):

  L1d32   1.5e-2: 1.741   3e-2: 1.849
  L1d48   1e-3: 2.279   3e-3: 1.926   1e-2: 1.627   2e-2: 1.816
  L2d128  1e-3: 2.046   3e-3: 1.830   1e-2: 2.324
"""

from experiments.scaling import spec
from experiments.sweeps import cpu

PROBES = ((spec.Shape(1, 32, 2), 600, (1.5e-2, 3e-2)),
          (spec.Shape(1, 48, 3), 600, (1e-3, 3e-3, 1e-2, 2e-2)),
          (spec.Shape(2, 128, 4), 250, (1e-3, 3e-3, 1e-2)))


def get_sweep() -> spec.Sweep:
  tokens_per_step = cpu.BATCH_SIZE * cpu.SEQ_LEN
  runs = [spec.Run(f"{shape.name}-lr{lr:g}", shape, tokens=steps * tokens_per_step, lr=lr)
          for shape, steps, lrs in PROBES for lr in lrs]
  return spec.Sweep("lr_probe", runs, base_config=cpu.BASE_CONFIG, batch_size=cpu.BATCH_SIZE,
                    seq_len=cpu.SEQ_LEN, overrides=cpu.OVERRIDES, description=__doc__)
