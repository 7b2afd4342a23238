"""Decode throughput of the sampler: tokens/s at batch 1 and 8, random weights, --dtype.

  python -m experiments.bench_decode                      # nanogpt-baby and gpt2-small
  python -m experiments.bench_decode --presets=gpt2-small --batches=1 --repeats=5
  python -m experiments.bench_decode --reference           # + Hugging Face generate() here
  python -m experiments.bench_decode --int8                # + int8 weights (model/quant.py)
  python -m experiments.bench_decode --presets=gpt2-small --dtype=bfloat16 --attention_impl=auto
      # an accelerator (experiments/accelerator_check.sh)

Greedy decoding of --new_tokens tokens after an 8-token prompt (fewer when the
model's context is shorter), timed after a compile/warm-up run; prints the best
and the median of --repeats runs (the prefill is included in the time), and
tokens per CPU-second of this process (best run): on a loaded machine the
wall clock also counts time spent waiting for a core, CPU time does not
(for a multi-threaded run it adds up every thread's time).
`--reference` times transformers' GPT2LMHeadModel.generate() (KV cache, greedy,
float32, same shapes) in the same process, so both see the same machine load.
The load average is printed: on a shared machine, compare figures taken together.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags

import model
from model import quant
from sample import engine

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["nanogpt-baby", "gpt2-small"], "Model presets to time.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("new_tokens", 128, "Tokens to generate per row (capped by the context).")
flags.DEFINE_integer("prompt_len", 8, "Prompt tokens per row.")
flags.DEFINE_integer("repeats", 5, "Timed runs per setting.")
flags.DEFINE_bool("reference", False, "Also time Hugging Face transformers generate().")
flags.DEFINE_integer("threads", 0, "torch threads for --reference (0: torch's default).")
flags.DEFINE_string("dtype", "float32", "ModelConfig.dtype (compute and KV cache) of the sampler.")
flags.DEFINE_string("attention_impl", "", "ModelConfig.attention_impl ('': the preset's).")
flags.DEFINE_bool("int8", False, "Also time the sampler on int8 weights (model/quant.py).")


def _load() -> str:
  return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time(fn, repeats):
  """(best wall s, median wall s, best CPU s) over `repeats` runs after a warm-up run."""
  fn()  # compile / warm up
  times, cpus = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    times.append(time.perf_counter() - start)
    cpus.append(_cpu_seconds() - cpu)
  return min(times), statistics.median(times), min(cpus)


def time_sampler(cfg, batch, prompt_len, new_tokens, repeats, int8=False):
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  if int8:
    params = quant.quantize(params)
  # The engine unrolls the layers once here, as sample.Generator does at load time.
  dcfg, dparams = engine.decode_model(cfg, params)
  del params
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()

  def run():
    out = engine.generate_ids(dcfg, dparams, prompts, new_tokens)
    assert all(len(row) == new_tokens for row in out)

  return _time(run, repeats)


def time_reference(cfg, batch, prompt_len, new_tokens, repeats):
  import torch
  import transformers

  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                                   n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                                   bos_token_id=None, eos_token_id=None)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len))

  def run():
    with torch.no_grad():
      hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)

  return _time(run, repeats)


def main(argv):
  del argv
  print(f"# decode throughput, {FLAGS.dtype}, greedy; {_load()}")
  print(f"{'model':14s} {'params':>8s} {'batch':>5s} {'new':>5s} {'impl':>9s} "
        f"{'best tok/s':>11s} {'median tok/s':>13s} {'tok/CPU-s':>10s}")
  for name in FLAGS.presets:
    impl = {"attention_impl": FLAGS.attention_impl} if FLAGS.attention_impl else {}
    cfg = model.get_preset(name, dtype=FLAGS.dtype, **impl)
    new = min(FLAGS.new_tokens, cfg.max_seq_len - FLAGS.prompt_len)
    n_params = model.count_params(cfg).total
    for batch in (int(b) for b in FLAGS.batches):
      runners = [("sample", time_sampler)]
      if FLAGS.int8:
        runners.append(("int8", functools.partial(time_sampler, int8=True)))
      if FLAGS.reference:
        runners.append(("hf", time_reference))
      for impl, timer in runners:
        best, median, cpu = timer(cfg, batch, FLAGS.prompt_len, new, FLAGS.repeats)
        print(f"{name:14s} {n_params / 1e6:7.1f}M {batch:5d} {new:5d} {impl:>9s} "
              f"{batch * new / best:11.1f} {batch * new / median:13.1f} "
              f"{batch * new / cpu:10.1f}", flush=True)
  print(f"# {_load()}")


if __name__ == "__main__":
  app.run(main)
