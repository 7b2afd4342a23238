"""Corpus reading: files, directories, globs, JSONL, compressed files, Parquet, URLs, Hugging
Face datasets, the stdlib corpus, bad inputs, and the split (by name, never empty)."""

import bz2
import gzip
import json
import lzma

import fsspec
import pytest

from train import corpus as corpus_lib
from train.corpus import Corpus, CorpusError, forced_validation, split_of

HASH_OS_PY = 0.4529168167821032


def open_corpus(spec, **kwargs):
  return Corpus(corpus_lib.parse_sources(spec), **kwargs)


def read(spec, **kwargs):
  corpus = open_corpus(spec, **kwargs)
  return corpus, list(corpus)


@pytest.fixture
def text_tree(tmp_path):
  (tmp_path / "a.txt").write_text("alpha text\n")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("beta ünïcode\n")
  (tmp_path / "sub" / ".hidden").write_text("never read")
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "empty.txt").write_text("  \n")
  with open(tmp_path / "docs.jsonl", "w") as f:
    f.write(json.dumps({"text": "first record"}) + "\n")
    f.write(json.dumps({"other": 1}) + "\n")
    f.write("not json\n\n")
    f.write(json.dumps({"text": "second record"}) + "\n")
  return tmp_path


def test_directory_reads_text_and_counts_what_it_skips(text_tree):
  corpus, docs = read(str(text_tree))
  assert [d.name for d in docs] == ["a.txt", "docs.jsonl:1", "docs.jsonl:5", "sub/b.md"]
  assert docs[3].text == "beta ünïcode\n"
  assert corpus.skipped == {"binary files": 1, "undecodable (non-UTF-8) files": 1,
                            "empty files": 1, "invalid JSONL lines": 1,
                            "records without a string 'text' field": 1}
  assert "skipped" in corpus.describe() and "1 binary files" in corpus.describe()


def test_files_globs_and_comma_lists(text_tree):
  _, one = read(str(text_tree / "a.txt"))
  assert [(d.name, d.text) for d in one] == [("a.txt", "alpha text\n")]
  _, globbed = read(f"{text_tree}/**/*.md")
  assert [(d.name, d.text) for d in globbed] == [("sub/b.md", "beta ünïcode\n")]
  _, both = read(f"{text_tree / 'a.txt'}, {text_tree}/sub/*.md")
  assert [d.name for d in both] == ["a.txt", "b.md"]
  with pytest.raises(CorpusError, match="3 records without a string 'other' field"):
    read(str(text_tree / "docs.jsonl"), jsonl_field="other")


def test_names_do_not_depend_on_how_a_path_is_spelled(text_tree, monkeypatch):
  """The hash split hashes names: input.txt, ./input.txt and an absolute path must agree."""
  monkeypatch.chdir(text_tree)
  spellings = ["a.txt", "./a.txt", str(text_tree / "a.txt"), f"file://{text_tree}/a.txt",
               "sub/../a.txt"]
  names = {tuple(d.name for d in read(s)[1]) for s in spellings}
  assert names == {("a.txt",)}
  assert {tuple(d.name for d in read(s)[1]) for s in ("sub", "./sub/", str(text_tree / "sub"))
          } == {("b.md",)}


