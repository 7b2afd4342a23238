"""Attention: the mask patterns, causality, GQA/MQA, and every kernel against the dense one.

Kernel-level tests call `model.attention` / `model.flash` on random q, k, v with a `Mask`;
model-level tests go through `model.apply`. The dense kernel is itself checked against the
NumPy loops of eq. 8.10-8.19 here and in test_model_layers.py. Gradients of the chunked
kernel through the whole model (under scan and remat) are in test_model_transformer.py.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import abstract_params, flash
from model import attention as attn_lib
from model.masks import KIND_IDS, Mask
from tests import numpy_reference as ref
from tests.conftest import tiny_config

B, H = 2, 8
WINDOW, STRIDE = 3, 3
KINDS = ["global", "local", "strided"]
IMPLS = ["dense", "chunked", "xla"]
_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_intermediates")


def _qkv(t, s, n, k, seed=0):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32)
          for shape in [(B, t, n, H), (B, s, k, H), (B, s, k, H)])


def _mask(t, s, kind, causal=True, segments=None, q_start=None, kv_len=None):
  q_start = np.zeros(B, int) if q_start is None else np.asarray(q_start)
  slots = q_start[:, None] + np.arange(t)
  return Mask.build(batch=B, q_slot_BT=slots, kv_len=s, causal=causal, kind=KIND_IDS[kind],
                    window=WINDOW, stride=STRIDE, segment_ids_BT=segments, kv_length_B=kv_len)


def _ref_allowed(mask, b, kind):
  """The NumPy reference's [T, S] pattern for row b of a Mask."""
  seg = None
  if not np.all(np.asarray(mask.q_segment_BT) == 0):
    seg = np.asarray(mask.q_segment_BT)[b]
  return ref.allowed(np.asarray(mask.q_slot_BT)[b], mask.kv_valid_BS.shape[1], kind=kind,
                     causal=mask.causal, window=mask.window, stride=mask.stride, segments=seg,
                     kv_valid_len=int(np.asarray(mask.kv_valid_BS)[b].sum()))


@functools.partial(jax.jit, static_argnames=("impl", "block"))
def _out_and_grads(q, k, v, mask, do, *, impl, block=4):
  """Output and (dq, dk, dv) of sum(out * do) for one kernel."""
  def run(q, k, v):
    if impl == "chunked":
      return flash.chunked_attention(q, k, v, mask, block=block)
    return attn_lib.attention(q, k, v, mask, impl=impl)

  out, vjp = jax.vjp(run, q, k, v)
  return out, vjp(do)


@functools.partial(jax.jit, static_argnames=("impl",))
def _forward(q, k, v, mask, *, impl):
  return attn_lib.attention(q, k, v, mask, impl=impl)


def _output(q, k, v, mask, impl):
  """The kernel's output through the same compiled functions the equivalence cases use."""
  if impl == "xla":
    return _forward(q, k, v, mask, impl=impl)
  return _out_and_grads(q, k, v, mask, q, impl=impl)[0]


# ---- the dense kernel and the mask patterns ----------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_kv", [6, 2, 1], ids=["mha", "gqa", "mqa"])
def test_dense_kernel_matches_reference_and_is_zero_outside_the_pattern(kind, causal, n_kv):
  t = 9
  q, k, v = _qkv(t, t, 6, n_kv)
  mask = _mask(t, t, kind, causal)
  out, w_BNTS = jax.jit(functools.partial(attn_lib.dense_attention, return_weights=True))(
      q, k, v, mask)
  w_BNTS = np.asarray(w_BNTS)
  for b in range(B):
    ok = _ref_allowed(mask, b, kind)
    expected, alpha = ref.multi_head_attention(*(np.asarray(a[b], np.float64) for a in (q, k, v)),
                                               ok)
    np.testing.assert_allclose(np.asarray(out[b]).reshape(t, -1), expected, atol=1e-5)
    np.testing.assert_allclose(w_BNTS[b], alpha, atol=1e-6)
    assert (w_BNTS[b][:, ~ok] == 0).all()  # exactly zero outside the pattern
    assert (w_BNTS[b][:, ok] > 0).all()
  if kind != "global":
    assert not ok.all(axis=1).any() or not causal  # the pattern really removes keys


