"""LoRA fine-tuning through the training CLI (train/configs/lora.py, train/finetune.py).

A base workdir of random params (written with train.workdir, as an import would
be) is fine-tuned on other text with `python -m train --config=train/configs/lora.py
--config.init_from=BASE`: the loss falls, only the adapters train (optimizer
state, gradients), the checkpoint's 'params' item is the base bit for bit, the
summary counts trainable vs total parameters exactly, a restart continues the
same run, `python -m sample` uses the adapters, an imported Hugging Face Llama
can be fine-tuned (and exported with the adapters merged), and bad settings
fail with a clear message before anything compiles.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import model
from model import store
from model.config import ModelConfig
from model.store import ByteTokenizer
from sample.generator import Generator
from train import finetune
from train.config_lib import ConfigError, load_config, model_section
from train.corpus import stdlib_root
from train.data import prepare_data
from train.metrics import read_metrics
from train.run import setup
from train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One device and a cheap XLA optimization level: the CLI run checks behaviour, not speed.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
BASE_CFG = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                       position="rope", norm="rmsnorm")
RANK = 4
N = 2  # steps before the restart; runs have 2N
PROMPT = "def "


def overrides(root, base, **extra):
  """A seconds-long LoRA run on the stdlib's email package (the base knows no text at all)."""
  return {"init_from": base, "num_steps": 2 * N, "batch_size": 8, "log_every": 1,
          "eval_every": 2 * N, "eval_batches": 2, "checkpoint_every": N, "keep_checkpoints": 5,
          "progress_bar": False, "trackers": ("jsonl",), "peak_flops": 1e11, "sample_tokens": 0,
          "data.seq_len": 32, "data.cache_dir": os.path.join(root, "cache"),
          "data.corpus": os.path.join(stdlib_root(), "email", "*.py"),
          "data.split_chunk_chars": 2000, "optim.lr": 3e-2, "optim.warmup_steps": 1,
          "model.lora_rank": RANK, **extra}


def cli_args(settings):
  return [f"--config.{k}={v}" for k, v in settings.items()]


def leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A workdir holding random params and the byte tokenizer at step 0."""
  workdir = str(tmp_path_factory.mktemp("base"))
  params = model.init(BASE_CFG, jax.random.PRNGKey(0))
  store.write_config(workdir, BASE_CFG, ByteTokenizer())
  store.save_params(workdir, params, step=0)
  return workdir, params


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
  """2N LoRA steps in one go, through the command line of the issue."""
  root = str(tmp_path_factory.mktemp("lora"))
  workdir = os.path.join(root, "run")
  settings = overrides(root, base[0])
  out = subprocess.run([sys.executable, "-m", "train", "--config=train/configs/lora.py",
                        f"--workdir={workdir}", *cli_args(settings)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return root, workdir, summary, out.stdout + out.stderr


def test_only_the_adapters_train_and_the_summary_counts_them(base, straight):
  base_dir, base_params = base
  _, workdir, summary, printed = straight
  # q, k, v, o (the default targets) of 2 layers: A [32, r] and B [r, 32] each.
  trainable = 2 * 4 * RANK * (32 + 32)
  total = sum(x.size for x in jax.tree.leaves(base_params)) + trainable
  assert summary["status"] == "completed" and summary["step"] == 2 * N
  assert (summary["trainable_params"], summary["total_params"]) == (trainable, total)
  assert summary["lora"] == {"rank": RANK, "alpha": 16.0, "targets": ["q", "k", "v", "o"]}
  assert summary["init_from"] == base_dir and summary["init_step"] == 0
  share = 100 * trainable / total
  assert f"LoRA : trainable {trainable:,} of {total:,} parameters ({share:.3f}%)" in printed
  # The loss on the new text falls from the base's (evaluated before the first step).
  evals = read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [0, 2 * N]
  assert summary["base_val_loss"] == evals[0]["val_loss"]
  assert evals[1]["val_loss"] < evals[0]["val_loss"] - 0.01
  # config.json: the base's architecture and tokenizer plus the LoRA fields
  config = store.read_config(workdir)
  assert ModelConfig.from_dict(config["model"]) == BASE_CFG.replace(
      lora_rank=RANK, lora_targets=("q", "k", "v", "o"))
  assert config["tokenizer"] == {"kind": "byte"}  # the base's, not config.tokenizer's
  assert config["init_from"] == {"workdir": base_dir, "step": 0}


def test_checkpoint_holds_the_base_bitwise_and_optimizer_state_for_adapters_only(base, straight):
  _, base_params = base
  _, workdir, summary, _ = straight
  assert store.checkpoint_items(workdir, 2 * N) >= {"params", "lora", "opt_state", "meta",
                                                    "data"}
  with store.checkpoint_manager(workdir) as mngr:
    opt_state = mngr.restore(2 * N, args=ocp.args.Composite(
        opt_state=ocp.args.StandardRestore()))["opt_state"]
  ckpt = store.restore(workdir, items=("params", "lora"))
  params, adapters = ckpt.items["params"], ckpt.items["lora"]
  assert ckpt.step == 2 * N and store.load_model_config(workdir).lora_rank == RANK
  for (path, want), (_, got) in zip(leaves(base_params), leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
  # The adapters moved (B starts at zero).
  assert all(np.abs(np.asarray(b)).max() > 0 for path, b in leaves(adapters)
             if path[-1].key == "b")
  # AdamW's two moments, one per adapter entry, and nothing for the base params.
  arrays = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in arrays) == 2 * summary["trainable_params"]
  assert sorted(np.shape(x) for x in arrays) == sorted(
      2 * [np.shape(x) for x in jax.tree.leaves(adapters)])


def test_restart_continues_the_same_run(base, straight, tmp_path):
  root, workdir, summary, _ = straight
  resumed = str(tmp_path / "resumed")
  os.makedirs(os.path.join(resumed, "checkpoints"))
  shutil.copy(os.path.join(workdir, "config.json"), resumed)
  shutil.copytree(os.path.join(workdir, "checkpoints", str(N)),
                  os.path.join(resumed, "checkpoints", str(N)))
  # The straight run had one device; this one has 8: the adapters are re-sharded on restore.
  again = train_and_evaluate(load_config("train/configs/lora.py", overrides(root, base[0])),
                             resumed)
  want = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}
  got = {r["step"]: r["loss"] for r in read_metrics(resumed, "train")}
  assert sorted(got) == list(range(N + 1, 2 * N + 1))  # it continued after step N
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)
  assert again["tokens_seen"] == summary["tokens_seen"]
  assert again["base_val_loss"] == summary["base_val_loss"]  # kept in the checkpoint's meta
  adapters_a = store.restore(workdir, items=("lora",)).items["lora"]
  adapters_b = store.restore(resumed, items=("lora",)).items["lora"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5),
               adapters_a, adapters_b)


def test_sample_cli_uses_the_adapters(base, straight):
  _, workdir, _, _ = straight
  # This process's XLA settings, so the sampled tokens can be compared with in-process ones.
  out = subprocess.run([sys.executable, "-m", "sample", f"--workdir={workdir}",
                        f"--prompt={PROMPT}", "--max_new_tokens=16", "--temperature=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  adapted = Generator.from_workdir(workdir)
  text = adapted.generate(PROMPT, 16, temperature=1.0)
  assert out.stdout.rstrip("\n") == PROMPT + text
  # The same frozen params without the adapters, same seed: another distribution, other text.
  assert text != Generator.from_workdir(base[0]).generate(PROMPT, 16, temperature=1.0)


def _llama_base(root, dtype=None):
  """A tiny random Hugging Face Llama imported with `model.hf` (tokenizer.json, pad 0)."""
  from model.hf.convert import import_to_workdir
  from tests import hf_testlib as lib

  hf_dir = lib.save(lib.hf_model("llama", seed=3), os.path.join(root, "hf"))
  lib.train_tokenizer(os.path.join(hf_dir, "tokenizer.json"))
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, f)
  workdir = os.path.join(root, "llama")
  import_to_workdir(hf_dir, workdir, dtype=dtype)
  texts = os.path.join(root, "texts")
  os.makedirs(texts)
  for i, line in enumerate(lib.CORPUS[:4]):
    with open(os.path.join(texts, f"{i}.txt"), "w") as f:
      f.write((line + "\n") * 12)
  return lib, workdir, texts


def test_an_imported_llama_is_fine_tuned_and_exported_merged(tmp_path):
  lib, base_dir, texts = _llama_base(str(tmp_path))
  workdir = str(tmp_path / "run")
  settings = overrides(str(tmp_path), base_dir, **{
      "num_steps": 3, "eval_every": 3, "checkpoint_every": 3, "data.corpus": texts,
      "data.split_chunk_chars": 100, "data.val_fraction": 0.25,
      "model.lora_targets": ("q", "v", "gate", "up", "down")})
  with pytest.raises(ConfigError, match=r"\['qkv'\] not a projection of the base model.*"
                                        r"'q', 'k', 'v', 'o', 'up', 'gate', 'down'"):
    train_and_evaluate(load_config("train/configs/lora.py", {
        **settings, "model.lora_targets": ("qkv",)}), workdir)
  summary = train_and_evaluate(load_config("train/configs/lora.py", settings), workdir)
  assert summary["status"] == "completed" and summary["val_loss"] < summary["base_val_loss"]
  config, base_config = store.read_config(workdir), store.read_config(base_dir)
  assert config["tokenizer"] == base_config["tokenizer"]  # reused, not retrained
  assert config["source"] == base_config["source"]  # the architecture and stop ids it exports
  with open(os.path.join(workdir, "tokenizer.json"), "rb") as a, \
      open(os.path.join(base_dir, "tokenizer.json"), "rb") as b:
    assert a.read() == b.read()
  # `python -m model.hf export` merges the adapters: the HF model gives the adapted logits.
  from model.hf.convert import export_workdir

  cfg = store.load_model_config(workdir)
  ckpt = store.restore(workdir, items=("params", "lora"))
  params, adapters = ckpt.items["params"], ckpt.items["lora"]
  out = str(tmp_path / "exported")
  assert export_workdir(workdir, out) == "LlamaForCausalLM"
  tokens_BT = lib.tokens()
  adapted, _ = model.apply(cfg, params, tokens_BT, lora=adapters)
  plain, _ = model.apply(cfg, params, tokens_BT)
  assert np.abs(np.asarray(adapted) - np.asarray(plain)).max() > 1e-3
  np.testing.assert_allclose(lib.logits(lib.reload("llama", out), tokens_BT), adapted,
                             atol=1e-4)


@pytest.mark.slow
def test_the_accelerator_config_tunes_float32_adapters_on_a_bfloat16_import(tmp_path):
  """finetune_accel.py (bfloat16 compute, remat, the platform's attention) on CPU: the base
  imported in bfloat16 stays as it was, the adapters and their moments are float32."""
  _, base_dir, texts = _llama_base(str(tmp_path), dtype="bfloat16")
  workdir = str(tmp_path / "run")
  settings = overrides(str(tmp_path), base_dir, **{
      "num_steps": 3, "eval_every": 3, "checkpoint_every": 3, "data.corpus": texts,
      "data.split_chunk_chars": 100, "data.val_fraction": 0.25, "data.seq_len": 32,
      "batch_size": 8, "mesh_shape": (1, -1, 1)})
  config = load_config("train/configs/finetune_accel.py", settings)
  summary = train_and_evaluate(config, workdir)
  assert summary["status"] == "completed" and summary["val_loss"] < summary["base_val_loss"]
  cfg = store.load_model_config(workdir)
  assert (cfg.dtype, cfg.param_dtype, cfg.remat, cfg.attention_impl) == (
      "bfloat16", "bfloat16", "full", "auto")
  ckpt = store.restore(workdir, items=("params", "lora"))
  with store.checkpoint_manager(workdir) as mngr:
    opt_state = mngr.restore(ckpt.step, args=ocp.args.Composite(
        opt_state=ocp.args.StandardRestore()))["opt_state"]
  assert {x.dtype.name for x in jax.tree.leaves(ckpt.items["params"])} == {"bfloat16"}
  assert {x.dtype.name for x in jax.tree.leaves(ckpt.items["lora"])} == {"float32"}
  assert {np.asarray(x).dtype.name for x in jax.tree.leaves(opt_state)
          if np.ndim(x) > 0} == {"float32"}  # AdamW's moments
  base = store.restore(base_dir, items=("params",)).items["params"]
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(ckpt.items["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base, bit for bit


def test_bad_settings_fail_clearly_before_anything_runs(base, tmp_path):
  base_dir, _ = base
  root = str(tmp_path)
  workdir = str(tmp_path / "run")

  def run(**changes):
    return train_and_evaluate(load_config("train/configs/lora.py",
                                          {**overrides(root, base_dir), **changes}), workdir)

  with pytest.raises(ConfigError, match="config.init_from='': is empty: a LoRA run"):
    load_config("train/configs/lora.py")
  with pytest.raises(ConfigError, match="model.lora_rank=0: must be > 0"):
    load_config("train/configs/lora.py", {"init_from": base_dir, "model.lora_rank": 0})
  with pytest.raises(ConfigError, match="unknown projection 'qq'"):
    load_config("train/configs/lora.py", {"init_from": base_dir,
                                          "model.lora_targets": ("q", "qq")})
  with pytest.raises(ConfigError, match=f"init_from='{root}/nowhere'.*does not exist"):
    run(init_from=f"{root}/nowhere")
  os.makedirs(f"{root}/empty")
  with pytest.raises(ConfigError, match="init_from=.*empty.*has no config.json"):
    run(init_from=f"{root}/empty")
  with pytest.raises(ConfigError, match=r"\['gate'\] not a projection of the base model"):
    run(**{"model.lora_targets": ("q", "gate")})  # the base's FFN is not gated
  with pytest.raises(ConfigError, match="d_model=64 would change the base model.*d_model=32"):
    run(**{"model.d_model": 64})
  with pytest.raises(ConfigError, match="is the run's own workdir"):
    run(init_from=workdir)
  assert store.latest_step(workdir) is None  # nothing was trained or saved


def test_a_lora_run_takes_the_sequence_length_of_its_base(base, tmp_path):
  """Unset, data.seq_len is the base run's (its config.json 'train' section); an imported base
  (no training run) gives min(256, max_seq_len)."""
  settings = overrides(str(tmp_path), base[0])
  del settings["data.seq_len"]
  run = setup(load_config("train/configs/lora.py", settings), str(tmp_path / "run"))
  run.checkpointer.close()
  assert run.config.data.seq_len == BASE_CFG.max_seq_len == 64
  trained = str(tmp_path / "trained")
  shutil.copytree(base[0], trained)
  store.write_config(trained, BASE_CFG, ByteTokenizer(), train={"data": {"seq_len": 16}})
  run = setup(load_config("train/configs/lora.py", {**settings, "init_from": trained}),
              str(tmp_path / "run2"))
  run.checkpointer.close()
  assert run.config.data.seq_len == 16
  assert store.read_config(str(tmp_path / "run2"))["train"]["data"]["seq_len"] == 16


def test_default_targets_are_the_attention_projections_the_base_has():
  section = model_section(None, lora_rank=RANK)
  fused = BASE_CFG.replace(fused_qkv=True, ffn="swiglu", fused_gate_up=True)
  assert finetune.adapted_config(fused, section, "x").lora_targets == ("qkv", "o")
  assert finetune.adapted_config(BASE_CFG, section, "x").lora_targets == ("q", "k", "v", "o")
  section.dropout_rate = 0.1  # runtime fields may change; the weights stay the base's
  assert finetune.adapted_config(BASE_CFG, section, "x").dropout_rate == 0.1


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path):
  """Imported tokenizers (GPT-2, Llama) often have no pad id; padding is outside the loss."""
  class NoPad(ByteTokenizer):
    pad_id = None

  config = load_config("train/configs/tiny.py", {"data.cache_dir": str(tmp_path / "cache")})
  data = prepare_data(config, str(tmp_path / "run"), tokenizer=NoPad())
  last = data.val.windows(np.array([len(data.val) - 1]))
  padded = last["loss_mask"][0] == 0
  assert padded.any() and (last["inputs"][0][padded] == NoPad.eos_id).all()
