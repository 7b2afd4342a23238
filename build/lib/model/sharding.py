"""The parallelism policy: one table from logical axis names to mesh axes.

Mesh axes:  data   - pure data parallelism (params replicated)
            fsdp   - data parallelism with params, grads and optimizer state
                     sharded along 'embed' (ZeRO-3 / FSDP)
            tensor - Megatron-style tensor parallelism over heads and the FFN

Every parameter carries logical names (model/layers.py); activations are
constrained with the same names. A dimension that a mesh axis does not divide
is replicated instead (e.g. 4 kv heads on an 8-way tensor axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.api import abstract_params, logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed_act", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drop mesh axes that do not divide their dimension (replicate that dimension)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_to_sharding(logical_tree, shapes_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a pytree of logical PartitionSpecs and matching shapes."""
  def one(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules)
    return NamedSharding(mesh, _fit(mesh_spec, shape.shape, mesh))

  return jax.tree.map(one, logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg, mesh: Mesh, rules=LOGICAL_RULES, collection: str = "params"):
  """NamedSharding of every parameter of `cfg` under `rules` (nothing is allocated)."""
  return logical_to_sharding(logical_axes(cfg, collection), abstract_params(cfg, collection),
                             mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
  """Sharding of a [B, T, ...] batch: B over ('data', 'fsdp')."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)