def test_reference_patterns_by_hand():
  """The patterns themselves, spelled out for query 7 (so the reference cannot drift)."""
  def keys(**kw):
    return list(np.flatnonzero(ref.allowed([7], 10, **kw)[0]))

  assert keys() == list(range(8))
  assert keys(kind="local", window=3) == [5, 6, 7]
  assert keys(kind="strided", stride=3) == [1, 4, 5, 6, 7]
  assert keys(kind="local", window=2, causal=False) == [6, 7, 8]
  assert keys(segments=[0, 0, 1, 1, 1, 1, 1, 1, 2, 2]) == [2, 3, 4, 5, 6, 7]
  np.testing.assert_array_equal(ref.causal_mask(3), [[0, -np.inf, -np.inf], [0, 0, -np.inf],
                                                     [0, 0, 0]])


# ---- causality -----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_causal_and_bidirectional(impl):
  """For every pattern: changing q/k/v at slots >= 6 leaves causal outputs before 6 unchanged;
  bidirectional outputs before 6 do change. (Shapes as in KERNEL_CASES: compiled once.)"""
  t, t0 = 10, 6
  q, k, v = _qkv(t, t, 6, 2)
  q2, k2, v2 = (a.at[:, t0:].add(1.0) for a in (q, k, v))
  for kind in KINDS:
    for causal in (True, False):
      mask = _mask(t, t, kind, causal)
      out, out2 = _output(q, k, v, mask, impl), _output(q2, k2, v2, mask, impl)
      past_change = np.abs(np.asarray(out[:, :t0] - out2[:, :t0])).max()
      assert (past_change == 0.0) if causal else (past_change > 1e-3), (kind, causal)


PATTERN_CFG = tiny_config(n_layers=3, attention_pattern=KINDS, window_size=WINDOW,
                          sparse_stride=STRIDE, attn_chunk_size=4, position="rope")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_model_causality_for_every_pattern_and_impl(causal):
  """Layers global, local, strided; future tokens change no past logit (bidirectional: they
  do); the chunked and xla kernels give the dense kernel's logits."""
  tokens = np.random.RandomState(0).randint(0, 61, (B, 12))
  future = tokens.copy()
  future[:, 7:] = (future[:, 7:] + 5) % 61
  params = ref.random_params(abstract_params(PATTERN_CFG))
  by_impl = {}
  for impl in IMPLS:
    cfg = PATTERN_CFG.replace(attention_impl=impl, causal=causal)
    a, b = _apply(cfg, params, tokens)[0], _apply(cfg, params, future)[0]
    past = np.abs(np.asarray(a[:, :7] - b[:, :7])).max()
    assert (past < 1e-6) if causal else (past > 1e-3), (impl, past)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3
    by_impl[impl] = a
  np.testing.assert_allclose(by_impl["chunked"], by_impl["dense"], atol=1e-5)
  np.testing.assert_allclose(by_impl["xla"], by_impl["dense"], atol=1e-5)


