"""Prepare a corpus: stream its documents, tokenize them in worker processes, write shards.

  python -m train.prepare --config=train/configs/gpt2_small.py --out=data/owt \\
      --config.data.corpus='gs://bucket/owt/*.jsonl.zst' --workers=16
  python -m train.prepare --corpus=notes/ --tokenizer=runs/default --out=data/notes
  python -m train --config=train/configs/gpt2_small.py --config.data.prepared=data/owt ...

The documents of config.data.corpus are read in order and cut into pieces
(data.split_chunk_chars); each piece goes to the validation split when a hash of its
name falls below data.val_fraction (or all of data.val_corpus is the validation split),
is tokenized by one of --workers processes (in order) and appended to its split's
shards (train/shards.py): flat uint16/uint32 files of `piece [eot] piece [eot] ...` plus
piece offsets, and a manifest naming the tokenizer (by the SHA-256 of its file), the
counts and the source. The tokenizer is --tokenizer (a workdir, a tokenizer file or
'byte') or, as training does, config.tokenizer trained on the training split.

Nothing holds the corpus in memory. An interrupted prepare continues where its last
committed shards end; a finished one is reused; a directory prepared with another
tokenizer is refused. `python -m train` prepares its corpus the same way, implicitly,
into data.cache_dir (keyed by the sources' names, sizes and times, the split settings
and the tokenizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags
from tqdm import tqdm

from model import store
from model.hf.tokenizer import install_tokenizer
from train import config_lib
from train import tokenizer as tok_lib
from train.corpus import Corpus, CorpusError, forced_validation, split_of
from train.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    dtype_for,
    is_url,
    join,
    local_path,
    read_json,
    remove_file,
    write_json_file,
)

PROGRESS = "progress.json"
SHARD_TOKENS = 1 << 26   # 64M tokens (128 MB of uint16) per shard file
BATCH_PIECES = 64        # pieces per task handed to a worker
NAMES_CAP = 1_000_000    # pieces whose names are listed to keep validation non-empty
PROCESSES_FROM_BYTES = 64 << 20  # smaller corpora are tokenized in this process


class PrepareError(CorpusError):
  """A prepared directory cannot be made or used."""


@dataclasses.dataclass(frozen=True)
class Sources:
  """What a prepared directory is made from (recorded in its manifest)."""

  corpus: tuple[str, ...]
  val_corpus: tuple[str, ...] = ()
  jsonl_field: str = "text"
  val_fraction: float = 0.05
  split_chunk_chars: int = 0

  @classmethod
  def from_config(cls, data) -> Sources:
    def parts(spec):
      return tuple(s.strip() for s in (spec or "").split(",") if s.strip())
    return cls(parts(data.corpus), parts(data.get("val_corpus", "")), data.jsonl_field,
               float(data.val_fraction), int(data.split_chunk_chars))


def tokenizer_fingerprint(tokenizer: store.Tokenizer) -> str:
  """SHA-256 of the tokenizer's file and spec (the ids depend on nothing else)."""
  h = hashlib.sha256(repr(sorted(tokenizer.spec().items())).encode())
  path = getattr(tokenizer, "path", None)
  if path:
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def _tokenizer_settings(tcfg) -> dict:
  return {k: tcfg[k] for k in ("kind", "model_type", "vocab_size", "byte_fallback",
                               "character_coverage", "max_train_chars")}


# ---- the pieces and their split -------------------------------------------------------------
def _val_names(sources: Sources) -> set[str] | None:
  """The validation pieces when the hash split would leave one side empty (small corpora:
  their names are listed first), else None (the hash decides, piece by piece)."""
  if sources.val_corpus:
    return None
  names, val = [], 0
  for piece in Corpus(list(sources.corpus), sources.jsonl_field).pieces(
      sources.split_chunk_chars):
    names.append(piece.name)
    val += split_of(piece.name, sources.val_fraction) == "val"
    if len(names) > NAMES_CAP:
      return None
  if 0 < val < len(names):
    return None
  return forced_validation(names, sources.val_fraction)


