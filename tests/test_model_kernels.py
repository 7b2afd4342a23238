"""The accelerator kernels (model/kernels.py) against the dense reference kernel.

On this CPU both run emulated (`kernels.INTERPRET`, set here only): splash through the
Pallas interpreter (the kernel's own code as XLA ops), cudnn as the same
`jax.nn.dot_product_attention` call with implementation='xla' (the mask translation is
checked, cuDNN is not). On a TPU splash, on an NVIDIA GPU cudnn, runs natively
(`experiments/accelerator_check.sh`). Interpret mode compiles slowly: every splash case
below is one compilation of a forward and backward pass (padded to a 128-key block), so
the cases are few and each covers several features.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model
from model import abstract_params, kernels, sharding
from model import attention as attn_lib
from model.masks import KIND_IDS, Mask
from tests import numpy_reference as ref
from tests.conftest import tiny_config

H = 8
_SEG = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6, 7, 7]])


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
  monkeypatch.setattr(kernels, "INTERPRET", True)


def _atol(native_platform, emulated):
  """Interpret mode runs float32 on the CPU; natively the MXU / tensor cores round more."""
  return emulated if kernels.platform() != native_platform else 3e-2


def _inputs(b, t, n, k, dtype=jnp.float32, seed=0, s=None):
  rng = np.random.RandomState(seed)
  s = t if s is None else s
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in [(b, t, n, H), (b, s, k, H), (b, s, k, H), (b, t, n, H)])


def _self_mask(b, t, kind, causal, segments=None, window=0, stride=0):
  return Mask.build(batch=b, q_slot_BT=None, kv_len=t, causal=causal, kind=KIND_IDS[kind],
                    window=window, stride=stride, segment_ids_BT=segments)


def _out_and_grads(q, k, v, do, mask, *, impl):
  """Output and (dq, dk, dv) of sum(out * do) for one kernel, jitted with the mask a constant
  (its kind known at trace time: one kernel, not one per kind)."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: attn_lib.attention(q, k, v, mask, impl=impl), q, k, v)
    return out, vjp(do)

  return jax.jit(run)(q, k, v, do)


def _check_against_dense(impl, q, k, v, do, mask, atol):
  out, grads = _out_and_grads(q, k, v, do, mask, impl=impl)
  want, want_grads = _out_and_grads(*(a.astype(jnp.float32) for a in (q, k, v, do)), mask,
                                    impl="dense")
  for name, have, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads),
                                  strict=True):
    np.testing.assert_allclose(np.asarray(have, np.float32), expected, atol=atol, err_msg=name)


