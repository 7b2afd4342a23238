"""The train state and its placement on the device mesh.

  mesh = make_run_mesh(config.mesh_shape)                       # ('data', 'fsdp', 'tensor')
  state, shardings = create_state(cfg, tx, mesh, rng)           # created sharded
  state, shardings = create_state(cfg, tx, mesh, rng, collection="lora")  # adapters only

State is never built on one device and then moved: `jax.eval_shape` gives the
abstract state, the logical-axis rules (model/sharding.py) give each leaf's
NamedSharding, and `jit(init, out_shardings=...)` materializes every shard
where it lives. Optimizer moments (mu, nu) take the sharding of the parameter
they belong to; scalars (counts) are replicated. In a LoRA fine-tune
(collection='lora') the state's params are the adapters, so the optimizer
state exists for them alone; the frozen base params live outside the state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import model
from model.config import ModelConfig
from model.sharding import LOGICAL_RULES, batch_sharding, make_mesh, param_shardings


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray   # int32 scalar: optimizer updates applied so far
  params: Any        # the trained params: the model's, or a fine-tune's LoRA adapters
  opt_state: Any
  rng: jnp.ndarray    # uint32[2] raw PRNG key (dropout); folded with the step each update


def make_run_mesh(shape, devices=None) -> Mesh:
  return make_mesh(tuple(int(s) for s in shape), devices)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Trace under the mesh and the logical rules so the model's activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def _path_keys(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)


def opt_state_shardings(abstract_opt_state, params_shardings, abstract_params, mesh: Mesh):
  """Each optimizer-state leaf takes the sharding of the parameter whose path ends its path."""
  by_path = {}
  for (path, sharding), leaf in zip(
      jax.tree_util.tree_flatten_with_path(params_shardings)[0],
      jax.tree.leaves(abstract_params), strict=True):
    by_path[_path_keys(path)] = (sharding, leaf.shape)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng,
               collection: str = "params") -> TrainState:
  """A fresh state training `collection`: 'params' (the model) or 'lora' (its adapters)."""
  init_rng, dropout_rng = jax.random.split(rng)
  params = model.init_lora(cfg, init_rng) if collection == "lora" else model.init(cfg, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    collection: str = "params") -> tuple[TrainState, TrainState]:
  """(abstract state, NamedSharding of every leaf) for `cfg` on `mesh`."""
  abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.PRNGKey(0), collection))
  p_shard = param_shardings(cfg, mesh, collection=collection)
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(
      step=replicated, params=p_shard,
      opt_state=opt_state_shardings(abstract.opt_state, p_shard, abstract.params, mesh),
      rng=replicated)
  return abstract, shardings


def create_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rng,
                 collection: str = "params") -> tuple[TrainState, TrainState]:
  """A fresh state created directly in its shards, and its shardings."""
  _, shardings = state_shardings(cfg, tx, mesh, collection)
  with activation_sharding(mesh):
    state = jax.jit(lambda r: init_state(cfg, tx, r, collection), out_shardings=shardings)(rng)
  return state, shardings


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [A, B, T]: A micro-steps unsharded, B over ('data', 'fsdp')."""
  spec = batch_sharding(mesh, ndim=2).spec
  return NamedSharding(mesh, P(None, *spec))


def put_batch(batch: dict, mesh: Mesh, global_rows: int) -> dict:
  """Process-local numpy [A, b_local, T] arrays -> global jax arrays [A, b, T] on the mesh."""
  sharding = data_sharding(mesh)

  def put(x):
    shape = (x.shape[0], global_rows) + x.shape[2:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return {k: put(v) for k, v in batch.items()}
