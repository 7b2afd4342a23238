"""Run configs: a config file and its overrides -> one validated ConfigDict -> a ModelConfig.

  config = from_command_line(["--config=train/configs/default.py", "--config.num_steps=10"])
  config = load_config("train/configs/tiny.py", {"num_steps": 10, "optim.lr": 1e-3})
  model_cfg = model_config(config, vocab_size=tokenizer.vocab_size)

A config file is loaded once, by `ml_collections.config_flags` (which also parses
`--config.a.b=value` overrides into each key's type: the command line's syntax,
`--config.model.lora_targets="('q','v')"` for a tuple). Typed overrides from
Python (sweeps, tests) are set with ml_collections' own `config_path`. Either
way an unknown key fails with the closest known keys before anything compiles,
and the config is validated once.

`config.model` holds `preset` (a name from model.PRESETS or None for the
ModelConfig defaults) and one entry per ModelConfig field, each a typed
placeholder: None means "the preset's value". `vocab_size` left None is taken
from the tokenizer.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

from model.config import LORA_TARGETS, RUNTIME_FIELDS, ModelConfig
from model.presets import PRESETS, get_preset
from train.metrics import TRACKERS

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
  """A config file, an override or a config value is wrong."""


# ---- the model section -------------------------------------------------------------------------
def _field_type(field: dataclasses.Field) -> type:
  default = field.default
  if isinstance(default, bool):
    return bool
  if isinstance(default, tuple):
    return tuple
  if default is None:  # n_kv_heads, head_dim, d_ff: optional ints; rope_scaling: a mapping
    return object if "RopeScaling" in str(field.type) else int
  return type(default)


def model_section(preset: str | None = None, **fields: Any) -> ml_collections.ConfigDict:
  """config.model: the preset name plus a typed None placeholder for every ModelConfig field."""
  known = {f.name: f for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ConfigError(_unknown_message("model", unknown, ["preset", *known]))
  section = ml_collections.ConfigDict()
  section.preset = config_dict.placeholder(str)
  if preset is not None:
    section.preset = preset
  for name, field in known.items():
    section[name] = config_dict.placeholder(_field_type(field))
    if fields.get(name) is not None:
      value = fields[name]
      section[name] = tuple(value) if isinstance(value, list) else value
  return section


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None
                 ) -> ModelConfig:
  """The ModelConfig that config.model describes (`vocab_size` fills an unset vocab size)."""
  section = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  preset = section.pop("preset", None)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ConfigError(_unknown_message("model", unknown, ["preset", *sorted(known)]))
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()
               if v is not None}
  if vocab_size is not None and "vocab_size" not in overrides:
    overrides["vocab_size"] = vocab_size
  try:
    if preset is not None:
      if preset not in PRESETS:
        raise ConfigError(f"config.model.preset={preset!r} is not a preset; known presets: "
                          f"{sorted(PRESETS)}")
      return get_preset(preset, **overrides)
    return ModelConfig(**overrides)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e


# ---- loading and overriding --------------------------------------------------------------------
def _unknown_message(section: str, unknown: Iterable[str], known: Iterable[str]) -> str:
  known = list(known)
  parts = []
  for key in unknown:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    parts.append(f"{key!r}{hint}")
  where = f"config.{section}" if section else "config"
  return (f"unknown key(s) in {where}: {', '.join(parts)}; known keys: {', '.join(sorted(known))}")


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key as a dotted path ('optim.lr', 'model.n_layers', ...)."""
  keys = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(all_keys(value, path + "."))
    else:
      keys.append(path)
  return keys


def _unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """A message if `dotted` names no key of `config`, else None."""
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    section = ".".join(parts[:i])
    keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(dotted, all_keys(config), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown config key {dotted!r}{hint}; keys of config"
            f"{'.' + section if section else ''}: {', '.join(keys)}")
  return None


def set_values(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """config.<key> = value for each dotted key (typed values; the key must exist)."""
  for key, value in overrides.items():
    problem = _unknown_key(config, key)
    if problem:
      raise ConfigError(problem)
    if isinstance(value, list):
      value = tuple(value)
    try:
      config_path.set_value(key, config, value)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"config.{key}={value!r}: {e}") from None


def _override_keys(args: Sequence[str]) -> list[str]:
  keys = []
  for arg in args:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config."):
      keys.append(name[len("config."):])
  return keys


