"""Every failure is one clear line and loses nothing: unsafe resumes are refused before
anything is written, damaged checkpoints are set aside and training falls back, failed
writes name the last good step, damaged caches are rebuilt, bad sweep input is one line,
and metrics.jsonl reads as if the run had never stopped."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

from model import store
from train.checkpoints import SaveFailed
from train.config_lib import ConfigError, load_config
from train.data import prepare_data
from train.metrics import read_metrics
from train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
STEPS = 6


def tiny(root, **overrides):
  return load_config("train/configs/tiny.py", {
      "num_steps": STEPS, "log_every": 1, "eval_every": STEPS, "checkpoint_every": 2,
      "keep_checkpoints": 5, "trackers": ("jsonl",),
      "data.cache_dir": os.path.join(root, "cache"), **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """STEPS steps in one go, checkpoints at 2, 4, 6."""
  root = str(tmp_path_factory.mktemp("straight"))
  workdir = os.path.join(root, "run")
  summary = train_and_evaluate(tiny(root), workdir)
  return root, workdir, summary


def copy_until(workdir, step, target):
  """A workdir holding `workdir`'s config and its checkpoints up to `step`."""
  os.makedirs(os.path.join(target, "checkpoints"))
  shutil.copy(os.path.join(workdir, "config.json"), target)
  for s in store.all_steps(workdir):
    if s <= step:
      shutil.copytree(os.path.join(workdir, "checkpoints", str(s)),
                      os.path.join(target, "checkpoints", str(s)))
  return target


def params_of(workdir, step=None):
  return jax.tree.map(np.asarray, store.load_params(workdir, step).params)


# ---- resuming safely ----------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    ({"model.d_model": 64}, "model.d_model=32 (this command: 64)"),
    ({"model.n_layers": 3}, "model.n_layers=2 (this command: 3)"),
    ({"tokenizer.kind": "sentencepiece"}, "tokenizer.kind='byte' (this command: 'sentencepiece')"),
    ({"data.seq_len": 16}, "data.seq_len=32 (this command: 16)"),
])
def test_a_resume_that_changes_weights_or_tokens_is_refused_before_writing(straight, tmp_path,
                                                                           change, named):
  root, workdir, _ = straight
  target = copy_until(workdir, 4, str(tmp_path / "run"))
  before = {name: open(os.path.join(target, name), "rb").read() for name in ("config.json",)}
  with pytest.raises(ConfigError, match="cannot resume") as info:
    train_and_evaluate(tiny(root, **change), target)
  assert named in str(info.value) and "another --workdir" in str(info.value)
  assert "\n" not in str(info.value)
  assert open(os.path.join(target, "config.json"), "rb").read() == before["config.json"]
  assert store.all_steps(target) == [2, 4]  # nothing trained, nothing saved


def test_resumable_keys_may_change(straight, tmp_path):
  root, workdir, _ = straight
  target = copy_until(workdir, 4, str(tmp_path / "run"))
  summary = train_and_evaluate(tiny(root, **{"num_steps": 8, "eval_every": 8,
                                             "optim.lr": 5e-3, "log_every": 2}), target)
  assert summary["step"] == 8
  assert store.read_config(target)["train"]["num_steps"] == 8  # rewritten after the restore


def test_a_workdir_without_a_training_run_is_not_resumed(straight, tmp_path):
  root, workdir, _ = straight
  imported = str(tmp_path / "imported")
  cfg = store.load_model_config(workdir)
  store.write_config(imported, cfg, store.ByteTokenizer(), source={"format": "huggingface"})
  with pytest.raises(ConfigError, match="not a training run to resume.*lora.py"):
    train_and_evaluate(tiny(root), imported)


def test_an_unwritable_workdir_is_one_line(straight, tmp_path, monkeypatch):
  root, _, _ = straight
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(store.WorkdirError, match="is a file, not a directory"):
    train_and_evaluate(tiny(root), str(afile))

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr("tempfile.TemporaryFile", read_only)
  with pytest.raises(store.WorkdirError, match="is not writable: Read-only file system"):
    train_and_evaluate(tiny(root), str(tmp_path / "ro"))


