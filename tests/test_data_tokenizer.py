"""Tokenizer training (bpe/unigram/char), byte fallback round trips, byte accounting, the cache."""

import os

import numpy as np
import pytest

from model import store
from train import data as data_lib
from train import prepare as prepare_lib
from train import tokenizer as tok_lib
from train.config_lib import load_config
from train.corpus import stdlib_root

TEXT_DIR = os.path.join(stdlib_root(), "json")
UNSEEN = "naïve café — 日本語 \U0001f600\ttabs\n    indented\r\n\x00 end"


@pytest.fixture(scope="module")
def training_texts():
  names = sorted(n for n in os.listdir(TEXT_DIR) if n.endswith(".py"))
  return [open(os.path.join(TEXT_DIR, n), encoding="utf-8").read() for n in names]


@pytest.mark.parametrize("model_type,vocab_size", [("bpe", 600), ("unigram", 600),
                                                    ("char", 1000)])
def test_sentencepiece_round_trips_any_text(tmp_path, training_texts, model_type, vocab_size):
  tok = tok_lib.train_sentencepiece(training_texts, str(tmp_path / "t.model"),
                                    model_type=model_type, vocab_size=vocab_size)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  for text in (training_texts[0][:3000], UNSEEN):  # code with indentation; unseen characters
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  lengths = tok_lib.token_byte_lengths(tok)
  ids = tok.encode(UNSEEN)
  assert lengths[ids].sum() == len(UNSEEN.encode("utf-8"))  # bits per byte counts every byte
  assert lengths[[tok.pad_id, tok.bos_id, tok.eos_id]].sum() == 0
  if model_type == "bpe":  # merges learned: code compresses well below a byte per token
    assert len(tok.encode(training_texts[0])) < len(training_texts[0].encode()) / 2


def test_byte_tokenizer_lengths():
  tok = store.ByteTokenizer()
  lengths = tok_lib.token_byte_lengths(tok)
  assert lengths.shape == (259,) and lengths[:256].all() and not lengths[256:].any()
  assert tok.decode(tok.encode(UNSEEN)) == UNSEEN


def test_bad_training_requests_are_rejected(tmp_path, training_texts):
  with pytest.raises(ValueError, match="empty"):
    tok_lib.train_sentencepiece([], str(tmp_path / "t.model"))
  with pytest.raises(ValueError, match="vocab_size=100 failed: Vocabulary size is smaller"):
    tok_lib.train_sentencepiece(training_texts, str(tmp_path / "t.model"), vocab_size=100)


def test_cache_reuse_skips_training_and_tokenizing(tmp_path, monkeypatch):
  config = load_config("train/configs/tiny.py", {
      "tokenizer.kind": "sentencepiece", "tokenizer.vocab_size": 400,
      "data.cache_dir": str(tmp_path / "cache")})
  first = data_lib.prepare_data(config, str(tmp_path / "run1"))
  assert not first.cache_hit
  assert os.path.exists(tmp_path / "run1" / "tokenizer.model")

  def boom(*args, **kwargs):
    raise AssertionError("the second run must not tokenize or train again")

  monkeypatch.setattr(prepare_lib, "_tokenize", boom)
  monkeypatch.setattr(tok_lib, "train_sentencepiece", boom)
  second = data_lib.prepare_data(config, str(tmp_path / "run2"))  # a fresh workdir, same corpus
  assert second.cache_hit
  for split in ("train", "val"):
    a, b = getattr(first, split).stream, getattr(second, split).stream
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
  with open(tmp_path / "run1" / "tokenizer.model", "rb") as a, \
       open(tmp_path / "run2" / "tokenizer.model", "rb") as b:
    assert a.read() == b.read()
  # A different tokenizer setting is a different cache entry: it trains and tokenizes again.
  config.tokenizer.vocab_size = 420
  with pytest.raises(AssertionError, match="must not tokenize"):
    data_lib.prepare_data(config, str(tmp_path / "run3"))
