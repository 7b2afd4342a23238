"""The race's char-level data, written once in nanoGPT's format and read by both sides.

  meta = write_char_data("stdlib", out_dir, max_chars=1_000_000, eval_windows=480, seq_len=64)

Like nanoGPT's data/shakespeare_char/prepare.py: the text's characters, sorted, are the
vocabulary; the first 90% of the text is train.bin, the last 10% val.bin (uint16 ids).
The corpus is train.corpus's (`stdlib`: the running interpreter's standard library, no
download; or any text files), its documents joined by newlines and cut at `max_chars`.
eval_offsets.npy holds the fixed validation windows (val[o:o+T] -> val[o+1:o+T+1]) that
both sides are evaluated on, so "reached L*" compares losses on the same tokens.
"""

from __future__ import annotations

import json
import os

import numpy as np

from train.corpus import Corpus, parse_sources

VAL_FRACTION = 0.1


def read_text(source: str, max_chars: int) -> str:
  """The corpus's documents, joined by newlines, up to `max_chars` characters."""
  parts, total = [], 0
  for doc in Corpus(parse_sources(source)):
    parts.append(doc.text)
    total += len(doc.text) + 1
    if total >= max_chars:
      break
  return "\n".join(parts)[:max_chars]


def write_char_data(source: str, out_dir: str, *, max_chars: int, eval_windows: int,
                    seq_len: int, seed: int = 0) -> dict:
  """train.bin, val.bin, eval_offsets.npy and meta.json in `out_dir`; returns the meta."""
  text = read_text(source, max_chars)
  chars = sorted(set(text))
  if len(chars) > np.iinfo(np.uint16).max:
    raise ValueError(f"{len(chars)} distinct characters do not fit uint16 ids")
  lookup = {c: i for i, c in enumerate(chars)}
  ids = np.array([lookup[c] for c in text], dtype=np.uint16)
  n_train = int(len(ids) * (1 - VAL_FRACTION))
  train, val = ids[:n_train], ids[n_train:]
  if len(val) <= seq_len + 1:
    raise ValueError(f"validation split of {len(val)} characters is shorter than a window "
                     f"of {seq_len + 1}: raise max_chars")
  offsets = np.random.default_rng(seed).integers(0, len(val) - seq_len - 1, eval_windows)
  os.makedirs(out_dir, exist_ok=True)
  train.tofile(os.path.join(out_dir, "train.bin"))
  val.tofile(os.path.join(out_dir, "val.bin"))
  np.save(os.path.join(out_dir, "eval_offsets.npy"), offsets)
  meta = {"source": source, "chars": len(text), "vocab_size": len(chars),
          "train_tokens": int(len(train)), "val_tokens": int(len(val)),
          "eval_windows": int(eval_windows), "eval_seq_len": seq_len}
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f)
  return meta


def load(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """(train ids, val ids, eval offsets, meta) as written by `write_char_data`."""
  with open(os.path.join(data_dir, "meta.json")) as f:
    meta = json.load(f)
  train = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16)
  val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
  return train, val, np.load(os.path.join(data_dir, "eval_offsets.npy")), meta


def windows(ids: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs ids[o:o+T] and targets ids[o+1:o+T+1] of each offset o, int32 [len(offsets), T]."""
  idx_WT = offsets[:, None] + np.arange(seq_len)[None, :]
  return ids[idx_WT].astype(np.int32), ids[idx_WT + 1].astype(np.int32)
