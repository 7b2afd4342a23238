"""The train state and its placement on the device mesh.

  abstract, shardings = state_shardings(task, tx, mesh)         # once per run
  state = create_state(task, tx, mesh, rng, shardings)           # created sharded
  batch = put_batch(host_batch, mesh, global_rows)

State is never built on one device and then moved: the task's abstract params
(one trace of the model's init) and the logical-axis rules (model/sharding.py)
give each leaf's NamedSharding, and `jit(init, out_shardings=...)` materializes
every shard where it lives. Optimizer moments (mu, nu) take the sharding of the
parameter they belong to; scalars (counts) are replicated. The state's params
are what the task trains: the model's params, or a LoRA run's adapters (whose
frozen base lives outside the state).
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
from model.sharding import LOGICAL_RULES, batch_sharding, param_shardings


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray   # int32 scalar: optimizer updates applied so far
  params: Any        # the trained tree: the model's params, or a fine-tune's LoRA adapters
  opt_state: Any
  rng: jnp.ndarray    # uint32[2] raw PRNG key (dropout); folded with the step each update


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


def init_state(task, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh state: the task's trainable tree, its optimizer state, a dropout key."""
  init_rng, dropout_rng = jax.random.split(rng)
  params = task.init(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


def state_shardings(task, tx: optax.GradientTransformation, mesh: Mesh
                    ) -> tuple[TrainState, TrainState]:
  """(abstract state, NamedSharding of every leaf) of `task` on `mesh`; nothing is allocated."""
  abstract_params = model.abstract_params(task.cfg, task.collection)
  p_shard = param_shardings(task.cfg, mesh, collection=task.collection)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt_state,
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  shardings = TrainState(
      step=replicated, params=p_shard,
      opt_state=opt_state_shardings(abstract_opt_state, p_shard, abstract_params, mesh),
      rng=replicated)
  return abstract, shardings


def create_state(task, tx: optax.GradientTransformation, mesh: Mesh, rng,
                 shardings: TrainState) -> TrainState:
  """A fresh state created directly in its shards (`shardings` from state_shardings)."""
  with activation_sharding(mesh):
    return jax.jit(lambda r: init_state(task, tx, r), out_shardings=shardings)(rng)


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