def _pieces(sources: Sources, opened: list | None = None) -> Iterator[tuple[str, str, str]]:
  """(split, name, text) of every piece, in order: the corpus, then the validation corpus
  (`opened` receives the Corpus objects, for their counts)."""
  val_names = _val_names(sources)
  corpus = Corpus(list(sources.corpus), sources.jsonl_field)
  if opened is not None:
    opened.append(corpus)
  for piece in corpus.pieces(sources.split_chunk_chars):
    if sources.val_corpus:
      split = "train"
    elif val_names is not None:
      split = "val" if piece.name in val_names else "train"
    else:
      split = split_of(piece.name, sources.val_fraction)
    yield split, piece.name, piece.text
  if sources.val_corpus:
    val = Corpus(list(sources.val_corpus), sources.jsonl_field)
    if opened is not None:
      opened.append(val)
    for piece in val.pieces(sources.split_chunk_chars):
      yield "val", piece.name, piece.text


# ---- tokenizing in worker processes ---------------------------------------------------------
_WORKER_TOKENIZER = None


def _load_worker(spec: dict, directory: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = store.tokenizer_from_spec(spec, directory)


def _encode(batch: list[tuple[str, str, str]]) -> list[tuple[str, int, np.ndarray]]:
  """(split, UTF-8 bytes, ids) of each (split, name, text) piece of the batch."""
  return [(split, len(text.encode("utf-8", "surrogatepass")),
           np.asarray(_WORKER_TOKENIZER.encode(text), np.int64))
          for split, _, text in batch]


def _batches(pieces: Iterator[tuple[str, str, str]], size: int):
  batch = []
  for piece in pieces:
    batch.append(piece)
    if len(batch) >= size:
      yield batch
      batch = []
  if batch:
    yield batch


def _encoded(batches, tokenizer: store.Tokenizer, directory: str, workers: int):
  """The encoded batches, in order, tokenized by `workers` processes (0 or 1: here)."""
  global _WORKER_TOKENIZER
  if workers <= 1:  # (small corpora: starting processes would cost more than it saves)
    _WORKER_TOKENIZER = tokenizer
    yield from map(_encode, batches)
    return
  context = multiprocessing.get_context("spawn")  # no JAX or thread state is forked
  with _main_module_hidden():
    pool = context.Pool(workers, initializer=_load_worker,
                        initargs=(tokenizer.spec(), directory))
  with pool:
    yield from pool.imap(_encode, batches, chunksize=1)


@contextlib.contextmanager
def _main_module_hidden():
  """Spawned workers need only this module: without this they would first re-run the
  caller's __main__ (a CLI, a notebook, a script on stdin), slowly or not at all."""
  main = sys.modules["__main__"]
  saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
  main.__spec__ = None
  main.__dict__.pop("__file__", None)
  try:
    yield
  finally:
    main.__dict__.update(saved)


# ---- prepare --------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  root: str
  manifest: dict
  reused: bool  # the directory was already complete


def _train_tokenizer(sources: Sources, tcfg, root: str, log) -> store.Tokenizer:
  """A sentencepiece model trained on the first max_train_chars of the training pieces."""
  texts, total = [], 0
  for split, _, text in _pieces(sources):
    if split == "train":
      texts.append(text)
      total += len(text)
      if total >= tcfg.max_train_chars:
        break
  t0 = time.time()
  path = join(root, "tokenizer.model")
  trained = tok_lib.train_sentencepiece(
      texts, path, model_type=tcfg.model_type, vocab_size=tcfg.vocab_size,
      byte_fallback=tcfg.byte_fallback, character_coverage=tcfg.character_coverage,
      max_chars=tcfg.max_train_chars)
  log(f"trained a {tcfg.model_type} tokenizer ({trained.vocab_size} pieces) on "
      f"{min(total, tcfg.max_train_chars) / 1e6:.1f}M characters in {time.time() - t0:.1f} s")
  return trained


def _install_tokenizer(tokenizer: store.Tokenizer, root: str) -> store.Tokenizer:
  """The given tokenizer, its file copied into root (the shards travel with their ids)."""
  path = getattr(tokenizer, "path", None)
  if path is None:
    return tokenizer
  target = join(root, os.path.basename(path))
  store.copy_file(path, target)
  return store.tokenizer_from_spec(tokenizer.spec(), root)


def open_prepared(root: str) -> dict:
  """The manifest of a complete prepared directory (PrepareError otherwise)."""
  manifest = read_json(join(root, MANIFEST))
  if manifest is None or not manifest.get("complete"):
    raise PrepareError(f"{root} holds no prepared data (no complete {MANIFEST}); make it with "
                       f"python -m train.prepare --out={root} ...")
  if manifest.get("format") != FORMAT:
    raise PrepareError(f"{root}: prepared data format {manifest.get('format')} is not "
                       f"{FORMAT}; prepare it again")
  return manifest


def prepared_tokenizer(root: str, manifest: dict) -> store.Tokenizer:
  return store.tokenizer_from_spec(manifest["tokenizer"]["spec"], local_path(root))


def prepare(root: str, sources: Sources, *, tokenizer: store.Tokenizer | None = None,
            tokenizer_config=None, workers: int = 1, shard_tokens: int = SHARD_TOKENS,
            log: Callable[[str], None] = print, progress: bool = True) -> Prepared:
  """Tokenize `sources` into shards under `root` (see the module docstring); returns the
  manifest. `tokenizer`: use this one; else train config.tokenizer (`tokenizer_config`)."""
  if is_url(root) and tokenizer is None:
    raise PrepareError("preparing into a URL needs a given tokenizer (--tokenizer); train one "
                       "by preparing to a local directory first")
  if not is_url(root):
    store.ensure_writable(local_path(root))
  existing = read_json(join(root, MANIFEST))
  expected = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
  if existing is not None:
    if expected is not None and existing["tokenizer"]["fingerprint"] != expected:
      raise PrepareError(
          f"{root} was prepared with another tokenizer ({existing['tokenizer']['spec']}, "
          f"sha256 {existing['tokenizer']['fingerprint'][:12]}...), not the one given "
          f"(sha256 {expected[:12]}...); prepare into another --out")
    if existing.get("complete"):
      return Prepared(root, existing, reused=True)
  if existing is None:  # a fresh directory (or one whose first run died before a commit)
    if tokenizer is None:
      tokenizer = _train_tokenizer(sources, tokenizer_config, root, log)
    else:
      tokenizer = _install_tokenizer(tokenizer, root)
  else:
    tokenizer = prepared_tokenizer(root, existing)
  return _tokenize(root, sources, tokenizer, existing, workers, shard_tokens, log, progress)


def _tokenize(root, sources, tokenizer, existing, workers, shard_tokens, log, progress):
  if tokenizer.eos_id is None:
    raise PrepareError("the tokenizer has no eos id; pieces are separated by it")
  dtype = dtype_for(tokenizer.vocab_size)
  resume = read_json(join(root, PROGRESS)) if existing is not None else None
  done = resume["pieces_done"] if resume else 0
  writers = {split: ShardWriter(root, split, dtype, tokenizer.eos_id, shard_tokens,
                                resume["splits"][split]["shards"] if resume else ())
             for split in ("train", "val")}
  manifest = {
      "format": FORMAT, "complete": False, "dtype": dtype.str, "eot_id": tokenizer.eos_id,
      "vocab_size": tokenizer.vocab_size,
      "tokenizer": {"spec": tokenizer.spec(), "fingerprint": tokenizer_fingerprint(tokenizer)},
      "source": dataclasses.asdict(sources)}
  write_json_file(join(root, MANIFEST), manifest)
  total = Corpus(list(sources.corpus + sources.val_corpus), sources.jsonl_field).total_bytes()
  bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
             desc="tokenizing", mininterval=1.0)
  opened: list[Corpus] = []
  pieces = _pieces(sources, opened)
  for _ in range(done):  # already in the shards of an interrupted run
    bar.update(len(next(pieces)[2].encode("utf-8", "surrogatepass")))
  if done:
    log(f"continuing {root}: {done:,} pieces were prepared before")
  index, t0 = done, time.time()
  if total is not None and total < PROCESSES_FROM_BYTES:
    workers = 1
  try:
    for results in _encoded(_batches(pieces, BATCH_PIECES), tokenizer, local_path(root),
                            workers):
      written = len(writers["train"].shards)
      for split, nbytes, ids in results:
        writers[split].add(ids)
        bar.update(nbytes)
      index += len(results)
      if len(writers["train"].shards) > written:  # a train shard was written: commit
        _commit(root, writers, index)
    for writer in writers.values():
      writer.flush()
  except BaseException:  # the shards being written are not listed anywhere: remove them
    for writer in writers.values():
      writer.abort()
    raise
  bar.close()
  for split in ("train", "val"):
    if not writers[split].shards:
      raise PrepareError(f"the {split} split of {list(sources.corpus)} is empty; "
                         + ("give a validation corpus with text" if split == "val" and
                            sources.val_corpus else "the corpus needs more text"))
  manifest.update(complete=True, splits={s: w.summary() for s, w in writers.items()},
                  pieces=index, seconds=round(time.time() - t0, 1),
                  corpus=[{"sources": c.sources, "documents": c.documents_read,
                           "bytes": c.bytes_read, "skipped": dict(c.skipped)} for c in opened])
  write_json_file(join(root, MANIFEST), manifest)
  remove_file(join(root, PROGRESS))
  log(f"prepared {root}: " + "; ".join(
      f"{s} {manifest['splits'][s]['pieces']:,} pieces, {manifest['splits'][s]['tokens']:,} "
      "tokens" for s in ("train", "val")))
  return Prepared(root, manifest, reused=False)


