"""Run configs: load a config file, apply `a.b=value` overrides, build the ModelConfig.

  config = load_config("train/configs/default.py", ["--config.model.n_layers=2"])
  config = load_config("train/configs/tiny.py", {"num_steps": 10, "optim.lr": 1e-3})
  model_cfg = model_config(config, vocab_size=tokenizer.vocab_size)

The same rules as the command line (`python -m train --config=... --config.a.b=value`):
an override names an existing key (a typo fails with the closest known keys,
before anything compiles) and a string value is parsed into the key's type.

`config.model` holds `preset` (a name from model.PRESETS or None for the
ModelConfig defaults) and one entry per ModelConfig field, each a typed
placeholder: None means "the preset's value". `vocab_size` left None is taken
from the tokenizer.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from model.config import LORA_TARGETS, ModelConfig
from model.presets import PRESETS, get_preset


class ConfigError(ValueError):
  """A config file, an override or a config value is wrong."""


# ---- the model section -------------------------------------------------------------------------
def _field_type(field: dataclasses.Field) -> type:
  default = field.default
  if isinstance(default, bool):
    return bool
  if isinstance(default, tuple):
    return tuple
  if default is None:  # n_kv_heads, head_dim, d_ff: optional ints
    return int
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
def import_file(path: str, prefix: str):
  """The Python file at `path` run as a fresh module (config and sweep files are not packages)."""
  spec = importlib.util.spec_from_file_location(f"{prefix}{abs(hash(os.path.abspath(path)))}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_module_config(path: str) -> ml_collections.ConfigDict:
  """`path` or `path:arg` (the config_flags convention): get_config() or get_config(arg)."""
  file_path, _, arg = path.partition(":")
  if not os.path.isfile(file_path):
    raise ConfigError(f"config file not found: {file_path!r} (try train/configs/default.py)")
  module = import_file(file_path, "_train_config_")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {file_path!r} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


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
    value = config[key] if not isinstance(config, dict) else config.get(key)
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(all_keys(value, path + "."))
    else:
      keys.append(path)
  return keys


def _lookup_parent(config: ml_collections.ConfigDict, dotted: str):
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(_unknown_message(".".join(parents[:i]), [part],
                                         node.keys() if hasattr(node, "keys") else []))
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    section = ".".join(parents)
    close = difflib.get_close_matches(dotted, all_keys(config), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown config key {dotted!r}{hint}; keys of config"
                      f"{'.' + section if section else ''}: "
                      f"{', '.join(sorted(node.keys()) if hasattr(node, 'keys') else [])}")
  return node, leaf


def parse_value(text: str, target_type: type | None) -> Any:
  """A command-line string as `target_type` (bool/int/float/str/tuple), like config_flags."""
  if target_type is bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected a boolean (true/false), got {text!r}")
  if target_type is str:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if target_type in (None, type(None)):
      return text
    if target_type in (tuple, list):
      return tuple(s.strip() for s in text.split(",") if s.strip())
    raise ConfigError(f"cannot parse {text!r} as {target_type.__name__}") from None
  if target_type in (tuple, list) and isinstance(value, (str, int, float)):
    value = (value,)
  if target_type is float and isinstance(value, int):
    value = float(value)
  if target_type in (tuple, list) and isinstance(value, list):
    value = tuple(value)
  return value


def _key_type(node: ml_collections.ConfigDict, leaf: str) -> type | None:
  try:
    t = node.get_type(leaf)
  except (AttributeError, KeyError):
    return None
  return None if t is type(None) else t


def set_override(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config.<dotted> = value; the key must exist; a string is parsed into the key's type."""
  node, leaf = _lookup_parent(config, dotted)
  target = _key_type(node, leaf)
  if isinstance(value, str) and target is not str:
    value = parse_value(value, target)
  if isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config.{dotted}: {e}") from e


def parse_override_args(args: Iterable[str], flag_name: str = "config") -> dict[str, str]:
  """['--config.a.b=1', 'c=x'] -> {'a.b': '1', 'c': 'x'} (other flags are ignored)."""
  out = {}
  prefix = f"--{flag_name}."
  for arg in args:
    if arg.startswith(prefix):
      arg = arg[len(prefix):]
    elif arg.startswith("--"):
      continue
    if "=" not in arg:
      raise ConfigError(f"override {arg!r} must look like key=value (e.g. --config.num_steps=100)")
    key, value = arg.split("=", 1)
    out[key] = value
  return out


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[str] = ()) -> ml_collections.ConfigDict:
  items = overrides if isinstance(overrides, Mapping) else parse_override_args(overrides)
  for key, value in items.items():
    set_override(config, key, value)
  return config


def load_config(path: str, overrides: Mapping[str, Any] | Iterable[str] = ()
                ) -> ml_collections.ConfigDict:
  """The config of `path` (`file.py` or `file.py:arg`) with overrides applied and checked."""
  config = _load_module_config(path)
  apply_overrides(config, overrides)
  validate(config)
  return config


# ---- validation --------------------------------------------------------------------------------
SCHEDULES = ("cosine", "linear", "constant", "wsd", "rsqrt")
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
  need(config.optim.lr > 0, "optim.lr", "must be positive")
  need(0.0 <= config.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
  need(config.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(config.optim.warmup_steps < config.num_steps or config.optim.schedule == "constant",
       "optim.warmup_steps", f"must be below num_steps={config.num_steps}")
  need(0.0 < config.optim.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
  need(not config.sample_tokens or config.sample_prompt, "sample_prompt",
       "must be non-empty when sample_tokens > 0")
  need(config.data.seq_len > 0, "data.seq_len", "must be positive")
  need(0.0 < config.data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
  need(config.eval_batches >= 0, "eval_batches", "must be >= 0 (0: the whole validation split)")
  rank = config.model.lora_rank or 0
  if config.get("init_from") or rank:  # a LoRA fine-tune (train/finetune.py)
    need(config.get("init_from"), "init_from",
         "is empty: a LoRA run (model.lora_rank > 0) fine-tunes a base model; pass "
         "--config.init_from=runs/BASE (a workdir trained here or imported with "
         "`python -m model.hf import`)")
    need(rank > 0, "model.lora_rank", "must be > 0: a run with init_from trains LoRA adapters")
    for target in config.model.lora_targets or ():
      need(target in LORA_TARGETS, "model.lora_targets",
           f"unknown projection {target!r}; known: {LORA_TARGETS}")
    return  # the model is the base's, checked against it when the run starts
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
