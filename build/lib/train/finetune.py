"""LoRA fine-tuning from a base workdir (`config.init_from`): the base the trainer adapts.

  python -m train --config=train/configs/lora.py --config.init_from=runs/BASE --workdir=runs/NAME
  base = load_base(config, workdir, mesh)  # adapted cfg, frozen params on the mesh, tokenizer
  task = LoraFinetune(base.cfg, base.params)                    (train/tasks.py)

The base is a workdir trained here or imported (`python -m model.hf import`).
The run keeps its architecture, weights and tokenizer and trains LoRA adapters
only: the train state's params are the adapters, the optimizer state covers
them alone, and the base params are a frozen argument of the jitted steps.
Checkpoints hold the base as 'params' and the adapters as 'lora', so `python -m
sample`, `python -m experiments.interpret` and `python -m model.hf export` read a
LoRA run like any workdir (model.store.load_params merges the adapters).

A fresh run reads the base from `init_from` (its latest checkpoint; a base that
is itself a LoRA run has its adapters merged first). A resumed run reads the
base from its own checkpoint, so it does not depend on `init_from` staying as
it was. The run's sequence length is the base run's (its config.json 'train'
section) unless config.data.seq_len sets one; an imported base, which has no
training run, gets min(256, max_seq_len).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import traverse_util
from jax.sharding import Mesh

import model
from model import store
from model.config import LORA_TARGETS, RUNTIME_FIELDS, ModelConfig
from model.lora import LORA_FIELDS, without_lora
from train.config_lib import ConfigError

# The default targets when config.model.lora_targets is unset: the attention projections the
# base has (q, k, v, o; qkv, o when they are fused).
ATTENTION_TARGETS = ("qkv", "q", "k", "v", "o")
IMPORTED_SEQ_LEN = 256  # an imported base's default sequence length (capped by max_seq_len)


@dataclasses.dataclass
class Base:
  cfg: ModelConfig          # the base's config plus the LoRA fields: what the run trains
  params: Any               # the frozen base params, sharded on the mesh
  tokenizer: store.Tokenizer  # the base's (never retrained)
  workdir: str              # init_from, absolute
  step: int                 # the base checkpoint's step
  seq_len: int              # the base run's training sequence length (or the imported default)
  sections: dict            # extra config.json sections: 'init_from' and the base's 'source'


def projections(cfg: ModelConfig) -> tuple[str, ...]:
  """The projections of cfg's layers that LoRA can adapt (names of modules holding a kernel)."""
  names = {path[-2] for path in traverse_util.flatten_dict(model.abstract_params(cfg))
           if len(path) >= 2 and path[-1] == "kernel"}
  return tuple(t for t in LORA_TARGETS if t in names)


def adapted_config(base_cfg: ModelConfig, model_section, where: str) -> ModelConfig:
  """The base's config plus config.model's LoRA fields (and runtime fields, if set).

  Any other config.model field that differs from the base's raises: a LoRA run
  cannot change the architecture it adapts.
  """
  section = model_section.to_dict() if hasattr(model_section, "to_dict") else dict(model_section)
  preset = section.pop("preset", None)
  if preset is not None:
    raise ConfigError(f"config.model.preset={preset!r}: a LoRA run keeps the architecture of "
                      f"its base ({where}); leave the preset unset")
  base = without_lora(base_cfg)
  ours = base.to_dict()
  changed = sorted(k for k, v in section.items()
                   if v is not None and k not in LORA_FIELDS + RUNTIME_FIELDS
                   and (list(v) if isinstance(v, tuple) else v) != ours[k])
  if changed:
    raise ConfigError(
        "config.model: " + ", ".join(f"{k}={section[k]!r}" for k in changed) +
        f" would change the base model in {where} (it has " +
        ", ".join(f"{k}={ours[k]!r}" for k in changed) + "); a LoRA run keeps the base's "
        f"architecture: set only lora_rank, lora_alpha, lora_targets and {RUNTIME_FIELDS}")
  rank = section.get("lora_rank") or 0
  if rank <= 0:
    raise ConfigError(f"config.model.lora_rank={rank}: a LoRA run needs a rank > 0")
  available = projections(base)
  targets = section.get("lora_targets")
  if not targets:
    targets = tuple(t for t in ATTENTION_TARGETS if t in available)
  missing = [t for t in targets if t not in available]
  if missing:
    raise ConfigError(f"config.model.lora_targets={tuple(targets)!r}: {missing} not a projection "
                      f"of the base model in {where}; its projections are {available}")
  fields = {k: section[k] for k in RUNTIME_FIELDS if section.get(k) is not None}
  if section.get("lora_alpha") is not None:
    fields["lora_alpha"] = float(section["lora_alpha"])
  try:
    return base.replace(lora_rank=rank, lora_targets=tuple(targets), **fields)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def _base_seq_len(saved: dict, cfg: ModelConfig) -> int:
  """The sequence length the base was trained at (a LoRA base's own base's, recursively
  recorded), or the imported default."""
  trained = (saved.get("train") or {}).get("data", {}).get("seq_len")
  return int(trained) if trained else min(IMPORTED_SEQ_LEN, cfg.max_seq_len)


