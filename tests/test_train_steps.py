"""The jitted train step on 8 forced CPU devices: sharded == one device, the rules table's
shardings, gradient accumulation == one big batch, non-finite steps change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.sharding import make_mesh
from tests.conftest import tiny_config
from train import state as state_lib
from train.config_lib import load_config
from train.optimizer import make_optimizer, make_schedule
from train.packing import PackedWindows
from train.steps import make_train_step
from train.tasks import Pretrain, cross_entropy

CFG = tiny_config(vocab_size=64, d_model=32, n_heads=4, max_seq_len=16)
STEPS, ROWS, T = 3, 8, 16


def optim_config(**overrides):
  return load_config("train/configs/tiny.py", {f"optim.{k}": v for k, v in overrides.items()}
                     ).optim


def batches(accum=1):
  """STEPS packed batches [A, ROWS / A, T] of random documents (segment ids and positions)."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, CFG.vocab_size, rng.integers(3, 40)).astype(np.int32)
          for _ in range(60)]
  packed = PackedWindows.from_documents(docs, seq_len=T, eot_id=1, pad_id=0)
  out = []
  for s in range(STEPS):
    w = packed.windows(np.arange(s * ROWS, (s + 1) * ROWS))
    out.append({k: v.reshape(accum, ROWS // accum, T) for k, v in w.items()})
  return out


def run(mesh_shape, accum=1, optim=None, cfg=CFG):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = make_mesh(mesh_shape, devices)
  optim = optim or optim_config()
  tx, schedule = make_optimizer(optim, 100), make_schedule(optim, 100)
  task = Pretrain(cfg)
  _, shardings = state_lib.state_shardings(task, tx, mesh)
  state = state_lib.create_state(task, tx, mesh, jax.random.PRNGKey(0), shardings)
  step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
  losses = []
  for batch in batches(accum):
    state, metrics = step(state, state_lib.put_batch(batch, mesh, ROWS // accum))
    losses.append(metrics)
  return state, jax.device_get(losses), shardings, step


@pytest.fixture(scope="module")
def single():
  return run((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_steps_match_one_device(single, mesh_shape):
  state1, metrics1, _, _ = single
  state, metrics, shardings, _ = run(mesh_shape)
  for a, b in zip(metrics1, metrics, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  assert metrics1[-1]["loss"] < metrics1[0]["loss"]  # it trains
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5),
               state1.params, state.params)
  # Every leaf lives where the rules table puts it (optimizer moments with their parameter).
  jax.tree.map(lambda x, s: assert_sharding(x, s), state.params, shardings.params)
  adam = state.opt_state[1][0]
  jax.tree.map(lambda x, s: assert_sharding(x, s), adam.mu, shardings.params)
  if mesh_shape == (2, 2, 2):
    check_rules_table(state)


def assert_sharding(x, sharding):
  assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)


def spec_of(tree, *path):
  for key in path:
    tree = tree[key]
  return tuple(tree.sharding.spec) + (None,) * (tree.ndim - len(tree.sharding.spec))


def check_rules_table(state):
  """vocab -> tensor, embed -> fsdp, heads/mlp -> tensor, layers -> none (LOGICAL_RULES)."""
  p = state.params
  assert spec_of(p, "embed", "embedding") == ("tensor", "fsdp")
  assert spec_of(p, "layers", "attn", "q", "kernel") == (None, "fsdp", "tensor")
  assert spec_of(p, "layers", "attn", "o", "kernel") == (None, "tensor", "fsdp")
  assert spec_of(p, "layers", "mlp", "up", "kernel") == (None, "fsdp", "tensor")
  assert spec_of(p, "layers", "mlp", "down", "kernel") == (None, "tensor", "fsdp")
  assert spec_of(p, "layers", "attn_norm", "scale") == (None, "fsdp")
  assert spec_of(p, "pos_embedding") == (None, "fsdp")
  assert state.step.sharding.spec == P()
  mesh = state.step.sharding.mesh
  batch = state_lib.put_batch(batches()[0], mesh, ROWS)
  assert tuple(batch["inputs"].sharding.spec)[:2] == (None, ("data", "fsdp"))


def test_gradient_accumulation_equals_one_big_batch(single):
  state1, metrics1, _, _ = single
  state4, metrics4, _, _ = run((1, 1, 1), accum=4)
  for a, b in zip(metrics1, metrics4, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert b["tokens"] == a["tokens"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5),
               state1.params, state4.params)


def test_bfloat16_compute_keeps_float32_params_and_moments(single):
  _, metrics1, _, _ = single
  state, metrics, _, _ = run((1, 1, 1), cfg=CFG.replace(dtype="bfloat16"))
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  losses = [float(m["loss"]) for m in metrics]
  np.testing.assert_allclose(losses, [float(m["loss"]) for m in metrics1], rtol=2e-2)
  assert losses[-1] < losses[0]


def test_non_finite_step_leaves_the_state_unchanged(single):
  state, _, _, step = single
  bad = jax.tree.map(jnp.copy, state)  # the step donates its input: keep the fixture's intact
  bad.params["embed"]["embedding"] = bad.params["embed"]["embedding"].at[5, 0].set(jnp.nan)
  before = jax.device_get(bad)
  mesh = state.step.sharding.mesh
  after, metrics = step(bad, state_lib.put_batch(batches()[0], mesh, ROWS))
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), before,
               jax.device_get(after))  # step, params, moments, rng: all as they were


def test_packed_documents_do_not_see_each_other(single):
  params = single[0].params
  losses_fn = jax.jit(lambda p, b, masking: cross_entropy(CFG, p, b, document_masking=masking),
                      static_argnums=2)
  a, b = np.arange(5, 12, dtype=np.int32), np.arange(20, 29, dtype=np.int32)
  both = PackedWindows.from_documents([a, b], seq_len=T, eot_id=1, pad_id=0)[0]
  alone = PackedWindows.from_documents([b], seq_len=T, eot_id=1, pad_id=0)[0]
  both, alone = ({k: v[None] for k, v in w.items()} for w in (both, alone))
  losses = np.asarray(losses_fn(params, both, True))[0]
  want = np.asarray(losses_fn(params, alone, True))[0]
  n = len(a) + 1  # b starts after a and its eot, at position 0 of its own segment
  np.testing.assert_allclose(losses[n:T], want[:T - n], rtol=1e-5)
  leaky = np.asarray(losses_fn(params, both, False))[0]  # one stream: b sees a
  assert not np.allclose(leaky[n:T], want[:T - n], rtol=1e-3)
