"""The jitted train and eval steps.

Loss: the mean next-token cross-entropy over the target tokens the loss mask keeps,

  L = sum_{b,t} m_bt * (-log softmax(logits_bt)[y_bt]) / sum_{b,t} m_bt

With gradient accumulation the batch [A, b, T] is scanned over its A
micro-batches inside the one jitted step; each micro-batch contributes its
masked sum divided by the whole batch's token count, so the summed gradients
equal the gradient of the big-batch mean exactly.

A step whose loss or gradient is not finite leaves the state unchanged and
reports `nonfinite = 1`; the trainer stops the run at the next check, so no
checkpoint ever holds a broken state.

LoRA fine-tuning (`frozen_params` given): the state's params are the adapters,
the loss is model.apply(cfg, frozen_params, ..., lora=adapters), and gradients,
updates and norms concern the adapters only. The frozen params are a third jit
argument (neither donated nor a baked-in constant), placed as they already are.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import model
from model.config import ModelConfig
from train.state import TrainState, activation_sharding, data_sharding


def token_losses(cfg: ModelConfig, params, batch: dict, *, document_masking: bool,
                 deterministic: bool = True, rng=None, lora=None):
  """Per-token cross-entropy [b, T] (float32) of one micro-batch (dict of [b, T] arrays)."""
  logits_BTV, _ = model.apply(
      cfg, params, batch["inputs"], positions_BT=batch["positions"],
      segment_ids_BT=batch["segment_ids"] if document_masking else None,
      deterministic=deterministic, rng=rng, lora=lora)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])


def _needs_rng(cfg: ModelConfig) -> bool:
  return cfg.dropout_rate > 0 or cfg.attn_dropout_rate > 0


def _model_and_adapters(trained, frozen):
  """(params, lora) for model.apply: the trained tree is the model, or its LoRA adapters."""
  return (trained, None) if frozen is None else (frozen, trained)


def _shardings_of(tree):
  return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation,
                    schedule: Callable, *, document_masking: bool, mesh: Mesh,
                    shardings: TrainState, frozen_params=None):
  """jit(train_step)(state, batch) -> (state, metrics); state is donated."""
  dropout = _needs_rng(cfg)

  def micro_loss(trained, micro, rng, total, frozen):
    params, lora = _model_and_adapters(trained, frozen)
    losses_BT = token_losses(cfg, params, micro, document_masking=document_masking,
                             deterministic=not dropout, rng=rng if dropout else None, lora=lora)
    return jnp.sum(losses_BT * micro["loss_mask"]) / total

  grad_fn = jax.value_and_grad(micro_loss)

  def train_step(state: TrainState, batch: dict, frozen):
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    step_rng = jax.random.fold_in(state.rng, state.step)
    accum = batch["inputs"].shape[0]
    if accum == 1:
      loss, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch), step_rng, total,
                            frozen)
    else:
      def body(carry, inputs):
        grads_acc, loss_acc = carry
        micro, i = inputs
        loss_i, grads_i = grad_fn(state.params, micro, jax.random.fold_in(step_rng, i), total,
                                  frozen)
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
                   in_shardings=(shardings, data_sharding(mesh), _shardings_of(frozen_params)),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def run(state, batch):
    with activation_sharding(mesh):
      return jitted(state, batch, frozen_params)

  run.jitted = jitted
  return run


def make_eval_step(cfg: ModelConfig, *, document_masking: bool, mesh: Mesh, params_shardings,
                   frozen_params=None):
  """jit(eval_step)(params, batch [1, b, T], byte_lengths [V]) -> sums of loss, tokens, bytes.

  With `frozen_params` (LoRA), `params` are the adapters of the frozen model."""

  def eval_step(trained, batch, byte_lengths_V, frozen):
    micro = jax.tree.map(lambda x: x[0], batch)
    params, lora = _model_and_adapters(trained, frozen)
    losses_BT = token_losses(cfg, params, micro, document_masking=document_masking, lora=lora)
    mask_BT = micro["loss_mask"]
    return {"loss_sum": jnp.sum(losses_BT * mask_BT), "tokens": jnp.sum(mask_BT),
            "bytes": jnp.sum(byte_lengths_V[micro["targets"]] * mask_BT)}

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(eval_step, in_shardings=(params_shardings, data_sharding(mesh), replicated,
                                            _shardings_of(frozen_params)),
                   out_shardings=replicated)

  def run(params, batch, byte_lengths_V):
    with activation_sharding(mesh):
      return jitted(params, batch, byte_lengths_V, frozen_params)

  return run
