"""Mixed precision: bfloat16 compute with float32 master params, optimizer state, logits and
loss; a bfloat16 run tracks the float32 run of the same seed and data over 50 steps."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from tests.conftest import tiny_config
from train import state as state_lib
from train.config_lib import load_config, model_config
from train.metrics import read_metrics
from train.optimizer import make_optimizer
from train.tasks import LoraFinetune, Pretrain, cross_entropy
from train.trainer import train_and_evaluate

STEPS = 50


def dtypes(tree) -> set[str]:
  return {jnp.dtype(x.dtype).name for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tiny config trained 50 steps in float32 and in bfloat16: same seed, same batches."""
  root = str(tmp_path_factory.mktemp("precision"))
  out = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("train/configs/tiny.py", {
        "num_steps": STEPS, "log_every": 1, "eval_every": STEPS, "checkpoint_every": STEPS,
        "trackers": ("jsonl",), "async_checkpoints": False, "model.dtype": dtype,
        "data.cache_dir": os.path.join(root, "cache")})
    workdir = os.path.join(root, dtype)
    summary = train_and_evaluate(config, workdir)
    losses = np.array([r["loss"] for r in read_metrics(workdir, "train")])
    params = model.store.load_params(workdir).params
    out[dtype] = summary, losses, params
  return out


@pytest.mark.slow
def test_bfloat16_run_tracks_the_float32_run(runs):
  _, f32, _ = runs["float32"]
  _, bf16, _ = runs["bfloat16"]
  assert len(f32) == len(bf16) == STEPS
  assert f32[-1] < f32[0] - 1.0  # a real trajectory: the loss falls by more than a nat
  # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operation). With float32
  # masters, moments, logits and loss, the runs differ only by rounding in the bfloat16
  # matmuls: 1e-4 nats in the first steps, growing as the trajectories part; measured here
  # mean 0.003 and max 0.048 nats (one noisy batch late in the run), the final loss 0.08%
  # apart. The bounds leave 2x room over that.
  gap = np.abs(bf16 - f32)
  print(f"bfloat16 vs float32 over {STEPS} steps: max gap {gap.max():.4f}, mean "
        f"{gap.mean():.4f} nats; final losses {f32[-1]:.4f} vs {bf16[-1]:.4f}")
  assert gap.max() < 0.1, gap
  assert gap.mean() < 0.01, gap
  assert abs(bf16[-1] - f32[-1]) < 0.02 * f32[-1]
  assert gap.max() > 0  # and the bfloat16 run really computed in bfloat16


@pytest.mark.slow
def test_bfloat16_run_checkpoints_float32_params(runs):
  assert dtypes(runs["bfloat16"][2]) == {"float32"}


def test_bfloat16_compute_keeps_float32_params_state_logits_loss_and_gradients():
  cfg = tiny_config(dtype="bfloat16")
  mesh = model.sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = make_optimizer(load_config("train/configs/tiny.py").optim, 10)
  task = Pretrain(cfg)
  state = state_lib.create_state(task, tx, mesh, jax.random.PRNGKey(0),
                                 state_lib.state_shardings(task, tx, mesh)[1])
  assert dtypes(state.params) == {"float32"}
  assert dtypes(state.opt_state) == {"float32", "int32"}  # mu, nu; the step count
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size
  batch = {"inputs": tokens, "targets": tokens, "positions": None, "segment_ids": None}
  logits_BTV = jax.eval_shape(lambda p: model.apply(cfg, p, tokens)[0], state.params)
  assert logits_BTV.dtype == jnp.float32
  loss_fn = lambda p: cross_entropy(cfg, p, batch, document_masking=False).mean()  # noqa: E731
  loss, grads = jax.eval_shape(jax.value_and_grad(loss_fn), state.params)
  assert loss.dtype == jnp.float32 and dtypes(grads) == {"float32"}


def test_lora_adapters_are_float32_masters_on_a_bfloat16_base():
  base = tiny_config(dtype="bfloat16", param_dtype="bfloat16")
  cfg = base.replace(lora_rank=2, lora_targets=("q", "v"))
  params = model.abstract_params(base)
  assert dtypes(params) == {"bfloat16"}  # the frozen base may stay bfloat16: it never updates
  task = LoraFinetune(cfg, params)
  tx = make_optimizer(load_config("train/configs/tiny.py").optim, 10)
  state = jax.eval_shape(lambda: state_lib.init_state(task, tx, jax.random.PRNGKey(1)))
  assert dtypes(state.params) == {"float32"}
  assert dtypes(state.opt_state) == {"float32", "int32"}
  assert dtypes(model.abstract_params(cfg, "lora")) == {"float32"}


@pytest.mark.parametrize("path, settings", [
    ("train/configs/gpt2_small.py", {}),
    ("train/configs/finetune_accel.py", {"init_from": "runs/base"})])
def test_accelerator_configs_compute_in_bfloat16_on_float32_masters(path, settings):
  config = load_config(path, settings)
  assert config.model.dtype == "bfloat16"
  assert config.model.param_dtype in (None, "float32")
  if config.model.preset:
    cfg = model_config(config, vocab_size=320)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")

