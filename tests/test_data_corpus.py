"""Corpus reading: files, directories, globs, JSONL, the stdlib corpus, bad inputs, the split."""

import json
import os

import pytest

from train import corpus as corpus_lib
from train.corpus import CorpusError, read_corpus, split_documents

HASH_OS_PY = 0.4529168167821032


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
  corpus = read_corpus(str(text_tree))
  names = [d.name for d in corpus.documents]
  assert names == ["a.txt", "docs.jsonl:1", "docs.jsonl:5", os.path.join("sub", "b.md")]
  assert corpus.documents[3].text == "beta ünïcode\n"
  assert corpus.skipped == {"binary files": 1, "undecodable (non-UTF-8) files": 1,
                            "empty files": 1, "invalid JSONL lines": 1,
                            "JSONL lines without a string 'text' field": 1}
  assert "skipped" in corpus.describe() and "1 binary files" in corpus.describe()


def test_files_globs_and_comma_lists(text_tree):
  one = read_corpus(str(text_tree / "a.txt"))
  assert [d.text for d in one.documents] == ["alpha text\n"]
  globbed = read_corpus(f"{text_tree}/**/*.md")
  assert [d.text for d in globbed.documents] == ["beta ünïcode\n"]
  both = read_corpus(f"{text_tree / 'a.txt'}, {text_tree}/sub/*.md")
  assert len(both.documents) == 2
  with pytest.raises(CorpusError, match="3 JSONL lines without a string 'other' field"):
    read_corpus(str(text_tree / "docs.jsonl"), jsonl_field="other")


def test_bad_inputs_fail_with_clear_messages(text_tree):
  with pytest.raises(CorpusError, match="does not exist"):
    read_corpus(str(text_tree / "missing.txt"))
  with pytest.raises(CorpusError, match="matches no file"):
    read_corpus(f"{text_tree}/*.nothing")
  with pytest.raises(CorpusError, match="no usable text.*binary files"):
    read_corpus(str(text_tree / "blob.bin"))
  with pytest.raises(CorpusError, match="no corpus given"):
    read_corpus(" , ")
  (text_tree / "void").mkdir()
  with pytest.raises(CorpusError, match="contains no files"):
    read_corpus(str(text_tree / "void"))


def test_stdlib_corpus_is_nontest_python_sources():
  files = corpus_lib.stdlib_files()
  names = [name for name, _ in files]
  assert len(names) > 300 and "json/decoder.py" in names and "os.py" in names
  for name in names:
    parts = name.split("/")
    assert name.endswith(".py")
    assert not parts[-1].startswith("test_")
    assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)


def test_split_is_deterministic_by_name_and_chunks_long_documents():
  docs = [corpus_lib.Document(f"doc{i}", f"text {i}\n" * 5) for i in range(200)]
  train, val = split_documents(docs, 0.25)
  assert len(train) + len(val) == 200 and 25 < len(val) < 75
  copies = [corpus_lib.Document(d.name, d.text) for d in reversed(docs)]
  train2, val2 = split_documents(copies, 0.25)
  assert {d.name for d in val} == {d.name for d in val2}  # order does not matter, names do
  # The same number on every machine and Python version (SHA-256, not hash()).
  assert corpus_lib.hash_fraction("stdlib/os.py") == pytest.approx(HASH_OS_PY, abs=1e-12)
  big = [corpus_lib.Document("play.txt", "".join(f"line {i}\n" for i in range(4000)))]
  with pytest.raises(CorpusError, match="split_chunk_chars"):
    split_documents(big, 0.1)
  train, val = split_documents(big, 0.1, chunk_chars=1000)
  pieces = sorted(train + val, key=lambda d: int(d.name.split("#")[1]))
  assert "".join(p.text for p in pieces) == big[0].text  # cut at lines, nothing lost
  assert all(p.text.endswith("\n") for p in pieces) and val