# ---- damaged checkpoints ------------------------------------------------------------------
def _truncate_params(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params"))
           for f in fs if "/d/" in os.path.join(d, f) + "/"]
  # Every data file: OCDBT may keep more than one, and one that the manifest no longer
  # references would damage nothing (the test would pass or fail by chance).
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty_data_metadata(step_dir):
  open(os.path.join(step_dir, "data", "metadata"), "w").close()


def _delete_opt_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "opt_state"))


@pytest.mark.parametrize("damage", [_truncate_params, _empty_data_metadata, _delete_opt_state])
def test_training_falls_back_to_the_newest_readable_checkpoint(straight, tmp_path, damage,
                                                               capsys):
  root, workdir, summary = straight
  target = copy_until(workdir, 4, str(tmp_path / "run"))
  damage(os.path.join(target, "checkpoints", "4"))
  again = train_and_evaluate(tiny(root), target)
  err = capsys.readouterr().err
  assert "checkpoint 4 of" in err and "is damaged" in err and "4.damaged" in err
  assert "resumed from" in err and err.count("Traceback") == 0
  assert os.path.isdir(os.path.join(target, "checkpoints", "4.damaged"))  # kept, not deleted
  assert again["step"] == STEPS and store.all_steps(target) == [2, 4, 6]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_of(workdir),
               params_of(target))  # the same run as if nothing had happened


def test_sampling_a_missing_or_damaged_step_is_one_line(straight, tmp_path):
  _, workdir, _ = straight
  target = copy_until(workdir, 4, str(tmp_path / "run"))

  def sample(*flags):
    return subprocess.run([sys.executable, "-m", "sample", f"--workdir={target}",
                           "--max_new_tokens=2", *flags], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)

  def error_lines(out):
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]

  assert error_lines(sample("--step=7")) == [
      f"error: workdir '{target}' has no checkpoint at step 7; its steps are [2, 4]"]
  _truncate_params(os.path.join(target, "checkpoints", "4"))
  (line,) = error_lines(sample())
  assert "checkpoint 4" in line and "item 'params' cannot be read" in line
  assert "complete steps: [2, 4]" in line
  assert sample("--step=2").returncode == 0


# ---- failed writes ------------------------------------------------------------------------
def test_a_failed_save_names_the_last_good_checkpoint(straight, tmp_path, monkeypatch):
  root, _, _ = straight
  save = ocp.CheckpointManager.save

  def disk_full_from_step_4(self, step, *args, **kwargs):
    if step >= 4:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 8045 "
                       "bytes to file 28: No space left on device [os_error_code='28']")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_from_step_4)
  target = str(tmp_path / "run")
  with pytest.raises(SaveFailed) as info:
    train_and_evaluate(tiny(root), target)
  message = str(info.value)
  assert "saving checkpoint 4" in message and "(No space left on device)" in message
  assert "the last good checkpoint is step 2" in message and "\n" not in message
  assert store.all_steps(target) == [2]


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True,
                   capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    pytest.skip("cannot mount a size-limited tmpfs here (needs root)")


