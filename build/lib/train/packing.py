"""Packing documents into fixed windows of T tokens for next-token prediction.

The stream ends every document with an end-of-text token (GPT-2's convention):

  stream = d1 [eot] d2 [eot] d3 [eot] ...

so a document's last token learns to predict the eot that ends it (a sampler
stops there), and a document starts at position 0 with its own first token,
exactly as a prompt does at sampling time. The eot belongs to the document it
ends. Window w covers
stream[wT : wT + T + 1]: inputs are its first T tokens, targets the last T
(the next token of each input). The final window is padded with pad_id.

The stream is a TokenStream (train/shards.py): memory-mapped shard files, or arrays in
memory (`from_documents`); a window reads its T + 1 tokens and the piece starts inside it,
so nothing per token is held beside the tokens themselves.

Per window (all [T]):
  inputs, targets   int32 token ids
  segment_ids       int32: 1, 2, ... per document piece inside the window, 0 on padding
  positions         int32: index inside the document piece (restarting at 0), or 0..T-1
  loss_mask         float32: 1 where the target is a real token, 0 on padding

With `document_masking` on, segment_ids keep attention inside each document
and positions restart per document; off, the window is one continuous stream
(nanoGPT): every real token has segment 1 and positions are 0..T-1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from train.shards import TokenStream


def build_stream(doc_tokens: Sequence[np.ndarray], eot_id: int) -> TokenStream:
  """The in-memory stream `d1 [eot] d2 [eot] ...` and its piece starts."""
  if not len(doc_tokens):
    raise ValueError("cannot pack an empty list of documents")
  lengths = np.array([len(d) + 1 for d in doc_tokens], np.int64)
  tokens = np.empty(int(lengths.sum()), np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  for start, doc in zip(starts, doc_tokens, strict=True):
    tokens[start:start + len(doc)] = doc
    tokens[start + len(doc)] = eot_id
  return TokenStream.from_arrays(tokens, starts)


@dataclasses.dataclass
class PackedWindows:
  """Random access to the packed windows of a token stream (a grain-compatible source)."""

  stream: TokenStream
  seq_len: int
  pad_id: int
  document_masking: bool = True

  def __post_init__(self):
    if self.seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if len(self.stream) < 2:
      raise ValueError("the token stream needs at least 2 tokens to form one (input, target)")
    self.num_windows = -(-(len(self.stream) - 1) // self.seq_len)

  @classmethod
  def from_documents(cls, doc_tokens: Sequence[np.ndarray], *, seq_len: int, eot_id: int,
                     pad_id: int, document_masking: bool = True) -> PackedWindows:
    return cls(build_stream(doc_tokens, eot_id), seq_len, pad_id, document_masking)

  @property
  def num_target_tokens(self) -> int:
    return len(self.stream) - 1

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.windows(np.asarray([index])).items()}

  def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T + 1] padded, starts [T + 1]: a new piece (or the padding) begins here)."""
    t, n = self.seq_len, len(self.stream)
    lo = w * t
    tok = np.full(t + 1, self.pad_id, np.int32)
    real = self.stream.read(lo, lo + t + 1)
    tok[:len(real)] = real
    starts = np.zeros(t + 1, bool)
    starts[self.stream.starts_between(lo, lo + t + 1) - lo] = True
    if lo + t + 1 > n:
      starts[n - lo] = True  # the padding after the stream is a run of its own
    starts[0] = True
    return tok, starts

  def windows(self, indices) -> dict[str, np.ndarray]:
    """The windows at `indices` (any shape I) as arrays [*I, T]."""
    indices = np.asarray(indices, np.int64)
    flat = indices.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= self.num_windows):
      raise IndexError(f"window index out of range [0, {self.num_windows})")
    t, n = self.seq_len, len(self.stream)
    tok_WT1 = np.empty((len(flat), t + 1), np.int32)
    starts_WT = np.empty((len(flat), t), bool)
    for row, w in enumerate(flat):
      tok_WT1[row], starts = self._window(int(w))
      starts_WT[row] = starts[:t]
    position_WT1 = flat[:, None] * t + np.arange(t + 1)[None, :]
    real_WT1 = position_WT1 < n
    real_WT = real_WT1[:, :-1]
    loss_mask_WT = (real_WT & real_WT1[:, 1:]).astype(np.float32)
    arange_WT = np.broadcast_to(np.arange(t, dtype=np.int32), real_WT.shape)
    if self.document_masking:
      segment_WT = np.cumsum(starts_WT, axis=1, dtype=np.int32) * real_WT
      run_start_WT = np.maximum.accumulate(np.where(starts_WT, arange_WT, 0), axis=1)
      positions_WT = (arange_WT - run_start_WT).astype(np.int32)
    else:
      segment_WT = real_WT.astype(np.int32)
      positions_WT = arange_WT.copy()
    out = {"inputs": tok_WT1[:, :-1], "targets": tok_WT1[:, 1:], "segment_ids": segment_WT,
           "positions": positions_WT, "loss_mask": loss_mask_WT}
    return {k: np.ascontiguousarray(v).reshape(*indices.shape, t) for k, v in out.items()}