def _parse(args: Sequence[str]) -> ml_collections.ConfigDict:
  """`--config=FILE[:arg]` plus `--config.key=value` arguments through config_flags."""
  argv = ["train", *args]
  paths = [a.split("=", 1)[1].partition(":")[0] for a in args if a.startswith("--config=")]
  if paths and not os.path.isfile(paths[-1]):
    raise ConfigError(f"config file not found: {paths[-1]!r} (configs: "
                      f"{', '.join(available_configs())})")
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "a run config file",
                                           flag_values=values, lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    raise ConfigError(_explain(e, args)) from None
  except Exception as e:  # the config file's own code failed (a syntax error, an import)
    raise ConfigError(f"config file {paths[-1] if paths else ''!r} failed to load: "
                      f"{type(e).__name__}: {' '.join(str(e).split())}") from None
  if holder.value is None:
    raise ConfigError("--config is required, e.g. --config=train/configs/default.py "
                      f"(configs: {', '.join(available_configs())})")
  if not isinstance(holder.value, ml_collections.ConfigDict):  # config_flags' stand-in
    raise ConfigError(f"config file {paths[-1]!r} did not load: it must define get_config() "
                      "returning an ml_collections.ConfigDict")
  return holder.value


def _explain(error: Exception, args: Sequence[str]) -> str:
  """A one-line message for a config_flags error: the unknown key with its neighbours, the
  missing file with the configs that exist, or config_flags' own words."""
  keys = _override_keys(args)
  if keys and isinstance(error, (AttributeError, KeyError, flags.Error)):
    base = _parse([a for a in args if a.startswith("--config=")])
    for key in keys:
      problem = _unknown_key(base, key)
      if problem:
        return problem
  return " ".join(str(error).split())


def split_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the program's other flags, its --config and --config.* arguments), argv[0] first in the
  former; '--config PATH' becomes '--config=PATH'."""
  ours, config_args = [argv[0]], []
  args = iter(argv[1:])
  for arg in args:
    if arg in ("--config", "-config"):
      config_args.append(f"--config={next(args, '')}")
    elif arg.lstrip("-").startswith(("config=", "config.")):
      config_args.append("--" + arg.lstrip("-"))
    else:
      ours.append(arg)
  return ours, config_args


def from_command_line(args: Sequence[str]) -> ml_collections.ConfigDict:
  """The validated config of `--config=FILE` and its `--config.key=value` overrides."""
  config = _parse(args)
  validate(config)
  return config


def load_config(path: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The validated config of `path` (`file.py` or `file.py:arg`) with typed overrides."""
  config = _parse([f"--config={path}"])
  set_values(config, overrides or {})
  validate(config)
  return config


def available_configs() -> list[str]:
  """The config files that ship with the project (train/configs/*.py), as paths from here."""
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIGS_DIR, "*.py"))
                if not p.endswith("__init__.py"))


def describe(config: ml_collections.ConfigDict, width: int = 100) -> str:
  """The resolved config in a few lines: `key=value` per set leaf, wrapped, by section."""
  flat = config_dict.ConfigDict(config).to_dict()
  lines = []

  def walk(node, prefix):
    leaves, sections = [], []
    for key, value in node.items():
      if isinstance(value, dict):
        sections.append((key, value))
      elif value is not None and value != "":
        leaves.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    if leaves:
      line = f"  {prefix or 'run'}:"
      for item in leaves:
        if len(line) + 1 + len(item) > width:
          lines.append(line)
          line = " " * (len(prefix or "run") + 3)
        line += " " + item
      lines.append(line)
    for key, value in sections:
      walk(value, f"{prefix}.{key}" if prefix else key)

  walk(flat, "")
  return "\n".join(lines)


# ---- validation --------------------------------------------------------------------------------
SCHEDULES = ("cosine", "linear", "constant", "wsd", "rsqrt")
OPTIMIZERS = ("adamw", "muon")
TOKENIZERS = ("sentencepiece", "byte")
SP_MODEL_TYPES = ("bpe", "unigram", "char")


