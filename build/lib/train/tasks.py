"""What a run trains: the trainable tree, the loss, the checkpoint items, the inference view.

  task = Pretrain(cfg)                          # every parameter of the model
  task = LoraFinetune(cfg, base_params)         # LoRA adapters on a frozen base (finetune.py)

The state (train/state.py), the steps (train/steps.py), the checkpointer and the
trainer see a run only through its task:

  task.collection                  'params' or 'lora': what the state's params are
  task.init(rng)                   a fresh trainable tree
  task.frozen                      params outside the state (a jit argument), or None
  task.token_losses(trainable, frozen, batch, rng=None)   per-token cross-entropy [b, T]
  task.checkpoint_items()          items saved beside the state (a LoRA run's base 'params')
  task.inference(trainable)        (cfg, params) of a plain model: what the sampler runs
  task.counts()                    trainable vs total parameters
  task.flops_per_token(seq_len)    training FLOPs per token (for MFU)

Loss per token (b rows of T targets): -log softmax(logits_bt)[y_bt]; the steps mask
and average it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

import model
from model import lora as lora_lib
from model.config import ModelConfig
from train import flops


def cross_entropy(cfg: ModelConfig, params, batch: dict, *, document_masking: bool,
                  rng=None, lora=None):
  """Per-token cross-entropy [b, T] (float32) of one micro-batch (dict of [b, T] arrays);
  dropout is on when `rng` is given."""
  logits_BTV, _ = model.apply(
      cfg, params, batch["inputs"], positions_BT=batch["positions"],
      segment_ids_BT=batch["segment_ids"] if document_masking else None,
      deterministic=rng is None, rng=rng, lora=lora)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])


@dataclasses.dataclass
class Pretrain:
  """Train every parameter of `cfg`'s model from scratch."""

  cfg: ModelConfig
  document_masking: bool = True
  collection = "params"
  frozen = None

  def init(self, rng):
    return model.init(self.cfg, rng)

  def token_losses(self, trainable, frozen, batch: dict, rng=None):
    del frozen
    return cross_entropy(self.cfg, trainable, batch, document_masking=self.document_masking,
                         rng=rng)

  def checkpoint_items(self) -> dict[str, Any]:
    return {}

  def inference(self, trainable):
    return self.cfg, trainable

  def counts(self) -> lora_lib.LoraCount:
    total = model.count_params(self.cfg).total
    return lora_lib.LoraCount(trainable=total, total=total)

  def flops_per_token(self, seq_len: int) -> float:
    return model.flops_per_token(self.cfg, seq_len)


@dataclasses.dataclass
class LoraFinetune:
  """Train LoRA adapters (cfg.lora_rank, cfg.lora_targets) on frozen `base_params`.

  The base params stay outside the train state: no optimizer state, no gradient,
  passed to the jitted steps as they are placed (never donated). Checkpoints hold
  them as 'params' beside the adapters ('lora'), so every reader of a workdir
  finds the base where it always is.
  """

  cfg: ModelConfig
  base_params: Any
  document_masking: bool = True
  collection = "lora"

  @property
  def frozen(self):
    return self.base_params

  def init(self, rng):
    return model.init_lora(self.cfg, rng)

  def token_losses(self, trainable, frozen, batch: dict, rng=None):
    return cross_entropy(self.cfg, frozen, batch, document_masking=self.document_masking,
                         rng=rng, lora=trainable)

  def checkpoint_items(self) -> dict[str, Any]:
    return {"params": self.base_params}

  def inference(self, trainable):
    return lora_lib.without_lora(self.cfg), lora_lib.merge(self.cfg, self.base_params, trainable)

  def counts(self) -> lora_lib.LoraCount:
    return lora_lib.count(model.abstract_params(self.cfg),
                          model.abstract_params(self.cfg, "lora"))

  def flops_per_token(self, seq_len: int) -> float:
    return flops.lora_flops_per_token(self.cfg, seq_len, self.counts().trainable)
