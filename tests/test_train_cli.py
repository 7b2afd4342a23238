"""`python -m train` in a subprocess: bad keys fail before compiling, SIGTERM saves and exits,
the same command resumes and finishes, the summary says how to sample."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from absl import flags

from train import distributed
from train.config_lib import ConfigError, from_command_line, load_config, model_config
from train.metrics import read_metrics

# One device; a cheaper XLA optimization level: these runs check behaviour, not numbers.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}


def train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "train", "--config=train/configs/tiny.py", f"--workdir={workdir}",
          *overrides]


def test_unknown_keys_fail_before_anything_runs(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(train_cmd(workdir, "--config.optim.lrr=0.1"), env=ENV,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "unknown config key 'optim.lrr' (did you mean optim.lr" in result.stderr
  assert not workdir.exists()  # nothing was read, trained or written
  with pytest.raises(ConfigError, match="unknown config key 'model.n_layer'.*n_layers"):
    from_command_line(["--config=train/configs/tiny.py", "--config.model.n_layer=3"])
  with pytest.raises(ConfigError, match="unknown config key 'model.n_layer'.*n_layers"):
    load_config("train/configs/tiny.py", {"model.n_layer": 3})
  with pytest.raises(ConfigError, match="model: ModelConfig.n_heads=3"):
    load_config("train/configs/tiny.py", {"model.n_heads": 3})  # 32 % 3: validated up front
  with pytest.raises(ConfigError, match="batch_size.*divisible by grad_accum_steps=3"):
    load_config("train/configs/tiny.py", {"grad_accum_steps": 3})


def test_overrides_are_typed_like_the_command_line():
  config = from_command_line([
      "--config=train/configs/tiny.py", "--config.num_steps=7", "--config.optim.lr=1",
      "--config.data.document_masking=false", "--config.mesh_shape=(2,2,2)",
      "--config.model.preset=nanogpt-baby",
      "--config.model.attention_pattern=('global','local')", "--config.model.window_size=8"])
  assert config.num_steps == 7 and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.data.document_masking is False and tuple(config.mesh_shape) == (2, 2, 2)
  assert config.model.attention_pattern == ("global", "local")
  cfg = model_config(config, vocab_size=259)
  assert (cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.window_size) == (2, 32, 259, 8)
  # The one nested ModelConfig field, as a dict on the command line and from Python.
  scaling = ("{'factor': 8, 'low_freq_factor': 1, 'high_freq_factor': 4, "
             "'original_max_position_embeddings': 64}")
  config = from_command_line(["--config=train/configs/tiny.py", "--config.model.position=rope",
                              f"--config.model.rope_scaling={scaling}"])
  assert model_config(config).rope_scaling.original_max_position_embeddings == 64
  config = load_config("train/configs/tiny.py", {"model.position": "rope", "model.rope_scaling": {
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32}})
  assert model_config(config).rope_scaling.factor == 8.0
  with pytest.raises(ConfigError, match="rope_scaling.*missing key"):
    load_config("train/configs/tiny.py", {"model.position": "rope",
                                          "model.rope_scaling": {"factor": 8.0}})


def test_multi_process_flags_are_checked(monkeypatch, tmp_path):
  for key in list(os.environ):  # no cluster around (the test may itself run under SLURM)
    if key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_")):
      monkeypatch.delenv(key)

  def parsed(*args):
    values = flags.FlagValues()
    distributed.define_flags(values)
    values(["train", *args])
    return values

  assert distributed.initialize(parsed()) is False  # one process: nothing to join
  with pytest.raises(distributed.DistributedError, match="together, or --distributed"):
    distributed.initialize(parsed("--num_processes=2", "--process_id=0"))
  # jax.distributed.initialize must run before any JAX backend starts: in a fresh process.
  env = {k: v for k, v in ENV.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_"))}
  result = subprocess.run([sys.executable, "-m", "train", "--distributed",
                           "--config=train/configs/tiny.py", f"--workdir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert re.search("coordinator_address should be defined.*no TPU pod, SLURM", result.stderr)
  assert not os.listdir(tmp_path)  # nothing written


def test_help_prints_usage_and_the_configs():
  result = subprocess.run([sys.executable, "-m", "train", "--help"], env=ENV,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--config.a.b=value" in result.stdout and "Exit status" in result.stdout
  for name, doc in (("tiny.py", "A seconds-long run"), ("lora.py", "LoRA fine-tuning")):
    assert f"train/configs/{name}" in result.stdout and doc in result.stdout


def test_the_config_file_runs_once(tmp_path):
  calls = tmp_path / "calls"
  config_file = tmp_path / "counted.py"
  config_file.write_text(
      "from train.configs import tiny\n\n"
      "def get_config():\n"
      f"  with open({str(calls)!r}, 'a') as f:\n"
      "    f.write('x')\n"
      "  return tiny.get_config()\n")
  config = from_command_line([f"--config={config_file}", "--config.num_steps=3",
                              "--config.model.n_layers=1"])
  assert (config.num_steps, config.model.n_layers) == (3, 1)
  assert calls.read_text() == "x"


@pytest.mark.slow
def test_sigterm_saves_then_the_same_command_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = train_cmd(workdir, "--config.num_steps=100000", "--config.log_every=1",
                  "--config.eval_every=100000", "--config.checkpoint_every=100000",
                  f"--config.data.cache_dir={tmp_path}/cache")
  proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 240
  while not read_metrics(str(workdir), "train") and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
  assert "interrupted by SIGTERM" in out and "rerun the same command to resume" in out
  with open(workdir / "summary.json") as f:
    stopped = json.load(f)
  assert stopped["checkpoint_step"] == stopped["step"] > 0  # saved where it stopped

  # The same command with a reachable end resumes from that checkpoint and finishes,
  # sampling a little text at the final eval.
  end = stopped["step"] + 2
  cmd = [c.replace("num_steps=100000", f"num_steps={end}").replace(
      "eval_every=100000", f"eval_every={end}") for c in cmd] + ["--config.sample_tokens=8"]
  result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resumed from {workdir}/checkpoints/{stopped['step']}" in result.stderr
  train_steps = [r["step"] for r in read_metrics(str(workdir), "train")]
  assert train_steps[-2:] == [end - 1, end] and len(set(train_steps)) == len(train_steps)
  (sample,) = read_metrics(str(workdir), "sample")
  assert sample["text"].startswith("def ")
  for words in ("validation loss", "bits per byte", "tokens/s", "MFU",
                f"checkpoints/{end}", f"python -m sample --workdir={workdir} --prompt='def '"):
    assert words in result.stderr, words