def test_orbax_errors_are_dropped_also_when_asyncio_reports_them():
  """A failed save's write tasks are reported by asyncio when they are garbage-collected (at
  a moment that depends on the machine): those records are orbax's too and are dropped;
  other errors are kept."""
  store.quiet_orbax_errors()
  handler = absl_logging.get_absl_handler()

  def record(name, pathname, msg, level=logging.ERROR):
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)

  task = ("Task exception was never retrieved\nfuture: <Task finished coro=<async_serialize_"
          "from_host() done, defined at /venv/site-packages/orbax/checkpoint/_src/x.py:126>>")
  assert not handler.filter(record("asyncio", "/usr/lib/python3.11/asyncio/base_events.py",
                                   task))
  assert not handler.filter(record("absl", "/venv/site-packages/orbax/checkpoint/a.py", "x"))
  assert handler.filter(record("asyncio", "/usr/lib/asyncio/base_events.py", "other task"))
  assert handler.filter(record("absl", "/repo/train/trainer.py", "orbax", logging.WARNING))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_resumes(straight, tmp_path):
  """A real full disk (a 1 MB tmpfs) through the CLI: exit 3, one error line, no traceback;
  with room again, the same command resumes from the last good checkpoint."""
  root, _, _ = straight
  mount = str(tmp_path / "small")
  _mount_tmpfs(mount, "1m")
  try:
    cmd = [sys.executable, "-m", "train", "--config=train/configs/tiny.py",
           f"--workdir={mount}/run", f"--config.data.cache_dir={root}/cache",
           "--config.num_steps=40", "--config.checkpoint_every=4", "--config.keep_checkpoints=10",
           "--config.progress_bar=False"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    good = store.all_steps(f"{mount}/run")[-1]
    assert f"the last good checkpoint is step {good}" in errors[0]
    subprocess.run(["mount", "-o", "remount,size=30m", mount], check=True, timeout=30)
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {mount}/run/checkpoints/{good}" in out.stderr
  finally:
    subprocess.run(["umount", mount], timeout=30)


# ---- caches, sweeps, metrics --------------------------------------------------------------
def test_damaged_prepared_tokens_in_the_cache_are_rebuilt(straight, tmp_path, caplog):
  config = tiny(str(tmp_path))
  first = prepare_data(config, str(tmp_path / "a"))
  want = {split: getattr(first, split).stream.read(0, len(getattr(first, split).stream))
          for split in ("train", "val")}  # (read before the mapped files are cut)
  del first
  shards = [os.path.join(d, f) for d, _, fs in os.walk(str(tmp_path / "cache" / "prepared"))
            for f in fs if f.endswith(".tokens")]
  assert shards
  for path in shards:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level("WARNING"):
    again = prepare_data(config, str(tmp_path / "b"))
  assert not again.cache_hit and "are damaged" in caplog.text and "preparing them again" in (
      caplog.text)
  for split in ("train", "val"):
    got = getattr(again, split).stream
    np.testing.assert_array_equal(got.read(0, len(got)), want[split])


@pytest.mark.parametrize("args, says", [
    (["--sweep=nosuch"], "sweep file not found: 'experiments/sweeps/nosuch.py'; the sweeps"),
    (["--sweep=README.md"], "is not a Python file"),
    (["--sweep=smoke", "--only=nope"], "sweep 'smoke' has no run 'nope'"),
])
def test_bad_sweep_input_is_one_line(args, says, tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.sweep", *args,
                        f"--workdir={tmp_path}/sweep"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  (line,) = [x for x in out.stderr.splitlines() if x.strip()]
  assert line.startswith("error: ") and says in line


def test_rerunning_a_finished_run_adds_no_rows(straight, tmp_path):
  root, workdir, summary = straight
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target)
  rows = read_metrics(target)
  again = train_and_evaluate(tiny(root), target)
  assert read_metrics(target) == rows
  assert again["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_the_row_spanning_a_restart_averages_the_same_steps(tmp_path):
  """log_every=4 with a restart from step 2: the row at step 4 covers steps 1-4 as in an
  uninterrupted run (the open interval is carried in the checkpoint)."""
  root = str(tmp_path)
  settings = {"log_every": 4, "num_steps": 8, "eval_every": 8}
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_and_evaluate(tiny(root, **settings), straight_dir)
  copy_until(straight_dir, 2, resumed_dir)
  train_and_evaluate(tiny(root, **settings), resumed_dir)
  want = {r["step"]: r for r in read_metrics(straight_dir, "train")}
  got = {r["step"]: r for r in read_metrics(resumed_dir, "train")}
  assert sorted(want) == sorted(got) == [4, 8]
  for step in (4, 8):
    for key in ("loss", "grad_norm", "lr", "param_norm"):
      assert got[step][key] == pytest.approx(want[step][key], rel=2e-5), (step, key)
  with open(os.path.join(resumed_dir, "checkpoints", "2", "meta", "metadata")) as f:
    assert json.load(f)["interval"]["steps"] == 2


@pytest.mark.slow
def test_the_fault_harness_recovers_bit_for_bit(tmp_path):
  """python -m experiments.faults on a kill, a SIGTERM and a damaged checkpoint: every one
  recovered with the uninterrupted run's parameters, at most one error line each."""
  out_file = str(tmp_path / "faults.json")
  out = subprocess.run([sys.executable, "-m", "experiments.faults", "--kills=1", "--steps=12",
                        "--faults=kill,sigterm,deleted_opt_state", f"--out={out_file}"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(out_file) as f:
    rows = json.load(f)["rows"]
  assert sorted(r["fault"] for r in rows) == ["deleted_opt_state", "kill", "sigterm"]
  for row in rows:
    assert row["recovered"] and row["bitwise_equal"] and row["error_lines"] <= 1, row
