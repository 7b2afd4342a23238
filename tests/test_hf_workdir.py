"""Imported models in workdirs: the CLI, the tokenizer, the sampler and the next-token demo.

The HF directories here carry a tiny byte-level BPE tokenizer.json trained in
the test, so text goes in and out exactly as it would with a downloaded
checkpoint.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import model
import model.hf
from model import store
from model.hf.convert import import_to_workdir
from model.hf.tokenizer import install_tokenizer, special_ids
from sample.engine import generate_ids
from sample.generator import Generator
from tests import hf_testlib as lib
from train.tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is"
TEXT = "To be, or not to be; Paris is the capital of France."
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{arch: HF directory with weights, config, tokenizer.json (+ tokenizer_config.json)}."""
  root = tmp_path_factory.mktemp("hf")
  tok = lib.train_tokenizer(str(root / "tokenizer.json"))
  dirs = {}
  for arch in lib.MODEL_CLASSES:
    path = lib.save(lib.hf_model(arch, seed=3), str(root / arch))
    tok.save(os.path.join(path, "tokenizer.json"))
    if arch != "gpt2":  # Llama-style: prepend <s>, stop at </s>
      with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, f)
    dirs[arch] = path
  return dirs


def run(*args):
  out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_cli_import_makes_a_workdir_that_sample_runs_on_text(hf_dirs, tmp_path):
  workdir = str(tmp_path / "runs" / "llama")
  printed = run("-m", "model.hf", "import", f"--hf_dir={hf_dirs['llama']}",
                f"--workdir={workdir}")
  assert "imported" in printed
  config = store.read_config(workdir)
  assert config["source"]["architecture"] == "LlamaForCausalLM"
  assert config["source"]["hf_dir"] == os.path.abspath(hf_dirs["llama"])
  assert config["tokenizer"] == {"kind": "huggingface", "file": "tokenizer.json", "bos_id": 1,
                                 "eos_id": 2, "pad_id": 0, "add_bos": True}
  loaded = store.load_params(workdir)
  assert loaded.cfg == model.hf.load_config(hf_dirs["llama"]) and loaded.step == 0
  assert not loaded.adapted
  # `python -m sample` continues the prompt from the imported workdir
  sampled = run("-m", "sample", f"--workdir={workdir}", f"--prompt={PROMPT}",
                "--max_new_tokens=8", "--temperature=0")
  gen = Generator.from_workdir(workdir)
  assert sampled.rstrip("\n") == PROMPT + gen.generate(PROMPT, 8)
  # bad input: one line naming the problem, exit status 1, no traceback
  failed = subprocess.run([sys.executable, "-m", "model.hf", "import", f"--hf_dir={tmp_path}",
                           f"--workdir={tmp_path / 'other'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert failed.returncode == 1 and "Traceback" not in failed.stderr
  assert f"error: {tmp_path}/config.json does not exist" in failed.stderr


def fake_hub_cache(cache, repo_id: str, src: str) -> str:
  """A Hugging Face hub cache at `cache` holding the directory src as repo_id's main revision,
  in huggingface_hub's layout: models--ORG--NAME/refs/main names a commit and
  models--ORG--NAME/snapshots/<commit>/ holds the files. Returns the snapshot directory."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / commit
  shutil.copytree(src, snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  return str(snapshot)


def test_cli_import_by_hub_id_from_the_local_cache_offline(hf_dirs, tmp_path):
  """--hf_dir=ORG/NAME with HF_HUB_OFFLINE=1 takes the model from the local HF cache (here a
  tiny random Llama 3 with its llama3 RoPE scaling); an id that is not cached is one line."""
  hf = lib.hf_model("llama", seed=3, **lib.LLAMA3)
  src = lib.save(hf, str(tmp_path / "src"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(hf_dirs["llama"], name), src)
  home = tmp_path / "hf_home"
  snapshot = fake_hub_cache(home / "hub", "tiny-org/Tiny-Llama-3", src)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
         "HF_HUB_CACHE": str(home / "hub")}
  workdir = str(tmp_path / "runs" / "llama3")
  out = subprocess.run([sys.executable, "-m", "model.hf", "import",
                        "--hf_dir=tiny-org/Tiny-Llama-3", f"--workdir={workdir}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  source = store.read_config(workdir)["source"]
  assert (source["hub_id"], source["hf_dir"]) == ("tiny-org/Tiny-Llama-3", snapshot)
  loaded = store.load_params(workdir)
  assert loaded.cfg.rope_scaling.original_max_position_embeddings == 32
  logits_BTV, _ = lib.forward(loaded.cfg, loaded.params, lib.tokens())
  assert np.abs(np.asarray(logits_BTV) - lib.logits(hf, lib.tokens())).max() <= 1e-4

  failed = subprocess.run([sys.executable, "-m", "model.hf", "import",
                           "--hf_dir=tiny-org/Not-Cached", f"--workdir={tmp_path / 'other'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
  assert failed.stderr.strip().splitlines() == [
      "error: 'tiny-org/Not-Cached' is not a local directory, the Hugging Face hub is switched "
      f"off (HF_HUB_OFFLINE=1), and the model is not in the local HF cache {home / 'hub'}: "
      "download it where the hub is reachable (hf download tiny-org/Not-Cached) or pass its "
      "directory"]
  assert not os.path.exists(tmp_path / "other")


def test_tokenizer_round_trips_text_through_the_workdir(hf_dirs, tmp_path):
  from tokenizers import Tokenizer

  reference = Tokenizer.from_file(os.path.join(hf_dirs["llama"], "tokenizer.json"))
  tok, stop_ids = install_tokenizer(hf_dirs["llama"], str(tmp_path))
  assert os.path.exists(tmp_path / "tokenizer.json") and stop_ids == [2]
  ids = tok.encode(TEXT)
  assert ids == [lib.BOS] + reference.encode(TEXT).ids  # add_bos_token, as HF does
  assert tok.decode(ids[1:]) == TEXT


def test_gpt2_vocab_and_merges_files_become_the_same_tokenizer(hf_dirs, tmp_path):
  """Old GPT-2 directories have vocab.json + merges.txt but no tokenizer.json."""
  from tokenizers import Tokenizer

  reference = Tokenizer.from_file(os.path.join(hf_dirs["gpt2"], "tokenizer.json"))
  old_style = tmp_path / "old"
  os.makedirs(old_style)
  reference.model.save(str(old_style))  # writes vocab.json and merges.txt
  (old_style / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
  tok, _ = install_tokenizer(str(old_style), str(tmp_path / "workdir"))
  assert tok.encode(TEXT) == reference.encode(TEXT).ids
  assert tok.decode(tok.encode(TEXT)) == TEXT
  assert tok.encode("a<|endoftext|>b") == reference.encode("a<|endoftext|>b").ids
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 0, False)


def test_sentencepiece_tokenizer_model_is_installed(tmp_path):
  """A directory with only tokenizer.model (older Llama/Mistral uploads)."""
  hf_dir = tmp_path / "sp"
  trained = train_sentencepiece(lib.CORPUS, str(hf_dir / "tokenizer.model"), vocab_size=300)
  (hf_dir / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 3}))
  tok, stop_ids = install_tokenizer(str(hf_dir), str(tmp_path / "workdir"))
  assert isinstance(tok, store.SentencePieceTokenizer) and stop_ids == [3]
  assert os.path.exists(tmp_path / "workdir" / "tokenizer.model")
  assert tok.encode(TEXT) == trained.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT


def test_special_ids_follow_generation_config_then_config_then_tokenizer_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"pad_token": {"content": "<pad>"}, "bos_token": "<x>"}))
  ids = special_ids(str(tmp_path), {"<pad>": 5, "<x>": 8}.get, vocab_size=10)
  assert ids == {"bos_id": 1, "eos_id": 7, "pad_id": 5, "stop_ids": [7, 2, 9], "add_bos": False}
  # ids outside the vocabulary (a tiny model with GPT-2's default 50256) are skipped
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 50256}))
  assert special_ids(str(tmp_path), {}.get, vocab_size=10)["eos_id"] == 2


@pytest.mark.parametrize("arch", list(lib.MODEL_CLASSES))
def test_greedy_generation_equals_transformers_generate(hf_dirs, arch):
  """20 greedy tokens from this project's sampler (prefill + KV-cache decode) equal
  transformers' generate(do_sample=False), for two ragged prompts at once (Mistral's and
  Phi-3's windows of 4 and 5 keys are far shorter than prompt + 20 tokens)."""
  hf = lib.reload(arch, hf_dirs[arch])
  prompts = [lib.tokens(1, 7, seed=1)[0].tolist(), lib.tokens(1, 3, seed=2)[0].tolist()]
  cfg, params = model.hf.load(hf_dirs[arch])
  ours = generate_ids(cfg, params, prompts, NEW_TOKENS, temperature=0.0, stop_ids=())
  for prompt, got in zip(prompts, ours, strict=True):
    want = lib.greedy(hf, prompt, NEW_TOKENS)
    assert got == want
    # The comparison means something only if no step was a near tie.
    with torch.no_grad():
      logits = hf(torch.tensor([prompt + want[:-1]])).logits[0, len(prompt) - 1:].numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3


def test_next_token_demo_on_an_imported_model(hf_dirs, tmp_path):
  """The textbook's first demo: the 5 most likely tokens after the prompt, with
  probabilities equal to softmax of transformers' logits."""
  workdir = str(tmp_path / "phi3")
  import_to_workdir(hf_dirs["phi3"], workdir)
  gen = Generator.from_workdir(workdir)
  top5 = gen.top_next_tokens(PROMPT, k=5)
  ids = gen.encode(PROMPT)
  assert ids[0] == lib.BOS
  hf = lib.reload("phi3", hf_dirs["phi3"])
  probs = torch.softmax(torch.as_tensor(lib.logits(hf, [ids])[0, -1]), -1).numpy()
  want_ids = np.argsort(-probs)[:5]
  assert [text for text, _ in top5] == [gen.tokenizer.decode([int(i)]) for i in want_ids]
  np.testing.assert_allclose([p for _, p in top5], probs[want_ids], atol=1e-5)
  assert all(a >= b for (_, a), (_, b) in zip(top5, top5[1:], strict=False))


def test_cli_export_of_an_imported_workdir_loads_in_transformers(hf_dirs, tmp_path):
  import transformers

  workdir, out = str(tmp_path / "wd"), str(tmp_path / "out")
  import_to_workdir(hf_dirs["mistral"], workdir)
  with pytest.raises(FileExistsError, match="--overwrite"):
    import_to_workdir(hf_dirs["mistral"], workdir)
  printed = run("-m", "model.hf", "export", f"--workdir={workdir}", f"--out_dir={out}")
  assert "MistralForCausalLM" in printed
  hf = lib.reload("mistral", out)
  reference = lib.logits(lib.reload("mistral", hf_dirs["mistral"]), lib.tokens())
  assert np.abs(lib.logits(hf, lib.tokens()) - reference).max() <= 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok(TEXT).input_ids == store.load_tokenizer(workdir).encode(TEXT)
  assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
