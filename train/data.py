"""The data path: corpus -> tokenizer -> cached tokens -> packed windows -> grain batches.

  data = prepare_data(config, workdir)             # tokenizer in the workdir, splits packed
  it = train_iterator(data.train, batch_size=32, accum=1, seed=0)
  batch = next(it)                                  # dict of [A, B_local, T] numpy arrays
  state = it.get_state()                            # saved in checkpoints ('data' item)

Batches are laid out [A, b, T]: A gradient-accumulation micro-steps of b rows.
Every process builds the same global order (a seeded shuffle of all windows,
reshuffled each epoch) and keeps its own rows of each micro-batch
(rows [i b / P, (i + 1) b / P) for process i of P), so the global batch does
not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import grain
import jax
import ml_collections
import numpy as np

from model import store
from train import corpus as corpus_lib
from train import tokenizer as tok_lib
from train.packing import PackedWindows
from train.token_cache import TokenCache, file_digest, make_key

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class PreparedData:
  tokenizer: store.Tokenizer
  train: PackedWindows
  val: PackedWindows
  byte_lengths: np.ndarray   # [V] bytes per token id (for bits per byte)
  description: str           # what was read, skipped, cached
  cache_hit: bool            # the token arrays came from the cache


def _tokenizer_settings(tcfg: ml_collections.ConfigDict) -> dict:
  return {k: tcfg[k] for k in ("kind", "model_type", "vocab_size", "byte_fallback",
                               "character_coverage", "max_train_chars")}


def load_or_train_tokenizer(tcfg: ml_collections.ConfigDict, workdir: str, train_docs,
                            corpus_key: str, cache: TokenCache) -> store.Tokenizer:
  """The workdir's tokenizer if it has one (resume), else the cached or a freshly trained one."""
  if store.has_config(workdir):
    return store.load_tokenizer(workdir)
  if tcfg.kind == "byte":
    return store.ByteTokenizer()
  target = os.path.join(workdir, TOKENIZER_FILE)
  key = make_key("tokenizer", corpus_key, _tokenizer_settings(tcfg))
  cached = cache.tokenizer_path(key)
  if not os.path.exists(cached):
    t0 = time.time()
    trained = tok_lib.train_sentencepiece(
        [d.text for d in train_docs], cached, model_type=tcfg.model_type,
        vocab_size=tcfg.vocab_size, byte_fallback=tcfg.byte_fallback,
        character_coverage=tcfg.character_coverage, max_chars=tcfg.max_train_chars)
    logging.info("trained a %s tokenizer (%d pieces) in %.1fs", tcfg.model_type,
                 trained.vocab_size, time.time() - t0)
  store.copy_file(cached, target)
  return store.SentencePieceTokenizer(target)


def _tokenizer_identity(tokenizer: store.Tokenizer) -> str:
  path = getattr(tokenizer, "path", None)
  return file_digest(path) if path else repr(tokenizer.spec())


def _encode_all(tokenizer: store.Tokenizer, docs) -> list[np.ndarray]:
  texts = [d.text for d in docs]
  if isinstance(tokenizer, store.SentencePieceTokenizer):
    ids = tokenizer.sp.encode(texts, num_threads=os.cpu_count() or 1)
  else:
    ids = [tokenizer.encode(t) for t in texts]
  return [np.asarray(x, np.int32) for x in ids]


def prepare_data(config: ml_collections.ConfigDict, workdir: str,
                 tokenizer: store.Tokenizer | None = None) -> PreparedData:
  """Read, split, tokenize (or load from the cache) and pack the corpus of config.data.

  `tokenizer` (a fine-tune's base tokenizer) replaces the workdir's or a trained one.
  """
  dcfg = config.data
  corpus = corpus_lib.read_corpus(dcfg.corpus, jsonl_field=dcfg.jsonl_field)
  train_docs, val_docs = corpus_lib.split_documents(corpus.documents, dcfg.val_fraction,
                                                    chunk_chars=dcfg.split_chunk_chars)
  corpus_key = make_key(corpus.fingerprint(), dcfg.val_fraction, dcfg.split_chunk_chars)
  cache = TokenCache(dcfg.cache_dir or None)
  if tokenizer is None:
    tokenizer = load_or_train_tokenizer(config.tokenizer, workdir, train_docs, corpus_key, cache)
  if tokenizer.eos_id is None:
    raise ValueError("the tokenizer has no eos_id; packing ends each document with one")
  # Padding is outside the loss mask and the documents' segments, so any id will do; imported
  # tokenizers (GPT-2, Llama) often have no pad token.
  pad_id = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
  tokens_key = make_key("tokens", corpus_key, _tokenizer_identity(tokenizer))
  splits, hit = {}, True
  for split, docs in (("train", train_docs), ("val", val_docs)):
    cached = cache.get_tokens(tokens_key, split)
    if cached is None or len(cached) != len(docs):
      hit = False
      cached = _encode_all(tokenizer, docs)
      cache.put_tokens(tokens_key, split, cached, tokenizer.vocab_size)
    splits[split] = cached

  def pack(docs):
    return PackedWindows.from_documents(docs, seq_len=dcfg.seq_len, eot_id=tokenizer.eos_id,
                                        pad_id=pad_id,
                                        document_masking=dcfg.document_masking)

  train, val = pack(splits["train"]), pack(splits["val"])
  description = (f"corpus: {corpus.describe()}\n"
                 f"split: {len(train_docs)} train / {len(val_docs)} validation documents; "
                 f"{train.num_target_tokens:,} / {val.num_target_tokens:,} tokens "
                 f"({'cached' if hit else 'tokenized'}, {cache.root})")
  return PreparedData(tokenizer, train, val, tok_lib.token_byte_lengths(tokenizer), description,
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
