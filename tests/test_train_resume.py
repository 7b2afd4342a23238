"""Whole runs through train_and_evaluate: the outputs' contract, resume == uninterrupted (on a
different mesh), divergence keeps the last good checkpoint, a crashed save leaves the previous
checkpoint intact, and two processes (jax.distributed, gloo) match one."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import store
from train.checkpoints import Checkpointer, SaveFailed
from train.config_lib import load_config
from train.metrics import read_metrics
from train.state import TrainState
from train.trainer import TrainingDiverged, train_and_evaluate

N = 3  # steps before the restart; runs have 2N


def tiny(tmp_root, **overrides):
  return load_config("train/configs/tiny.py", {
      "num_steps": 2 * N, "log_every": 1, "eval_every": 2 * N, "checkpoint_every": N,
      "keep_checkpoints": 5, "data.cache_dir": os.path.join(tmp_root, "cache"), **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """2N steps in one go on the default mesh (all 8 devices on 'data')."""
  root = str(tmp_path_factory.mktemp("straight"))
  workdir = os.path.join(root, "run")
  summary = train_and_evaluate(tiny(root), workdir)
  return root, workdir, summary


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


def restart_from(workdir, step, new_workdir):
  """A workdir holding only what `workdir` had after step `step` (a crash right after it)."""
  os.makedirs(os.path.join(new_workdir, "checkpoints"))
  shutil.copy(os.path.join(workdir, "config.json"), new_workdir)
  shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                  os.path.join(new_workdir, "checkpoints", str(step)))


def test_run_outputs_follow_the_contract(straight):
  _, workdir, summary = straight
  for key in ("step", "tokens_seen", "train_loss", "val_loss", "val_bpb", "best_val_loss",
              "tokens_per_sec", "mfu", "wall_time_s", "checkpoint_dir", "n_params",
              "n_params_non_embedding", "flops_per_token"):
    assert key in summary, key
  assert summary["status"] == "completed" and summary["step"] == 2 * N
  assert summary["tokens_seen"] == 2 * N * 8 * 32
  assert summary["val_loss"] < np.log(259)  # better than uniform over the byte vocabulary
  train = read_metrics(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 2 * N + 1))
  for record in train:
    for key in ("loss", "lr", "grad_norm", "param_norm", "tokens_seen", "tokens_per_sec",
                "step_time_s", "mfu"):
      assert key in record
  (evaluation,) = read_metrics(workdir, "eval")
  assert {"val_loss", "val_ppl", "val_bpb"} <= set(evaluation)
  # Bytes: one per byte token, none for the eot that ends each document.
  assert 0 < evaluation["val_tokens"] - evaluation["val_bytes"] < evaluation["val_tokens"] / 50
  assert evaluation["val_bpb"] == pytest.approx(
      evaluation["val_loss"] * evaluation["val_tokens"] / evaluation["val_bytes"] / np.log(2))
  assert read_metrics(workdir, "summary")[0]["val_loss"] == summary["val_loss"]
  config = store.read_config(workdir)
  assert set(config) >= {"model", "tokenizer", "train"}
  assert config["tokenizer"] == {"kind": "byte"} and config["train"]["num_steps"] == 2 * N
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert store.latest_step(workdir) == 2 * N
  loaded = store.load_params(workdir)  # what sample/ reads
  assert loaded.step == 2 * N and loaded.cfg.vocab_size == 259 and "layers" in loaded.params


def test_resume_on_another_mesh_equals_the_straight_run(straight, tmp_path):
  root, workdir, summary = straight
  resumed = str(tmp_path / "resumed")
  restart_from(workdir, N, resumed)
  # The straight run used mesh (8, 1, 1); continue on (2, 2, 2): params are re-sharded on restore.
  again = train_and_evaluate(tiny(root, mesh_shape=(2, 2, 2)), resumed)
  want, got = losses(workdir), losses(resumed)
  assert sorted(got) == list(range(N + 1, 2 * N + 1))  # it continued after step N
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)
  assert again["val_loss"] == pytest.approx(summary["val_loss"], rel=2e-5)
  assert again["tokens_seen"] == summary["tokens_seen"]
  params_a, params_b = store.load_params(workdir).params, store.load_params(resumed).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5),
               params_a, params_b)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(straight, tmp_path):
  root, workdir, _ = straight
  diverging = str(tmp_path / "diverging")
  restart_from(workdir, N, diverging)
  config = tiny(root, **{"optim.lr": 1e38, "optim.schedule": "constant",
                         "optim.warmup_steps": 0})
  with pytest.raises(TrainingDiverged, match=f"non-finite.*last good checkpoint is step {N}"):
    train_and_evaluate(config, diverging)
  assert store.latest_step(diverging) == N
  good, kept = store.load_params(workdir, step=N).params, store.load_params(diverging).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               good, kept)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
  def state(value):
    return TrainState(step=jnp.asarray(value, jnp.int32), params={"w": jnp.full(4, value, float)},
                      opt_state={"mu": jnp.zeros(4)}, rng=jax.random.PRNGKey(0))

  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(state(1), data_state={"next_index": 1}, meta={})
  with pytest.raises(SaveFailed, match="checkpoint 2 .* failed .*last good checkpoint is step 1"):
    # dies half-way: params written, the data item is not JSON
    ckpt.save(state(2), data_state={"next_index": object()}, meta={})
  ckpt.close()
  # A save killed from outside leaves a temporary directory like this one behind.
  os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234" / "params")
  assert store.latest_step(str(tmp_path)) == 1
  again = Checkpointer(str(tmp_path), keep=1, async_save=False)
  abstract = jax.eval_shape(lambda: state(0))
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                           abstract)
  restored, data_state, meta = again.restore(abstract, shardings)
  assert int(restored.step) == 1 and data_state == {"next_index": 1} and meta["step"] == 1
  np.testing.assert_array_equal(restored.params["w"], np.ones(4))
  again.close()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_flags(launch, port, process_id):
  """(extra flags, extra environment) of process `process_id` of 2."""
  if launch == "flags":
    return [f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={process_id}"], {}
  # `srun -n 2` on one node sets these; jax.distributed's auto-detection reads them.
  return ["--distributed"], {
      "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
      "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id),
      "JAX_COORDINATOR_PORT": str(port)}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["flags", "slurm"])
def test_two_processes_match_one(straight, tmp_path, launch):
  """`python -m train` as 2 processes x 4 devices == 1 process x 8 devices, launched with the
  explicit flags or with --distributed in a (simulated) SLURM step; process 0 alone writes the
  metrics and config, every process writes its shards of the checkpoint."""
  root, workdir, _ = straight
  multi = str(tmp_path / "multi")
  port = _free_port()
  # The same XLA flags as this process (none of train/xla_flags.py), so the numbers agree.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "TRANSFORMER_LAB_NO_XLA_FLAGS": "1"}
  for key in list(env):  # the test may itself run under SLURM
    if key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR")):
      del env[key]
  args = [sys.executable, "-m", "train", "--config=train/configs/tiny.py", f"--workdir={multi}",
          f"--config.num_steps={2 * N}", "--config.log_every=1", f"--config.eval_every={2 * N}",
          f"--config.checkpoint_every={N}", f"--config.data.cache_dir={root}/cache"]
  procs = []
  for i in range(2):
    extra_flags, extra_env = _launch_flags(launch, port, i)
    procs.append(subprocess.Popen(args + extra_flags, env={**env, **extra_env},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  want, got = losses(workdir), losses(multi)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=2e-5)
  with open(os.path.join(multi, "summary.json")) as f:
    assert json.load(f)["devices"] == 8
  train_rows = [r["step"] for r in read_metrics(multi, "train")]
  assert train_rows == sorted(set(train_rows))  # one writer: no step logged twice
  assert "training summary" in outputs[0] and "training summary" not in outputs[1]
  params_dir = os.path.join(multi, "checkpoints", str(2 * N), "params")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(params_dir))
