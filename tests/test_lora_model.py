"""LoRA on the model side: identity at init, adapter-only gradients, merge/unmerge, counting,
saving adapters apart from the base, and a short fine-tune that lowers the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from model import lora as lora_lib
from tests.conftest import tiny_config
from train import workdir as wd
from train.tokenizer import ByteTokenizer

# Jitted once per config: far cheaper than running the model op by op.
apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_intermediates")
init = jax.jit(model.init, static_argnums=0)
init_lora = jax.jit(model.init_lora, static_argnums=0)
TARGETS = ("q", "k", "v", "o", "up", "down")
TOKENS_BT = np.array([[1, 5, 9, 2, 7, 7, 3, 0], [4, 4, 8, 60, 11, 2, 5, 6]])


def _loss_fn(cfg):
  def loss_fn(params, adapters, tokens_BT):
    logits_BTV, _ = apply(cfg, params, tokens_BT[:, :-1], lora=adapters)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

  return loss_fn


def _nonzero(adapters, seed=1):
  """Adapters with B != 0 (a trained adapter), so they change the model."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
  return jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), adapters)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS)
  params = init(cfg, jax.random.PRNGKey(0))
  adapters = init_lora(cfg, jax.random.PRNGKey(1))
  return cfg, params, adapters


def test_fresh_adapters_leave_the_model_unchanged(setup):
  cfg, params, adapters = setup
  assert all(np.all(np.asarray(b) == 0) for path, b in
             jax.tree_util.tree_flatten_with_path(adapters)[0] if path[-1].key == "b")
  base, _ = apply(cfg, params, TOKENS_BT)
  adapted, _ = apply(cfg, params, TOKENS_BT, lora=adapters)
  np.testing.assert_array_equal(adapted, base)
  changed, _ = apply(cfg, params, TOKENS_BT, lora=_nonzero(adapters))
  assert not np.allclose(changed, base, atol=1e-4)


def test_gradients_reach_only_the_adapters(setup):
  cfg, params, adapters = setup
  adapters = _nonzero(adapters)
  grad_fn = jax.jit(lora_lib.value_and_grad(_loss_fn(cfg)))
  loss, grads = grad_fn(params, adapters, TOKENS_BT)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # The base params are constants of the loss: no gradient flows back into them.
  params_grads = jax.jit(jax.grad(lambda p: grad_fn(p, adapters, TOKENS_BT)[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(params_grads))
  # The optimizer state covers the adapters only.
  opt_state = optax.adam(1e-2).init(adapters)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
  assert n_state == 2 * lora_lib.count(params, adapters).trainable
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("scan", [True, False])
def test_merge_gives_the_adapted_logits_and_unmerge_the_base(setup, scan):
  cfg, params, adapters = setup
  adapters = _nonzero(adapters)
  if not scan:
    cfg = cfg.replace(scan_layers=False)
    params = model.unstack_layers(params, cfg.n_layers)
    adapters = model.unstack_layers(adapters, cfg.n_layers)
  before = jax.tree.map(np.array, params)
  adapted, _ = apply(cfg, params, TOKENS_BT, lora=adapters)
  merged = lora_lib.merge(cfg, params, adapters)
  got, _ = apply(cfg.replace(lora_rank=0, lora_targets=()), merged, TOKENS_BT)
  np.testing.assert_allclose(got, adapted, atol=2e-5)
  base_logits, _ = apply(cfg, params, TOKENS_BT)
  assert not np.allclose(got, base_logits, atol=1e-3)
  jax.tree.map(np.testing.assert_array_equal, params, before)  # merge made a new tree
  restored = lora_lib.unmerge(cfg, merged, adapters)
  jax.tree.map(lambda r, b: np.testing.assert_allclose(r, b, rtol=0, atol=1e-6), restored, before)


def test_count_is_rank_times_in_plus_out_per_adapted_matrix(setup):
  cfg, params, adapters = setup
  d, f, r, n_layers = cfg.d_model, cfg.ffn_size, cfg.lora_rank, cfg.n_layers
  per_layer = r * ((d + d) * 4 + (d + f) + (f + d))  # q, k, v, o are D x D here; up, down
  counts = lora_lib.count(params, adapters)
  assert counts.trainable == n_layers * per_layer
  assert counts.total == model.count_params(cfg).total + counts.trainable
  assert "trainable" in str(counts) and math.isclose(counts.fraction,
                                                     counts.trainable / counts.total)


def test_adapters_are_saved_and_loaded_apart_from_the_base(setup, tmp_path):
  cfg, params, adapters = setup
  adapters = _nonzero(adapters)
  file = lora_lib.save_adapters(str(tmp_path / "shared"), cfg, adapters)
  loaded_cfg, loaded = lora_lib.load_adapters(str(tmp_path / "shared"),
                                              cfg.replace(lora_rank=0, lora_targets=()))
  assert (loaded_cfg.lora_rank, loaded_cfg.lora_alpha, loaded_cfg.lora_targets) == (
      4, 8.0, TARGETS)
  jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
  assert lora_lib.load_adapters(file)[0] == cfg
  with pytest.raises(ValueError, match=r"another model; fields that differ: \['d_model'"):
    lora_lib.load_adapters(file, tiny_config(d_model=48))
  # In a workdir: the 'lora' item of a checkpoint, restored without touching 'params'.
  workdir = str(tmp_path / "run")
  wd.save_params(workdir, params, step=3, lora=adapters)
  wd.write_config(workdir, cfg, ByteTokenizer())
  got_cfg, got, step = lora_lib.restore_adapters(workdir)
  assert (got_cfg, step) == (cfg, 3)
  jax.tree.map(np.testing.assert_array_equal, got, adapters)
  assert wd.restore_params(workdir)[2] is not None


def test_a_short_fine_tune_lowers_the_loss_on_new_text():
  # A wider init than GPT-2's 0.02 stands in for a trained base: the frozen tied embedding
  # must allow logits larger than a fresh model's (|logit| <= |LN(x)| |E_v|).
  cfg = tiny_config(lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "o", "up", "down"),
                    init_std=0.2)
  params = init(cfg, jax.random.PRNGKey(0))
  adapters = init_lora(cfg, jax.random.PRNGKey(1))
  text = b"the quick brown fox jumps over the lazy dog. " * 4
  tokens = np.frombuffer(text, np.uint8).astype(np.int32) % cfg.vocab_size
  batch_BT = np.stack([tokens[i:i + 33] for i in range(0, 128, 16)])
  optimizer = optax.adam(3e-2)
  step = lora_lib.make_train_step(_loss_fn(cfg), optimizer)
  opt_state = optimizer.init(adapters)
  start = end = None
  for _ in range(30):
    adapters, opt_state, loss = step(params, adapters, opt_state, batch_BT)
    start = float(loss) if start is None else start
    end = float(loss)
  assert end < 0.5 * start, (start, end)
