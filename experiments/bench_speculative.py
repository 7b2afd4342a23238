"""Decode speed of a trained model by method (plain, int8, prompt lookup, draft model), vs HF.

  python -m experiments.bench_speculative --workdir=runs/spec_llama \
      --draft_workdir=runs/spec_llama_draft --batches=1,8,32 --reference
  python -m experiments.bench_speculative --workdir=runs/spec_llama --quality   # int8 check

Greedy decoding of --new_tokens tokens after --prompt_len-token prompts cut from
the validation split of the run's corpus (speculative figures on random weights
mean nothing: their repetitive output inflates acceptance). Each method is
timed in this process after a warm-up run (best and median of --repeats, the
prefill included), with its acceptance rate (accepted / drafted tokens).
`--reference` exports the target (and draft) to Hugging Face format and times
transformers' generate() on the same prompts in the same process: plain, with
`prompt_lookup_num_tokens` and with `assistant_model` (HF's assisted
generation takes batch 1 only), and reports whether its greedy tokens equal
ours. `--quality` compares int8 with float32: greedy token agreement over
--quality_tokens tokens of several prompts, and validation loss.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging

import model
from model import quant, store
from model.hf import convert
from sample import engine
from sample import speculative as sp
from train import data as data_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The trained target model's workdir.")
flags.DEFINE_string("draft_workdir", None, "A smaller model with the same tokenizer (optional).")
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
flags.DEFINE_list("methods", ["plain", "int8", "prompt_lookup", "draft"], "Methods to time.")
flags.DEFINE_integer("draft_tokens", 4, "Tokens drafted per round.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting.")
flags.DEFINE_bool("reference", False, "Also time Hugging Face generate() on an exported copy.")
flags.DEFINE_string("attention_impl", "", "Decode with this ModelConfig.attention_impl ('': the "
                    "run's; its params do not depend on it).")
flags.DEFINE_integer("threads", 0, "torch threads for --reference (0: torch's default).")
flags.DEFINE_bool("quality", False, "int8 vs float32: greedy agreement and validation loss.")
flags.DEFINE_integer("quality_tokens", 256, "Greedy tokens per prompt for --quality.")
flags.DEFINE_integer("quality_prompts", 4, "Prompts for --quality.")
flags.DEFINE_integer("val_windows", 64, "Validation windows scored for --quality.")


def _load() -> str:
  return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _time(fn, repeats):
  """(best s, median s, last result) after one warm-up (compile) run."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times), out


def validation(workdir: str):
  """The validation windows of the run's corpus (prepared data from the cache)."""
  config = ml_collections.ConfigDict(store.read_config(workdir)["train"])
  with tempfile.TemporaryDirectory() as scratch:  # prepare_data installs the tokenizer there
    return data_lib.prepare_data(config, scratch, store.load_tokenizer(workdir)).val


def val_prompts(val, n: int, length: int) -> list[list[int]]:
  """n prompts of `length` tokens, from windows spread over the validation split."""
  idx = np.linspace(0, len(val) - 1, n).round().astype(np.int64)
  return val.windows(idx)["inputs"][:, :length].tolist()


def val_loss(cfg, params, val, n_windows: int) -> float:
  """Mean next-token cross-entropy over n_windows validation windows (documents kept apart)."""
  forward = jax.jit(lambda p, b: model.apply(cfg, p, b["inputs"], positions_BT=b["positions"],
                                             segment_ids_BT=b["segment_ids"])[0])
  idx = np.linspace(0, len(val) - 1, n_windows).round().astype(np.int64)
  total = count = 0.0
  for chunk in np.array_split(idx, max(1, n_windows // 8)):
    batch = val.windows(chunk)
    logits = forward(params, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    total += float((ce * batch["loss_mask"]).sum())
    count += float(batch["loss_mask"].sum())
  return total / count


def quality(cfg, params, val):
  prompts = val_prompts(val, FLAGS.quality_prompts, FLAGS.prompt_len)
  n = FLAGS.quality_tokens
  a = engine.generate(cfg, params, prompts, n, cache_len=FLAGS.prompt_len + n).tokens
  fl = val_loss(cfg, params, val, FLAGS.val_windows)
  for embeddings in (False, True):
    qparams = quant.quantize(params, embeddings=embeddings)
    print(f"# int8 {'with' if embeddings else 'without'} the embedding: weights "
          f"{quant.param_bytes(params) / 2**20:.2f} MiB float32 -> "
          f"{quant.param_bytes(qparams) / 2**20:.2f} MiB")
    b = engine.generate(cfg, qparams, prompts, n, cache_len=FLAGS.prompt_len + n).tokens
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), n)
              for ra, rb in zip(a, b, strict=True)]
    print(f"  greedy tokens equal at the same position: {same}/{len(prompts) * n} "
          f"({same / (len(prompts) * n):.1%}); identical prefixes {prefix}")
    ql = val_loss(cfg, qparams, val, FLAGS.val_windows)
    print(f"  validation loss ({FLAGS.val_windows} windows): float32 {fl:.5f}, int8 {ql:.5f} "
          f"({(ql - fl) / fl:+.3%})")


