"""The jitted train and eval steps of a task (train/tasks.py).

Loss: the mean next-token cross-entropy over the target tokens the loss mask keeps,

  L = sum_{b,t} m_bt * (-log softmax(logits_bt)[y_bt]) / sum_{b,t} m_bt

With gradient accumulation the batch [A, b, T] is scanned over its A
micro-batches inside the one jitted step; each micro-batch contributes its
masked sum divided by the whole batch's token count, so the summed gradients
equal the gradient of the big-batch mean exactly.

A step whose loss or gradient is not finite leaves the state unchanged and
reports `nonfinite = 1`; the trainer stops the run at the next check, so no
checkpoint ever holds a broken state.

The task's frozen params (a LoRA run's base) are a third jit argument: neither
donated nor a baked-in constant, placed as they already are, and no gradient
flows to them (only the state's params are differentiated).

Evaluation (`evaluate_windows`: the trainer's evaluate() and `python -m train.evaluate`)
sums the masked per-token loss, the target tokens and the UTF-8 bytes those tokens stand
for (train/tokenizer.py token_byte_lengths) over the windows, then

  val_loss = sum loss / tokens   val_ppl = exp(val_loss)   val_bpb = sum loss / (ln 2 bytes)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.state import TrainState, activation_sharding, data_sharding, put_batch


def _shardings_of(tree):
  return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def _uses_dropout(task) -> bool:
  return task.cfg.dropout_rate > 0 or task.cfg.attn_dropout_rate > 0


def make_train_step(task, tx: optax.GradientTransformation, schedule: Callable, *, mesh: Mesh,
                    shardings: TrainState):
  """train_step(state, batch) -> (state, metrics), one jit; the state is donated.
  train_step.lower(state, batch) lowers that jit for abstract arguments (AOT)."""
  dropout = _uses_dropout(task)

  def micro_loss(trainable, frozen, micro, rng, total):
    losses_BT = task.token_losses(trainable, frozen, micro, rng=rng if dropout else None)
    return jnp.sum(losses_BT * micro["loss_mask"]) / total

  grad_fn = jax.value_and_grad(micro_loss)

  def train_step(state: TrainState, batch: dict, frozen):
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    step_rng = jax.random.fold_in(state.rng, state.step)
    accum = batch["inputs"].shape[0]
    if accum == 1:
      loss, grads = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[0], batch), step_rng,
                            total)
    else:
      def body(carry, inputs):
        grads_acc, loss_acc = carry
        micro, i = inputs
        loss_i, grads_i = grad_fn(state.params, frozen, micro, jax.random.fold_in(step_rng, i),
                                  total)
        return (jax.tree.map(jnp.add, grads_acc, grads_i), loss_acc + loss_i), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                      (batch, jnp.arange(accum)))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    param_norm = optax.global_norm(params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=state.rng)
    # A bad step changes nothing; the host sees nonfinite=1 and stops the run.
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "param_norm": jnp.where(ok, param_norm, optax.global_norm(state.params)),
               "lr": jnp.asarray(schedule(state.step), jnp.float32),
               "tokens": total, "nonfinite": 1 - ok.astype(jnp.int32)}
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(train_step,
                   in_shardings=(shardings, data_sharding(mesh), _shardings_of(task.frozen)),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def run(state, batch):
    with activation_sharding(mesh):
      return jitted(state, batch, task.frozen)

  def lower(state, batch):
    """The same jit lowered ahead of time; state and batch may be jax.ShapeDtypeStructs
    (experiments/plan.py compiles it without allocating a weight)."""
    with activation_sharding(mesh):
      return jitted.lower(state, batch, task.frozen)

  run.lower = lower
  return run


def make_eval_step(task, *, mesh: Mesh, params_shardings):
  """eval_step(trainable, batch [1, b, T], byte_lengths [V]) -> sums of loss, tokens, bytes."""

  def eval_step(trainable, batch, byte_lengths_V, frozen):
    micro = jax.tree.map(lambda x: x[0], batch)
    losses_BT = task.token_losses(trainable, frozen, micro)
    mask_BT = micro["loss_mask"]
    return {"loss_sum": jnp.sum(losses_BT * mask_BT), "tokens": jnp.sum(mask_BT),
            "bytes": jnp.sum(byte_lengths_V[micro["targets"]] * mask_BT)}

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(eval_step, in_shardings=(params_shardings, data_sharding(mesh), replicated,
                                            _shardings_of(task.frozen)),
                   out_shardings=replicated)

  def run(trainable, batch, byte_lengths_V):
    with activation_sharding(mesh):
      return jitted(trainable, batch, byte_lengths_V, task.frozen)

  return run


def evaluate_windows(eval_step: Callable, trainable, batches: Iterable[dict], *, mesh: Mesh,
                     rows: int, byte_lengths_V) -> dict[str, float]:
  """val_loss (nats/token), val_ppl, val_bpb, val_tokens, val_bytes of `eval_step` (from
  make_eval_step) over host batches [1, b_local, T] (train.data.eval_batches) of `rows`
  global rows; byte_lengths_V: [V] UTF-8 bytes per token id."""
  byte_lengths_V = jnp.asarray(byte_lengths_V, jnp.float32)
  totals = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  for batch in batches:
    out = eval_step(trainable, put_batch(batch, mesh, rows), byte_lengths_V)
    # One multi-device program in flight at a time: eval steps do not depend on each other,
    # and on CPU devices dozens of them queued at once competed for the same threads (a
    # collective timed out under load). The host sum costs nothing next to a forward pass.
    for key, value in jax.device_get(out).items():
      totals[key] += float(value)
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
          "val_bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
          "val_tokens": totals["tokens"], "val_bytes": totals["bytes"]}
