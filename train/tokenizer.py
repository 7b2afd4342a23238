"""Training a sentencepiece tokenizer, and the bytes each token id stands for.

  tokenizer = train_sentencepiece(texts, "runs/x/tokenizer.model", vocab_size=2048)
  lengths_V = token_byte_lengths(tokenizer)     # for bits per byte

The tokenizer classes themselves (byte, sentencepiece, Hugging Face) are part of
the workdir format: model/store/tokenizer.py.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from model.store.files import atomic_open
from model.store.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

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
    _train_sp(proto, sample, total, model_type, vocab_size, byte_fallback,
              character_coverage, num_threads)
  except RuntimeError as e:
    message = str(e).split("] ")[-1]
    raise ValueError(f"training a {model_type} sentencepiece tokenizer with vocab_size="
                     f"{vocab_size} failed: {message}") from e
  with atomic_open(path, "wb") as f:
    f.write(proto.getvalue())
  return SentencePieceTokenizer(path)


def _train_sp(proto, sample, total, model_type, vocab_size, byte_fallback,
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
  """[V] int32: the UTF-8 bytes of text each token id stands for (0 for control tokens).

  Bits per byte = sum of the loss in bits / sum of these lengths over the predicted
  tokens: a tokenizer-independent measure of compression. The lengths are exact per
  token, so their sum over a text's tokens is the UTF-8 length of the text they decode
  to, even where one character spans several tokens (tests/test_evaluate.py):

    byte tokenizer      ids 0..255 are one byte each; bos/eos/pad are 0
    sentencepiece       a byte-fallback piece <0xNN> is 1; any other piece its UTF-8 length
                        with U+2581 as the space it stands for; control and unknown 0
    Hugging Face        byte-level BPE (GPT-2, Llama 3): the bytes its characters map back to;
                        <0xNN> byte-fallback pieces 1; otherwise the piece's UTF-8 length
                        (U+2581 as a space); special added tokens 0
  """
  lengths = np.zeros(tokenizer.vocab_size, np.int32)
  if isinstance(tokenizer, ByteTokenizer):
    lengths[:256] = 1
  elif isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer.sp
    for i in range(tokenizer.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
  elif isinstance(tokenizer, HFTokenizer):
    lengths = _hf_byte_lengths(tokenizer.tok, tokenizer.vocab_size)
  else:
    for i in range(tokenizer.vocab_size):
      lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
  return lengths


def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE writes byte b as a printable character; this maps it back."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars, shift = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + shift)] = b
      shift += 1
  return chars


def _uses(component: dict | None, kind: str) -> bool:
  """Whether a tokenizer.json decoder (possibly a Sequence of them) includes `kind`."""
  if not component:
    return False
  return component.get("type") == kind or any(
      _uses(c, kind) for c in component.get("decoders", []) or [])


def _hf_byte_lengths(tok, vocab_size: int):
  lengths = np.zeros(vocab_size, np.int32)
  special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
  byte_level = _uses(json.loads(tok.to_str()).get("decoder"), "ByteLevel")
  alphabet = _byte_level_alphabet()
  for i in range(vocab_size):
    piece = tok.id_to_token(i)
    if piece is None or i in special:
      continue
    if byte_level and all(c in alphabet for c in piece):
      lengths[i] = len(piece)  # one character per byte
    elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
      lengths[i] = 1
    else:
      lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
  return lengths
