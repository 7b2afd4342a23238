"""The data path: corpus -> tokenizer -> prepared shards -> packed windows -> grain batches.

  data = prepare_data(config, workdir)             # tokenizer in the workdir, splits packed
  it = train_iterator(data.train, batch_size=32, accum=1, seed=0)
  batch = next(it)                                  # dict of [A, B_local, T] numpy arrays
  state = it.get_state()                            # saved in checkpoints ('data' item)

The tokens come from prepared shards (train/prepare.py): config.data.prepared names a
directory made by `python -m train.prepare`; otherwise the corpus is prepared here, into
data.cache_dir under a key of the sources (names, sizes, times), the split settings and
the tokenizer, so a second run (any workdir) reuses the shards and the tokenizer.

Batches are laid out [A, b, T]: A gradient-accumulation micro-steps of b rows.
Every process builds the same global order (a seeded shuffle of all windows,
reshuffled each epoch) and keeps its own rows of each micro-batch
(rows [i b / P, (i + 1) b / P) for process i of P), so the global batch does
not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import grain
import jax
import ml_collections
import numpy as np

from model import store
from train import tokenizer as tok_lib
from train.corpus import Corpus
from train.packing import PackedWindows
from train.prepare import (
    PrepareError,
    Sources,
    open_prepared,
    prepare,
    prepared_tokenizer,
    tokenizer_fingerprint,
)
from train.shards import TokenStream, is_url, local_path

CACHE_ENV_VAR = "TRANSFORMER_LAB_CACHE"


@dataclasses.dataclass
class PreparedData:
  tokenizer: store.Tokenizer
  train: PackedWindows
  val: PackedWindows
  byte_lengths: np.ndarray   # [V] bytes per token id (for bits per byte)
  description: str           # what was read, skipped, prepared
  cache_hit: bool            # the shards existed already (prepared before)


def default_cache_dir() -> str:
  return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "transformer-lab")


def make_key(*parts) -> str:
  payload = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(payload).hexdigest()[:32]


def _tokenizer_settings(tcfg: ml_collections.ConfigDict) -> dict:
  return {k: tcfg[k] for k in ("kind", "model_type", "vocab_size", "byte_fallback",
                               "character_coverage", "max_train_chars")}


def _given_tokenizer(config, workdir: str, tokenizer: store.Tokenizer | None):
  """The tokenizer the tokens must come from: the given one (a LoRA base's), the workdir's
  (a resumed run), the byte tokenizer; None means train one as config.tokenizer says."""
  if tokenizer is not None:
    return tokenizer
  if store.has_config(workdir):
    return store.load_tokenizer(workdir)
  if config.tokenizer.kind == "byte":
    return store.ByteTokenizer()
  return None


def _prepared_dir(config, sources: Sources, tokenizer) -> str:
  """Where this corpus, split and tokenizer are prepared in the cache."""
  dcfg = config.data
  identity = (tokenizer_fingerprint(tokenizer) if tokenizer is not None else
              _tokenizer_settings(config.tokenizer))
  corpus = Corpus(list(sources.corpus), sources.jsonl_field).signature()
  val = Corpus(list(sources.val_corpus), sources.jsonl_field).signature() if (
      sources.val_corpus) else None
  key = make_key(corpus, val, dataclasses.asdict(sources), identity)
  return os.path.join(dcfg.cache_dir or default_cache_dir(), "prepared", key)


def _install(tokenizer: store.Tokenizer, workdir: str) -> store.Tokenizer:
  """The tokenizer with its file in the workdir (the sampler reads it from there)."""
  path = getattr(tokenizer, "path", None)
  if path is None or os.path.dirname(os.path.abspath(path)) == os.path.abspath(workdir):
    return tokenizer
  store.copy_file(path, os.path.join(workdir, os.path.basename(path)))
  return store.tokenizer_from_spec(tokenizer.spec(), workdir)


def _describe(corpus: dict) -> str:
  text = (f"corpus: {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.2f} MB from "
          f"{corpus['sources']}")
  if corpus["skipped"]:
    text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(
        corpus["skipped"].items()))
  return text


def prepare_data(config: ml_collections.ConfigDict, workdir: str,
                 tokenizer: store.Tokenizer | None = None, *, progress: bool = False
                 ) -> PreparedData:
  """The windows of the training and validation splits, and the tokenizer (put in workdir).

  `tokenizer` (a fine-tune's base tokenizer) replaces the workdir's or a trained one.
  """
  dcfg = config.data
  given = _given_tokenizer(config, workdir, tokenizer)
  if dcfg.prepared:
    root = dcfg.prepared if is_url(dcfg.prepared) else os.path.abspath(
        local_path(dcfg.prepared))
    manifest = open_prepared(root)
    if given is not None and tokenizer_fingerprint(given) != manifest["tokenizer"][
        "fingerprint"]:
      raise PrepareError(f"config.data.prepared={dcfg.prepared!r} was made with another "
                         "tokenizer than this run's (the workdir's or the base model's); "
                         "prepare the corpus with this tokenizer: python -m train.prepare "
                         f"--tokenizer={workdir} --out=...")
    hit = True
  else:
    sources = Sources.from_config(dcfg)
    root = _prepared_dir(config, sources, given)
    done = prepare(root, sources, tokenizer=given, tokenizer_config=config.tokenizer,
                   workers=dcfg.workers or os.cpu_count() or 1, progress=progress,
                   log=lambda m: None)
    manifest, hit = done.manifest, done.reused
    try:
      for split in ("train", "val"):
        TokenStream.open(root, split, manifest)
    except (OSError, ValueError) as e:  # a cache entry damaged on disk: make it again
      logging.warning("the prepared tokens in %s are damaged (%s); preparing them again",
                      root, e)
      shutil.rmtree(root)
      done = prepare(root, sources, tokenizer=given, tokenizer_config=config.tokenizer,
                     workers=dcfg.workers or os.cpu_count() or 1, progress=progress,
                     log=lambda m: None)
      manifest, hit = done.manifest, False
  chosen = given or prepared_tokenizer(root, manifest)
  if given is None and not is_url(root):
    chosen = _install(chosen, workdir)
  if chosen.eos_id is None:
    raise ValueError("the tokenizer has no eos_id; packing ends each document with one")
  # Padding is outside the loss mask and the documents' segments, so any id will do; imported
  # tokenizers (GPT-2, Llama) often have no pad token.
  pad_id = chosen.eos_id if chosen.pad_id is None else chosen.pad_id

  def windows(split):
    return PackedWindows(TokenStream.open(root, split, manifest), dcfg.seq_len, pad_id,
                         dcfg.document_masking)

  train, val = windows("train"), windows("val")
  splits = manifest["splits"]
  description = "\n".join(_describe(c) for c in manifest["corpus"]) + (
      f"\nsplit: {splits['train']['pieces']:,} train / {splits['val']['pieces']:,} "
      f"validation pieces; {train.num_target_tokens:,} / {val.num_target_tokens:,} tokens "
      f"({'prepared before' if hit else 'tokenized now'}, {root})")
  return PreparedData(chosen, train, val, tok_lib.token_byte_lengths(chosen), description,
                      hit)


# ---- grain pipelines -------------------------------------------------------------------------
def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size % process_count:
    raise ValueError(f"batch of {batch_size} rows does not divide over {process_count} processes")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def train_dataset(source: PackedWindows, *, batch_size: int, accum: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> grain.MapDataset:
  """Infinite MapDataset of this process's batches [A, b_local, T] (b = batch_size / A)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  micro = batch_size // accum
  rows = _local_rows(micro, pi, pc)

  def fetch(flat_indices):  # [A * micro] window indices of one step
    return source.windows(flat_indices.reshape(accum, micro)[:, rows])

  return (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).map(fetch))


def train_iterator(source: PackedWindows, *, batch_size: int, accum: int = 1, seed: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator (get_state/set_state) over `train_dataset`."""
  ds = train_dataset(source, batch_size=batch_size, accum=accum, seed=seed,
                     process_index=process_index, process_count=process_count)
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def eval_batches(source: PackedWindows, *, batch_size: int, max_batches: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
  """The validation windows as [1, b_local, T] batches, the last padded with fully masked
  rows. `max_batches` > 0 scores only that many batches of windows spread evenly over the
  split (the first windows alone would favour the first documents)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  rows = _local_rows(batch_size, pi, pc)
  order = np.arange(len(source))
  if max_batches and max_batches * batch_size < len(source):
    order = np.linspace(0, len(source) - 1, max_batches * batch_size).round().astype(np.int64)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    valid = np.arange(batch_size) < len(idx)
    idx = np.pad(idx, (0, batch_size - len(idx)))
    batch = source.windows(idx)
    batch["loss_mask"] = batch["loss_mask"] * valid[:, None]
    yield {k: v[rows][None] for k, v in batch.items()}
