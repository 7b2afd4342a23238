"""cpu: the default scaling sweep, 20 runs on the embedded corpus in about half an hour on 2 cores.

  python -m experiments.sweep --sweep=cpu --workdir=runs/sweeps/cpu
  python -m experiments.scaling_fit --workdir=runs/sweeps/cpu

Layout (approach 2 of Hoffmann et al. 2022): four compute budgets of 2e11, 5e11, 1.25e12
and 3e12 FLOPs (2.5x apart, 1.2 decades), counted exactly as the trainer counts them
(6 N + the LM head's 6 d V + attention's 12 L T d per token; at these sizes 6ND alone
misses 20-260% of the work, and an isoFLOP layout in 6ND would hand the smallest models
up to 3.6x more real compute). At each budget five consecutive rungs of the shape ladder
(experiments/scaling/spec.py: L = 1, 2, 4; d = 32 L, 48 L, 64 L, plus d = 16 and 24 at
L = 1; aspect ratio 32-64 above d = 32; 16-wide heads below d = 128, 32-wide from there)
centred on the rung nearest 200 tokens per non-embedding parameter, moved up the ladder
where the smallest model would need more tokens than the corpus has. Each model trains on
D = C / (FLOPs per token) tokens: 3k - 390k non-embedding parameters (2.1 decades),
0.4M - 10.8M tokens, 2.5e13 FLOPs in all (`--dry_run`): ~20 minutes at 25 GFLOP/s plus
~15 s of compilation and data loading per run.

Why 200 tokens per parameter, not Chinchilla's 20: a pilot at C = 6ND = 2e11 with this
recipe (experiments/scaling/README.md) put the best model at 12k parameters and 2.7M
tokens, D/N = 217, with the loss rising steeply on both sides.

Recipe shared by every run: byte-level tokens of the Python standard library (12 MB;
11.8M training tokens, so no run repeats data), sequences of 128 tokens in batches of 16
(2,048 tokens per step), AdamW (b2 0.95, weight decay 0.1), warmup 5% of the run, cosine
decay to 10% over the run's own length (as Chinchilla; a schedule longer than the run
would overstate the loss), one seed, and a peak learning rate of 0.5 / d_model (below).
Validation: the first 16 batches of 64 sequences of the held-out split (131k tokens, the
same for every run), once at the end.
"""

from experiments.scaling import spec

BASE_CONFIG = "train/configs/default.py"
BATCH_SIZE, SEQ_LEN = 16, 128
BUDGETS = (2e11, 5e11, 1.25e12, 3e12)  # FLOPs, counted exactly (spec.flops_per_token_of)
TOKENS_PER_PARAM = 200.0
MAX_TOKENS = 11e6  # the stdlib corpus has 11.8M training tokens (bytes): no run repeats data
# The recipe is spelled out, not inherited, so that a change of train/configs/default.py
# cannot change this experiment; remat and the attention kernel are left to the trainer
# (they change speed, not numbers).
OVERRIDES = {
    "model.position": "rope", "model.norm": "rmsnorm", "model.ffn": "gelu",
    "model.attn_bias": False, "model.mlp_bias": False, "model.tie_embeddings": True,
    "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1, "optim.b1": 0.9, "optim.b2": 0.95,
    "optim.eps": 1e-8, "optim.weight_decay": 0.1, "optim.decay_embeddings": False,
    "optim.grad_clip": 1.0, "data.document_masking": True, "data.val_fraction": 0.05,
    "data.corpus": "stdlib",
    "tokenizer.kind": "byte",
    "eval_batches": 16,
    "eval_batch_size": 64,
    "sample_tokens": 0,
    "trackers": ("jsonl",),
    "progress_bar": False,
    "keep_checkpoints": 1,
}


# Peak learning rate 0.5 / d_model (Adam's muP scaling with width), from the lr_probe sweep
# on this recipe: d = 32: 1.5e-2 beat 3e-2; d = 48: 1e-2 beat 3e-3 and 2e-2; d = 128 (L = 2):
# 3e-3 beat 1e-3 and 1e-2. Kaplan et al.'s LR(N) (1.4e-3 - 1.9e-3 at these sizes, tuned for
# 0.5M-token batches) is 2-7x lower and costs 0.2-0.6 nats at d = 48.
learning_rate = spec.lr_inverse_width(0.5)


def shapes() -> list[spec.Shape]:
  """The ladder up to L = 4, continued below d = 32 by two one-head, one-layer rungs."""
  return [spec.Shape(1, 16, 1), spec.Shape(1, 24, 1)] + spec.ladder(max_layers=4)


def get_sweep() -> spec.Sweep:
  model = spec.base_model_config(BASE_CONFIG, OVERRIDES, SEQ_LEN)
  runs = spec.isoflop_runs(BUDGETS, shapes(), model, per_budget=5,
                           tokens_per_param=TOKENS_PER_PARAM, lr=learning_rate,
                           tokens_per_step=BATCH_SIZE * SEQ_LEN, max_tokens=MAX_TOKENS,
                           compute="exact")
  return spec.Sweep("cpu", runs, base_config=BASE_CONFIG, batch_size=BATCH_SIZE,
                    seq_len=SEQ_LEN, overrides=OVERRIDES, budget_flops="exact",
                    description=__doc__)
