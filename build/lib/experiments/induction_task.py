"""A synthetic task where induction heads must form, and a hand-built induction circuit.

  python -m experiments.induction_task --workdir=runs/induction \
      --out=experiments/results/induction

trains a 2-layer attention-only transformer (ffn='none') on sequences of
random letters in which a random-length prefix is repeated once:

  r_1 .. r_h r_1 .. r_h x_1 .. x_m        h ~ U[min_half, max_half], r, x random

The repeat's offset h changes from row to row, so no positional rule predicts
the second copy: the model has to find the previous occurrence of the
current token by content and copy the token after it, the two-layer
induction circuit (a previous-token head in layer 0 writes "my predecessor
was a" into each position; an induction head in layer 1 queries for "my
predecessor was <current token>" and copies what it finds). The trained
model is written as an ordinary workdir (byte tokenizer), then
`experiments.interpret` analyses it into --out.

`handmade_induction_model` builds the same circuit by hand (no training):
the tests use it as a model whose induction heads are known.
"""

from __future__ import annotations

import os
import shutil
import string
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import model
from experiments import interpret
from experiments.interp import ablation, figures, induction
from experiments.interp.losses import run_with_intermediates, token_losses
from model import store
from model.config import ModelConfig


def task_config(**overrides) -> ModelConfig:
  """The demo model: 2 layers x 4 heads of width 32, attention only, RoPE, byte vocabulary."""
  fields = dict(vocab_size=259, d_model=64, n_layers=2, n_heads=4, head_dim=32, ffn="none",
                max_seq_len=32, position="rope", attn_bias=False, tie_embeddings=True)
  return ModelConfig(**{**fields, **overrides})


def sample_batch(rng: np.random.Generator, batch: int, seq_len: int, token_ids, min_half: int,
                 max_half: int) -> np.ndarray:
  """[batch, seq_len] random tokens whose first h (random per row) are repeated once."""
  token_ids = np.asarray(token_ids)
  if 2 * max_half > seq_len:
    raise ValueError(f"sample_batch: 2 * max_half={2 * max_half} exceeds seq_len={seq_len}")
  tokens = rng.choice(token_ids, size=(batch, seq_len)).astype(np.int32)
  for row, h in enumerate(rng.integers(min_half, max_half + 1, size=batch)):
    tokens[row, h:2 * h] = tokens[row, :h]
  return tokens


