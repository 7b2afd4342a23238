"""pilot: one 6ND isoFLOP budget over seven rungs, the run that set the cpu sweep's centre.

  python -m experiments.sweep --sweep=pilot --workdir=runs/sweeps/pilot

C = 6 N D = 2e11 FLOPs (N non-embedding) for the seven smallest rungs of the cpu ladder,
with the cpu sweep's recipe and learning rates. Validation losses measured here
(experiments/scaling/README.md):

  N     3.1k   7.0k   12.4k  27.8k  49k    99k    222k
  D/N   3430   683    217    43     14     3.4    0.7
  loss  1.706  1.535  1.458  1.674  2.055  2.611  2.979

The minimum near D/N = 200 is why the cpu sweep centres its windows there, not at 20.
"""

from experiments.scaling import spec
from experiments.sweeps import cpu


def get_sweep() -> spec.Sweep:
  model = spec.base_model_config(cpu.BASE_CONFIG, cpu.OVERRIDES, cpu.SEQ_LEN)
  runs = spec.isoflop_runs([2e11], cpu.shapes()[:7], model, per_budget=7, tokens_per_param=40,
                           lr=cpu.learning_rate, tokens_per_step=cpu.BATCH_SIZE * cpu.SEQ_LEN)
  return spec.Sweep("pilot", runs, base_config=cpu.BASE_CONFIG, batch_size=cpu.BATCH_SIZE,
                    seq_len=cpu.SEQ_LEN, overrides=cpu.OVERRIDES, description=__doc__)
