"""Which Hugging Face tensor holds which of this project's parameters, both ways.

An architecture module (gpt2.py, llama.py, phi3.py) describes a checkpoint as
a list of `HFTensor`s. Each one is the concatenation, along its output axis,
of `Piece`s: column ranges of our parameters (kernels are [in, out] here, so
a piece is kernel[..., start:stop]). The same description drives both
directions:

  import  every parameter leaf is read from the slices of the HF tensors that
          hold its pieces (`safe_open(...).get_slice`, nothing else is read),
          stacked over layers on the host when cfg.scan_layers, and put on its
          device or mesh sharding leaf by leaf;
  export  every HF tensor is concatenated from its pieces when its shard is
          written.

torch.nn.Linear stores weights [out, in], so most HF kernels are `transpose`d
pieces; GPT-2's Conv1D already stores [in, out]. Fused HF tensors (GPT-2
c_attn, Phi-3 qkv_proj and gate_up_proj) are several pieces, and a fused
parameter of ours (cfg.fused_qkv, cfg.fused_gate_up) is several pieces of one
leaf, so any mix of fused and split layouts converts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import traverse_util

from model.api import abstract_params
from model.config import ModelConfig
from model.hf.safetensors_io import CheckpointError, SafetensorsReader

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
  """Columns [start, stop) of the last axis of our parameter at `path` (within a layer for
  per-layer tensors); `path` None stands for zeros (a bias our config does not have)."""

  path: Path | None
  start: int
  stop: int

  @property
  def size(self) -> int:
    return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """A checkpoint tensor: its pieces concatenated along its output axis (axis 0 when
  `transpose`, i.e. a torch Linear's [out, in] weight; the last axis otherwise)."""

  name: str
  pieces: tuple[Piece, ...]
  layer: int | None = None
  transpose: bool = False


def projection(cfg: ModelConfig, name: str, param: str = "kernel") -> Piece:
  """Our piece holding projection `name` (q k v o gate up down) 'kernel' or 'bias'.

  Fused layouts: qkv = [q | k | v] with widths (N H, K H, K H); gate_up = [gate | up] with
  widths (F, F), the order of Phi-3's checkpoints. A bias the config does not have is zeros.
  """
  n, k, h, f, d = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.ffn_size, cfg.d_model
  widths = {"q": n * h, "k": k * h, "v": k * h, "o": d, "gate": f, "up": f, "down": d}
  if name not in widths:
    raise ValueError(f"unknown projection {name!r}; known: {sorted(widths)}")
  width = widths[name]
  has_bias = has_projection_bias(cfg, name)
  if param == "bias" and not has_bias:
    return Piece(None, 0, width)
  if name in ("q", "k", "v") and cfg.fused_qkv:
    start = {"q": 0, "k": n * h, "v": (n + k) * h}[name]
    return Piece(("attn", "qkv", param), start, start + width)
  if name in ("gate", "up") and cfg.fused_gate_up:
    start = 0 if name == "gate" else f
    return Piece(("mlp", "gate_up", param), start, start + width)
  group = "attn" if name in ("q", "k", "v", "o") else "mlp"
  return Piece((group, name, param), 0, width)


def has_projection_bias(cfg: ModelConfig, name: str) -> bool:
  """Does our projection `name` (q k v o gate up down) have a bias under cfg?"""
  if name == "o":
    return cfg.attn_bias and cfg.o_bias
  return cfg.attn_bias if name in ("q", "k", "v") else cfg.mlp_bias


def whole(path: Path, width: int) -> Piece:
  """All of our parameter at `path` (its last axis is `width` wide)."""
  return Piece(path, 0, width)


# ---- shapes -------------------------------------------------------------------------------

def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """{(layer or None, *path): shape} of every parameter leaf, per layer (no L axis)."""
  abstract = abstract_params(cfg)
  shapes = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    if path[0] == "layers":
      for i in range(cfg.n_layers):
        shapes[(i, *path[1:])] = tuple(leaf.shape[1:])
    elif path[0].startswith("layers_"):
      shapes[(int(path[0][len("layers_"):]), *path[1:])] = tuple(leaf.shape)
    else:
      shapes[(None, *path)] = tuple(leaf.shape)
  return shapes


def hf_shape(tensor: HFTensor, shapes: dict) -> tuple[int, ...]:
  """The shape `tensor` must have in the checkpoint, from our parameter shapes."""
  parts = []
  for piece in tensor.pieces:
    if piece.path is None:
      parts.append((piece.size,))
      continue
    key = (tensor.layer, *piece.path)
    if key not in shapes:
      raise CheckpointError(f"mapping of {tensor.name!r} names parameter {_key_str(key)} that "
                            "this config does not have")
    parts.append(shapes[key][:-1] + (piece.size,))
  lead = {p[:-1] for p in parts}
  if len(lead) != 1:
    raise CheckpointError(f"mapping of {tensor.name!r} joins pieces of shapes {parts}")
  shape = lead.pop() + (sum(p[-1] for p in parts),)
  return shape[::-1] if tensor.transpose else shape


def _key_str(key) -> str:
  layer, *path = key
  return "/".join(([f"layers_{layer}"] if layer is not None else []) + list(path))


# ---- import -------------------------------------------------------------------------------

def check_checkpoint(tensors: list[HFTensor], shapes: dict, reader: SafetensorsReader,
                     ignored: Callable[[str], bool]) -> None:
  """Every mapped tensor present with the right shape, every parameter covered, nothing extra."""
  coverage: dict = {key: [] for key in shapes}
  for tensor in tensors:
    expected = hf_shape(tensor, shapes)
    if tensor.name not in reader:
      raise CheckpointError(
          f"tensor {tensor.name!r} is missing from the checkpoint in {reader.hf_dir} (it holds "
          f"{', '.join(_key_str((tensor.layer, *p.path)) for p in tensor.pieces if p.path)})")
    found = reader.shape(tensor.name)
    if found != expected:
      raise CheckpointError(
          f"tensor {tensor.name!r} has shape {list(found)} in {reader.hf_dir}, but config.json "
          f"implies {list(expected)}")
    for piece in tensor.pieces:
      if piece.path is not None:
        coverage[(tensor.layer, *piece.path)].append((piece.start, piece.stop))
  for key, spans in coverage.items():
    width = shapes[key][-1]
    if not _tiles(sorted(spans), width):
      raise CheckpointError(f"no checkpoint tensor provides all of parameter {_key_str(key)} "
                            f"(columns covered: {sorted(spans)} of {width})")
  known = {t.name for t in tensors}
  unexpected = [n for n in reader.names() if n not in known and not ignored(n)]
  if unexpected:
    raise CheckpointError(
        f"checkpoint in {reader.hf_dir} has tensor(s) this architecture's mapping does not use: "
        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (is config.json right?)")


def _tiles(spans, width) -> bool:
  """Do the sorted [start, stop) spans cover [0, width) exactly once?"""
  edge = 0
  for start, stop in spans:
    if start != edge:
      return False
    edge = stop
  return edge == width


def read_params(cfg: ModelConfig, tensors: list[HFTensor], reader: SafetensorsReader, *,
                shardings=None) -> dict:
  """Our params, read leaf by leaf from the checkpoint and placed on device (or `shardings`).

  Scanned layers are stacked on the host one leaf at a time and sent to their
  sharding from there (model.stack_layers' layout: 'layers' with L on axis 0;
  model.stack_layers itself would first gather each stacked leaf on one device),
  so host memory holds one leaf plus one layer of it at a time, and no device
  ever holds more than its shard.
  """
  dtype = np.dtype(cfg.param_dtype)
  sources: dict = {}  # (layer, *path) -> [(piece, tensor, offset of the piece in tensor)]
  for tensor in tensors:
    offset = 0
    for piece in tensor.pieces:
      if piece.path is not None:
        sources.setdefault((tensor.layer, *piece.path), []).append((piece, tensor, offset))
      offset += piece.size

  def leaf(layer, path):
    parts = []
    for piece, tensor, offset in sorted(sources[(layer, *path)], key=lambda s: s[0].start):
      ndim = len(reader.shape(tensor.name))
      part = reader.read(tensor.name, axis=0 if tensor.transpose else ndim - 1,
                         span=(offset, offset + piece.size))
      parts.append((part.T if tensor.transpose else part).astype(dtype, copy=False))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

  abstract = traverse_util.flatten_dict(abstract_params(cfg))
  flat_shardings = (traverse_util.flatten_dict(shardings) if shardings is not None else {})
  if shardings is not None and set(flat_shardings) != set(abstract):
    raise ValueError("shardings do not match the parameter tree of the imported config; build "
                     "them with model.sharding.param_shardings(model.hf.load_config(hf_dir), "
                     "mesh)")
  flat = {}
  for path, want in abstract.items():
    if path[0] == "layers":
      host = np.empty(want.shape, dtype)  # filled layer by layer: one extra layer at most
      for i in range(cfg.n_layers):
        host[i] = leaf(i, path[1:])
    elif path[0].startswith("layers_"):
      host = leaf(int(path[0][len("layers_"):]), path[1:])
    else:
      host = leaf(None, path)
    assert host.shape == want.shape, (path, host.shape, want.shape)
    flat[path] = jax.device_put(host, flat_shardings.get(path))
    del host
  return traverse_util.unflatten_dict(flat)


# ---- export -------------------------------------------------------------------------------

def tensor_entries(cfg: ModelConfig, params, tensors: Iterable[HFTensor], dtype) -> list:
  """(name, shape, dtype, make_array) per HF tensor, for `write_safetensors`."""
  flat = traverse_util.flatten_dict(params)
  shapes = param_shapes(cfg)
  found = {k: tuple(np.shape(v)) for k, v in flat.items()}
  expected = {}
  for key, shape in shapes.items():
    layer, *path = key
    if layer is None:
      expected[tuple(path)] = shape
    elif cfg.scan_layers:
      expected[("layers", *path)] = (cfg.n_layers, *shape)
    else:
      expected[(f"layers_{layer}", *path)] = shape
  if found != expected:
    diff = sorted(set(found.items()) ^ set(expected.items()))[:6]
    raise ValueError(f"params do not match the config's parameter tree (scan_layers="
                     f"{cfg.scan_layers}); differing (path, shape): {diff}")

  def piece_array(layer, piece: Piece):
    if piece.path is None:
      return np.zeros((piece.size,), dtype)
    if layer is None:
      value = flat[piece.path]
    elif cfg.scan_layers:
      value = flat[("layers", *piece.path)][layer]
    else:
      value = flat[(f"layers_{layer}", *piece.path)]
    return np.asarray(value[..., piece.start:piece.stop]).astype(dtype, copy=False)

  def maker(tensor: HFTensor):
    def make():
      parts = [piece_array(tensor.layer, p) for p in tensor.pieces]
      array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
      return array.T if tensor.transpose else array
    return make

  return [(t.name, hf_shape(t, shapes), np.dtype(dtype), maker(t)) for t in tensors]
