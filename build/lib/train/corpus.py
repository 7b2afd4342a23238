"""Text sources -> a stream of documents, cut into pieces and split into train / validation.

  corpus = open_corpus("stdlib")                             # the embedded default corpus
  corpus = open_corpus("data/*.txt,notes/,dump.jsonl.gz")    # files, directories, globs
  corpus = open_corpus("gs://bucket/shard-*.parquet")        # any fsspec URL (gcsfs installed)
  corpus = open_corpus("hf:wikitext:wikitext-2-raw-v1:train")  # a Hugging Face dataset
  for piece in corpus.pieces(chunk_chars=20000):            # streamed: never all in memory
    split = split_of(piece.name, val_fraction=0.05)          # 'train' or 'val'

Sources (a comma-separated string or a list), read in order, each in sorted order:
  "stdlib"        the running interpreter's standard library: non-test `.py` files under
                  sysconfig.get_paths()['stdlib'], one document per file ("stdlib/<path>").
  a file          one document named by its file name; `.jsonl` / `.json` lines give one
                  document per line's `text` field (configurable); `.parquet` and `.arrow`
                  files one per row of that column (pyarrow); `.gz`, `.zst`, `.xz`, `.bz2`
                  of any of these are decompressed on the fly.
  a directory     every non-hidden file below it, named by its path inside the directory.
  a glob          every match, named by its path below the glob's first wildcard's folder.
  a URL           the same through fsspec (`memory://`, `file://`, `gs://` with gcsfs,
                  `s3://` with s3fs, ...).
  hf:NAME[:CONFIG][:SPLIT]   a Hugging Face dataset (the `datasets` library): a directory
                  written by `save_to_disk`, or a hub dataset (streamed; needs the network).

Names do not depend on how a path is spelled (`input.txt`, `./input.txt` and an absolute
path name the same document), so the hash split is the same from any directory. A
document longer than `chunk_chars` is cut at line boundaries into pieces "<name>#<k>",
while it is read. Bad input is reported, never silently dropped: a missing path raises;
binary or undecodable files and records without text are skipped and counted in
`Corpus.skipped`; a corpus with no text raises `CorpusError`.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence

import fsspec
from fsspec.core import url_to_fs

STDLIB = "stdlib"
HF_PREFIX = "hf:"
_TEST_DIRS = {"test", "tests", "idle_test", "idlelib_test", "site-packages", "dist-packages",
              "__pycache__"}
_SNIFF_BYTES = 8192
_READ_BLOCK = 1 << 20
STREAM_BYTES = 64 << 20  # text files above this are cut into pieces while they are read
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".xz": "xz", ".bz2": "bz2"}
# What each URL scheme or file kind needs, to name it when it is missing.
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "zstd": "zstandard",
             "parquet": "pyarrow", "arrow": "pyarrow", "hf": "datasets"}


class CorpusError(ValueError):
  """A corpus source is missing, cannot be read, or holds no usable text."""


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # stable identity: the split hashes it
  text: str


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


def parse_sources(spec: str | Iterable[str]) -> list[str]:
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  sources = [s.strip() for s in items if s and s.strip()]
  if not sources:
    raise CorpusError("no corpus given: set config.data.corpus to 'stdlib', files, directories, "
                      "globs, URLs or hf:NAME (comma-separated)")
  return sources


def _missing_package(what: str, error: Exception) -> CorpusError:
  package = _PACKAGES.get(what, what)
  return CorpusError(f"reading {what!r} sources needs the `{package}` package ({error}); "
                     f"install it: pip install {package}  (or pip install -e .[data])")


def _filesystem(source: str):
  """(fsspec filesystem, path) of a local path or URL; '~' is expanded."""
  source = os.path.expanduser(source)
  try:
    return url_to_fs(source)
  except (ImportError, ValueError) as e:
    scheme = source.split("://", 1)[0] if "://" in source else source
    if isinstance(e, ImportError) or "Protocol not known" in str(e):
      raise _missing_package(scheme, e) from None
    raise CorpusError(f"corpus source {source!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class SourceFile:
  name: str       # the document name (stable across spellings of the path)
  url: str        # what fsspec opens
  size: int | None
  mtime: str      # for the cache signature ('' when the file system does not say)


def _file_info(fs, path: str) -> tuple[int | None, str]:
  info = fs.info(path)
  mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
  return info.get("size"), str(mtime)


def _relative(path: str, root: str) -> str:
  rel = path[len(root):] if path.startswith(root) else path
  return rel.lstrip("/")


def _glob_root(path: str) -> str:
  """The folder above a glob's first wildcard ('data/**/*.txt' -> 'data')."""
  head = []
  for part in path.split("/"):
    if any(c in part for c in "*?["):
      break
    head.append(part)
  return "/".join(head)


