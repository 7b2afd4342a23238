"""Packing (eot separators, segment ids, positions, loss mask) and the grain loader."""

import numpy as np
import pytest

from train import data as data_lib
from train.packing import PackedWindows, build_stream

EOT, PAD = 99, 98


def docs_of(*lengths):
  return [np.arange(1, n + 1, dtype=np.int32) + 10 * i for i, n in enumerate(lengths)]


def test_stream_ends_every_document_with_eot():
  stream = build_stream(docs_of(2, 3), EOT)
  np.testing.assert_array_equal(stream.read(0, len(stream)), [1, 2, EOT, 11, 12, 13, EOT])
  np.testing.assert_array_equal(stream.starts_between(0, len(stream)), [0, 3])
  np.testing.assert_array_equal(stream.starts_between(1, 4), [3])


def test_document_masking_windows():
  packed = PackedWindows.from_documents(docs_of(2, 3, 2), seq_len=4, eot_id=EOT, pad_id=PAD)
  # stream: 1 2 E 11 | 12 13 E 21 | 22 E (+ pad)
  assert len(packed) == 3 and packed.num_target_tokens == 9
  w = packed.windows([0, 1, 2])
  np.testing.assert_array_equal(w["inputs"], [[1, 2, EOT, 11], [12, 13, EOT, 21],
                                              [22, EOT, PAD, PAD]])
  np.testing.assert_array_equal(w["targets"], [[2, EOT, 11, 12], [13, EOT, 21, 22],
                                               [EOT, PAD, PAD, PAD]])
  np.testing.assert_array_equal(w["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 0, 0]])
  np.testing.assert_array_equal(w["positions"], [[0, 1, 2, 0], [0, 1, 2, 0], [0, 1, 0, 1]])
  # Every real (input, target) pair counts, "predict the eot" and the pair that crosses
  # into the next document included; none whose target is padding.
  np.testing.assert_array_equal(w["loss_mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
  one = packed[1]
  assert set(one) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
  np.testing.assert_array_equal(one["positions"], [0, 1, 2, 0])


def test_last_window_partial_padding_is_masked():
  packed = PackedWindows.from_documents(docs_of(5), seq_len=4, eot_id=EOT, pad_id=PAD)
  w = packed[1]  # stream 1..5 E: window 1 is [5, E] then padding
  np.testing.assert_array_equal(w["inputs"], [5, EOT, PAD, PAD])
  np.testing.assert_array_equal(w["loss_mask"], [1, 0, 0, 0])
  np.testing.assert_array_equal(w["segment_ids"], [1, 1, 0, 0])


def test_document_masking_off_is_one_stream():
  packed = PackedWindows.from_documents(docs_of(2, 3, 2), seq_len=4, eot_id=EOT, pad_id=PAD,
                                        document_masking=False)
  w = packed.windows([0, 2])
  np.testing.assert_array_equal(w["segment_ids"], [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(w["positions"], [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(w["inputs"][0], [1, 2, EOT, 11])


def test_packing_errors():
  with pytest.raises(ValueError, match="empty list"):
    PackedWindows.from_documents([], seq_len=4, eot_id=EOT, pad_id=PAD)
  packed = PackedWindows.from_documents(docs_of(3), seq_len=2, eot_id=EOT, pad_id=PAD)
  with pytest.raises(IndexError):
    packed.windows([2])


@pytest.fixture
def source():
  return PackedWindows.from_documents(docs_of(*range(5, 40)), seq_len=8, eot_id=EOT, pad_id=PAD)


def test_loader_is_deterministic_and_covers_an_epoch(source):
  take = lambda it, n: [next(it)["inputs"] for _ in range(n)]
  a = take(data_lib.train_iterator(source, batch_size=4, seed=3), 6)
  b = take(data_lib.train_iterator(source, batch_size=4, seed=3), 6)
  c = take(data_lib.train_iterator(source, batch_size=4, seed=4), 6)
  assert a[0].shape == (1, 4, 8)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))
  epoch = take(data_lib.train_iterator(source, batch_size=len(source), seed=3), 1)[0][0]
  rows = {tuple(r) for r in epoch}
  assert rows == {tuple(source[i]["inputs"]) for i in range(len(source))}  # a permutation


def test_loader_state_resumes_the_same_stream(source):
  it = data_lib.train_iterator(source, batch_size=4, accum=2, seed=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = data_lib.train_iterator(source, batch_size=4, accum=2, seed=0)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got["inputs"].shape == (2, 2, 8)  # [accum, micro batch, T]
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_processes_split_each_global_batch(source):
  whole = next(data_lib.train_iterator(source, batch_size=8, accum=2, seed=1))
  parts = [next(data_lib.train_iterator(source, batch_size=8, accum=2, seed=1, process_index=i,
                                        process_count=2)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts], axis=1),
                                whole["inputs"])
  with pytest.raises(ValueError, match="does not divide over 3 processes"):
    data_lib.train_dataset(source, batch_size=8, accum=1, seed=0, process_index=0,
                           process_count=3)


def test_eval_batches_cover_the_split_once(source):
  batches = list(data_lib.eval_batches(source, batch_size=4))
  assert len(batches) == -(-len(source) // 4)
  masked = sum(b["loss_mask"].sum() for b in batches)
  assert masked == source.num_target_tokens
  spread = list(data_lib.eval_batches(source, batch_size=4, max_batches=2))
  assert len(spread) == 2
  first, last = source[0]["inputs"], source[len(source) - 1]["inputs"]
  np.testing.assert_array_equal(spread[0]["inputs"][0, 0], first)  # spread over the split:
  np.testing.assert_array_equal(spread[1]["inputs"][0, -1], last)  # first and last window
