"""Tokenizers: one small interface, three implementations.

  ByteTokenizer           UTF-8 bytes 0..255 plus pad/bos/eos; needs no training.
  SentencePieceTokenizer  a trained sentencepiece model (`tokenizer.model`).
  HFTokenizer             a Hugging Face `tokenizer.json` (GPT-2, Llama, Phi-3 imports).

A workdir names its tokenizer in config.json["tokenizer"]; `load_tokenizer`
reads it back. Every tokenizer round-trips any text: encode then decode gives
the text back (sentencepiece needs byte_fallback for that).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def spec(self) -> dict[str, Any]:
    """What config.json["tokenizer"] records so that `load_tokenizer` can rebuild it."""
    ...


class ByteTokenizer:
  """Bytes of the UTF-8 encoding are the tokens; ids 256, 257, 258 are pad, bos, eos."""

  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def spec(self) -> dict[str, Any]:
    return {"kind": "byte"}


def _none_if_negative(i: int) -> int | None:
  return None if i < 0 else int(i)


class SentencePieceTokenizer:
  """A sentencepiece model file (BPE, unigram or char)."""

  def __init__(self, path: str):
    import sentencepiece as spm

    if not os.path.exists(path):
      raise FileNotFoundError(f"sentencepiece model not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id = _none_if_negative(self.sp.pad_id())
    self.bos_id = _none_if_negative(self.sp.bos_id())
    self.eos_id = _none_if_negative(self.sp.eos_id())

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def spec(self) -> dict[str, Any]:
    return {"kind": "sentencepiece", "file": os.path.basename(self.path)}


class HFTokenizer:
  """A Hugging Face fast tokenizer file (tokenizer.json), via the `tokenizers` library."""

  def __init__(self, path: str, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, add_bos: bool = False):
    from tokenizers import Tokenizer as _HFTok

    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    self.path = path
    self.tok = _HFTok.from_file(path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos

  def encode(self, text: str) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] + ids) if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def spec(self) -> dict[str, Any]:
    return {"kind": "huggingface", "file": os.path.basename(self.path), "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id, "add_bos": self.add_bos}


def tokenizer_from_spec(spec: dict[str, Any], directory: str) -> Tokenizer:
  """Rebuild the tokenizer that `spec` (config.json["tokenizer"]) describes."""
  kind = spec.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer(os.path.join(directory, spec.get("file", "tokenizer.model")))
  if kind == "huggingface":
    return HFTokenizer(os.path.join(directory, spec.get("file", "tokenizer.json")),
                       bos_id=spec.get("bos_id"), eos_id=spec.get("eos_id"),
                       pad_id=spec.get("pad_id"), add_bos=spec.get("add_bos", False))
  raise ValueError(f"unknown tokenizer kind {kind!r} in {directory}/config.json; "
                   "expected 'byte', 'sentencepiece' or 'huggingface'")


# ---- training and byte accounting -------------------------------------------------------------
SP_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def train_sentencepiece(texts: Sequence[str], path: str, *, model_type: str = "bpe",
                        vocab_size: int = 2048, byte_fallback: bool = True,
                        character_coverage: float = 0.9995, max_chars: int = 20_000_000,
                        num_threads: int = 2) -> SentencePieceTokenizer:
  """Train a sentencepiece model on `texts` (whole documents) and write it to `path`.

  Text is kept as is (identity normalization, no dummy prefix, whitespace
  runs and newlines kept) so that code and indentation round-trip; byte
  fallback encodes any character outside the vocabulary as its UTF-8 bytes.
  Ids: pad 0, unk 1, bos 2, eos 3. `max_chars` caps the training text (the
  documents are taken in the given order until the budget is spent).
  """
  import io

  import sentencepiece as spm

  if model_type not in ("bpe", "unigram", "char"):
    raise ValueError(f"sentencepiece model_type must be bpe, unigram or char, not {model_type!r}")
  sample, total = [], 0
  for text in texts:
    if total >= max_chars:
      break
    sample.append(text[:max_chars - total])
    total += len(sample[-1])
  if not sample or total == 0:
    raise ValueError("cannot train a tokenizer on an empty text sample")
  proto = io.BytesIO()
  try:
    _train_sp(spm, proto, sample, total, model_type, vocab_size, byte_fallback,
              character_coverage, num_threads)
  except RuntimeError as e:
    message = str(e).split("] ")[-1]
    raise ValueError(f"training a {model_type} sentencepiece tokenizer with vocab_size="
                     f"{vocab_size} failed: {message}") from e
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto.getvalue())
  os.replace(tmp, path)
  return SentencePieceTokenizer(path)


def _train_sp(spm, proto, sample, total, model_type, vocab_size, byte_fallback,
              character_coverage, num_threads):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sample), model_writer=proto, model_type=model_type,
      vocab_size=vocab_size, byte_fallback=byte_fallback, character_coverage=character_coverage,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
      max_sentence_length=max(total, 4192) + 1, hard_vocab_limit=model_type != "char",
      train_extremely_large_corpus=total > 50_000_000, num_threads=num_threads, minloglevel=2,
      **SP_SPECIAL_IDS)


def token_byte_lengths(tokenizer: Tokenizer):
  """[V] int32: the UTF-8 bytes each token id stands for (0 for control tokens).

  Bits per byte = sum of the loss in bits / sum of these lengths over the
  predicted tokens: a tokenizer-independent measure of compression.
  """
  import numpy as np

  lengths = np.zeros(tokenizer.vocab_size, np.int32)
  if isinstance(tokenizer, ByteTokenizer):
    lengths[:256] = 1
  elif isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer.sp
    for i in range(tokenizer.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
  else:
    for i in range(tokenizer.vocab_size):
      lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
  return lengths