def _hf(workdir: str, out_dir: str):
  import torch
  import transformers

  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  convert.export_workdir(workdir, out_dir, overwrite=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  hf.generation_config.eos_token_id = None
  return hf.eval()


def time_hf(hf, draft_hf, prompts, new, method, k):
  import torch

  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, use_cache=True, pad_token_id=0)
  if method == "prompt_lookup":
    kw["prompt_lookup_num_tokens"] = k
  elif method == "draft":
    draft_hf.generation_config.num_assistant_tokens = k
    draft_hf.generation_config.num_assistant_tokens_schedule = "constant"
    draft_hf.generation_config.eos_token_id = None
    kw["assistant_model"] = draft_hf

  def run():
    with torch.no_grad():
      return hf.generate(ids, **kw)[:, len(prompts[0]):].tolist()

  return _time(run, FLAGS.repeats)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a trained model)")
  loaded = store.load_params(FLAGS.workdir)
  impl = {"attention_impl": FLAGS.attention_impl} if FLAGS.attention_impl else {}
  cfg, params = engine.decode_model(loaded.cfg.replace(**impl), loaded.params)
  val = validation(FLAGS.workdir)
  if FLAGS.quality:
    quality(cfg, params, val)
    if not FLAGS.methods:
      return
  draft = None
  if FLAGS.draft_workdir:
    d = store.load_params(FLAGS.draft_workdir)
    draft = sp.DraftModel(*engine.decode_model(d.cfg.replace(**impl), d.params))
  methods = [m for m in FLAGS.methods if m != "draft" or draft is not None]
  qparams = quant.quantize(params) if "int8" in methods else None
  hf = draft_hf = None
  scratch = tempfile.mkdtemp()
  if FLAGS.reference:
    hf = _hf(FLAGS.workdir, os.path.join(scratch, "target"))
    if draft is not None:
      draft_hf = _hf(FLAGS.draft_workdir, os.path.join(scratch, "draft"))
  k, new = FLAGS.draft_tokens, FLAGS.new_tokens
  cache_len = FLAGS.prompt_len + new + k + 1
  print(f"# {FLAGS.workdir} ({model.count_params(cfg).total / 1e6:.2f}M params), draft "
        f"{FLAGS.draft_workdir} ; greedy, float32, {FLAGS.prompt_len}-token validation prompts, "
        f"{new} new tokens, {k} draft tokens, {cfg.attention_impl} attention; {_load()}")
  print(f"{'batch':>5s} {'method':>14s} {'impl':>6s} {'best tok/s':>11s} {'median tok/s':>13s} "
        f"{'acceptance':>11s} {'= ours':>7s}")
  for batch in (int(b) for b in FLAGS.batches):
    prompts = val_prompts(val, batch, FLAGS.prompt_len)
    ours = {}
    for method in methods:
      if method in ("plain", "int8"):
        p = qparams if method == "int8" else params

        def run(p=p):
          return engine.generate(cfg, p, prompts, new, cache_len=cache_len)
      else:
        d = sp.PromptLookup() if method == "prompt_lookup" else draft

        def run(d=d):
          return sp.generate(cfg, params, prompts, new, draft=d, draft_tokens=k,
                             cache_len=cache_len)
      best, median, out = _time(run, FLAGS.repeats)
      ours[method] = out.tokens
      rate = f"{out.speculation.acceptance_rate:.1%}" if out.speculation else "-"
      same = "yes" if out.tokens == ours["plain" if "plain" in ours else method] else "NO"
      print(f"{batch:5d} {method:>14s} {'ours':>6s} {batch * new / best:11.1f} "
            f"{batch * new / median:13.1f} {rate:>11s} {same:>7s}", flush=True)
      if hf is not None and method != "int8" and (batch == 1 or method == "plain"):
        best, median, tokens = time_hf(hf, draft_hf, prompts, new, method, k)
        same = "yes" if tokens == ours[method] else "NO"
        print(f"{batch:5d} {method:>14s} {'hf':>6s} {batch * new / best:11.1f} "
              f"{batch * new / median:13.1f} {'':>11s} {same:>7s}", flush=True)
  print(f"# {_load()}")


if __name__ == "__main__":
  app.run(main)
