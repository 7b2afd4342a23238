"""Evaluate a workdir's model: loss, perplexity and bits per byte on any text.

  python -m train.evaluate --workdir=runs/default                       # its validation split
  python -m train.evaluate --workdir=runs/phi3 --corpus=data/wiki.txt   # any corpus spec
  python -m train.evaluate --workdir=runs/default --step=1000 --batches=8

  --workdir    a run trained here, a LoRA fine-tune (adapters merged at load) or a model
               imported with `python -m model.hf import`
  --corpus     text to score: a corpus spec as config.data.corpus takes it (files, globs,
               directories, .jsonl, URLs, hf:NAME); default: the run's validation split
  --step       the checkpoint (default: the newest)
  --batches    score this many batches spread over the text (default: the run's
               eval_batches for its validation split, all of it for --corpus)
  --batch_size rows per batch (default: the run's eval batch)

The default evaluates the same windows as the training run's evaluations (its data
settings, tokenizer and eval_batches), with the same jitted eval step
(train/steps.py), so the loss equals the run's own eval row at that step. --corpus
text is cut into the run's windows (data.seq_len; an import's: min(256,
max_seq_len)) with the workdir's tokenizer, tokenized once into the data cache (as
both splits of a prepared directory) and reused by later evaluations.

  loss = sum of -log p(target) over the target tokens / their number   (nats/token)
  perplexity = exp(loss)
  bits per byte = sum of -log p(target) / (ln 2 x UTF-8 bytes the target tokens decode to)

Bytes are counted per target token, exactly (train/tokenizer.py token_byte_lengths): a
byte token is one byte; a sentencepiece piece is its text's UTF-8 length (the U+2581 marker
a space, a byte-fallback piece one byte); a Hugging Face byte-level BPE token is the bytes it
decodes to; end-of-text and other control tokens are none (their loss still counts). So the
bytes of a document's tokens are the UTF-8 length of its text.

The result is printed and appended to WORKDIR/metrics.jsonl as an 'eval' row at the
checkpoint's step, with `corpus` ('validation' or the spec) and `evaluated_by`. Errors
(a missing workdir or step, an unreadable corpus) are one line; exit status 1.
"""

from __future__ import annotations

import argparse
import sys

import jax
import ml_collections
from absl import logging

from model import store
from model.sharding import make_mesh
from train import finetune, xla_flags
from train.config_lib import ConfigError
from train.configs import default
from train.corpus import CorpusError
from train.data import eval_batches, prepare_data
from train.metrics import MetricsWriter
from train.run import check_model_fits_data
from train.steps import evaluate_windows, make_eval_step
from train.tasks import Pretrain

VALIDATION = "validation"
# The run's keys that decide its evaluation windows (everything else of it is irrelevant here).
RUN_KEYS = ("batch_size", "grad_accum_steps", "eval_batches", "eval_batch_size")


class EvaluateError(ValueError):
  """A flag names something the workdir does not have."""


def eval_config(workdir: str, saved: dict, corpus: str | None) -> ml_collections.ConfigDict:
  """The data settings of the evaluation: the run's (default config + its saved keys), or an
  import's defaults; `corpus` replaces its text (scored whole, as a validation corpus)."""
  config = default.get_config()
  trained = saved.get("train")
  if trained:
    for key in RUN_KEYS:
      if key in trained:
        config[key] = trained[key]
    for key, value in trained.get("data", {}).items():
      if key in config.data:
        config.data[key] = value
  else:
    if not corpus:
      raise EvaluateError(f"workdir {workdir} holds an imported model, not a training run: "
                          "it has no validation split; pass --corpus=TEXT")
    cfg = store.load_model_config(workdir)
    config.data.seq_len = min(finetune.IMPORTED_SEQ_LEN, cfg.max_seq_len)
  if corpus:
    config.data.corpus = config.data.val_corpus = corpus
    config.data.prepared = ""
  return config


