"""Learning-rate schedules' shapes, the weight-decay mask, AdamW + clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import model
from tests.conftest import tiny_config
from train.optimizer import make_optimizer, make_schedule, muon_labels, weight_decay_mask
from train.tasks import Pretrain


def optim(**overrides):
  c = ml_collections.ConfigDict(dict(
      name="adamw", lr=1.0, muon_lr=0.02, muon_momentum=0.95, muon_ns_steps=5,
      schedule="cosine",
      warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, grad_clip=1.0))
  c.update(overrides)
  return c


def curve(schedule, n):
  return np.asarray(schedule(jnp.arange(n + 1)))


def test_warmup_is_linear_from_zero_in_every_schedule():
  for kind in ("cosine", "linear", "constant", "wsd", "rsqrt"):
    lr = curve(make_schedule(optim(schedule=kind), 100), 100)
    np.testing.assert_allclose(lr[:11], np.arange(11) / 10, atol=1e-6, err_msg=kind)


def test_decay_shapes():
  n = 100
  cos = curve(make_schedule(optim(schedule="cosine"), n), n)
  lin = curve(make_schedule(optim(schedule="linear"), n), n)
  const = curve(make_schedule(optim(schedule="constant"), n), n)
  wsd = curve(make_schedule(optim(schedule="wsd"), n), n)
  rsqrt = curve(make_schedule(optim(schedule="rsqrt"), n), n)
  for lr in (cos, lin, wsd):
    assert lr[n] == pytest.approx(0.1)  # ends at the floor, lr * min_lr_ratio
    assert np.all(np.diff(lr[10:]) <= 1e-7)  # never rises after warmup
  # cosine: halfway through the decay it is halfway between peak and floor
  assert cos[55] == pytest.approx(0.55, abs=1e-6)
  assert lin[55] == pytest.approx(0.55, abs=1e-6)
  assert cos[30] > lin[30] and cos[80] < lin[80]  # cosine is flat at both ends
  np.testing.assert_allclose(const[10:], 1.0)
  # warmup-stable-decay: at the peak until the last 20% of the steps, then linear
  np.testing.assert_allclose(wsd[10:81], 1.0)
  assert wsd[90] == pytest.approx(0.55, abs=1e-6)
  # rsqrt: lr * sqrt(warmup / step) after warmup
  np.testing.assert_allclose(rsqrt[10:], np.sqrt(10 / np.arange(10, n + 1)), rtol=1e-5)


def test_schedule_errors():
  with pytest.raises(ValueError, match="warmup_steps=10 must be below num_steps=10"):
    make_schedule(optim(), 10)
  with pytest.raises(ValueError, match="unknown optim.schedule"):
    make_schedule(optim(schedule="exp"), 100)


def test_weight_decay_mask_spares_norms_biases_and_embeddings():
  cfg = tiny_config(attn_bias=True, mlp_bias=True, tie_embeddings=False)
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
  mask = weight_decay_mask(shapes)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["embed/embedding"] is False and flat["pos_embedding"] is False
  assert flat["lm_head/kernel"] is True
  assert flat["layers/attn/q/kernel"] is True and flat["layers/mlp/down/kernel"] is True
  assert flat["layers/attn/q/bias"] is False and flat["layers/mlp/up/bias"] is False
  assert flat["layers/attn_norm/scale"] is False and flat["final_norm/scale"] is False
  assert flat["layers/attn_norm/bias"] is False
  with_emb = weight_decay_mask(shapes, decay_embeddings=True)
  assert with_emb["embed"]["embedding"] is True and with_emb["pos_embedding"] is True


def test_adamw_decays_only_masked_leaves():
  params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
            "embed": {"embedding": jnp.ones((3, 2))}}
  tx = make_optimizer(optim(schedule="constant", warmup_steps=0, lr=0.5, weight_decay=0.1),
                      num_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)  # zero gradient: only decay
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"]["kernel"], 1 - 0.5 * 0.1)
  np.testing.assert_allclose(new["n"]["scale"], 1.0)
  np.testing.assert_allclose(new["n"]["bias"], 1.0)
  np.testing.assert_allclose(new["embed"]["embedding"], 1.0)


def test_gradient_clipping_by_global_norm():
  # A huge eps makes Adam's update -lr * g / eps: plain SGD, so clipping shows directly.
  params = {"kernel": jnp.zeros(4)}
  grads = {"kernel": jnp.array([30.0, 40.0, 0.0, 0.0])}  # global norm 50
  for clip, want in ((1.0, [-0.6, -0.8, 0, 0]), (0.0, [-30.0, -40.0, 0, 0])):
    tx = make_optimizer(optim(schedule="constant", warmup_steps=0, lr=1e6, eps=1e6, b1=0.0,
                              b2=0.0, weight_decay=0.0, grad_clip=clip), num_steps=10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], want, rtol=1e-3, atol=1e-4)


# ---- Muon ----------------------------------------------------------------------------------
def flat_paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scan", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(scan):
  cfg = tiny_config(attn_bias=True, mlp_bias=True, tie_embeddings=False, scan_layers=scan)
  labels = flat_paths(muon_labels(jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))))
  muon = sorted(k for k, v in labels.items() if v == "muon")
  block = "layers" if scan else "layers_0"
  for name in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down"):
    assert f"{block}/{name}/kernel" in muon
  assert len(muon) == 6 * (1 if scan else cfg.n_layers)
  for name in ("embed/embedding", "pos_embedding", "lm_head/kernel", "final_norm/scale",
               f"{block}/attn_norm/scale", f"{block}/attn/q/bias", f"{block}/mlp/up/bias"):
    assert labels[name] == "adamw", name


def test_muon_orthogonalizes_each_layer_of_a_stack():
  # One step from zero momentum: the update of w_LIO is -lr * sqrt(max(1, O/I)) * U V^T per
  # layer. Layers whose gradients differ by 1e4 in scale must each come out orthogonal (all
  # singular values ~1, Newton-Schulz's quintic leaves them in ~[0.7, 1.2]); orthogonalizing
  # the stack as one matrix would leave the small layer's near 0.
  n_layers, d_in, d_out = 3, 16, 32
  scales_L11 = jnp.array([1e2, 1.0, 1e-2])[:, None, None]
  g_LIO = jax.random.normal(jax.random.PRNGKey(0), (n_layers, d_in, d_out)) * scales_L11
  params = {"layers": {"mlp": {"up": {"kernel": jnp.zeros((n_layers, d_in, d_out))}}},
            "embed": {"embedding": jnp.zeros((5, d_in))}}
  grads = {"layers": {"mlp": {"up": {"kernel": g_LIO}}},
           "embed": {"embedding": jnp.ones((5, d_in))}}
  tx = make_optimizer(optim(name="muon", schedule="constant", warmup_steps=0, muon_lr=1.0,
                            lr=0.1, weight_decay=0.0, grad_clip=0.0), num_steps=10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  u_LIO = np.asarray(updates["layers"]["mlp"]["up"]["kernel"]) / -np.sqrt(d_out / d_in)
  for layer in range(n_layers):
    s = np.linalg.svd(u_LIO[layer], compute_uv=False)
    assert s.min() > 0.6 and s.max() < 1.25, (layer, s)
  # The embedding went through AdamW: its first step is -lr * sign(g).
  np.testing.assert_allclose(updates["embed"]["embedding"], -0.1, rtol=1e-4)


def test_muon_lowers_the_loss_of_a_short_run():
  cfg = tiny_config()
  task = Pretrain(cfg, document_masking=False)
  params = task.init(jax.random.PRNGKey(0))
  tx = make_optimizer(optim(name="muon", lr=1e-2, warmup_steps=2, muon_lr=0.1), num_steps=30)
  tokens = np.tile(np.arange(17) % 11, (4, 4))[:, :33].astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1))}
  loss_fn = lambda p: jnp.mean(task.token_losses(p, None, batch))

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state, losses = tx.init(params), []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.4 * losses[0], " ".join(f"{x:.2f}" for x in losses)
