"""Positions: sinusoids and RoPE against NumPy, RoPE's relative property, packed documents.

Packed rows (several documents in one row, told apart by segment ids) must give each document
exactly the logits it gets when run alone: attention never crosses a boundary and positions
restart at 0 in each document, for learned, sinusoidal and rotary positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import abstract_params
from model import positions as pos_lib
from model.config import RopeScaling
from tests import numpy_reference as ref
from tests.conftest import tiny_config

_apply = jax.jit(model.apply, static_argnums=0)


def test_sinusoidal_matches_reference():
  positions_BT = np.array([[0, 1, 2, 3, 50], [7, 0, 1, 200, 1023]])
  pe = np.asarray(pos_lib.sinusoidal(jnp.asarray(positions_BT), 32))
  np.testing.assert_allclose(pe, ref.sinusoidal(positions_BT, 32), atol=1e-4)
  np.testing.assert_allclose(pe[0, 0], [0.0, 1.0] * 16, atol=1e-7)  # sin 0, cos 0


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_rotation_matrices(theta):
  rng = np.random.RandomState(0)
  x_BTNH = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  positions_BT = np.array([[0, 1, 2, 3, 4], [9, 3, 0, 40, 100]])
  y = np.asarray(pos_lib.apply_rope(jnp.asarray(x_BTNH), jnp.asarray(positions_BT), theta))
  for b in range(2):
    for n in range(3):
      np.testing.assert_allclose(y[b, :, n], ref.rope(x_BTNH[b, :, n], positions_BT[b], theta),
                                 atol=1e-5)
  np.testing.assert_allclose(y[0, 0], x_BTNH[0, 0], atol=0)  # position 0: no rotation
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x_BTNH, axis=-1),
                             rtol=1e-5)  # rotations keep the length


# Head size 8, theta 500: wavelengths 2 pi / omega_j = 6.3, 29.7, 140, 664; with a pretraining
# context of 32 the bands are < 8 (kept), 8..32 (interpolated), > 32 (stretched): every case.
LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=32)


def test_llama3_scaled_rope_matches_the_three_band_reference():
  omega_J = np.asarray(pos_lib.rope_frequencies(8, 500.0, LLAMA3))
  plain_J = np.asarray(pos_lib.rope_frequencies(8, 500.0))
  want_J = [ref.rope_frequency(j, 8, 500.0, LLAMA3) for j in range(4)]
  np.testing.assert_allclose(omega_J, want_J, rtol=1e-6)
  ratio_J = plain_J / omega_J  # 1 kept, 8 stretched, strictly between: interpolated
  np.testing.assert_allclose(ratio_J[[0, 2, 3]], [1.0, 8.0, 8.0], rtol=1e-6)
  assert 1.5 < ratio_J[1] < 7.5
  rng = np.random.RandomState(2)
  x_BTNH = rng.standard_normal((1, 6, 2, 8)).astype(np.float32)
  positions_BT = np.array([[0, 3, 11, 40, 300, 1000]])
  y = np.asarray(pos_lib.apply_rope(jnp.asarray(x_BTNH), jnp.asarray(positions_BT), 500.0,
                                    LLAMA3))
  for n in range(2):
    np.testing.assert_allclose(y[0, :, n], ref.rope(x_BTNH[0, :, n], positions_BT[0], 500.0,
                                                    LLAMA3), atol=2e-4)


def test_rope_score_depends_only_on_the_offset():
  """<R_p q, R_s k> = q^T R_{s-p} k: equal for equal p - s, different for different p - s."""
  rng = np.random.RandomState(1)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(p, s):
    rq = pos_lib.apply_rope(q, jnp.array([[p]]), 10000.0)
    rk = pos_lib.apply_rope(k, jnp.array([[s]]), 10000.0)
    return float(jnp.sum(rq * rk))

  for offset in (0, 1, 5, -3):
    scores = [score(s + offset, s) for s in (0, 3, 17, 60, 250)]
    np.testing.assert_allclose(scores, scores[0], atol=1e-4)
  assert len({round(score(s, 0), 3) for s in range(6)}) == 6
  # In matrix form: R_p^T R_s = R_{s-p}.
  np.testing.assert_allclose(ref.rope_matrix(7, 16, 1e4).T @ ref.rope_matrix(3, 16, 1e4),
                             ref.rope_matrix(-4, 16, 1e4), atol=1e-12)


def test_rope_model_logits_are_shift_invariant():
  """A RoPE model with no absolute positions sees only offsets: shifting every position by the
  same amount leaves the logits unchanged (a learned-position model does change)."""
  tokens = np.random.RandomState(2).randint(0, 61, (2, 9))
  positions = np.broadcast_to(np.arange(9), (2, 9))
  for cfg, invariant in [(tiny_config(position="rope", n_kv_heads=2), True),
                         (tiny_config(), False)]:
    params = ref.random_params(abstract_params(cfg))
    change = np.abs(np.asarray(_apply(cfg, params, tokens, positions_BT=positions)[0] -
                               _apply(cfg, params, tokens, positions_BT=positions + 23)[0])).max()
    assert (change < 1e-4) if invariant else (change > 1e-2)


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3], [4, 4, 4, 4, 4, 4], [0, 1, 0, 0, 2, 2]])
  np.testing.assert_array_equal(pos_lib.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]])


# Row 0 packs documents of 5 and 7 tokens, row 1 of 3 and 9.
DOCS = [(0, 0, 5), (0, 5, 12), (1, 0, 3), (1, 3, 12)]  # (row, start, end)


@pytest.mark.parametrize("cfg", [
    tiny_config(position="learned"),
    tiny_config(position="sinusoidal", norm_placement="post"),
    tiny_config(position="rope", n_kv_heads=2),
    tiny_config(position="rope", attention_impl="chunked", attn_chunk_size=4,
                attention_pattern=("local", "strided"), window_size=4, sparse_stride=3),
], ids=["learned", "sinusoidal", "rope", "rope-chunked-local-strided"])
def test_packed_documents_equal_documents_run_alone(cfg):
  tokens = np.random.RandomState(3).randint(0, 61, (2, 12))
  seg = np.zeros((2, 12), np.int32)
  for i, (row, start, end) in enumerate(DOCS):
    seg[row, start:end] = i + 1
  params = ref.random_params(abstract_params(cfg), seed=4)
  packed = np.asarray(_apply(cfg, params, tokens, segment_ids_BT=seg)[0])
  # Each document alone in its own row from position 0 (right-padded: causal attention
  # keeps the padding out of the real tokens' logits).
  alone_BT = np.zeros((len(DOCS), 9), np.int32)
  for i, (row, start, end) in enumerate(DOCS):
    alone_BT[i, :end - start] = tokens[row, start:end]
  alone = np.asarray(_apply(cfg, params, alone_BT)[0])
  for i, (row, start, end) in enumerate(DOCS):
    np.testing.assert_allclose(packed[row, start:end], alone[i, :end - start], atol=1e-5)
  # As one document per row the second document sees the first: different logits.
  unpacked = np.asarray(_apply(cfg, params, tokens, segment_ids_BT=np.ones_like(seg))[0])
  assert np.abs(unpacked[0, 5:] - packed[0, 5:]).max() > 1e-3


def test_learned_positions_beyond_the_table_raise():
  cfg = tiny_config(max_seq_len=8)
  params = ref.random_params(abstract_params(cfg))
  with pytest.raises(ValueError, match="max_seq_len"):
    model.apply(cfg, params, np.zeros((1, 9), np.int32))
  with pytest.raises(ValueError, match="max_seq_len"):
    model.apply(cfg, params, np.zeros((1, 2), np.int32), positions_BT=np.array([[0, 8]]))
