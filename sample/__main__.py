"""Sample from a trained workdir, streaming to stdout.

  python -m sample --workdir=runs/tiny --prompt="To be" --max_new_tokens=200 \
      --temperature=0.8 --top_k=40 --num_samples=2
  python -m sample --workdir=runs/tiny --draft=prompt_lookup --draft_tokens=4 --quantize=int8

Sample i of --num_samples uses seed + i. The prompt is echoed, then the
completion streams as it is decoded; a summary line (tokens, seconds,
tokens/s) goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

from absl import app, flags, logging

from model import store
from model.store import WorkdirError
from sample.generator import Generator

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by `python -m train` (or an import).")
flags.DEFINE_string("prompt", "", "Text to continue (empty: start from the bos token).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
flags.DEFINE_integer("seed", 0, "Random seed of the first sample.")
flags.DEFINE_integer("num_samples", 1, "How many samples to draw.")
flags.DEFINE_multi_string("stop", [], "Stop string(s) (eos always stops).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("no_cache", False, "Recompute the full forward pass at every step (slow).")
flags.DEFINE_integer("chunk_size", 8, "Tokens decoded per jitted call between prints "
                     "(rounds, when decoding speculatively).")
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: int8 matmul weights with float32 "
                  "per-output-channel scales (a quarter of the weight memory).")
flags.DEFINE_string("draft", None, "Speculative decoding: 'prompt_lookup' (n-grams of the "
                    "prompt and text so far) or the workdir of a small model with the same "
                    "tokenizer.")
flags.DEFINE_integer("draft_tokens", 4, "Speculative decoding: tokens drafted per round.")


class _HeldStderr:
  """What the process wrote to file descriptor 2 while held (C++ threads included)."""

  def __init__(self):
    self.file = tempfile.TemporaryFile()
    self.saved_fd = os.dup(2)
    self.dropped = False

  def drop(self) -> None:
    self.dropped = True
    self.release()

  def release(self) -> None:
    if self.saved_fd is None:
      return
    sys.stderr.flush()
    os.dup2(self.saved_fd, 2)
    os.close(self.saved_fd)
    self.saved_fd = None
    if not self.dropped:  # a successful load: show what it said (warnings), in order
      self.file.seek(0)
      sys.stderr.write(self.file.read().decode(errors="replace"))
      sys.stderr.flush()
    self.file.close()


@contextlib.contextmanager
def _stderr_held():
  """File descriptor 2 goes to a temporary file inside the block; replayed after it, unless
  `drop()` was called (a failed load's one error line stands alone)."""
  sys.stderr.flush()
  held = _HeldStderr()
  os.dup2(held.file.fileno(), 2)
  try:
    yield held
  finally:
    held.release()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a directory written by `python -m train`)")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    store.quiet_orbax_errors()  # a damaged checkpoint is one line of ours
  with _stderr_held() as held:
    try:
      gen = Generator.from_workdir(FLAGS.workdir, FLAGS.step, quantize=FLAGS.quantize,
                                   draft=FLAGS.draft, draft_tokens=FLAGS.draft_tokens)
    except (WorkdirError, ValueError) as e:
      # A damaged checkpoint leaves TensorStore reads in flight whose callbacks find orbax's
      # event loop closed and print tracebacks from C++ threads that no Python hook sees:
      # let them land in the held stream, drop it, and leave (nothing is written here).
      time.sleep(0.5)
      held.drop()
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)
  started = time.perf_counter()
  drafted = accepted = 0
  for i in range(FLAGS.num_samples):
    if FLAGS.num_samples > 1:
      print(f"--- sample {i + 1}/{FLAGS.num_samples} (seed {FLAGS.seed + i}) ---")
    print(FLAGS.prompt, end="", flush=True)
    pieces = gen.stream(FLAGS.prompt, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed + i,
                        stop=FLAGS.stop, use_cache=not FLAGS.no_cache,
                        chunk_size=FLAGS.chunk_size)
    try:
      for piece in pieces:
        print(piece, end="", flush=True)
    except ValueError as e:  # e.g. the prompt and max_new_tokens do not fit the context
      print(f"\nerror: {e}", file=sys.stderr)
      return 1
    print(flush=True)
    if gen.last_speculation is not None:
      drafted += gen.last_speculation.drafted
      accepted += gen.last_speculation.accepted
  elapsed = time.perf_counter() - started
  extra = "; int8 weights" if FLAGS.quantize == "int8" else ""
  if FLAGS.draft:
    rate = accepted / drafted if drafted else 0.0
    extra += (f"; speculative ({FLAGS.draft}, {FLAGS.draft_tokens} draft tokens): acceptance "
              f"{rate:.1%} ({accepted}/{drafted})")
  print(f"[{FLAGS.num_samples} sample(s) in {elapsed:.2f} s incl. compilation; checkpoint step "
        f"{gen.step}; {'no ' if FLAGS.no_cache else ''}KV cache{extra}]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(main)
