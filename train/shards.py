"""Prepared token shards: flat binary token files, document offsets, a JSON manifest.

  DIR/manifest.json            what the shards hold (below); written last
  DIR/tokenizer.model          the tokenizer the ids come from (or tokenizer.json; none: bytes)
  DIR/train/00000.tokens       uint16 (vocab <= 65,536) or uint32, little-endian: every
                               document piece followed by the end-of-text id
  DIR/train/00000.starts.npy   int64 [pieces]: where each piece starts in its shard
  DIR/val/...

  writer = ShardWriter(DIR, "train", dtype, eot_id, shard_tokens)
  writer.add(ids); writer.flush()           # a shard file appears atomically when flushed
  stream = TokenStream.open(DIR, "train")    # memory-mapped (local) or read in ranges (URLs)
  stream.read(start, stop)                   # int32 tokens of the concatenated split
  stream.starts_between(lo, hi)              # piece starts in [lo, hi), global offsets

Local shards are memory-mapped, so a split of any size costs no memory; a URL (memory://,
gs://, ...) is read through fsspec one range at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from model.store.files import atomic_open, atomic_path, write_json

MANIFEST = "manifest.json"
FORMAT = 1


def dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_url(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else os.path.expanduser(path)


def join(root: str, *parts: str) -> str:
  return "/".join([root.rstrip("/"), *parts]) if is_url(root) else os.path.join(
      local_path(root), *parts)


def write_bytes(path: str, data: bytes) -> None:
  """One file, whole or not at all (atomic rename locally; object stores write whole)."""
  if is_url(path):
    with fsspec.open(path, "wb") as f:
      f.write(data)
    return
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def read_json(path: str) -> dict | None:
  """A JSON file's contents, or None when it does not exist."""
  fs, p = url_to_fs(path) if is_url(path) else (None, local_path(path))
  if fs is None:
    if not os.path.exists(p):
      return None
    with open(p) as f:
      return json.load(f)
  if not fs.exists(p):
    return None
  with fs.open(p, "r") as f:
    return json.load(f)


def write_json_file(path: str, obj: dict) -> None:
  if is_url(path):
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())
  else:
    write_json(path, obj, sort_keys=True)


def remove_file(path: str) -> None:
  """Delete a file if it exists."""
  fs, p = url_to_fs(path) if is_url(path) else (None, local_path(path))
  if fs is None:
    if os.path.exists(p):
      os.remove(p)
  elif fs.exists(p):
    fs.rm(p)


class ShardWriter:
  """Appends document pieces of one split; a shard file is written as its pieces arrive and
  appears (atomically, locally) when it is full or flushed, so memory stays at one piece."""

  def __init__(self, root: str, split: str, dtype: np.dtype, eot_id: int, shard_tokens: int,
               shards: Sequence[dict] = ()):
    self.root, self.split, self.dtype = root, split, np.dtype(dtype)
    self.eot_id, self.shard_tokens = int(eot_id), int(shard_tokens)
    self.shards = [dict(s) for s in shards]  # written so far: {file, tokens, pieces}
    self._lengths: list[int] = []
    self._buffered = 0
    self._open: contextlib.ExitStack | None = None  # the shard being written
    self._file = None

  @property
  def buffered(self) -> int:
    return self._buffered

  def _name(self) -> str:
    return f"{self.split}/{len(self.shards):05d}"

  def add(self, ids: np.ndarray) -> None:
    """One document piece: its ids, then the end-of-text id (the piece ends with it)."""
    piece = np.empty(len(ids) + 1, self.dtype)
    piece[:-1] = ids
    piece[-1] = self.eot_id
    if self._open is None:
      self._open = contextlib.ExitStack()
      path = join(self.root, f"{self._name()}.tokens")
      if is_url(self.root):  # object stores make the object whole when it is closed
        self._file = self._open.enter_context(fsspec.open(path, "wb"))
      else:
        self._file = self._open.enter_context(atomic_open(path, "wb"))
    self._file.write(piece.tobytes())
    self._lengths.append(len(piece))
    self._buffered += len(piece)
    if self._buffered >= self.shard_tokens:
      self.flush()

  def flush(self) -> None:
    if self._open is None:
      return
    name = self._name()
    self._open.close()  # the tokens file appears
    lengths = np.array(self._lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    buffer = io.BytesIO()
    np.save(buffer, starts)
    write_bytes(join(self.root, f"{name}.starts.npy"), buffer.getvalue())
    self.shards.append({"file": f"{name}.tokens", "tokens": int(lengths.sum()),
                        "pieces": len(lengths)})
    self._open, self._file, self._lengths, self._buffered = None, None, [], 0

  def abort(self) -> None:
    """Drop the shard being written (a failed or interrupted prepare): its temporary file is
    removed; the shards already listed stay."""
    if self._open is not None:
      self._open.__exit__(RuntimeError, RuntimeError("prepare stopped"), None)
    self._open, self._file, self._lengths, self._buffered = None, None, [], 0

  def summary(self) -> dict:
    return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
            "pieces": sum(s["pieces"] for s in self.shards)}