def _own_base(workdir: str, mesh: Mesh) -> store.LoadedParams:
  """A resumed LoRA run's frozen base: the 'params' item of its newest readable checkpoint
  (every checkpoint holds the same base; the trainer sets damaged steps aside)."""
  problems = []
  for step in reversed(store.all_steps(workdir)):
    try:
      return store.load_params(workdir, step, shardings=mesh, merge_lora=False)
    except store.CheckpointError as e:
      problems.append(str(e).split(";")[0])
  raise store.CheckpointError(f"no readable base params in {workdir}: " + "; ".join(problems))


def load_base(config, workdir: str, mesh: Mesh) -> Base:
  """The base of a LoRA run in `workdir` (config.init_from, or the run's own checkpoint when
  resuming), its params placed on `mesh` by the model's sharding rules."""
  init_from = os.path.abspath(config.init_from)
  workdir = os.path.abspath(workdir)
  if init_from == workdir:
    raise ConfigError(f"config.init_from={config.init_from!r} is the run's own workdir; "
                      "fine-tune into a new one")
  resuming = store.latest_step(workdir) is not None
  source = workdir if resuming else init_from
  try:
    saved = store.read_config(source)
    source_cfg = store.load_model_config(source)
    if resuming and not source_cfg.lora_rank:
      raise ConfigError(f"workdir {workdir} holds a training run without LoRA adapters, not a "
                        "LoRA fine-tune; choose a new workdir")
    cfg = adapted_config(source_cfg, config.model, config.init_from)
    if resuming and (cfg.lora_rank, cfg.lora_targets) != (source_cfg.lora_rank,
                                                          source_cfg.lora_targets):
      raise ConfigError(
          f"workdir {workdir} trains rank-{source_cfg.lora_rank} adapters on "
          f"{source_cfg.lora_targets}; resuming it with rank {cfg.lora_rank} on "
          f"{cfg.lora_targets} is not possible: use the same LoRA settings or a new workdir")
    # Resuming: the base is this run's own 'params' item (never its adapters: the state has
    # them). Fresh: the base's model, with its own adapters merged if it is a LoRA run.
    loaded = (_own_base(workdir, mesh) if resuming else
              store.load_params(source, shardings=mesh))
    tokenizer = store.load_tokenizer(source)
  except store.WorkdirError as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from e
  # An imported base's 'source' (architecture, stop ids) serves export and the sampler here too.
  sections = ({k: saved[k] for k in ("init_from", "source") if k in saved} if resuming else
              {"init_from": {"workdir": init_from, "step": loaded.step},
               **({"source": saved["source"]} if "source" in saved else {})})
  if jax.process_index() == 0:
    path = getattr(tokenizer, "path", None)
    if path is not None:  # the sampler reads the tokenizer file from the run's own workdir
      store.copy_file(path, os.path.join(workdir, os.path.basename(path)))
  return Base(cfg=cfg, params=loaded.params, tokenizer=tokenizer,
              workdir=sections["init_from"]["workdir"], step=sections["init_from"]["step"],
              seq_len=_base_seq_len(saved, cfg), sections=sections)