# ---- splash ---------------------------------------------------------------------------------
# (B, T, N, K, kind, causal, segments, window, stride): T = 10 and 200 are not multiples of
# the 128-key block (padded; 200 spans two blocks, so causal block skipping shows); T = 128
# is one whole block, the only case without segment ids inside the kernel.
SPLASH_CASES = {
    "global-bidirectional-gqa-one-block": (2, 128, 6, 2, "global", False, None, 0, 0),
    "global-causal-mha-two-blocks-padded": (1, 200, 2, 2, "global", True, None, 0, 0),
    "local-causal-segments-mqa": (2, 10, 4, 1, "local", True, _SEG, 3, 0),
    "local-bidirectional-gqa": (2, 10, 6, 2, "local", False, None, 3, 0),
    "strided-bidirectional-segments-gqa": (2, 10, 6, 2, "strided", False, _SEG, 0, 3),
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_equals_dense_forward_and_gradients(case):
  b, t, n, k, kind, causal, seg, window, stride = SPLASH_CASES[case]
  q, kk, v, do = _inputs(b, t, n, k)
  mask = _self_mask(b, t, kind, causal, seg, window, stride)
  _check_against_dense("splash", q, kk, v, do, mask, _atol("tpu", 2e-5))


def test_splash_sharded_over_data_fsdp_tensor_equals_dense():
  """On a 2 x 2 x 2 mesh under the logical rules (as the train step traces): the kernel runs
  per shard in shard_map (batch 4 over data x fsdp, 4 query / 2 kv heads over tensor), and
  output and gradients equal the single-device dense kernel's."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (8 forced CPU devices in this suite)")
  q, k, v, do = _inputs(4, 10, 4, 2, seed=3)
  mask = _self_mask(4, 10, "global", True, np.concatenate([_SEG, _SEG]))
  want, want_grads = _out_and_grads(q, k, v, do, mask, impl="dense")
  mesh = sharding.make_mesh((2, 2, 2))
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  placed = [jax.device_put(a, spec) for a in (q, k, v, do)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    jaxpr = str(jax.make_jaxpr(lambda *a: attn_lib.attention(*a, mask, impl="splash"))(
        *placed[:3]))
    out, grads = _out_and_grads(*placed, mask, impl="splash")
  assert "shard_map" in jaxpr and "f32[1,2,128,8]" in jaxpr  # one row, 2 heads per shard
  assert out.sharding.spec == spec.spec
  for have, expected in zip((out, *grads), (want, *want_grads), strict=True):
    np.testing.assert_allclose(have, expected, atol=_atol("tpu", 2e-5))
  # One kv head (MQA) does not split over tensor = 2: the heads stay whole on every shard.
  k1, v1 = k[:, :, :1], v[:, :, :1]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    out = jax.jit(lambda *a: attn_lib.attention(*a, mask, impl="splash"))(placed[0], k1, v1)
  np.testing.assert_allclose(out, attn_lib.attention(q, k1, v1, mask), atol=_atol("tpu", 2e-5))


def test_splash_with_a_kv_cache_runs_the_chunked_kernel():
  """Decoding (queries at cache slots, S != T) is served by the chunked kernel: no Pallas
  call is traced, and the output is the dense kernel's."""
  q, k, v, _ = _inputs(2, 1, 6, 2, s=16)
  mask = Mask.build(batch=2, q_slot_BT=np.array([[4], [10]]), kv_len=16,
                    kv_length_B=np.array([5, 11]))
  splash_fn = jax.jit(lambda *a: attn_lib.attention(*a, mask, impl="splash"))
  assert "pallas_call" not in str(splash_fn.trace(q, k, v).jaxpr)
  np.testing.assert_allclose(splash_fn(q, k, v),
                             jax.jit(lambda *a: attn_lib.attention(*a, mask))(q, k, v), atol=2e-6)


@pytest.mark.slow
def test_splash_model_with_scanned_global_and_local_layers_equals_dense():
  """A whole model under nn.scan (the layer kind is data: one splash kernel per kind,
  chosen by lax.switch), packed documents in one whole 128-key block (segment ids reach the
  kernel without padding), GQA, RoPE: logits and parameter gradients of the loss equal the
  dense kernel's."""
  cfg = tiny_config(n_heads=4, n_kv_heads=2, position="rope", attention_pattern=("global",
                    "local"), window_size=3)
  params = ref.random_params(abstract_params(cfg), seed=4)
  tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 128))
  segments = np.stack([np.repeat([0, 1, 2], [50, 70, 8]), np.repeat([3, 4], [9, 119])])

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grads(cfg, params):
    def loss(p):
      logits = model.apply(cfg, p, tokens, segment_ids_BT=segments)[0]
      return jnp.mean(logits ** 2), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, logits), grads = loss_and_grads(cfg.replace(attention_impl="splash"), params)
  (_, want), want_grads = loss_and_grads(cfg, params)
  atol = _atol("tpu", 1e-5)
  np.testing.assert_allclose(logits, want, atol=atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), grads, want_grads)


# ---- cudnn ----------------------------------------------------------------------------------
# bfloat16 (cuDNN has no float32 kernel); compared with the dense kernel in float32 on the
# same bfloat16 inputs.
CUDNN_CASES = {
    "global-causal-gqa": (10, 6, 2, "global", True, None, 0),
    "global-bidirectional-mqa": (10, 4, 1, "global", False, None, 0),
    "local-causal-segments-gqa": (10, 6, 2, "local", True, _SEG, 3),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_equals_dense_forward_and_gradients(case):
  t, n, k, kind, causal, seg, window = CUDNN_CASES[case]
  q, kk, v, do = _inputs(2, t, n, k, jnp.bfloat16, seed=1)
  mask = _self_mask(2, t, kind, causal, seg, window)
  _check_against_dense("cudnn", q, kk, v, do, mask, 3e-2)


def test_cudnn_decode_with_a_kv_cache_uses_key_lengths():
  """One new token per row at cache slots 4 and 10 of 16: the dense kernel's output (row 0's
  keys 5 and 6 are valid but in its future); a row that may see no key gives zeros."""
  q, k, v, _ = _inputs(3, 1, 6, 2, jnp.bfloat16, seed=2, s=16)
  mask = Mask.build(batch=3, q_slot_BT=np.array([[4], [10], [0]]), kv_len=16,
                    kv_length_B=np.array([7, 11, 0]))
  out = jax.jit(lambda *a: attn_lib.attention(*a, mask, impl="cudnn"))(q, k, v)
  want = attn_lib.attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask, impl="dense")
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
  assert (np.asarray(out[2]) == 0).all()


