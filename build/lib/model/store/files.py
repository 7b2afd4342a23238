"""Atomic file writes: a reader (or a crash) never sees half a file.

  with atomic_open(path, "w") as f:      # a temporary file beside `path`, renamed over it
    f.write(text)                        # only when the block ends without an error
  with atomic_path(path) as tmp:         # for writers that want a file name
    save_file(tensors, tmp)
  write_json(path, obj); copy_file(src, dst)

Every file the project writes outside orbax's checkpoints goes through
`atomic_path`: config.json, tokenizer models, token caches, sweep records,
exported Hugging Face files. The temporary name is unique per writer
(tempfile in the target's directory, so the final rename never crosses a file
system), and it is removed when the write fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str):
  """A temporary file name beside `path`, renamed over `path` when the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """A file object for `path` that replaces it atomically when the block succeeds."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f
    f.flush()
    os.fsync(f.fileno())


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """json.dump(obj) into `path` atomically (indent 2, values json cannot hold as str)."""
  with atomic_open(path, "w") as f:
    json.dump(obj, f, indent=2, default=str, **dump_kwargs)


def copy_file(src: str, dst: str) -> None:
  """Copy `src` to `dst` atomically (nothing happens when they are the same file)."""
  if os.path.exists(dst) and os.path.samefile(src, dst):
    return
  with open(src, "rb") as source, atomic_open(dst, "wb") as target:
    shutil.copyfileobj(source, target)
