"""LoRA on the model side: identity at init, gradients for every adapter, merge/unmerge,
counting, adapters in a workdir merged at load, and a short fine-tune (the training task)
that lowers the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from model import lora as lora_lib
from model import store
from model.sharding import make_mesh
from tests.conftest import tiny_config
from train.state import create_state, put_batch, state_shardings
from train.steps import make_train_step
from train.tasks import LoraFinetune

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
  loss_fn = _loss_fn(cfg)
  loss, grads = jax.jit(jax.value_and_grad(lambda a: loss_fn(params, a, TOKENS_BT)))(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
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


def test_a_workdir_keeps_adapters_apart_and_consumers_get_them_merged(setup, tmp_path):
  cfg, params, adapters = setup
  adapters = _nonzero(adapters)
  workdir = str(tmp_path / "run")
  store.save_params(workdir, params, step=3, lora=adapters)
  store.write_config(workdir, cfg, store.ByteTokenizer())
  # The 'lora' item of a checkpoint, restored without touching 'params'.
  ckpt = store.restore(workdir, items=("lora",))
  assert ckpt.step == 3 and set(ckpt.items) == {"lora"}
  jax.tree.map(np.testing.assert_array_equal, ckpt.items["lora"], adapters)
  # A consumer gets a plain model: the adapters folded into the weights once.
  loaded = store.load_params(workdir)
  assert loaded.adapted and loaded.cfg == lora_lib.without_lora(cfg)
  adapted, _ = apply(cfg, params, TOKENS_BT, lora=adapters)
  np.testing.assert_allclose(apply(loaded.cfg, loaded.params, TOKENS_BT)[0], adapted,
                             atol=2e-5)
  base = store.load_params(workdir, merge_lora=False)
  assert not base.adapted
  jax.tree.map(np.testing.assert_array_equal, base.params, params)


def test_a_short_fine_tune_lowers_the_loss_on_new_text():
  # A wider init than GPT-2's 0.02 stands in for a trained base: the frozen tied embedding
  # must allow logits larger than a fresh model's (|logit| <= |LN(x)| |E_v|).
  cfg = tiny_config(lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "o", "up", "down"),
                    init_std=0.2)
  params = init(cfg, jax.random.PRNGKey(0))
  adapters = init_lora(cfg, jax.random.PRNGKey(1))
  text = b"the quick brown fox jumps over the lazy dog. " * 4
  tokens = np.frombuffer(text, np.uint8).astype(np.int32) % cfg.vocab_size
  rows_BT = np.stack([tokens[i:i + 33] for i in range(0, 128, 16)])
  t = rows_BT.shape[1] - 1
  host_batch = {"inputs": rows_BT[None, :, :-1], "targets": rows_BT[None, :, 1:],
                "segment_ids": np.ones((1, len(rows_BT), t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, len(rows_BT), t)),
                "loss_mask": np.ones((1, len(rows_BT), t), np.float32)}
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  task = LoraFinetune(cfg, params)
  optimizer = optax.adam(3e-2)
  _, shardings = state_shardings(task, optimizer, mesh)
  state = create_state(task, optimizer, mesh, jax.random.PRNGKey(1), shardings)
  step = make_train_step(task, optimizer, lambda s: 3e-2, mesh=mesh, shardings=shardings)
  batch = put_batch(host_batch, mesh, len(rows_BT))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  # Only the adapters moved; the optimizer state exists for them alone.
  assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
  n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_state == 2 * lora_lib.count(params, adapters).trainable
