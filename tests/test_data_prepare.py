"""Prepared shards: the same windows as packing the documents in memory (across shard
boundaries), worker processes, an interrupted prepare that continues, reuse and refusal,
URLs (memory://) from corpus to training, compressed and Hugging Face sources, a
validation corpus, the command line."""

import gzip
import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from model import store
from train import prepare as prepare_lib
from train.config_lib import load_config
from train.corpus import Corpus, split_of, stdlib_root
from train.data import prepare_data
from train.packing import PackedWindows
from train.prepare import PrepareError, Sources, prepare
from train.shards import ShardWriter, TokenStream
from train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
JSON_DIR = os.path.join(stdlib_root(), "json")
BYTES = store.ByteTokenizer()


def in_memory(sources: Sources, split: str, tokenizer=BYTES):
  """Today's pipeline by hand: read, split, tokenize, pack in memory."""
  corpus = Corpus(list(sources.corpus), sources.jsonl_field)
  pieces = [p for p in corpus.pieces(sources.split_chunk_chars)
            if split_of(p.name, sources.val_fraction) == split]
  return PackedWindows.from_documents(
      [np.asarray(tokenizer.encode(p.text), np.int32) for p in pieces], seq_len=32,
      eot_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def assert_same_windows(a: PackedWindows, b: PackedWindows):
  assert len(a) == len(b) and len(a.stream) == len(b.stream)
  np.testing.assert_array_equal(a.stream.read(0, len(a.stream)), b.stream.read(0, len(b.stream)))
  wa, wb = a.windows(np.arange(len(a))), b.windows(np.arange(len(b)))
  for key in wa:
    np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


SOURCES = Sources(corpus=(JSON_DIR,), val_fraction=0.2, split_chunk_chars=2000)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The json package in shards of ~3000 tokens: windows cross many shard boundaries."""
  root = str(tmp_path_factory.mktemp("prepared"))
  return root, prepare(root, SOURCES, tokenizer=BYTES, shard_tokens=3000, progress=False,
                       log=lambda m: None)


def test_shards_give_the_same_windows_as_packing_in_memory(prepared):
  root, done = prepared
  manifest = done.manifest
  assert manifest["complete"] and manifest["dtype"] == "<u2" and len(
      manifest["splits"]["train"]["shards"]) > 5
  for split in ("train", "val"):
    shards = PackedWindows(TokenStream.open(root, split), 32, BYTES.pad_id)
    assert_same_windows(shards, in_memory(SOURCES, split))
    # document masking: positions restart at every piece, also right after a shard boundary
    boundary = manifest["splits"][split]["shards"][0]["tokens"]
    w = shards.windows(np.array([boundary // 32]))
    starts = shards.stream.starts_between(boundary // 32 * 32, boundary // 32 * 32 + 32)
    assert all(w["positions"][0][s % 32] == 0 for s in starts)


def test_worker_processes_write_the_same_shards(prepared, tmp_path, monkeypatch):
  root, _ = prepared
  monkeypatch.setattr(prepare_lib, "PROCESSES_FROM_BYTES", 0)  # use them even on a small corpus
  other = str(tmp_path / "workers")
  prepare(other, SOURCES, tokenizer=BYTES, shard_tokens=3000, workers=2, progress=False,
          log=lambda m: None)
  for split in ("train", "val"):
    a, b = TokenStream.open(root, split), TokenStream.open(other, split)
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
    np.testing.assert_array_equal(a.starts_between(0, len(a)), b.starts_between(0, len(b)))


def test_an_interrupted_prepare_continues_where_it_stopped(prepared, tmp_path, monkeypatch):
  root, _ = prepared
  interrupted = str(tmp_path / "interrupted")
  commits = []
  real_commit = prepare_lib._commit

  def die_after_three(*args):
    real_commit(*args)
    commits.append(args[-1])
    if len(commits) == 3:
      raise KeyboardInterrupt

  monkeypatch.setattr(prepare_lib, "BATCH_PIECES", 2)  # commit points every few pieces
  monkeypatch.setattr(prepare_lib, "_commit", die_after_three)
  with pytest.raises(KeyboardInterrupt):
    prepare(interrupted, SOURCES, tokenizer=BYTES, shard_tokens=3000, progress=False,
            log=lambda m: None)
  monkeypatch.setattr(prepare_lib, "_commit", real_commit)
  assert not prepare_lib.read_json(os.path.join(interrupted, "manifest.json"))["complete"]
  said = []
  again = prepare(interrupted, SOURCES, tokenizer=BYTES, shard_tokens=3000, progress=False,
                  log=said.append)
  assert any(f"{commits[-1]:,} pieces were prepared before" in m for m in said)
  for split in ("train", "val"):
    a, b = TokenStream.open(root, split), TokenStream.open(interrupted, split)
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
  for split in ("train", "val"):  # (the shard files are cut elsewhere: commits flush early)
    want = prepared[1].manifest["splits"][split]
    got = again.manifest["splits"][split]
    assert (got["tokens"], got["pieces"]) == (want["tokens"], want["pieces"])


def test_a_shard_is_written_as_its_pieces_arrive_and_an_abort_leaves_nothing(tmp_path):
  """Memory stays at one piece: the open shard is on disk (a temporary file) before it is
  full; flushing makes it appear whole; aborting removes it and lists nothing."""
  def files():
    return sorted(f for _, _, names in os.walk(tmp_path) for f in names)

  writer = ShardWriter(str(tmp_path), "train", np.dtype("<u2"), eot_id=0, shard_tokens=100)
  writer.add(np.array([5, 6, 7]))
  writer.add(np.array([8]))
  assert writer.buffered == 6 and [f for f in files() if f.endswith(".tmp")]
  writer.abort()
  assert files() == [] and writer.shards == [] and writer.buffered == 0
  writer.add(np.array([5, 6, 7]))
  writer.add(np.array([8]))
  writer.flush()
  assert files() == ["00000.starts.npy", "00000.tokens"]
  tokens = np.fromfile(tmp_path / "train" / "00000.tokens", "<u2")
  np.testing.assert_array_equal(tokens, [5, 6, 7, 0, 8, 0])
  np.testing.assert_array_equal(np.load(tmp_path / "train" / "00000.starts.npy"), [0, 4])
  assert writer.shards == [{"file": "train/00000.tokens", "tokens": 6, "pieces": 2}]


def test_a_finished_prepare_is_reused_and_another_tokenizer_refused(prepared, tmp_path):
  root, _ = prepared
  assert prepare(root, SOURCES, tokenizer=BYTES, progress=False).reused
  other = store_tokenizer(tmp_path)
  with pytest.raises(PrepareError, match="prepared with another tokenizer"):
    prepare(root, SOURCES, tokenizer=other, progress=False)


def store_tokenizer(tmp_path):
  from train.tokenizer import train_sentencepiece

  texts = [p.text for p in Corpus([JSON_DIR])]
  return train_sentencepiece(texts, str(tmp_path / "sp.model"), vocab_size=600)


def test_memory_urls_from_corpus_to_training(tmp_path):
  """A corpus and prepared shards behind memory:// URLs, and a file:// workdir: read in
  ranges through fsspec, trained on, same windows as local shards."""
  fs = fsspec.filesystem("memory")
  for name in sorted(os.listdir(JSON_DIR)):
    if name.endswith(".py"):
      with open(os.path.join(JSON_DIR, name), "rb") as f:
        fs.pipe(f"/corpus/json/{name}", f.read())
  sources = Sources(corpus=("memory://corpus/json",), val_fraction=0.2, split_chunk_chars=2000)
  prepare("memory://prepared/json", sources, tokenizer=BYTES, shard_tokens=3000,
          progress=False, log=lambda m: None)
  local = str(tmp_path / "local")
  prepare(local, sources, tokenizer=BYTES, shard_tokens=3000, progress=False,
          log=lambda m: None)
  for split in ("train", "val"):
    remote = PackedWindows(TokenStream.open("memory://prepared/json", split), 32, BYTES.pad_id)
    assert_same_windows(remote, PackedWindows(TokenStream.open(local, split), 32,
                                              BYTES.pad_id))
  config = load_config("train/configs/tiny.py", {
      "num_steps": 3, "eval_every": 3, "checkpoint_every": 3, "trackers": ("jsonl",),
      "data.prepared": "memory://prepared/json"})
  workdir = f"file://{tmp_path}/run"
  summary = train_and_evaluate(config, workdir)
  assert summary["status"] == "completed" and store.latest_step(str(tmp_path / "run")) == 3


def test_a_validation_corpus_and_compressed_jsonl(tmp_path):
  records = [json.dumps({"text": f"record {i} " * 20}) for i in range(40)]
  (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress("\n".join(records).encode()))
  (tmp_path / "val.txt").write_text("held out text\n" * 30)
  sources = Sources(corpus=(str(tmp_path / "train.jsonl.gz"),),
                    val_corpus=(str(tmp_path / "val.txt"),))
  done = prepare(str(tmp_path / "p"), sources, tokenizer=BYTES, progress=False,
                 log=lambda m: None)
  splits = done.manifest["splits"]
  assert splits["train"]["pieces"] == 40 and splits["val"]["pieces"] == 1
  val = TokenStream.open(str(tmp_path / "p"), "val")
  assert bytes(val.read(0, len(val) - 1).astype(np.uint8)).decode() == "held out text\n" * 30


def test_a_hugging_face_dataset_is_prepared(tmp_path):
  datasets = pytest.importorskip("datasets")
  saved = str(tmp_path / "ds")
  datasets.Dataset.from_dict({"text": [f"story {i} " * 10 for i in range(50)],
                              "id": list(range(50))}).save_to_disk(saved)
  done = prepare(str(tmp_path / "p"), Sources(corpus=(f"hf:{saved}",), val_fraction=0.2),
                 tokenizer=BYTES, progress=False, log=lambda m: None)
  assert done.manifest["splits"]["train"]["pieces"] + done.manifest["splits"]["val"][
      "pieces"] == 50


def test_missing_fields_are_counted_and_reported(tmp_path):
  (tmp_path / "docs.jsonl").write_text("\n".join(
      [json.dumps({"text": "kept " * 40})] * 10 + [json.dumps({"body": "no text"})] * 3))
  config = load_config("train/configs/tiny.py", {
      "data.corpus": str(tmp_path / "docs.jsonl"), "data.val_fraction": 0.3,
      "data.cache_dir": str(tmp_path / "cache")})
  data = prepare_data(config, str(tmp_path / "run"))
  assert "skipped: 3 records without a string 'text' field" in data.description


def test_the_command_line_prepares_and_training_uses_the_shards(tmp_path):
  out = str(tmp_path / "shards")
  cmd = [sys.executable, "-m", "train.prepare", "--config=train/configs/tiny.py",
         f"--out={out}", "--workers=1"]
  result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "prepared" in result.stderr and f"--config.data.prepared={out}" in result.stderr
  again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "already prepared" in again.stderr
  bad = subprocess.run([sys.executable, "-m", "train.prepare", f"--out={tmp_path}/x",
                        "--corpus=nosuchfs://bucket/x"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "needs the `nosuchfs` package" in bad.stderr.strip().splitlines()[-1]
  config = load_config("train/configs/tiny.py", {
      "num_steps": 3, "eval_every": 3, "checkpoint_every": 3, "trackers": ("jsonl",),
      "data.prepared": out})
  data = prepare_data(config, str(tmp_path / "run"))
  assert data.cache_hit and f"({'prepared before'}, {out})" in data.description