def expand_source(source: str) -> list[SourceFile]:
  """The files a path, directory, glob or URL stands for, in sorted order."""
  fs, path = _filesystem(source)
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

  def url(p: str) -> str:
    return p if protocol in ("file", "local") else fs.unstrip_protocol(p)

  if any(c in path for c in "*?["):
    root = _glob_root(path)
    paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    if not paths:
      raise CorpusError(f"corpus glob {source!r} matches no file")
    return [SourceFile(_relative(p, root), url(p), *_file_info(fs, p)) for p in paths]
  if not fs.exists(path):
    raise CorpusError(f"corpus path {source!r} does not exist (a text file, a directory, a "
                      "glob, a URL, 'stdlib' or hf:NAME)")
  if fs.isfile(path):
    return [SourceFile(path.rstrip("/").rsplit("/", 1)[-1], url(path), *_file_info(fs, path))]
  root = path.rstrip("/") + "/"
  files = []
  for p in sorted(fs.find(path)):
    rel = _relative(p, root)
    if not any(part.startswith(".") for part in rel.split("/")):
      files.append(SourceFile(rel, url(p), *_file_info(fs, p)))
  if not files:
    raise CorpusError(f"corpus directory {source!r} contains no files")
  return files


def _kind(name: str) -> tuple[str, str | None]:
  """(kind, compression) of a file name: kind in text/jsonl/parquet/arrow."""
  base, ext = os.path.splitext(name.lower())
  compression = COMPRESSIONS.get(ext)
  if compression:
    base, ext = os.path.splitext(base)
  kind = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow",
          ".feather": "arrow"}.get(ext, "text")
  return kind, compression


