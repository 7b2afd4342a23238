"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time.

A Hugging Face model directory holds its weights either in one file,
`model.safetensors`, or in shards named by `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}).
`SafetensorsReader` opens each shard lazily with `safetensors.safe_open` and
reads single tensors or slices of them, so a checkpoint is never held in
memory as a whole. `write_safetensors` streams named tensors into shards of
at most `max_shard_size` bytes in the same layout.

Bad input raises `CheckpointError` naming the file: a truncated or corrupt
shard, an index whose `weight_map` names a file outside the directory, a JSON
file that does not parse or is not an object.

numpy has no bfloat16 of its own; importing `ml_dtypes` (a jax dependency)
registers it, and safetensors then reads and writes BF16 tensors as numpy
arrays.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model.store.files import atomic_path, write_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


class CheckpointError(ValueError):
  """A Hugging Face checkpoint directory is missing files or tensors, or has wrong shapes."""


class SafetensorsReader:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint directory.

    with SafetensorsReader(hf_dir) as reader:
      reader.shape("model.norm.weight")         # header only, no data read
      reader.read("model.layers.0.self_attn.qkv_proj.weight", rows=(0, 3072))
  """

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    files, index = _checkpoint_files(hf_dir)
    self._handles: dict[str, object] = {}
    self._file_of: dict[str, str] = {}  # tensor name -> shard file
    self._shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
      handle = self._open(file)
      with _reading(self._path(file)):
        for name in handle.keys():
          if index is None or index.get(name) == file:
            self._file_of[name] = file
            self._shapes[name] = tuple(handle.get_slice(name).get_shape())
    missing = sorted(set(index or ()) - set(self._shapes))
    if missing:
      raise CheckpointError(f"{hf_dir}/{INDEX_NAME} lists tensor(s) its shard files do not "
                            f"contain: {missing[:5]}")

  def _path(self, file: str) -> str:
    return os.path.join(self.hf_dir, file)

  def _open(self, file: str):
    if file not in self._handles:
      path = self._path(file)
      if not os.path.exists(path):
        raise CheckpointError(f"checkpoint shard {path} is missing (named by {INDEX_NAME})")
      with _reading(path):
        self._handles[file] = safe_open(path, framework="numpy")
    return self._handles[file]

  def names(self) -> list[str]:
    return sorted(self._shapes)

  def __contains__(self, name: str) -> bool:
    return name in self._shapes

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._shapes:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}")
    return self._shapes[name]

  def read(self, name: str, *, axis: int = 0, span: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor `name`, or only its entries span[0]:span[1] along `axis` (read from disk)."""
    shape = self.shape(name)
    file = self._file_of[name]
    handle = self._open(file)
    with _reading(self._path(file), name):
      if span is None or (span[0] == 0 and span[1] == shape[axis]):
        return handle.get_tensor(name)
      index = [slice(None)] * len(shape)
      index[axis] = slice(*span)
      return handle.get_slice(name)[tuple(index)]

  def close(self):
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@contextlib.contextmanager
def _reading(path: str, tensor: str | None = None):
  """safetensors' errors on a truncated or corrupt file -> CheckpointError naming the file."""
  try:
    yield
  except (SafetensorError, OSError) as e:
    what = f"tensor {tensor!r} of " if tensor else ""
    raise CheckpointError(f"cannot read {what}{path} (truncated or not a safetensors file?): "
                          f"{e}") from None


def _checkpoint_files(hf_dir: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of hf_dir, and the index's {tensor name: file} (None: one file)."""
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"Hugging Face model directory {hf_dir!r} does not exist")
  index_path = os.path.join(hf_dir, INDEX_NAME)
  if os.path.exists(index_path):
    index = _weight_map(index_path)
    return sorted(set(index.values())), index
  if os.path.exists(os.path.join(hf_dir, WEIGHTS_NAME)):
    return [WEIGHTS_NAME], None
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if len(files) == 1:
    return files, None
  others = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
  hint = (f"; it has {others}: convert them to safetensors first (e.g. load with transformers "
          "and save_pretrained(..., safe_serialization=True))") if others else ""
  raise CheckpointError(f"{hf_dir} has no {WEIGHTS_NAME} and no {INDEX_NAME}"
                        + (f" (found several .safetensors files: {files})" if files else "")
                        + hint)


def _weight_map(index_path: str) -> dict[str, str]:
  """The index's {tensor name: shard file}, every file a relative path inside its directory.

  Checked lexically, not with realpath: the Hugging Face cache's snapshot files are
  symlinks into a blobs/ directory beside the snapshot, and those are fine.
  """
  weight_map = read_json(index_path).get("weight_map")
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) and v for v in weight_map.values()):
    raise CheckpointError(f"{index_path}: 'weight_map' must be an object of tensor name -> "
                          "shard file name")
  for name, file in weight_map.items():
    parts = os.path.normpath(file).split(os.sep)
    if os.path.isabs(file) or parts[0] in (os.pardir, os.curdir):
      raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {file!r} is not a file "
                            "inside the model directory; shards must be relative paths in it")
  return weight_map


def parse_size(size: int | str) -> int:
  """Bytes in `size`: an int, or a string like '5GB', '200MB', '10KiB'."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' or '200MB'")
  number, prefix, binary = match.groups()
  base = 1024 if binary else 1000
  return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def write_safetensors(out_dir: str, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype,
                                                               Callable[[], np.ndarray]]],
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Write (name, shape, dtype, make_array) tensors to out_dir; returns the files written.

  Tensors are grouped in order into shards of at most `max_shard_size` bytes
  (a single larger tensor gets a shard of its own), and each shard's arrays
  are made only while that shard is written. One shard is `model.safetensors`;
  several are `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
  """
  limit = parse_size(max_shard_size)
  shards: list[list] = [[]]
  shard_bytes = 0
  for entry in tensors:
    _, shape, dtype, _ = entry
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shards[-1] and shard_bytes + nbytes > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(entry)
    shard_bytes += nbytes
  os.makedirs(out_dir, exist_ok=True)
  names = ([WEIGHTS_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards, strict=True):
    arrays = {}
    for name, shape, dtype, make in shard:
      array = np.ascontiguousarray(make(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: made shape {array.shape}, declared {tuple(shape)}")
      arrays[name] = array
      weight_map[name] = file
      total += array.nbytes
    with atomic_path(os.path.join(out_dir, file)) as tmp:
      save_file(arrays, tmp, metadata={"format": "pt"})
  if len(shards) > 1:
    write_json(os.path.join(out_dir, INDEX_NAME),
               {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)
  return names


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def read_json(path: str, *, required: bool = True) -> dict:
  """The JSON object in `path` ({} when it is absent and not `required`).

  A missing required file, a file that is not valid JSON and one that holds
  something other than an object raise CheckpointError naming the file.
  """
  if not os.path.exists(path):
    if required:
      raise CheckpointError(f"{path} does not exist")
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path} must hold a JSON object, not {JSON_TYPES[type(obj)]}")
  return obj
