"""`python -m train.evaluate`: loss, perplexity and bits per byte of any workdir on any text.

On a tiny trained workdir the evaluation of its validation split equals the trainer's own
last eval row (same windows, same eval step), an older --step gives that step's model, a
text file is scored through --corpus, a missing step is one error line listing the steps,
and each evaluation appends an eval row. A LoRA workdir evaluates with its adapters merged;
an imported random GPT-2 scores a text with the loss that transformers computes. The bytes
behind bits per byte are exact: per-token byte lengths sum to the UTF-8 length of the text
for the byte, sentencepiece and Hugging Face byte-level tokenizers.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import model
from model import lora as lora_lib
from model import store
from model.config import ModelConfig
from model.store import ByteTokenizer
from train import evaluate as ev
from train import tokenizer as tok_lib
from train.config_lib import load_config
from train.metrics import read_metrics
from train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
STEPS = 4
TEXT = ("Les élèves étudient à Zürich — naïve café, 日本語 and emoji 🙂.\n"
        "The quick brown fox jumps over the lazy dog; Paris is the capital of France.\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("evaluate"))
  workdir = os.path.join(root, "run")
  train_and_evaluate(load_config("train/configs/tiny.py", {
      "num_steps": STEPS, "eval_every": STEPS, "checkpoint_every": 2, "keep_checkpoints": 5,
      "trackers": ("jsonl",), "data.cache_dir": os.path.join(root, "cache")}), workdir)
  text = os.path.join(root, "text.txt")
  with open(text, "w") as f:
    f.write(TEXT * 3)
  return workdir, text


def cli(*args):
  return subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_validation_loss_equals_the_trainers_last_eval_and_is_recorded(trained):
  workdir, _ = trained
  (last,) = [r for r in read_metrics(workdir, "eval") if "evaluated_by" not in r]
  assert last["step"] == STEPS
  before = len(read_metrics(workdir, "eval"))
  row = ev.evaluate(workdir)
  assert row["step"] == STEPS and row["corpus"] == "validation"
  assert row["val_tokens"] == last["val_tokens"] and row["val_bytes"] == last["val_bytes"]
  for key in ("val_loss", "val_ppl", "val_bpb"):
    assert row[key] == pytest.approx(last[key], rel=1e-5), key
  rows = read_metrics(workdir, "eval")
  assert len(rows) == before + 1
  assert rows[-1]["evaluated_by"] == "train.evaluate" and rows[-1]["step"] == STEPS
  assert rows[-1]["val_loss"] == pytest.approx(row["val_loss"])
  # An older checkpoint is another model.
  older = ev.evaluate(workdir, step=2, record=False)
  assert older["step"] == 2 and older["val_loss"] != pytest.approx(row["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_cli_scores_a_text_file_and_appends_its_row(trained):
  workdir, text = trained
  out = cli(f"--workdir={workdir}", f"--corpus={text}", "--step=2", "--batch_size=2")
  assert out.returncode == 0, out.stderr[-3000:]
  row = read_metrics(workdir, "eval")[-1]
  assert row["corpus"] == text and row["step"] == 2
  # Every byte is a target but the first (nothing before it to predict it from).
  assert row["val_bytes"] == len((TEXT * 3).encode()) - 1
  assert f"bits per byte {row['val_bpb']:.4f}" in out.stdout
  assert f"loss {row['val_loss']:.4f} nats/token" in out.stdout


@pytest.mark.slow
def test_a_missing_step_is_one_error_line(trained):
  workdir, _ = trained
  out = cli(f"--workdir={workdir}", "--step=3")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: --step=3: workdir {workdir} has no checkpoint at that step; available steps: "
      "2, 4"]


@pytest.mark.slow
def test_a_lora_workdir_is_evaluated_with_its_adapters_merged(tmp_path, monkeypatch):
  monkeypatch.setenv("TRANSFORMER_LAB_CACHE", str(tmp_path / "cache"))
  text = str(tmp_path / "text.txt")
  with open(text, "w") as f:
    f.write(TEXT * 4)
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                    position="rope", norm="rmsnorm", lora_rank=4, lora_targets=("q", "v"))
  params = model.init(lora_lib.without_lora(cfg), jax.random.PRNGKey(0))
  adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                          model.init_lora(cfg, jax.random.PRNGKey(2)))  # B != 0: it matters
  dirs = {}
  for name, c, p, lora in (("lora", cfg, params, adapters),
                           ("merged", lora_lib.without_lora(cfg),
                            lora_lib.merge(cfg, params, adapters), None),
                           ("base", lora_lib.without_lora(cfg), params, None)):
    dirs[name] = str(tmp_path / name)
    store.write_config(dirs[name], c, ByteTokenizer())
    store.save_params(dirs[name], p, step=0, lora=lora)
  losses = {name: ev.evaluate(d, corpus=text, batch_size=8) for name, d in dirs.items()}
  assert losses["lora"]["adapted"] and not losses["merged"]["adapted"]
  assert losses["lora"]["val_loss"] == pytest.approx(losses["merged"]["val_loss"], rel=1e-5)
  assert abs(losses["lora"]["val_loss"] - losses["base"]["val_loss"]) > 1e-3


@pytest.mark.slow
def test_an_imported_gpt2_scores_text_like_transformers(tmp_path, monkeypatch):
  import torch

  from model.hf.convert import import_to_workdir
  from tests import hf_testlib as lib

  monkeypatch.setenv("TRANSFORMER_LAB_CACHE", str(tmp_path / "cache"))
  hf = lib.hf_model("gpt2", seed=3)
  hf_dir = lib.save(hf, str(tmp_path / "hf"))
  lib.train_tokenizer(os.path.join(hf_dir, "tokenizer.json"))
  workdir = str(tmp_path / "gpt2")
  import_to_workdir(hf_dir, workdir)
  line = "Paris is the capital of France — café naïve."
  text = str(tmp_path / "line.txt")
  with open(text, "w") as f:
    f.write(line)
  with pytest.raises(ev.EvaluateError, match="imported model.*pass --corpus"):
    ev.evaluate(workdir)
  row = ev.evaluate(workdir, corpus=text, batch_size=8)
  tokenizer = store.load_tokenizer(workdir)
  ids = tokenizer.encode(line) + [tokenizer.eos_id]  # one document, then end of text
  assert row["val_tokens"] == len(ids) - 1  # targets: every token after the first, and eot
  assert row["val_bytes"] == len(tokenizer.decode(ids[1:-1]).encode())
  with torch.no_grad():
    logits = hf(torch.tensor([ids[:-1]])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
  assert row["val_loss"] == pytest.approx(expected, rel=1e-4)
  assert row["val_bpb"] == pytest.approx(expected * (len(ids) - 1) / np.log(2)
                                         / row["val_bytes"], rel=1e-4)


def test_token_byte_lengths_sum_to_the_utf8_length_of_the_text(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  sp = tok_lib.train_sentencepiece([TEXT[:60] * 5, "plain ascii words " * 20],
                                   str(tmp_path / "sp.model"), vocab_size=300)
  bpe = Tokenizer(models.BPE())  # byte-level BPE as GPT-2's: every byte has a token
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([TEXT[:40], "plain ascii words"], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(tmp_path / "tokenizer.json"))
  hf = store.HFTokenizer(str(tmp_path / "tokenizer.json"), eos_id=0)
  for tokenizer in (ByteTokenizer(), sp, hf):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    lengths = tok_lib.token_byte_lengths(tokenizer)
    assert int(lengths[ids].sum()) == len(TEXT.encode()), type(tokenizer).__name__
    assert lengths[tokenizer.eos_id] == 0