@dataclasses.dataclass
class Corpus:
  """A stream of documents from sources read in order; counts what it skips."""

  sources: list[str]
  jsonl_field: str = "text"
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  documents_read: int = 0
  bytes_read: int = 0

  def __post_init__(self):
    self._files = {s: (None if s == STDLIB or s.startswith(HF_PREFIX) else expand_source(s))
                   for s in self.sources}

  def total_bytes(self) -> int | None:
    """The size of every source file (None when a source does not say: hf datasets)."""
    total = 0
    for source, files in self._files.items():
      if source == STDLIB:
        total += sum(os.path.getsize(p) for _, p in stdlib_files())
      elif files is None or any(f.size is None for f in files):
        return None
      else:
        total += sum(f.size for f in files)
    return total

  def signature(self) -> str:
    """What identifies the corpus without reading it: every file's name, size and mtime
    (the key of prepared tokens in the cache)."""
    h = hashlib.sha256()
    for source in self.sources:
      h.update(source.encode() + b"\0")
      if source == STDLIB:
        for name, path in stdlib_files():
          stat = os.stat(path)
          h.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\1".encode())
      elif source.startswith(HF_PREFIX):
        h.update(_hf_signature(source).encode())
      else:
        for f in self._files[source]:
          h.update(f"{f.name}\0{f.url}\0{f.size}\0{f.mtime}\1".encode())
    h.update(self.jsonl_field.encode())
    return h.hexdigest()

  def describe(self) -> str:
    text = (f"{self.documents_read} documents, {self.bytes_read / 1e6:.2f} MB from "
            f"{self.sources}")
    if self.skipped:
      text += "; skipped: " + _count_text(self.skipped)
    return text

  def __iter__(self) -> Iterator[Document]:
    self.skipped.clear()
    self.documents_read = self.bytes_read = 0
    for source in self.sources:
      if source == STDLIB:
        docs = (Document(f"stdlib/{rel}", text) for rel, path in stdlib_files()
                if (text := self._read_text(path)) is not None)
      elif source.startswith(HF_PREFIX):
        docs = self._hf_documents(source)
      else:
        docs = (doc for f in self._files[source] for doc in self._file_documents(f))
      for doc in docs:
        self.documents_read += 1
        self.bytes_read += len(doc.text.encode("utf-8", "surrogatepass"))
        yield doc
    if not self.documents_read:
      raise CorpusError(f"the corpus {self.sources} holds no usable text"
                        + (f" (skipped: {_count_text(self.skipped)})" if self.skipped else ""))

  def pieces(self, chunk_chars: int = 0) -> Iterator[Document]:
    """The documents, each longer than chunk_chars (when > 0) cut at line boundaries into
    pieces '<name>#<k>' of about chunk_chars characters. A text file larger than
    STREAM_BYTES is cut while it is read (memory stays flat for one huge file)."""
    self._chunk_chars = chunk_chars
    try:
      for doc in self:
        yield from _chunks(doc, chunk_chars)
    finally:
      self._chunk_chars = 0

  # ---- readers -----------------------------------------------------------------------------
  def _read_text(self, url: str, compression: str | None = None) -> str | None:
    """The file's text, or None (counted in `skipped`) if it is binary or not UTF-8."""
    try:
      with fsspec.open(url, "rb", compression=compression) as f:
        raw = f.read()
    except ImportError as e:
      raise _missing_package(compression or url, e) from None
    except OSError:
      self.skipped["unreadable files"] += 1
      return None
    if b"\0" in raw[:_SNIFF_BYTES]:
      self.skipped["binary files"] += 1
      return None
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      self.skipped["undecodable (non-UTF-8) files"] += 1
      return None
    if not text.strip():
      self.skipped["empty files"] += 1
      return None
    return text

  def _record_text(self, value) -> str | None:
    if not isinstance(value, str):
      self.skipped[f"records without a string {self.jsonl_field!r} field"] += 1
      return None
    return value

  def _file_documents(self, f: SourceFile) -> Iterator[Document]:
    kind, compression = _kind(f.name)
    chunk_chars = getattr(self, "_chunk_chars", 0)
    if kind == "text" and chunk_chars > 0 and (f.size or 0) > STREAM_BYTES:
      yield from self._streamed_pieces(f, compression, chunk_chars)
    elif kind == "text":
      text = self._read_text(f.url, compression)
      if text is not None:
        yield Document(f.name, text)
    elif kind == "jsonl":
      yield from self._jsonl_documents(f, compression)
    else:
      yield from self._arrow_documents(f, kind, compression)

  def _streamed_pieces(self, f: SourceFile, compression: str | None, chunk_chars: int
                       ) -> Iterator[Document]:
    """The pieces of a large text file, cut while reading; they are already pieces, so the
    caller's _chunks passes them through (each is at most chunk_chars long)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, k, offset = "", 0, 0
    with fsspec.open(f.url, "rb", compression=compression) as handle:
      first = True
      while True:
        block = handle.read(_READ_BLOCK)
        if first and b"\0" in block[:_SNIFF_BYTES]:
          self.skipped["binary files"] += 1
          return
        first = False
        try:
          buffer += decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
          raise CorpusError(f"{f.url} is not UTF-8 near byte {offset + e.start}; "
                            f"{k} pieces of it were read") from None
        offset += len(block)
        while len(buffer) > chunk_chars or (not block and buffer):
          end = min(len(buffer), chunk_chars)
          if end < len(buffer):
            newline = buffer.rfind("\n", 0, end)
            end = newline + 1 if newline > 0 else end
          yield Document(f"{f.name}#{k}", buffer[:end])
          buffer, k = buffer[end:], k + 1
        if not block:
          return

  def _jsonl_documents(self, f: SourceFile, compression: str | None) -> Iterator[Document]:
    try:
      handle = fsspec.open(f.url, "rb", compression=compression)
      with handle as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as lines:
        for line_no, line in enumerate(lines, start=1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            self.skipped["invalid JSONL lines"] += 1
            continue
          value = record.get(self.jsonl_field) if isinstance(record, dict) else None
          text = self._record_text(value)
          if text is not None:
            yield Document(f"{f.name}:{line_no}", text)
    except ImportError as e:
      raise _missing_package(compression or f.url, e) from None
    except UnicodeDecodeError:
      self.skipped["undecodable (non-UTF-8) files"] += 1

  def _arrow_documents(self, f: SourceFile, kind: str, compression: str | None
                       ) -> Iterator[Document]:
    try:
      import pyarrow.ipc
      import pyarrow.parquet
    except ImportError as e:
      raise _missing_package(kind, e) from None
    with fsspec.open(f.url, "rb", compression=compression) as handle:
      if kind == "parquet":
        batches = pyarrow.parquet.ParquetFile(handle).iter_batches(columns=[self.jsonl_field])
      else:
        batches = pyarrow.ipc.open_file(handle)
        batches = (batches.get_batch(i) for i in range(batches.num_record_batches))
      row = 0
      for batch in batches:
        if self.jsonl_field not in batch.schema.names:
          raise CorpusError(f"{f.url} has no column {self.jsonl_field!r} (columns: "
                            f"{batch.schema.names}); set config.data.jsonl_field")
        for value in batch.column(self.jsonl_field).to_pylist():
          text = self._record_text(value)
          if text is not None:
            yield Document(f"{f.name}:{row}", text)
          row += 1

  def _hf_documents(self, source: str) -> Iterator[Document]:
    dataset = _hf_dataset(source)
    for index, record in enumerate(dataset):
      text = self._record_text(record.get(self.jsonl_field))
      if text is not None:
        yield Document(f"{source}:{index}", text)


def _hf_parts(source: str) -> tuple[str, str | None, str]:
  parts = source[len(HF_PREFIX):].split(":")
  if not parts[0] or len(parts) > 3:
    raise CorpusError(f"corpus source {source!r}: expected hf:NAME[:CONFIG][:SPLIT]")
  name = parts[0]
  config = parts[1] if len(parts) == 3 else None
  split = parts[-1] if len(parts) >= 2 else "train"
  return name, config or None, split


def _hf_dataset(source: str):
  """The records of an hf: source: a save_to_disk directory, or a hub dataset (streamed)."""
  try:
    import datasets
  except ImportError as e:
    raise _missing_package("hf", e) from None
  name, config, split = _hf_parts(source)
  path = os.path.expanduser(name)
  try:
    if os.path.isdir(path):
      loaded = datasets.load_from_disk(path)
      if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
          raise CorpusError(f"{source}: the dataset in {path} has no split {split!r} (splits: "
                            f"{sorted(loaded)})")
        loaded = loaded[split]
      return loaded
    return datasets.load_dataset(name, config, split=split, streaming=True)
  except CorpusError:
    raise
  except Exception as e:  # the datasets library raises many kinds (offline, unknown name)
    raise CorpusError(f"corpus source {source!r} cannot be loaded: "
                      f"{' '.join(str(e).split())[:300]}") from None


def _hf_signature(source: str) -> str:
  name, _, _ = _hf_parts(source)
  path = os.path.expanduser(name)
  if not os.path.isdir(path):
    return source  # a hub dataset: named by its id (the hub pins a revision per name)
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(path)):
    for file in sorted(files):
      stat = os.stat(os.path.join(dirpath, file))
      h.update(f"{os.path.relpath(os.path.join(dirpath, file), path)}\0{stat.st_size}\0"
               f"{stat.st_mtime_ns}\1".encode())
  return h.hexdigest()


def _chunks(doc: Document, max_chars: int) -> Iterator[Document]:
  """Cut a long document at line boundaries into pieces of about max_chars."""
  if max_chars <= 0 or len(doc.text) <= max_chars:
    yield doc
    return
  start, k = 0, 0
  while start < len(doc.text):
    end = min(len(doc.text), start + max_chars)
    if end < len(doc.text):
      newline = doc.text.rfind("\n", start, end)
      end = newline + 1 if newline > start else end
    yield Document(f"{doc.name}#{k}", doc.text[start:end])
    start, k = end, k + 1


def hash_fraction(name: str) -> float:
  """A uniform number in [0, 1) from a hash of `name`: the same on every machine and run."""
  digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_of(name: str, val_fraction: float) -> str:
  """'val' when the name's hash falls below val_fraction, else 'train'."""
  return "val" if hash_fraction(name) < val_fraction else "train"


def forced_validation(names: Sequence[str], val_fraction: float) -> set[str]:
  """When the hash split leaves one side empty: the round(f n) (at least 1) names of smallest
  hash as validation, so a requested fraction never comes out empty by chance."""
  if len(names) < 2:
    raise CorpusError(f"the corpus has {len(names)} document piece(s); a train/validation "
                      "split needs at least 2: cut long documents with "
                      "--config.data.split_chunk_chars (e.g. 20000) or name a validation "
                      "corpus with --config.data.val_corpus")
  k = min(max(1, round(val_fraction * len(names))), len(names) - 1)
  return set(sorted(names, key=hash_fraction)[:k])
