"""The KV-cache demonstration: time to generate N tokens with and without the cache.

  python -m experiments.kv_cache --new_tokens=256                       # shakespeare-char shape
  python -m experiments.kv_cache --preset=gpt2-small --new_tokens=64
  python -m experiments.kv_cache --workdir=runs/tiny --prompt="To be" --new_tokens=200

Without a cache, step t recomputes keys and values for all t tokens so far (a
full forward pass: O(t) work per token, O(N^2) in all); with it, each step
runs the model on one token and attends to the stored keys and values (O(1)
matrix work per token plus an O(t) attention read). Both modes decode
greedily in one jitted loop and must produce the same tokens; the times
exclude compilation (a warm-up run compiles both programs first).

With --preset the weights are random and the preset's context is stretched to
prompt + new tokens if it is shorter (timing does not need a trained model).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags

import model
from sample import engine
from sample.generator import Generator

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "shakespeare-char", "Model preset (random weights).")
flags.DEFINE_string("workdir", None, "A trained workdir instead of a preset.")
flags.DEFINE_string("prompt", "The ", "Prompt text (with --workdir).")
flags.DEFINE_integer("prompt_len", 8, "Prompt tokens (with --preset).")
flags.DEFINE_integer("new_tokens", 256, "Tokens to generate.")
flags.DEFINE_integer("batch", 1, "Rows decoded together.")
flags.DEFINE_integer("repeats", 3, "Timed runs with the cache (the best is reported).")
flags.DEFINE_integer("repeats_no_cache", 1, "Timed runs without the cache.")


def load_model():
  """(cfg, params, prompt ids) from --workdir or --preset."""
  if FLAGS.workdir:
    gen = Generator.from_workdir(FLAGS.workdir)
    ids = gen.encode(FLAGS.prompt)
    room = gen.cfg.max_seq_len - len(ids)
    if FLAGS.new_tokens > room:
      raise app.UsageError(f"--new_tokens={FLAGS.new_tokens} does not fit: the model's context "
                           f"is {gen.cfg.max_seq_len} and the prompt has {len(ids)} tokens")
    return gen.cfg, gen.params, ids
  cfg = model.get_preset(FLAGS.preset)
  need = FLAGS.prompt_len + FLAGS.new_tokens
  if cfg.max_seq_len < need:
    cfg = cfg.replace(max_seq_len=need)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  cfg, params = engine.decode_model(cfg, params)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, FLAGS.prompt_len).tolist()
  return cfg, params, ids


def timed(fn, repeats):
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times), out


def main(argv):
  del argv
  cfg, params, ids = load_model()
  prompts = [ids] * FLAGS.batch
  n = FLAGS.new_tokens

  def run(use_cache):
    return engine.generate(cfg, params, prompts, n, use_cache=use_cache).tokens

  source = FLAGS.workdir or f"preset {FLAGS.preset} (random weights)"
  print(f"# KV cache vs full recomputation: {source}, {cfg.n_layers} layers, d={cfg.d_model}, "
        f"batch {FLAGS.batch}, prompt {len(ids)} tokens, {n} new tokens, float32, greedy")
  print("# load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
  for use_cache in (True, False):
    start = time.perf_counter()
    run(use_cache)
    print(f"compile + first run, {'with' if use_cache else 'without'} cache: "
          f"{time.perf_counter() - start:.2f} s")
  best_c, median_c, with_cache = timed(lambda: run(True), FLAGS.repeats)
  best_n, median_n, without = timed(lambda: run(False), FLAGS.repeats_no_cache)
  tokens = FLAGS.batch * n
  for label, best, median in (("with cache:   ", best_c, median_c),
                              ("without cache:", best_n, median_n)):
    print(f"{label} {best:8.3f} s  ({tokens / best:9.1f} tokens/s; median {median:.3f} s)")
  print(f"speedup:       {best_n / best_c:8.1f}x")
  print(f"same tokens:   {with_cache == without}")
  print("# load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
  app.run(main)