def _commit(root: str, writers: dict, pieces_done: int) -> None:
  """Flush both splits and record how many pieces their shards hold (the resume point)."""
  for writer in writers.values():
    writer.flush()
  write_json_file(join(root, PROGRESS), {
      "pieces_done": pieces_done, "splits": {s: w.summary() for s, w in writers.items()}})


# ---- command line ---------------------------------------------------------------------------
FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory (or URL) to write the prepared shards to.")
flags.DEFINE_string("corpus", None, "Corpus sources (default: the config's data.corpus).")
flags.DEFINE_string("val_corpus", None, "Validation sources (default: data.val_corpus, or "
                    "a hash split of the corpus).")
flags.DEFINE_string("tokenizer", None, "'byte', a workdir, a Hugging Face model directory or a "
                    "sentencepiece .model file (default: train config.tokenizer on the corpus).")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 1)), "Tokenizer processes.")
flags.DEFINE_integer("shard_tokens", SHARD_TOKENS, "Tokens per shard file.")


def load_tokenizer_arg(value: str, out: str) -> store.Tokenizer:
  """--tokenizer: 'byte', a workdir, an HF model directory or a sentencepiece file."""
  path = os.path.expanduser(value)
  if value == "byte":
    return store.ByteTokenizer()
  if os.path.isdir(path) and store.has_config(path):
    return store.load_tokenizer(path)
  if os.path.isdir(path):
    tokenizer, _ = install_tokenizer(path, local_path(out))
    return tokenizer
  if os.path.isfile(path) and path.endswith(".model"):
    return store.SentencePieceTokenizer(path)
  raise PrepareError(f"--tokenizer={value!r}: expected 'byte', a workdir, a Hugging Face model "
                     "directory or a sentencepiece .model file")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required (a directory or URL for the shards)")
  try:
    config = config_lib.from_command_line(_config_args or ["--config=train/configs/default.py"])
    data = config.data
    if FLAGS.corpus:
      data.corpus = FLAGS.corpus
    if FLAGS.val_corpus:
      data.val_corpus = FLAGS.val_corpus
    tokenizer = load_tokenizer_arg(FLAGS.tokenizer, FLAGS.out) if FLAGS.tokenizer else None
    if tokenizer is None and config.tokenizer.kind == "byte":
      tokenizer = store.ByteTokenizer()
    done = prepare(FLAGS.out, Sources.from_config(data), tokenizer=tokenizer,
                   tokenizer_config=config.tokenizer, workers=FLAGS.workers,
                   shard_tokens=FLAGS.shard_tokens, log=store_log)
  except (CorpusError, config_lib.ConfigError, store.WorkdirError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if done.reused:
    store_log(f"{FLAGS.out} is already prepared (manifest complete): nothing to do")
  store_log(f"train on it: python -m train --config=... --config.data.prepared={FLAGS.out}")
  return 0


def store_log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


_config_args: list[str] = []


def _parse_flags(argv: list[str]) -> list[str]:
  global _config_args
  ours, _config_args = config_lib.split_command_line(argv)
  return FLAGS(ours)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