def test_cudnn_layer_kind_as_data_switches_between_global_and_local():
  """Under jit the kind is traced: the global and the local call are both built, and the
  kind picks one (a local layer's output differs from a global layer's)."""
  q, k, v, _ = _inputs(2, 10, 4, 2, jnp.bfloat16, seed=3)
  run = jax.jit(lambda kind: attn_lib.attention(
      q, k, v, _self_mask(2, 10, "global", True, window=3).with_kind(kind), impl="cudnn"))
  for kind in ("global", "local"):
    want = attn_lib.attention(*(a.astype(jnp.float32) for a in (q, k, v)),
                              _self_mask(2, 10, kind, True, window=3), impl="dense")
    np.testing.assert_allclose(np.asarray(run(KIND_IDS[kind]), np.float32), want, atol=3e-2)


@pytest.mark.parametrize("problem, dtype, mask_kw, t, words", [
    ("float32", jnp.float32, dict(kind="global", causal=True), 4, "dtype float32"),
    ("strided", jnp.bfloat16, dict(kind="strided", causal=True, stride=2), 4, "strided layers"),
    ("bidirectional-local", jnp.bfloat16, dict(kind="local", causal=False, window=2), 4,
     "bidirectional local"),
    ("cache-prefill", jnp.bfloat16, None, 3, "3 new tokens per row with a KV cache"),
])
def test_cudnn_refuses_what_it_does_not_serve_naming_what_it_does(problem, dtype, mask_kw, t,
                                                                  words):
  q, k, v, _ = _inputs(1, t, 4, 2, dtype, s=8 if mask_kw is None else t)
  if mask_kw is None:
    mask = Mask.build(batch=1, q_slot_BT=np.arange(t)[None], kv_len=8, kv_length_B=[t])
  else:
    mask_kw = dict(mask_kw)
    mask = _self_mask(1, t, mask_kw.pop("kind"), mask_kw.pop("causal"), **mask_kw)
  with pytest.raises(ValueError, match=f"cudnn' does not serve {words}.*causal local layers"):
    attn_lib.attention(q, k, v, mask, impl="cudnn")


def test_kernels_off_their_hardware_raise_unless_interpreted(monkeypatch):
  monkeypatch.setattr(kernels, "INTERPRET", False)
  q, k, v, _ = _inputs(1, 4, 4, 2, jnp.bfloat16)
  mask = _self_mask(1, 4, "global", True)
  monkeypatch.setattr(kernels, "platform", lambda: "cpu")
  for impl, hardware in (("splash", "a TPU"), ("cudnn", "an NVIDIA GPU")):
    with pytest.raises(ValueError, match=f"'{impl}' needs {hardware} .platform is 'cpu'"):
      attn_lib.attention(q, k, v, mask, impl=impl)


# ---- auto ------------------------------------------------------------------------------------
def test_auto_picks_the_kernel_for_the_platform_and_call(monkeypatch):
  bf16, f32 = (_inputs(1, 4, 4, 2, dtype)[0] for dtype in (jnp.bfloat16, jnp.float32))
  self_mask = _self_mask(1, 4, "global", True)
  strided = _self_mask(1, 4, "strided", True, stride=2)
  assert kernels.resolve("auto", f32, self_mask) == "chunked"  # this CPU
  for where, q, mask, kernel in [("tpu", f32, self_mask, "splash"),
                                 ("tpu", f32, strided, "splash"),
                                 ("gpu", bf16, self_mask, "cudnn"),
                                 ("gpu", f32, self_mask, "chunked"),
                                 ("gpu", bf16, strided, "chunked"),
                                 ("cpu", bf16, self_mask, "chunked")]:
    monkeypatch.setattr(kernels, "platform", lambda where=where: where)
    assert kernels.resolve("auto", q, mask) == kernel, (where, q.dtype, mask.kind)
    assert kernels.resolve("dense", q, mask) == "dense"


def test_auto_on_cpu_runs_the_chunked_kernel():
  """Bit for bit the chunked kernel's output (the dense kernel's differs in the last bits)."""
  q, k, v, _ = _inputs(2, 9, 4, 2, seed=6)
  mask = _self_mask(2, 9, "global", True)
  out = {impl: jax.jit(lambda *a, impl=impl: attn_lib.attention(*a, mask, impl=impl,
                                                                 chunk_size=4))(q, k, v)
         for impl in ("auto", "chunked", "dense")}
  np.testing.assert_array_equal(out["auto"], out["chunked"])
  assert not np.array_equal(out["auto"], out["dense"])
