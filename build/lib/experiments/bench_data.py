"""The data path at scale: tokenization throughput, memory flat in corpus size, loader speed.

  python -m experiments.bench_data                   # all three, ~15 minutes on 2 cores
  python -m experiments.bench_data --parts=loader    # one of: tokenize, memory, loader

tokenize  `train.prepare` on the stdlib corpus repeated --copies times (~12 MB each) with 1
          and 2 worker processes, against one process calling sentencepiece's encode on
          the same texts in the same run: MB/s of each (the tokenizer is the default run's
          2,048-piece BPE, trained once on the stdlib).
memory    peak resident memory of `python -m train.prepare` and of a 200-step run of the
          default config on the prepared shards, for 1x and --copies x the corpus: the
          ratio (memory must not grow with the corpus).
loader    tokens/s delivered by the grain loader over memory-mapped shards at the gpt2-small
          shape (batch 8 x 1024, document masking), against the tokens/s the gpt2-small
          train step consumes on this machine (timed in the same run): the ratio.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

import model
from model import store
from model.sharding import make_mesh
from train import optimizer as optim_lib
from train import state as state_lib
from train.config_lib import load_config
from train.corpus import Corpus, stdlib_files
from train.data import train_iterator
from train.packing import PackedWindows
from train.prepare import Sources, prepare
from train.shards import TokenStream
from train.steps import make_train_step
from train.tasks import Pretrain
from train.tokenizer import train_sentencepiece

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["tokenize", "memory", "loader"], "Which measurements to run.")
flags.DEFINE_integer("copies", 10, "Copies of the stdlib in the large corpus.")
flags.DEFINE_integer("steps", 200, "Training steps of the memory measurement.")
flags.DEFINE_string("root", None, "Working directory (default: a temporary one, removed).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_copies(root: str, copies: int) -> str:
  """A directory holding the stdlib's non-test sources `copies` times (copy_i/...)."""
  path = os.path.join(root, f"stdlib_x{copies}")
  if not os.path.isdir(path):
    for i in range(copies):
      for rel, src in stdlib_files():
        dst = os.path.join(path, f"copy_{i}", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
  return path


def tokenizer_for(root: str) -> store.SentencePieceTokenizer:
  path = os.path.join(root, "tokenizer.model")
  if not os.path.exists(path):
    texts = [doc.text for doc in Corpus(["stdlib"])]
    train_sentencepiece(texts, path, vocab_size=2048)
  return store.SentencePieceTokenizer(path)


def bench_tokenize(root: str, copies: int) -> None:
  tokenizer = tokenizer_for(root)
  corpus = corpus_copies(root, copies)
  size = Corpus([corpus]).total_bytes() / 1e6
  print(f"## tokenization: the stdlib x{copies} ({size:.0f} MB), 2,048-piece BPE", flush=True)
  texts = [doc.text for doc in Corpus([corpus])]
  start = time.perf_counter()
  tokenizer.sp.encode(texts, num_threads=1)
  base = size / (time.perf_counter() - start)
  del texts
  print(f"  sentencepiece encode, one process, one thread: {base:6.1f} MB/s", flush=True)
  for workers in (1, 2):
    out = os.path.join(root, f"prepared_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare(out, Sources(corpus=(corpus,)), tokenizer=tokenizer, workers=workers,
            progress=False, log=lambda m: None)
    rate = size / (time.perf_counter() - start)
    print(f"  train.prepare, {workers} worker process(es): {rate:6.1f} MB/s "
          f"({rate / base:.2f}x the plain encode; reading, splitting and writing shards "
          "included)", flush=True)


def _peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
  """(peak resident MB of the child, wall seconds) of running `cmd`."""
  start = time.perf_counter()
  code = ("import resource, subprocess, sys; "
          "r = subprocess.run(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
          "sys.exit(r.returncode)")
  out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=REPO, capture_output=True,
                       text=True)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return int(out.stderr.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def bench_memory(root: str, copies: int, steps: int) -> None:
  tokenizer_for(root)
  print(f"## peak resident memory, 1x vs {copies}x the stdlib", flush=True)
  results = {}
  for n in (1, copies):
    corpus = corpus_copies(root, n)
    out = os.path.join(root, f"mem_prepared_x{n}")
    shutil.rmtree(out, ignore_errors=True)
    prep, prep_s = _peak_rss_mb([sys.executable, "-m", "train.prepare", f"--out={out}",
                                 f"--corpus={corpus}",
                                 f"--tokenizer={os.path.join(root, 'tokenizer.model')}",
                                 "--workers=1"])
    run, run_s = _peak_rss_mb([
        sys.executable, "-m", "train", "--config=train/configs/default.py",
        f"--workdir={os.path.join(root, f'mem_run_x{n}')}", f"--config.data.prepared={out}",
        f"--config.num_steps={steps}", f"--config.eval_every={steps}",
        f"--config.checkpoint_every={steps}", "--config.eval_batches=4",
        "--config.progress_bar=False", "--config.sample_tokens=0"])
    results[n] = (prep, run)
    print(f"  x{n:<3d} prepare {prep:7.0f} MB ({prep_s:.0f} s)   {steps}-step run "
          f"{run:7.0f} MB ({run_s:.0f} s)", flush=True)
  print(f"  ratio x{copies} / x1: prepare {results[copies][0] / results[1][0]:.2f}, "
        f"training {results[copies][1] / results[1][1]:.2f} (target <= 1.2)", flush=True)


def bench_loader(root: str) -> None:
  print("## loader vs train step, gpt2-small shape (batch 8 x 1024)", flush=True)
  tokenizer = tokenizer_for(root)
  out = os.path.join(root, "loader_prepared")
  prepare(out, Sources(corpus=(corpus_copies(root, 1),)), tokenizer=tokenizer,
          progress=False, log=lambda m: None)
  windows = PackedWindows(TokenStream.open(out, "train"), 1024, 0, True)
  it = train_iterator(windows, batch_size=8, seed=0)
  next(it)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < 5.0:
    next(it)
    batches += 1
  loader = batches * 8 * 1024 / (time.perf_counter() - start)
  cfg = model.get_preset("gpt2-small", remat="dots", attention_impl="chunked",
                         dropout_rate=0.0)
  config = load_config("train/configs/gpt2_small.py")
  tx = optim_lib.make_optimizer(config.optim, 1000)
  schedule = optim_lib.make_schedule(config.optim, 1000)
  mesh = make_mesh((-1, 1, 1))
  task = Pretrain(cfg)
  _, shardings = state_lib.state_shardings(task, tx, mesh)
  state = state_lib.create_state(task, tx, mesh, jax.random.PRNGKey(0), shardings)
  step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
  batch = state_lib.put_batch(next(it), mesh, 8)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  start, steps = time.perf_counter(), 0
  while steps < 2 or time.perf_counter() - start < 20.0:
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    steps += 1
  consumed = steps * 8 * 1024 / (time.perf_counter() - start)
  print(f"  loader {loader:12,.0f} tokens/s; train step {consumed:9,.0f} tokens/s "
        f"({jax.device_count()} CPU device(s)): the loader is {loader / consumed:,.0f}x "
        "faster (target >= 50x)", flush=True)


def main(argv):
  del argv
  root = FLAGS.root or tempfile.mkdtemp(prefix="bench-data-")
  os.makedirs(root, exist_ok=True)
  print(f"# {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; in {root}",
        flush=True)
  try:
    if "tokenize" in FLAGS.parts:
      bench_tokenize(root, FLAGS.copies)
    if "memory" in FLAGS.parts:
      bench_memory(root, FLAGS.copies, FLAGS.steps)
    if "loader" in FLAGS.parts:
      bench_loader(root)
  finally:
    if not FLAGS.root:
      shutil.rmtree(root, ignore_errors=True)
  print(f"# load average {os.getloadavg()[0]:.2f}; peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
  app.run(main)
