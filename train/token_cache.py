"""Token arrays cached on disk, keyed by corpus and tokenizer, so a second run skips tokenizing.

  cache_dir/tokenizers/<key>.model        sentencepiece models trained for (corpus, settings)
  cache_dir/tokens/<key>/{train,val}.npz   flat tokens + per-document lengths of each split

Keys are SHA-256 digests of everything the content depends on (the corpus
fingerprint, the split settings, the tokenizer's bytes or settings). Entries
are written to a temporary name and renamed, so a crash never leaves a
half-written entry behind and concurrent writers agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from model.store.files import atomic_open

ENV_VAR = "TRANSFORMER_LAB_CACHE"


def default_cache_dir() -> str:
  return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                 "transformer-lab")


def make_key(*parts) -> str:
  payload = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(payload).hexdigest()[:32]


def file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class TokenCache:
  """A directory of cached tokenizers and token arrays."""

  def __init__(self, root: str | None = None):
    self.root = os.path.abspath(root or default_cache_dir())

  # tokenizers
  def tokenizer_path(self, key: str) -> str:
    return os.path.join(self.root, "tokenizers", f"{key}.model")

  # token arrays
  def _split_path(self, key: str, split: str) -> str:
    return os.path.join(self.root, "tokens", key, f"{split}.npz")

  def get_tokens(self, key: str, split: str) -> list[np.ndarray] | None:
    """The split's documents as token arrays, or None when not cached (or unreadable)."""
    path = self._split_path(key, split)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path) as data:
        tokens, lengths = data["tokens"], data["lengths"]
      if int(lengths.sum()) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but documents of {int(lengths.sum())}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      logging.warning("the token cache entry %s is damaged (%s); rebuilding it", path,
                      " ".join(str(e).split()) or type(e).__name__)
      return None
    return np.split(tokens.astype(np.int32), np.cumsum(lengths)[:-1])

  def put_tokens(self, key: str, split: str, docs: Sequence[np.ndarray], vocab_size: int) -> None:
    path = self._split_path(key, split)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = np.concatenate([np.asarray(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)
    lengths = np.array([len(d) for d in docs], np.int64)
    with atomic_open(path, "wb") as f:
      np.savez(f, tokens=tokens, lengths=lengths)