class _RemoteTokens:
  """A shard file behind a URL, read one range at a time."""

  def __init__(self, url: str, dtype: np.dtype, length: int):
    self.fs, self.path = url_to_fs(url)
    self.dtype, self.length = dtype, length
    self._handle = None

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, span: slice) -> np.ndarray:
    start, stop, _ = span.indices(self.length)
    if self._handle is None:
      self._handle = self.fs.open(self.path, "rb")
    self._handle.seek(start * self.dtype.itemsize)
    data = self._handle.read((stop - start) * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)


class TokenStream:
  """The concatenated tokens of a split, over in-memory arrays or shard files.

  tokens of shard i occupy [offsets[i], offsets[i + 1]) of the stream; starts[i] are
  its pieces' start offsets inside the shard.
  """

  def __init__(self, tokens: Sequence, starts: Sequence[np.ndarray]):
    if len(tokens) != len(starts) or not tokens:
      raise ValueError("a token stream needs one starts array per shard, and a shard")
    self._tokens, self._starts = list(tokens), list(starts)
    lengths = np.array([len(t) for t in self._tokens], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self.num_pieces = int(sum(len(s) for s in self._starts))

  @classmethod
  def from_arrays(cls, tokens: np.ndarray, starts: np.ndarray) -> TokenStream:
    return cls([np.asarray(tokens)], [np.asarray(starts, np.int64)])

  @classmethod
  def open(cls, root: str, split: str, manifest: dict | None = None) -> TokenStream:
    manifest = manifest or read_json(join(root, MANIFEST))
    if manifest is None:
      raise FileNotFoundError(f"no {MANIFEST} in {root}")
    dtype = np.dtype(manifest["dtype"])
    tokens, starts = [], []
    for shard in manifest["splits"][split]["shards"]:
      path = join(root, shard["file"])
      starts_path = path[:-len(".tokens")] + ".starts.npy"
      if is_url(root):
        tokens.append(_RemoteTokens(path, dtype, shard["tokens"]))
        with fsspec.open(starts_path, "rb") as f:
          starts.append(np.load(io.BytesIO(f.read())))
      else:
        size = os.path.getsize(path) // dtype.itemsize
        if size != shard["tokens"]:
          raise ValueError(f"{path} holds {size} tokens, the manifest says {shard['tokens']}: "
                           "the prepared data is damaged; prepare it again")
        tokens.append(np.memmap(path, dtype, mode="r", shape=(size,)))
        starts.append(np.load(starts_path, mmap_mode="r"))
    return cls(tokens, starts)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) as int32 (stop is clipped to the stream's end)."""
    stop = min(stop, len(self))
    if start >= stop:
      return np.zeros(0, np.int32)
    first = int(np.searchsorted(self.offsets, start, "right")) - 1
    parts = []
    for i in range(first, len(self._tokens)):
      lo, hi = self.offsets[i], self.offsets[i + 1]
      if lo >= stop:
        break
      parts.append(np.asarray(self._tokens[i][max(start, lo) - lo:min(stop, hi) - lo]))
    return np.concatenate(parts).astype(np.int32)

  def starts_between(self, lo: int, hi: int) -> np.ndarray:
    """Global start offsets of the pieces that start in [lo, hi)."""
    out = []
    first = int(np.searchsorted(self.offsets, lo, "right")) - 1
    for i in range(max(first, 0), len(self._tokens)):
      base = self.offsets[i]
      if base >= hi:
        break
      local = self._starts[i]
      a = int(np.searchsorted(local, lo - base, "left"))
      b = int(np.searchsorted(local, hi - base, "left"))
      if b > a:
        out.append(np.asarray(local[a:b]) + base)
    return np.concatenate(out) if out else np.zeros(0, np.int64)