# ---- kernels against the dense reference ---------------------------------------------------
# (t, s, n, k, kind, causal, segments, q_start, kv_len, block). Cases with equal shapes and
# equal `causal` share one compiled kernel: kind and segments are data, not static arguments.
# N = 6 query heads over K = 2 kv heads (G = 3 != K, so a swapped (K, G) grouping shows).
_SEG = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6, 7, 7]])
KERNEL_CASES = {
    # T = 10 with blocks of 4: the last block is padded.
    "global-gqa": (10, 10, 6, 2, "global", True, None, None, None, 4),
    "local-gqa": (10, 10, 6, 2, "local", True, None, None, None, 4),
    "strided-gqa": (10, 10, 6, 2, "strided", True, None, None, None, 4),
    "segments-global-gqa": (10, 10, 6, 2, "global", True, _SEG, None, None, 4),
    "segments-strided-gqa": (10, 10, 6, 2, "strided", True, _SEG, None, None, 4),
    "bidirectional-global-gqa": (10, 10, 6, 2, "global", False, None, None, None, 4),
    "bidirectional-local-gqa": (10, 10, 6, 2, "local", False, None, None, None, 4),
    "bidirectional-segments-strided-gqa": (10, 10, 6, 2, "strided", False, _SEG, None, None, 4),
    # A partially filled KV cache (S = 16 slots): 3 new queries at slots 2.. and 8.. (a
    # prefill chunk, one query block larger than T), then one-token decodes.
    "cache-chunk-global": (3, 16, 6, 2, "global", True, None, [2, 8], [5, 11], 8),
    "cache-decode-global": (1, 16, 6, 2, "global", True, None, [4, 10], [5, 11], 4),
    "cache-decode-local": (1, 16, 6, 2, "local", True, None, [4, 10], [5, 11], 4),
    "cache-decode-strided": (1, 16, 6, 2, "strided", True, None, [7, 12], [8, 13], 4),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_chunked_and_xla_equal_dense_forward_and_gradients(case):
  t, s, n, k, kind, causal, seg, q_start, kv_len, block = KERNEL_CASES[case]
  q, kk, v = _qkv(t, s, n, k, seed=1)
  do = jnp.asarray(np.random.RandomState(2).standard_normal(q.shape), jnp.float32)
  mask = _mask(t, s, kind, causal, seg, q_start, None if kv_len is None else np.array(kv_len))
  out, grads = _out_and_grads(q, kk, v, mask, do, impl="dense")
  out_c, grads_c = _out_and_grads(q, kk, v, mask, do, impl="chunked", block=block)
  np.testing.assert_allclose(out_c, out, atol=2e-6)
  for g, g_c in zip(grads, grads_c, strict=True):
    np.testing.assert_allclose(g_c, g, atol=1e-5)
  out_x = _forward(q, kk, v, mask, impl="xla")
  np.testing.assert_allclose(out_x, out, atol=2e-6)
  # The dense kernel here is the reference's: check the output once more against NumPy.
  for b in range(B):
    expected, _ = ref.multi_head_attention(*(np.asarray(a[b], np.float64) for a in (q, kk, v)),
                                           _ref_allowed(mask, b, kind))
    np.testing.assert_allclose(np.asarray(out[b]).reshape(t, -1), expected, atol=1e-5)


# ---- sliding windows across block edges ----------------------------------------------------
# The chunked kernel skips the key blocks outside a window by its loop bounds. In KERNEL_CASES
# (window 3, block 4, T 10) a window edge never meets a block edge, so bounds one block short
# at either end went unnoticed; here windows 1-5 meet block sizes 1-4.
WINDOWS, BLOCKS = range(1, 6), (1, 2, 3, 4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_block_range_is_the_span_of_the_allowed_keys(causal):
  """For T 1-10 queries after 0-3 cached keys, global and local windows 1-5, blocks 1-4: each
  query block's key-block loop [lo, hi) is exactly the span of the key blocks holding a key it
  may see (the reference pattern's): nothing allowed is skipped, and no block at either end is
  visited in vain (a window of W keys costs O(T * W))."""
  layers = [("global", 0)] + [("local", w) for w in WINDOWS]
  for t, q_start, (kind, window) in itertools.product(range(1, 11), range(4), layers):
    s = q_start + t
    ok_TS = ref.allowed(q_start + np.arange(t), s, kind=kind, causal=causal, window=window)
    for block in BLOCKS:
      bq, bk = min(block, t), min(block, s)  # as chunked_attention picks them
      for first in range(0, t, bq):
        rows_Q = np.minimum(first + np.arange(bq), t - 1)  # a padded query repeats the last
        keys = np.flatnonzero(ok_TS[rows_Q].any(0))
        lo, hi = flash._key_block_range(q_start + rows_Q[None], KIND_IDS[kind], nk=-(-s // bk),
                                        bk=bk, causal=causal, window=window)
        assert (int(lo), int(hi)) == (keys[0] // bk, keys[-1] // bk + 1), (
            f"{kind} window {window}, T {t} after {q_start}, block {block}, queries {first}..")


@functools.partial(jax.jit, static_argnames=("cases", "causal"))
def _chunked_local_sweep(inputs, *, cases, causal):
  """[(out, dq, dk, dv)] of the chunked kernel, one per static (t, window, block) in `cases`:
  self-attention of inputs[t] = (q, k, v, do) under a local window. One compilation for all
  (a jit per case would compile them one by one, and cases sharing T and block share code)."""
  results = []
  for t, window, block in cases:
    q, k, v, do = inputs[t]
    mask = Mask.build(batch=1, q_slot_BT=np.arange(t)[None], kv_len=t, causal=causal,
                      kind=KIND_IDS["local"], window=window)
    out, vjp = jax.vjp(functools.partial(flash.chunked_attention, mask=mask, block=block),
                       q, k, v)
    results.append((out, *vjp(do)))
  return results


def _reference_out_and_grads(q_TNH, k_SKH, v_SKH, do_TNH, ok_TS):
  """NumPy float64: the output of eq. 8.15-8.19 under ok_TS and its gradients (dq, dk, dv) for
  the cotangent do, through the softmax Jacobian: ds = alpha (dalpha - sum_s alpha dalpha)."""
  q_TNH, k_SKH, v_SKH, do_TNH = (np.asarray(a, np.float64) for a in (q_TNH, k_SKH, v_SKH, do_TNH))
  (t, n, h), s, kv = q_TNH.shape, k_SKH.shape[0], k_SKH.shape[1]
  out, alpha_NTS = ref.multi_head_attention(q_TNH, k_SKH, v_SKH, ok_TS)
  k_SNH, v_SNH = (np.repeat(a, n // kv, axis=1) for a in (k_SKH, v_SKH))  # head c: kv c // G
  dalpha_NTS = np.einsum("TNH,SNH->NTS", do_TNH, v_SNH)
  ds_NTS = alpha_NTS * (dalpha_NTS - (alpha_NTS * dalpha_NTS).sum(-1, keepdims=True))
  dq_TNH = np.einsum("NTS,SNH->TNH", ds_NTS, k_SNH) / np.sqrt(h)
  dk_SNH = np.einsum("NTS,TNH->SNH", ds_NTS, q_TNH) / np.sqrt(h)
  dv_SNH = np.einsum("NTS,TNH->SNH", alpha_NTS, do_TNH)
  fold = lambda a_SNH: a_SNH.reshape(s, kv, n // kv, h).sum(2)  # sum over each kv head's group
  return out.reshape(t, n, h), dq_TNH, fold(dk_SNH), fold(dv_SNH)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_chunked_local_window_equals_reference_across_block_edges(causal):
  """Chunked == the NumPy reference, output and gradients in q, k and v, for every pair of a
  window 1-5 and a block 1-4: causal for odd window + block, bidirectional for even (each pair
  costs a compilation; the bounds test above takes every pair both ways). T = 7 + block, + 1
  if causal: lengths a block divides and lengths that leave it a padded last block. (Window 2,
  block 4, T 10 with the loop ending or starting one block off was off by 1.6-2.0; here
  window 2 meets block 4 bidirectionally, at T 11.)"""
  cases = tuple((7 + block + causal, window, block)
                for window in WINDOWS for block in BLOCKS if (window + block) % 2 == causal)
  rng = np.random.RandomState(int(causal))
  inputs = {t: tuple(jnp.asarray(rng.standard_normal((1, t, n, H)), jnp.float32)
                     for n in (2, 1, 1, 2))  # q, k, v, do: 2 query heads share 1 kv head
            for t in sorted({t for t, _, _ in cases})}
  got = _chunked_local_sweep(inputs, cases=cases, causal=causal)
  for (t, window, block), got_case in zip(cases, got, strict=True):
    ok_TS = ref.allowed(np.arange(t), t, kind="local", causal=causal, window=window)
    want_case = _reference_out_and_grads(*(a[0] for a in inputs[t]), ok_TS)
    for name, want, have in zip(("out", "dq", "dk", "dv"), want_case, got_case, strict=True):
      np.testing.assert_allclose(have[0], want, atol=1e-5, err_msg=(
          f"{name}: window {window}, block {block}, T {t}, causal {causal}"))


def test_query_that_sees_nothing_gives_zero_in_every_kernel():
  q, k, v = _qkv(1, 16, 6, 2)
  mask = _mask(1, 16, "global", q_start=[0, 10], kv_len=np.array([0, 11]))  # row 0: no keys
  for impl in IMPLS:
    out = np.asarray(_output(q, k, v, mask, impl))
    assert (out[0] == 0).all() and np.isfinite(out).all(), impl
  for impl in ("dense", "chunked"):
    grads = _out_and_grads(q, k, v, mask, jnp.ones_like(q), impl=impl)[1]
    assert all(np.isfinite(np.asarray(g)).all() and (np.asarray(g[0]) == 0).all()
               for g in grads), impl


def test_cudnn_impl_is_guarded_on_cpu():
  """Running the cuDNN kernel off a GPU fails clearly; planning a GPU run (init, counting,
  summary, shardings) works anywhere, since params do not depend on the kernel."""
  cfg = tiny_config(attention_impl="cudnn")
  params = ref.random_params(abstract_params(cfg))
  assert model.count_params(cfg) == model.count_params(tiny_config())
  with pytest.raises(ValueError, match="cudnn.*needs an NVIDIA GPU"):
    model.apply(cfg, params, np.zeros((1, 4), np.int32))
  q, k, v = _qkv(4, 4, 4, 4)
  with pytest.raises(ValueError, match="unknown attention impl"):
    attn_lib.attention(q, k, v, _mask(4, 4, "global"), impl="flash")


# ---- grouped-query and multi-query attention -----------------------------------------------
def test_gqa_with_k_equal_n_is_mha():
  mha = tiny_config()
  gqa = tiny_config(n_kv_heads=4)
  params = ref.random_params(abstract_params(mha))
  assert jax.tree.structure(params) == jax.tree.structure(abstract_params(gqa))
  tokens = np.random.RandomState(0).randint(0, 61, (B, 9))
  np.testing.assert_array_equal(_apply(gqa, params, tokens)[0], _apply(mha, params, tokens)[0])


@pytest.mark.parametrize("n_kv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_equals_mha_with_each_kv_head_repeated(n_kv):
  """K kv heads shared by G = N / K query heads == MHA whose K/V weights repeat each kv head
  G times (what Hugging Face's repeat_kv does at run time; here nothing is repeated)."""
  gqa = tiny_config(n_heads=8, n_kv_heads=n_kv, position="rope")  # G = 8 / K != K
  mha = gqa.replace(n_kv_heads=None)
  g, h = mha.n_heads // n_kv, mha.head_size
  params = ref.random_params(abstract_params(gqa), seed=5)

  def repeat(a):  # [..., K H] -> [..., K G H] = [..., N H]
    a = np.asarray(a).reshape(a.shape[:-1] + (n_kv, h))
    return np.repeat(a, g, axis=-2).reshape(a.shape[:-2] + (n_kv * g * h,))

  mha_params = jax.tree.map(np.asarray, params)
  for name in ("k", "v"):
    mha_params["layers"]["attn"][name] = jax.tree.map(repeat, params["layers"]["attn"][name])
  assert jax.tree.structure(mha_params) == jax.tree.structure(abstract_params(mha))
  tokens = np.random.RandomState(0).randint(0, 61, (B, 9))
  np.testing.assert_allclose(_apply(gqa, params, tokens)[0], _apply(mha, mha_params, tokens)[0],
                             atol=1e-5)
  cache = model.init_cache(gqa, B, 16)
  assert cache.k_LBSKH.shape == (2, B, 16, n_kv, h)  # the cache holds only K heads


# ---- windows and strides inside the model --------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_model_attention_weights_are_exactly_zero_outside_the_pattern(causal):
  cfg = PATTERN_CFG.replace(causal=causal)
  params = ref.random_params(abstract_params(cfg), seed=6)
  tokens = np.random.RandomState(7).randint(0, 61, (B, 10))
  _, _, inter = _apply(cfg, params, tokens, segment_ids_BT=_SEG, return_intermediates=True)
  w_LBNTS = np.asarray(inter["layers"]["attn"]["attn_weights"])
  for layer, kind in enumerate(cfg.layer_kinds):
    for b in range(B):
      ok = ref.allowed(np.arange(10), 10, kind=kind, causal=causal, window=WINDOW,
                       stride=STRIDE, segments=_SEG[b])
      assert (w_LBNTS[layer, b][:, ~ok] == 0).all(), (kind, b)
      assert (w_LBNTS[layer, b][:, ok] > 0).all(), (kind, b)
      np.testing.assert_allclose(w_LBNTS[layer, b].sum(-1), 1.0, atol=1e-6)