def test_compressed_files_are_read_on_the_fly(tmp_path):
  text = "compressed words\n" * 3
  record = json.dumps({"body": text}) + "\n"
  (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
  (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress(record.encode()))
  (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(text.encode()))
  zstandard = pytest.importorskip("zstandard")
  (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(record.encode()))
  _, docs = read(str(tmp_path), jsonl_field="body")
  assert [(d.name, d.text) for d in docs] == [
      ("a.txt.gz", text), ("b.jsonl.xz:1", text), ("c.txt.bz2", text), ("d.jsonl.zst:1", text)]


def test_parquet_rows_are_documents(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  table = pa.table({"content": ["row one", None, "row three"], "id": [1, 2, 3]})
  pq.write_table(table, str(tmp_path / "part.parquet"), row_group_size=2)
  corpus, docs = read(str(tmp_path / "part.parquet"), jsonl_field="content")
  assert [(d.name, d.text) for d in docs] == [("part.parquet:0", "row one"),
                                              ("part.parquet:2", "row three")]
  assert corpus.skipped == {"records without a string 'content' field": 1}
  with pytest.raises(CorpusError, match="has no column 'text'.*jsonl_field"):
    read(str(tmp_path / "part.parquet"))


def test_fsspec_urls_read_like_paths():
  fs = fsspec.filesystem("memory")
  fs.pipe("/corpus/x/one.txt", b"memory one\n")
  fs.pipe("/corpus/x/two.jsonl", b'{"text": "memory two"}\n')
  _, docs = read("memory://corpus/x")
  assert [(d.name, d.text) for d in docs] == [("one.txt", "memory one\n"),
                                              ("two.jsonl:1", "memory two")]
  _, globbed = read("memory://corpus/x/*.txt")
  assert [d.name for d in globbed] == ["one.txt"]
  with pytest.raises(CorpusError, match="does not exist"):
    read("memory://corpus/none")
  with pytest.raises(CorpusError, match="needs the `nosuchfs` package.*pip install"):
    read("nosuchfs://bucket/x")


def test_a_hugging_face_dataset_saved_to_disk(tmp_path):
  datasets = pytest.importorskip("datasets")
  saved = str(tmp_path / "ds")
  datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"text": ["hf one", "hf two"]}),
      "test": datasets.Dataset.from_dict({"text": ["hf test"]})}).save_to_disk(saved)
  _, docs = read(f"hf:{saved}")
  assert [(d.name, d.text) for d in docs] == [(f"hf:{saved}:0", "hf one"),
                                              (f"hf:{saved}:1", "hf two")]
  _, test = read(f"hf:{saved}:test")
  assert [d.text for d in test] == ["hf test"]
  with pytest.raises(CorpusError, match="no split 'dev'"):
    read(f"hf:{saved}:dev")
  empty = str(tmp_path / "empty")
  datasets.Dataset.from_dict({"text": []}).save_to_disk(empty)
  with pytest.raises(CorpusError, match=f"hf:{empty}.*(no usable text|cannot be loaded)"):
    read(f"hf:{empty}")  # (datasets itself cannot load an empty saved dataset: one line too)


def test_bad_inputs_fail_with_clear_messages(text_tree):
  with pytest.raises(CorpusError, match="does not exist"):
    read(str(text_tree / "missing.txt"))
  with pytest.raises(CorpusError, match="matches no file"):
    read(f"{text_tree}/*.nothing")
  with pytest.raises(CorpusError, match="no usable text.*binary files"):
    read(str(text_tree / "blob.bin"))
  with pytest.raises(CorpusError, match="no corpus given"):
    read(" , ")
  (text_tree / "void").mkdir()
  with pytest.raises(CorpusError, match="contains no files"):
    read(str(text_tree / "void"))


def test_stdlib_corpus_is_nontest_python_sources():
  files = corpus_lib.stdlib_files()
  names = [name for name, _ in files]
  assert len(names) > 300 and "json/decoder.py" in names and "os.py" in names
  for name in names:
    parts = name.split("/")
    assert name.endswith(".py")
    assert not parts[-1].startswith("test_")
    assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)


def test_split_is_by_name_and_long_documents_are_cut_losslessly(tmp_path, monkeypatch):
  names = [f"doc{i}" for i in range(200)]
  val = {n for n in names if split_of(n, 0.25) == "val"}
  assert 25 < len(val) < 75
  # The same number on every machine and Python version (SHA-256, not hash()).
  assert corpus_lib.hash_fraction("stdlib/os.py") == pytest.approx(HASH_OS_PY, abs=1e-12)
  text = "".join(f"line {i}\n" for i in range(4000))
  (tmp_path / "play.txt").write_text(text)
  pieces = list(open_corpus(str(tmp_path / "play.txt")).pieces(chunk_chars=1000))
  assert [p.name for p in pieces[:2]] == ["play.txt#0", "play.txt#1"]
  assert "".join(p.text for p in pieces) == text  # cut at lines, nothing lost
  assert all(p.text.endswith("\n") and len(p.text) <= 1000 for p in pieces)
  # A file above STREAM_BYTES is cut while it is read, into the very same pieces.
  monkeypatch.setattr(corpus_lib, "STREAM_BYTES", 100)
  monkeypatch.setattr(corpus_lib, "_READ_BLOCK", 777)
  streamed = list(open_corpus(str(tmp_path / "play.txt")).pieces(chunk_chars=1000))
  assert streamed == pieces


def test_a_requested_validation_fraction_is_never_empty():
  names = [f"play.txt#{k}" for k in range(51)]
  assert not [n for n in names if split_of(n, 0.02) == "val"]  # the hash gives none here
  val = forced_validation(names, 0.02)
  assert len(val) == 1 and val == forced_validation(list(reversed(names)), 0.02)
  assert len(forced_validation(names, 0.2)) == 10
  with pytest.raises(CorpusError, match="at least 2.*split_chunk_chars.*val_corpus"):
    forced_validation(["only"], 0.1)
