"""Text sources -> documents, and the deterministic train/validation split.

  corpus = read_corpus("stdlib")                       # the embedded default corpus
  corpus = read_corpus("data/*.txt,notes/,dump.jsonl")  # files, directories, globs, JSONL
  train_docs, val_docs = split_documents(corpus.documents, val_fraction=0.05)

Sources (a comma-separated string or a list):
  "stdlib"    the running interpreter's standard library: non-test `.py` files
              under sysconfig.get_paths()['stdlib'] (no tests, no site-packages),
              one document per file, named by its path relative to that root.
  a file      one document; `*.jsonl` files give one document per line's `text`
              field (configurable).
  a directory every regular file below it (hidden entries skipped), in sorted order.
  a glob      every match, in sorted order.

Bad input is reported, never silently dropped: a missing path raises; binary or
undecodable files and JSONL lines without text are skipped and counted in
`Corpus.skipped`; a corpus with no text left raises `CorpusError`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence

STDLIB = "stdlib"
_TEST_DIRS = {"test", "tests", "idle_test", "idlelib_test", "site-packages", "dist-packages",
              "__pycache__"}
_SNIFF_BYTES = 8192


class CorpusError(ValueError):
  """A corpus source is missing or holds no usable text."""


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # stable identity: the split hashes it
  text: str


@dataclasses.dataclass
class Corpus:
  documents: list[Document]
  skipped: collections.Counter  # reason -> count
  sources: list[str]

  @property
  def num_bytes(self) -> int:
    return sum(len(d.text.encode("utf-8")) for d in self.documents)

  def describe(self) -> str:
    text = f"{len(self.documents)} documents, {self.num_bytes / 1e6:.2f} MB from {self.sources}"
    if self.skipped:
      text += "; skipped: " + _count_text(self.skipped)
    return text

  def fingerprint(self) -> str:
    """A hash of every document's name and text: the token cache key's corpus part."""
    h = hashlib.sha256()
    for doc in self.documents:
      h.update(doc.name.encode("utf-8", "surrogatepass") + b"\0")
      h.update(doc.text.encode("utf-8", "surrogatepass") + b"\1")
    return h.hexdigest()


def _count_text(counts: collections.Counter) -> str:
  return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _is_stdlib_source(rel_parts: Sequence[str]) -> bool:
  if any(part in _TEST_DIRS or part.startswith(".") for part in rel_parts):
    return False
  name = rel_parts[-1]
  return name.endswith(".py") and not name.startswith("test_") and name != "conftest.py"


def stdlib_files() -> list[tuple[str, str]]:
  """(relative name, absolute path) of every non-test .py file of the stdlib, sorted."""
  root = stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
    if any(p in _TEST_DIRS or p.startswith(".") for p in parts):
      dirnames[:] = []
      continue
    for name in filenames:
      if _is_stdlib_source(parts + (name,)):
        out.append(("/".join(parts + (name,)), os.path.join(dirpath, name)))
  return sorted(out)


def _read_text(path: str, skipped: collections.Counter) -> str | None:
  """The file's text, or None (counted in `skipped`) if it is binary or not UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError:
    skipped["unreadable files"] += 1
    return None
  if b"\0" in raw[:_SNIFF_BYTES]:
    skipped["binary files"] += 1
    return None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    skipped["undecodable (non-UTF-8) files"] += 1
    return None


def _read_jsonl(path: str, name: str, field: str, skipped: collections.Counter
                ) -> list[Document]:
  text = _read_text(path, skipped)
  if text is None:
    return []
  docs = []
  for line_no, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      skipped["invalid JSONL lines"] += 1
      continue
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
      skipped[f"JSONL lines without a string {field!r} field"] += 1
      continue
    docs.append(Document(f"{name}:{line_no}", value))
  return docs


def _expand(source: str) -> list[tuple[str, str]]:
  """(name, path) pairs of the files a path, directory or glob stands for."""
  if glob.has_magic(source):
    paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not paths:
      raise CorpusError(f"corpus glob {source!r} matches no file")
    return [(p, p) for p in paths]
  if not os.path.exists(source):
    raise CorpusError(f"corpus path {source!r} does not exist (a text file, a directory, a glob, "
                      "a .jsonl file or 'stdlib')")
  if os.path.isfile(source):
    return [(source, source)]
  out = []
  for dirpath, dirnames, filenames in os.walk(source):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if not name.startswith("."):
        path = os.path.join(dirpath, name)
        out.append((os.path.relpath(path, source), path))
  if not out:
    raise CorpusError(f"corpus directory {source!r} contains no files")
  return out


def parse_sources(spec: str | Iterable[str]) -> list[str]:
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  sources = [s.strip() for s in items if s and s.strip()]
  if not sources:
    raise CorpusError("no corpus given: set config.data.corpus to 'stdlib', files, directories "
                      "or globs (comma-separated)")
  return sources


def read_corpus(spec: str | Iterable[str], *, jsonl_field: str = "text") -> Corpus:
  """Every document of the sources in `spec` (see the module docstring)."""
  sources = parse_sources(spec)
  skipped: collections.Counter = collections.Counter()
  documents: list[Document] = []
  for source in sources:
    if source == STDLIB:
      files = [(f"stdlib/{rel}", path) for rel, path in stdlib_files()]
    else:
      files = _expand(source)
    for name, path in files:
      if path.endswith(".jsonl"):
        documents.extend(_read_jsonl(path, name, jsonl_field, skipped))
        continue
      text = _read_text(path, skipped)
      if text is None:
        continue
      if not text.strip():
        skipped["empty files"] += 1
        continue
      documents.append(Document(name, text))
  corpus = Corpus(documents, skipped, sources)
  if not documents:
    raise CorpusError(f"the corpus {sources} holds no usable text"
                      + (f" (skipped: {_count_text(skipped)})" if skipped else ""))
  return corpus


def _chunks(doc: Document, max_chars: int) -> list[Document]:
  """Cut a long document at line boundaries into pieces of about max_chars."""
  if max_chars <= 0 or len(doc.text) <= max_chars:
    return [doc]
  pieces, start = [], 0
  while start < len(doc.text):
    end = min(len(doc.text), start + max_chars)
    if end < len(doc.text):
      newline = doc.text.rfind("\n", start, end)
      end = newline + 1 if newline > start else end
    pieces.append(Document(f"{doc.name}#{len(pieces)}", doc.text[start:end]))
    start = end
  return pieces


def hash_fraction(name: str) -> float:
  """A uniform number in [0, 1) from a hash of `name`: the same on every machine and run."""
  digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_documents(documents: Sequence[Document], val_fraction: float, *,
                    chunk_chars: int = 0) -> tuple[list[Document], list[Document]]:
  """(train, validation) by a hash of each document's name; documents longer than
  `chunk_chars` (when > 0) are first cut into pieces so one big file splits too."""
  train, val = [], []
  for doc in documents:
    for piece in _chunks(doc, chunk_chars):
      (val if hash_fraction(piece.name) < val_fraction else train).append(piece)
  if not train or not val:
    which = "training" if not train else "validation"
    pieces = f" cut into {len(train) + len(val)} pieces" if chunk_chars > 0 else ""
    raise CorpusError(
        f"the {which} split is empty ({len(documents)} documents{pieces}, val_fraction="
        f"{val_fraction}); use more documents, or cut long ones into (smaller) pieces with "
        f"--config.data.split_chunk_chars={max(chunk_chars // 4, 1000) if chunk_chars else 20000}")
  return train, val