def choose_step(workdir: str, step: int | None) -> int:
  steps = store.all_steps(workdir)
  if not steps:
    raise EvaluateError(f"workdir {workdir} has no checkpoints to evaluate")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise EvaluateError(f"--step={step}: workdir {workdir} has no checkpoint at that step; "
                        f"available steps: {', '.join(map(str, steps))}")
  return step


def evaluate(workdir: str, *, corpus: str | None = None, step: int | None = None,
             batches: int | None = None, batch_size: int | None = None,
             record: bool = True) -> dict:
  """Score the workdir's model (LoRA adapters merged) on `corpus` or the run's validation
  split; returns the eval row (val_loss, val_ppl, val_bpb, val_tokens, val_bytes, step,
  corpus, windows) and, with `record`, appends it to WORKDIR/metrics.jsonl."""
  workdir = store.resolve(workdir)
  saved = store.read_config(workdir)
  step = choose_step(workdir, step)
  config = eval_config(workdir, saved, corpus)
  mesh = make_mesh((-1, 1, 1))  # data parallel: every device scores its own rows
  rows = batch_size or config.eval_batch_size or config.batch_size // config.grad_accum_steps
  devices = mesh.shape["data"]
  if rows <= 0 or rows % devices or rows % jax.process_count():
    raise EvaluateError(f"--batch_size={rows} rows must be positive and divide over the "
                        f"{devices} devices and {jax.process_count()} processes")
  data = prepare_data(config, workdir)
  loaded = store.load_params(workdir, step, shardings=mesh)
  cfg = loaded.cfg
  check_model_fits_data(cfg, data.tokenizer.vocab_size, config.data.seq_len)
  task = Pretrain(cfg, config.data.document_masking)
  eval_step = make_eval_step(task, mesh=mesh,
                             params_shardings=jax.tree.map(lambda x: x.sharding, loaded.params))
  max_batches = (batches if batches is not None else
                 0 if corpus else config.eval_batches)
  windows = (len(data.val) if not max_batches else min(len(data.val), max_batches * rows))
  metrics = evaluate_windows(
      eval_step, loaded.params, eval_batches(data.val, batch_size=rows, max_batches=max_batches),
      mesh=mesh, rows=rows, byte_lengths_V=data.byte_lengths)
  row = {**metrics, "corpus": corpus or VALIDATION, "windows": windows,
         "seq_len": config.data.seq_len, "adapted": loaded.adapted,
         "evaluated_by": "train.evaluate"}
  if record:
    writer = MetricsWriter(workdir, trackers=("jsonl",))
    writer.write(step, "eval", row)
    writer.close()
  return {"step": step, **row}


def describe(workdir: str, row: dict) -> str:
  text = "the validation split" if row["corpus"] == VALIDATION else row["corpus"]
  lora = " (LoRA adapters merged)" if row["adapted"] else ""
  return (f"{workdir} step {row['step']}{lora} on {text}: {row['windows']:,} windows of "
          f"{row['seq_len']} tokens, {row['val_tokens']:,.0f} tokens, {row['val_bytes']:,.0f} "
          f"bytes\nloss {row['val_loss']:.4f} nats/token  perplexity {row['val_ppl']:.3f}  "
          f"bits per byte {row['val_bpb']:.4f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
  # argparse, not absl flags: absl's are global, and train.prepare defines --corpus too.
  parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True,
                      help="a workdir: trained here, a LoRA fine-tune or an import")
  parser.add_argument("--corpus", help="text to score (a corpus spec); default: the run's "
                      "validation split")
  parser.add_argument("--step", type=int, help="the checkpoint step (default: the newest)")
  parser.add_argument("--batches", type=int, help="batches spread over the text (0: all)")
  parser.add_argument("--batch_size", type=int, help="rows per batch (default: the run's)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  store.quiet_orbax_errors()
  xla_flags.apply()  # before JAX starts its backend (train/xla_flags.py)
  try:
    row = evaluate(args.workdir, corpus=args.corpus, step=args.step, batches=args.batches,
                   batch_size=args.batch_size)
  except (EvaluateError, ConfigError, CorpusError, store.WorkdirError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(describe(args.workdir, row))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
