"""Packing documents into fixed windows of T tokens for next-token prediction.

The stream ends every document with an end-of-text token (GPT-2's convention):

  stream = d1 [eot] d2 [eot] d3 [eot] ...

so a document's last token learns to predict the eot that ends it (a sampler
stops there), and a document starts at position 0 with its own first token,
exactly as a prompt does at sampling time. The eot belongs to the document it
ends. Window w covers
stream[wT : wT + T + 1]: inputs are its first T tokens, targets the last T
(the next token of each input). The final window is padded with pad_id.

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


def build_stream(doc_tokens: Sequence[np.ndarray], eot_id: int) -> tuple[np.ndarray, np.ndarray]:
  """([N] tokens, [N] document index) of `d1 [eot] d2 [eot] ...`."""
  if not len(doc_tokens):
    raise ValueError("cannot pack an empty list of documents")
  lengths = np.array([len(d) + 1 for d in doc_tokens], np.int64)
  tokens = np.empty(int(lengths.sum()), np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for start, doc in zip(starts, doc_tokens, strict=True):
    tokens[start:start + len(doc)] = doc
    tokens[start + len(doc)] = eot_id
  doc_index = np.repeat(np.arange(len(doc_tokens), dtype=np.int32), lengths)
  return tokens, doc_index


@dataclasses.dataclass
class PackedWindows:
  """Random access to the packed windows of a token stream (a grain-compatible source)."""

  tokens: np.ndarray      # [N]
  doc_index: np.ndarray   # [N]
  seq_len: int
  pad_id: int
  document_masking: bool = True

  def __post_init__(self):
    if self.seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if len(self.tokens) < 2:
      raise ValueError("the token stream needs at least 2 tokens to form one (input, target)")
    t = self.seq_len
    self.num_windows = -(-(len(self.tokens) - 1) // t)
    pad = self.num_windows * t + 1 - len(self.tokens)
    self._tokens = np.concatenate([self.tokens, np.full(pad, self.pad_id, np.int32)])
    self._docs = np.concatenate([self.doc_index, np.full(pad, -1, np.int32)])

  @classmethod
  def from_documents(cls, doc_tokens: Sequence[np.ndarray], *, seq_len: int, eot_id: int,
                     pad_id: int, document_masking: bool = True) -> PackedWindows:
    tokens, doc_index = build_stream(doc_tokens, eot_id)
    return cls(tokens, doc_index, seq_len, pad_id, document_masking)

  @property
  def num_target_tokens(self) -> int:
    return len(self.tokens) - 1

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.windows(np.asarray([index])).items()}

  def windows(self, indices) -> dict[str, np.ndarray]:
    """The windows at `indices` (any shape I) as arrays [*I, T]."""
    indices = np.asarray(indices, np.int64)
    flat = indices.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= self.num_windows):
      raise IndexError(f"window index out of range [0, {self.num_windows})")
    t = self.seq_len
    span_WT1 = flat[:, None] * t + np.arange(t + 1)[None, :]
    tok_WT1 = self._tokens[span_WT1]
    doc_WT1 = self._docs[span_WT1]
    doc_WT = doc_WT1[:, :-1]
    real_WT = doc_WT >= 0
    loss_mask_WT = (real_WT & (doc_WT1[:, 1:] >= 0)).astype(np.float32)
    if self.document_masking:
      starts_WT = np.ones_like(real_WT)
      starts_WT[:, 1:] = doc_WT[:, 1:] != doc_WT[:, :-1]
      segment_WT = np.cumsum(starts_WT, axis=1, dtype=np.int32) * real_WT
      arange_WT = np.broadcast_to(np.arange(t, dtype=np.int32), doc_WT.shape)
      run_start_WT = np.maximum.accumulate(np.where(starts_WT, arange_WT, 0), axis=1)
      positions_WT = (arange_WT - run_start_WT).astype(np.int32)
    else:
      segment_WT = real_WT.astype(np.int32)
      positions_WT = np.broadcast_to(np.arange(t, dtype=np.int32), doc_WT.shape).copy()
    out = {"inputs": tok_WT1[:, :-1], "targets": tok_WT1[:, 1:], "segment_ids": segment_WT,
           "positions": positions_WT, "loss_mask": loss_mask_WT}
    return {k: np.ascontiguousarray(v).reshape(*indices.shape, t) for k, v in out.items()}
