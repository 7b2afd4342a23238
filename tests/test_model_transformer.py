"""The layer stack and its switches: scan vs unrolled, remat, dropout, dtypes, init, intermediates.

Gradients here also prove the chunked kernel's custom backward pass through the whole model
(under nn.scan and nn.remat) against the dense kernel's autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import abstract_params
from tests import numpy_reference as ref
from tests.conftest import tiny_config

BASE = tiny_config(position="rope", n_kv_heads=2, attention_pattern=("local", "strided"),
                   window_size=3, sparse_stride=3, attn_chunk_size=4)
TOKENS = np.random.RandomState(0).randint(0, 61, (2, 11))
SEGMENTS = np.array([[1] * 4 + [2] * 7, [3] * 11])
_apply = jax.jit(model.apply, static_argnums=0,
                 static_argnames=("deterministic", "return_intermediates"))


def _loss(cfg, params):
  logits = model.apply(cfg, params, TOKENS, segment_ids_BT=SEGMENTS)[0]
  return jnp.mean(jax.nn.log_softmax(logits)[..., 5])


_grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)


@pytest.fixture(scope="module")
def base_params():
  return ref.random_params(abstract_params(BASE), seed=1)


@pytest.fixture(scope="module")
def base_grads(base_params):
  """Gradients of the dense kernel without remat: the reference for every variant below."""
  return _grad(BASE, base_params)


def _assert_trees_close(actual, expected, atol):
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, e), a in zip(paths, jax.tree.leaves(actual), strict=True):
    np.testing.assert_allclose(a, e, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_scan_equals_unrolled(base_params):
  unrolled_cfg = BASE.replace(scan_layers=False)
  unrolled = model.unstack_layers(base_params, BASE.n_layers)
  assert jax.tree.structure(unrolled) == jax.tree.structure(abstract_params(unrolled_cfg))
  _assert_trees_close(model.stack_layers(unrolled, BASE.n_layers), base_params, atol=0)
  np.testing.assert_allclose(_apply(unrolled_cfg, unrolled, TOKENS)[0],
                             _apply(BASE, base_params, TOKENS)[0], atol=1e-6)


@pytest.mark.parametrize("impl,remat,scan", [("chunked", "full", True),
                                             ("dense", "dots", False),
                                             ("chunked", "dots_no_batch", True)])
def test_remat_unrolled_and_chunked_kernel_change_no_gradient(impl, remat, scan, base_params,
                                                               base_grads):
  cfg = BASE.replace(attention_impl=impl, remat=remat, scan_layers=scan)
  params = base_params if scan else model.unstack_layers(base_params, BASE.n_layers)
  grads = _grad(cfg, params)
  if not scan:
    grads = model.stack_layers(grads, BASE.n_layers)
  _assert_trees_close(grads, base_grads, atol=1e-6)
  # The policy is really applied: the backward pass recomputes a rematerialized block.
  jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(_loss, argnums=1)(cfg, p))(params))
  assert "remat" in jaxpr
  assert "remat" not in str(jax.make_jaxpr(lambda p: jax.grad(_loss, argnums=1)(BASE, p))(
      base_params))


def test_gradients_are_not_trivial(base_grads):
  for leaf in jax.tree.leaves(base_grads):
    assert np.abs(leaf).max() > 1e-6


# ---- dropout ---------------------------------------------------------------------------------
DROPOUT = tiny_config(dropout_rate=0.1, attn_dropout_rate=0.1)


def test_dropout_only_when_not_deterministic():
  params = ref.random_params(abstract_params(DROPOUT))
  plain = np.asarray(_apply(DROPOUT.replace(dropout_rate=0.0, attn_dropout_rate=0.0), params,
                            TOKENS)[0])
  np.testing.assert_array_equal(_apply(DROPOUT, params, TOKENS)[0], plain)
  with pytest.raises(ValueError, match="needs an rng"):
    _apply(DROPOUT, params, TOKENS, deterministic=False)

  def train(seed):
    # An "rbg" key: the same dropout code, a few seconds less to compile than threefry.
    logits, _, inter = _apply(DROPOUT, params, TOKENS, deterministic=False,
                              rng=jax.random.key(seed, impl="rbg"), return_intermediates=True)
    return np.asarray(logits), jax.tree.map(np.asarray, inter["layers"])

  (a, layers), (a_again, _), (b, _) = train(1), train(1), train(2)
  np.testing.assert_array_equal(a, a_again)
  assert np.abs(a - b).max() > 1e-3 and np.abs(a - plain).max() > 1e-3
  # Each dropout site is active: the embeddings, ...
  x0 = params["embed"]["embedding"][TOKENS] + params["pos_embedding"][:TOKENS.shape[1]]
  dropped = layers["resid_pre"][0] == 0
  assert 0.02 < dropped.mean() < 0.3
  np.testing.assert_allclose(layers["resid_pre"][0][~dropped], (x0 / 0.9)[~dropped], rtol=1e-5)
  # ... the attention weights (rows no longer sum to 1), ...
  assert np.abs(layers["attn"]["attn_weights"].sum(-1) - 1).max() > 0.05
  # ... and both residual branches (the sown outputs are taken before dropout).
  assert np.abs(layers["resid_mid"] - layers["resid_pre"] - layers["attn_out"]).max() > 1e-3
  assert np.abs(layers["resid_post"] - layers["resid_mid"] - layers["mlp_out"]).max() > 1e-3


# ---- dtypes ------------------------------------------------------------------------------------
def test_bfloat16_compute_stays_close_to_float32():
  cfg = tiny_config(dtype="bfloat16", position="rope", ffn="swiglu", norm="rmsnorm")
  params = ref.random_params(abstract_params(cfg), scale=0.1)
  logits16, _, inter = _apply(cfg, params, TOKENS, return_intermediates=True)
  logits32 = _apply(cfg.replace(dtype="float32"), params, TOKENS)[0]
  assert logits16.dtype == jnp.float32
  assert inter["layers"]["mlp_out"].dtype == jnp.bfloat16  # the compute really is bf16
  scale = np.abs(np.asarray(logits32)).max()
  assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() < 0.03 * scale
  assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() > 0  # and not float32
  shapes = abstract_params(cfg.replace(param_dtype="bfloat16"))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


# ---- init and intermediates ----------------------------------------------------------------
def test_init_shapes_and_statistics():
  cfg = tiny_config(d_model=64, init_std=0.05)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract_params(cfg))
  assert model.count_params(cfg).total == sum(x.size for x in jax.tree.leaves(params))
  layers = params["layers"]
  assert np.asarray(layers["attn"]["q"]["kernel"]).std() == pytest.approx(0.05, rel=0.1)
  assert np.asarray(params["embed"]["embedding"]).std() == pytest.approx(0.05, rel=0.1)
  residual_std = 0.05 / np.sqrt(2 * cfg.n_layers)  # GPT-2's scaled init of W_O and W_down
  assert np.asarray(layers["attn"]["o"]["kernel"]).std() == pytest.approx(residual_std, rel=0.1)
  assert np.asarray(layers["mlp"]["down"]["kernel"]).std() == pytest.approx(residual_std, rel=0.1)
  assert (np.asarray(layers["attn"]["q"]["bias"]) == 0).all()
  assert (np.asarray(layers["attn_norm"]["scale"]) == 1).all()
  # Layers get different random draws.
  assert not np.allclose(layers["attn"]["q"]["kernel"][0], layers["attn"]["q"]["kernel"][1])


def test_intermediates_add_up(base_params):
  logits, _, inter = _apply(BASE, base_params, TOKENS, return_intermediates=True)
  layers = inter["layers"]
  np.testing.assert_allclose(layers["resid_mid"], layers["resid_pre"] + layers["attn_out"],
                             atol=1e-5)
  np.testing.assert_allclose(layers["resid_post"], layers["resid_mid"] + layers["mlp_out"],
                             atol=1e-5)
  np.testing.assert_allclose(layers["resid_pre"][1], layers["resid_post"][0], atol=0)
  assert layers["attn"]["attn_weights"].shape == (2, 2, 4, 11, 11)  # [L, B, N, T, S]
  # Per-head outputs sum to the attention output (W_O is linear; the model has no o bias here
  # only if attn_bias is off, so compare without it).
  o_bias = base_params["layers"]["attn"]["o"]["bias"][:, None, None, :]
  np.testing.assert_allclose(layers["attn"]["head_out"].sum(3) + o_bias, layers["attn_out"],
                             atol=1e-5)
  np.testing.assert_allclose(logits, _apply(BASE, base_params, TOKENS)[0], atol=1e-5)
