"""Look inside a trained model: attention maps, logit lens, induction heads, ablations.

  python -m experiments.interpret --workdir=runs/NAME [--prompt="..."] [--out=DIR]

Reads the workdir's latest checkpoint (with its LoRA adapters, if any) and
tokenizer, and writes into --out (default: workdir/interpret):
  attention.png    attention weights of the prompt, one panel per head
  logit_lens.png   every layer's residual stream read as next-token probabilities
  head_scores.png  induction, previous-token and copying scores (layers x heads)
  ablation.png     loss on repeated random tokens with each head / the top
                   induction heads / control heads ablated
  report.md        the figures with their numbers; summary.json the same numbers
The analyses live in experiments/interp/ (see its README).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments.interp.analyze import analyze
from model import store

DEFAULT_PROMPT = ("Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that "
                  "they were perfectly normal. Mr and Mrs Dursley")


def analyze_workdir(workdir: str, out: str | None = None, *, step: int | None = None,
                    no_lora: bool = False, **kwargs) -> dict:
  """`experiments.interp.analyze.analyze` on a workdir's checkpoint (a LoRA run's adapters
  merged, unless `no_lora`); returns the summary."""
  loaded = store.load_params(workdir, step, merge_lora=not no_lora)
  tokenizer = store.load_tokenizer(workdir)
  out = out or os.path.join(workdir, "interpret")
  title = kwargs.pop("title", None) or f"{workdir} (step {loaded.step})"
  summary = analyze(loaded.cfg, loaded.params, tokenizer, out, title=title, **kwargs)
  print(f"wrote {out}/report.md and {', '.join(summary['figures'].values())}")
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  store.quiet_orbax_errors()  # a damaged checkpoint is one line of ours
  f = flags.FLAGS
  try:
    analyze_workdir(
        f.workdir, f.out, step=f.step, no_lora=f.no_lora, prompt=f.prompt, alphabet=f.alphabet,
        half=f.half, batch=f.batch, seed=f.seed, top_k=f.top_k, bos=f.bos, target=f.target,
        icl_text=f.icl_text, command="python -m experiments.interpret " + " ".join(sys.argv[1:]))
  except ValueError as e:  # a missing or damaged workdir, an analysis that does not fit
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A workdir written by train or the HF importer.",
                      required=True)
  flags.DEFINE_string("out", None, "Output directory (default: workdir/interpret).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("no_lora", False, "Ignore LoRA adapters stored in the checkpoint.")
  flags.DEFINE_string("prompt", DEFAULT_PROMPT, "Text for the attention maps and logit lens.")
  flags.DEFINE_string("target", None, "Logit-lens target after the prompt (default: the "
                      "model's own prediction).")
  flags.DEFINE_string("alphabet", None, "Characters whose tokens make the random repeated "
                      "sequences (default: every printable non-special token).")
  flags.DEFINE_integer("half", None, "Length of each copy of the repeated random sequence.")
  flags.DEFINE_integer("batch", 16, "Repeated random sequences.")
  flags.DEFINE_integer("seed", 0, "Seed of the random sequences.")
  flags.DEFINE_integer("top_k", 2, "How many top induction heads to ablate together.")
  flags.DEFINE_bool("bos", False, "Start every sequence with the tokenizer's bos token.")
  flags.DEFINE_string("icl_text", None, "A text file for the in-context-learning score.")
  app.run(main)