def validate(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of a whole run config (nothing is compiled or read from disk)."""
  def need(cond, key, message):
    if not cond:
      raise ConfigError(f"config.{key}={_get(config, key)!r}: {message}")

  for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
              "checkpoint_every"):
    need(isinstance(_get(config, key), int) and _get(config, key) > 0, key,
         "must be a positive integer")
  need(config.batch_size % config.grad_accum_steps == 0, "batch_size",
       f"must be divisible by grad_accum_steps={config.grad_accum_steps}")
  need(len(tuple(config.mesh_shape)) == 3, "mesh_shape", "must be (data, fsdp, tensor)")
  need(config.tokenizer.kind in TOKENIZERS, "tokenizer.kind", f"must be one of {TOKENIZERS}")
  need(config.tokenizer.model_type in SP_MODEL_TYPES, "tokenizer.model_type",
       f"must be one of {SP_MODEL_TYPES}")
  need(config.optim.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
  need(config.optim.name in OPTIMIZERS, "optim.name", f"must be one of {OPTIMIZERS}")
  need(config.optim.lr > 0, "optim.lr", "must be positive")
  need(config.optim.muon_lr > 0, "optim.muon_lr", "must be positive")
  need(0.0 <= config.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
  need(config.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(config.optim.warmup_steps < config.num_steps or config.optim.schedule == "constant",
       "optim.warmup_steps", f"must be below num_steps={config.num_steps}")
  need(0.0 < config.optim.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
  need(not config.sample_tokens or config.sample_prompt, "sample_prompt",
       "must be non-empty when sample_tokens > 0")
  need(0.0 < config.data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
  need(config.eval_batches >= 0, "eval_batches", "must be >= 0 (0: the whole validation split)")
  trackers = config.trackers
  need(isinstance(trackers, (tuple, list)) and set(trackers) <= set(TRACKERS), "trackers",
       f"must be a tuple of {TRACKERS} (e.g. --config.trackers=\"('jsonl','wandb')\")")
  need("wandb" not in trackers or importlib.util.find_spec("wandb") is not None, "trackers",
       "includes 'wandb' but the wandb package is not installed: pip install -e '.[wandb]' "
       "(or pip install wandb)")
  need(config.profile.num_steps >= 0, "profile.num_steps", "must be >= 0 (0: no trace)")
  need(config.profile.start_step >= 1, "profile.start_step",
       "must be >= 1 (the first step compiles; trace steps after it)")
  rank = config.model.lora_rank or 0
  if config.get("init_from") or rank:  # a LoRA fine-tune (train/finetune.py)
    need(config.get("init_from"), "init_from",
         "is empty: a LoRA run (model.lora_rank > 0) fine-tunes a base model; pass "
         "--config.init_from=runs/BASE (a workdir trained here or imported with "
         "`python -m model.hf import`)")
    need(rank > 0, "model.lora_rank", "must be > 0: a run with init_from trains LoRA adapters")
    need(config.data.seq_len is None or config.data.seq_len > 0, "data.seq_len",
         "must be positive (or unset: the base run's)")
    for target in config.model.lora_targets or ():
      hint = (" (a tuple on the command line: --config.model.lora_targets=\"('q','v')\")"
              if "," in target else "")
      need(target in LORA_TARGETS, "model.lora_targets",
           f"unknown projection {target!r}; known: {LORA_TARGETS}{hint}")
    return  # the model is the base's, checked against it when the run starts
  need(isinstance(config.data.seq_len, int) and config.data.seq_len > 0, "data.seq_len",
       "must be a positive integer")
  cfg = model_config(config, vocab_size=config.model.vocab_size or 256)
  need(cfg.position != "learned" or config.data.seq_len <= cfg.max_seq_len, "data.seq_len",
       f"exceeds model.max_seq_len={cfg.max_seq_len} of the learned position table")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-friendly dict (tuples become lists)."""
  def clean(v):
    if isinstance(v, Mapping):
      return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
      return [clean(x) for x in v]
    return v
  return clean(config.to_dict())


# ---- resuming ------------------------------------------------------------------------------
# Keys a resumed run may change: how long it runs and how it reports, how batches are laid out
# over devices, the optimizer's hyperparameters (the schedule's length included), a LoRA
# run's init_from (a resumed run reads its base from its own checkpoint) and the model's
# runtime knobs. Every other key changes the weights, the token ids or the data stream:
# resuming with another value is an error, before anything is written.
RESUMABLE_KEYS = (
    "num_steps", "log_every", "eval_every", "eval_batches", "eval_batch_size",
    "checkpoint_every", "keep_checkpoints", "async_checkpoints", "progress_bar", "trackers",
    "peak_flops", "sample_prompt", "sample_tokens", "sample_temperature", "batch_size",
    "grad_accum_steps", "mesh_shape", "init_from", "optim.*", "data.cache_dir", "data.workers",
    "wandb.*", "profile.*",
    *(f"model.{name}" for name in RUNTIME_FIELDS))


def resumable(key: str) -> bool:
  return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def resume_conflicts(saved: Mapping[str, Any], config: ml_collections.ConfigDict
                     ) -> list[tuple[str, Any, Any]]:
  """(key, the workdir's value, the requested value) of every non-resumable key that differs
  between a workdir's saved training config and `config`. A key the request leaves unset
  (None, e.g. a LoRA run's inherited seq_len) or that one side does not know is no conflict."""
  theirs, ours = _flat(saved), _flat(to_dict(config))
  # The byte tokenizer has no settings: only its kind matters.
  bytes_only = theirs.get("tokenizer.kind") == ours.get("tokenizer.kind") == "byte"
  return [(key, theirs[key], ours[key]) for key in sorted(set(theirs) & set(ours))
          if not resumable(key) and ours[key] is not None and theirs[key] != ours[key]
          and not (bytes_only and key.startswith("tokenizer."))]