def train(cfg: ModelConfig, *, steps: int, batch: int, lr: float, seed: int, token_ids,
          min_half: int, max_half: int, eval_every: int = 250, eval_half: int | None = None,
          log=print):
  """A minimal optax loop (AdamW, warmup + cosine) on next-token cross-entropy.

  Every `eval_every` steps it records, on fixed repeated sequences of `eval_half` tokens,
  the loss on the second copy and every head's induction score. Returns (params, history).
  """
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr / 10)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  opt_state = optimizer.init(params)

  def loss_fn(params, tokens_BT):
    logits_BTV, _ = model.apply(cfg, params, tokens_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, tokens_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  rep = induction.repeated_tokens(np.random.default_rng(seed + 1), 32,
                                  eval_half or (min_half + max_half) // 2, token_ids)
  history = {"step": [], "train_loss": [], "repeated_loss": [], "induction_scores": []}
  start, losses = time.time(), []
  for i in range(1, steps + 1):
    tokens_BT = sample_batch(rng, batch, cfg.max_seq_len + 1, token_ids, min_half, max_half)
    params, opt_state, loss = step(params, opt_state, tokens_BT)
    losses.append(loss)
    if i % eval_every == 0 or i == steps:
      _, sown = run_with_intermediates(cfg, params, rep.tokens_BT)
      scores_LN = induction.induction_scores(sown["attn_weights"], rep)
      repeated = float(np.asarray(token_losses(cfg, params, rep.tokens_BT))[
          :, ablation.repeated_half(rep)].mean())
      history["step"].append(i)
      history["train_loss"].append(float(np.mean(jax.device_get(losses))))
      history["repeated_loss"].append(repeated)
      history["induction_scores"].append(scores_LN.round(4).tolist())
      losses = []
      best = np.unravel_index(scores_LN.argmax(), scores_LN.shape)
      log(f"step {i}/{steps}  train loss {history['train_loss'][-1]:.3f}  loss on the repeated "
          f"half {repeated:.3f}  best induction score {scores_LN.max():.2f} "
          f"(L{best[0]}H{best[1]})  ({time.time() - start:.0f}s)")
  return params, history


def handmade_induction_model(vocab: int = 16, max_len: int = 32, sharpness: float = 4.0):
  """(cfg, params) of a 2-layer attention-only model with a hand-built induction circuit.

  The residual stream [D = 3 vocab + max_len] has four subspaces: TOK (one-hot
  current token), POS (one-hot position), PREV (the previous token, written by
  head L0H0) and OUT (the prediction, written by head L1H0 and read by the LM
  head). RMSNorm scales every row alike, so the one-hot codes survive it.
    L0H0  previous-token head: query POS_t matches key POS_{t-1}; copies TOK into PREV.
    L1H0  induction head: query TOK_t matches key PREV_s (token s-1 == token t);
          copies TOK_s into OUT, and the LM head reads OUT as logits.
    L1H1  a decoy previous-token head (attends to t - 1, writes nothing).
  Every other head has zero weights (uniform attention, zero output).
  """
  tok, pos = 0, vocab
  prev, out = vocab + max_len, 2 * vocab + max_len
  d = 3 * vocab + max_len
  h = max(vocab, max_len)
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=2, n_heads=4, head_dim=h,
                    max_seq_len=max_len, ffn="none", norm="rmsnorm", attn_bias=False,
                    tie_embeddings=False, position="learned")
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
  p = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  p["layers"]["attn_norm"]["scale"][:] = 1.0
  p["final_norm"]["scale"][:] = 1.0
  p["embed"]["embedding"][np.arange(vocab), tok + np.arange(vocab)] = 1.0
  p["pos_embedding"][np.arange(max_len), pos + np.arange(max_len)] = 1.0
  attn = p["layers"]["attn"]
  q, k, v, o = (attn[name]["kernel"] for name in "qkvo")

  def head_cols(head, idx):
    return head * h + np.asarray(idx)

  positions = np.arange(max_len - 1)
  for layer, head in ((0, 0), (1, 1)):  # previous-token heads: POS_t . POS_{s+1}
    q[layer, pos + positions + 1, head_cols(head, positions + 1)] = sharpness
    k[layer, pos + positions, head_cols(head, positions + 1)] = sharpness
  tokens = np.arange(vocab)
  v[0, tok + tokens, head_cols(0, tokens)] = 1.0  # L0H0 moves TOK -> PREV
  o[0, head_cols(0, tokens), prev + tokens] = 1.0
  q[1, tok + tokens, head_cols(0, tokens)] = sharpness  # L1H0: TOK_t . PREV_s
  k[1, prev + tokens, head_cols(0, tokens)] = sharpness
  v[1, tok + tokens, head_cols(0, tokens)] = 1.0  # ... and moves TOK_s -> OUT
  o[1, head_cols(0, tokens), out + tokens] = 1.0
  p["lm_head"]["kernel"][out + tokens, tokens] = 4.0 * sharpness
  return cfg, jax.tree.map(jnp.asarray, p)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  f = flags.FLAGS
  if store.latest_step(f.workdir) is not None:
    if not f.overwrite:
      raise SystemExit(f"{f.workdir} already holds a checkpoint; choose another --workdir or "
                       "pass --overwrite")
    shutil.rmtree(store.checkpoint_dir(f.workdir))
  cfg = task_config(d_model=f.d_model, n_heads=f.n_heads, head_dim=f.head_dim,
                    max_seq_len=f.seq_len, position=f.position)
  tokenizer = store.ByteTokenizer()
  token_ids = tokenizer.encode(f.alphabet)
  print(model.summary(cfg, name="induction-task"))
  params, history = train(cfg, steps=f.steps, batch=f.batch, lr=f.lr, seed=f.seed,
                          token_ids=token_ids, min_half=f.min_half, max_half=f.max_half,
                          eval_every=f.eval_every, eval_half=f.half)
  settings = {"alphabet": f.alphabet, "steps": f.steps, "batch": f.batch, "lr": f.lr,
              "seed": f.seed, "min_half": f.min_half, "max_half": f.max_half}
  store.save_params(f.workdir, params, step=f.steps)
  store.write_config(f.workdir, cfg, tokenizer, induction_task=settings)
  out = f.out or os.path.join(f.workdir, "interpret")
  os.makedirs(out, exist_ok=True)
  store.write_json(os.path.join(out, "training.json"), history)
  figures.training_curves(history, os.path.join(out, "training.png"))
  command = "python -m experiments.induction_task " + " ".join(sys.argv[1:])
  rng = np.random.default_rng(f.seed + 2)
  letters = "".join(rng.choice(list(f.alphabet), f.half, replace=False))
  interpret.analyze_workdir(
      f.workdir, out, prompt=letters * 2, target=letters[0], alphabet=f.alphabet, half=f.half,
      top_k=f.top_k,
      command=command, title="2-layer attention-only model trained on repeated random letters")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Where to write the trained model (a workdir).",
                      required=True)
  flags.DEFINE_string("out", None, "Where the figures and report go (default workdir/interpret).")
  flags.DEFINE_integer("steps", 8000, "Training steps.")
  flags.DEFINE_integer("batch", 64, "Sequences per step.")
  flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
  flags.DEFINE_integer("seed", 0, "Seed of the init and the data.")
  flags.DEFINE_integer("d_model", 64, "Model width.")
  flags.DEFINE_integer("n_heads", 4, "Heads per layer.")
  flags.DEFINE_integer("head_dim", 32, "Per-head width (wider heads leave RoPE more slowly "
                       "rotating dimensions for matching content; the circuit forms sooner).")
  flags.DEFINE_string("position", "rope", "Position encoding (learned, rope, ...).")
  flags.DEFINE_integer("seq_len", 32, "Training sequence length (the model's max_seq_len).")
  flags.DEFINE_string("alphabet", string.ascii_lowercase, "Characters the tokens come from.")
  flags.DEFINE_integer("min_half", 4, "Shortest repeated prefix.")
  flags.DEFINE_integer("max_half", 16, "Longest repeated prefix.")
  flags.DEFINE_integer("half", 12, "Copy length of the evaluation sequences and the prompt.")
  flags.DEFINE_integer("eval_every", 250, "Steps between induction-score measurements.")
  flags.DEFINE_bool("overwrite", False, "Replace the checkpoints of an existing workdir.")
  flags.DEFINE_integer("top_k", 1, "How many top induction heads the ablation removes together.")
  app.run(main)
