"""Tokenizers: one small interface, three implementations, rebuilt from a workdir's spec.

  ByteTokenizer           UTF-8 bytes 0..255 plus pad/bos/eos; needs no training.
  SentencePieceTokenizer  a trained sentencepiece model (`tokenizer.model`).
  HFTokenizer             a Hugging Face `tokenizer.json` (GPT-2, Llama, Phi-3 imports).

A workdir names its tokenizer in config.json["tokenizer"] (`spec()`);
`tokenizer_from_spec` rebuilds it from that entry and the workdir's files.
Every tokenizer round-trips any text: encode then decode gives the text back
(sentencepiece needs byte_fallback for that). Training a sentencepiece model
is train/tokenizer.py's job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import sentencepiece as spm
import tokenizers


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def spec(self) -> dict[str, Any]:
    """What config.json["tokenizer"] records so that `tokenizer_from_spec` can rebuild it."""
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
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    self.path = path
    self.tok = tokenizers.Tokenizer.from_file(path)
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


def _file_in(directory: str, name: str) -> str:
  """directory/name, for a plain file name only: a workdir's tokenizer lives inside it."""
  if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (
      ".", ".."):
    raise ValueError(f"tokenizer file {name!r} in {directory}/config.json must be a file name "
                     "inside the workdir (no directories, no '..', not an absolute path)")
  return os.path.join(directory, name)


def tokenizer_from_spec(spec: dict[str, Any], directory: str) -> Tokenizer:
  """Rebuild the tokenizer that `spec` (config.json["tokenizer"]) describes."""
  kind = spec.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer(_file_in(directory, spec.get("file", "tokenizer.model")))
  if kind == "huggingface":
    return HFTokenizer(_file_in(directory, spec.get("file", "tokenizer.json")),
                       bos_id=spec.get("bos_id"), eos_id=spec.get("eos_id"),
                       pad_id=spec.get("pad_id"), add_bos=spec.get("add_bos", False))
  raise ValueError(f"unknown tokenizer kind {kind!r} in {directory}/config.json; "
                   "expected 'byte', 'sentencepiece' or 'huggingface'")
