"""The workdir's files: config.json and the tokenizer beside it.

  workdir/
    config.json        {"model": ModelConfig fields, "tokenizer": tokenizer spec,
                        "train": training config (when trained), "source": provenance
                        (an import), "init_from": the base of a LoRA run}
    tokenizer.model    (or tokenizer.json; none for the byte tokenizer)
    checkpoints/<step>/{params, lora, opt_state, meta, data}   (model/store/checkpoint.py)
    metrics.jsonl, events.*, summary.json                        (written by train/)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from model.config import ModelConfig
from model.store.files import write_json
from model.store.tokenizer import Tokenizer, tokenizer_from_spec

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class WorkdirError(ValueError):
  """A workdir is missing, empty or inconsistent."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def resolve(workdir: str) -> str:
  """An absolute local path for a workdir given as a path, '~/...' or a file:// URL. Other
  URLs are refused: orbax writes checkpoints only to local paths and gs:// here, and the
  rest of a workdir (metrics, events) is written as local files."""
  if workdir.startswith("file://"):
    workdir = workdir[len("file://"):]
  elif "://" in workdir:
    raise WorkdirError(f"workdir {workdir!r}: a workdir must be a local path (or file://); "
                       "put the corpus or the prepared shards behind the URL instead")
  return os.path.abspath(os.path.expanduser(workdir))


def has_config(workdir: str) -> bool:
  return os.path.isfile(config_path(workdir))


def ensure_writable(workdir: str) -> None:
  """Create `workdir` if needed and check that files can be written in it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} is a file, not a directory; choose another one")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def write_config(workdir: str, model_cfg: ModelConfig, tokenizer: Tokenizer,
                 **sections: Any) -> None:
  """Write config.json (atomically: a crash never leaves half a file)."""
  payload = {"model": model_cfg.to_dict(), "tokenizer": tokenizer.spec(), **sections}
  write_json(config_path(workdir), payload, sort_keys=True)


def read_config(workdir: str) -> dict[str, Any]:
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} does not exist; train a model first "
                       "(python -m train --config=train/configs/default.py --workdir=...) "
                       "or import one (python -m model.hf import ...)")
  path = config_path(workdir)
  if not os.path.exists(path):
    raise WorkdirError(f"workdir {workdir!r} has no {CONFIG_FILE}: it is empty or not a "
                       "workdir written by `python -m train` or `python -m model.hf import`")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); it is not a config.json this project "
                       "wrote") from None
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise WorkdirError(f"{path} has no 'model' section; it is not a config.json this project "
                       "wrote")
  return config


def load_quantization(workdir: str) -> dict[str, Any] | None:
  """The workdir's weight quantization ({"weights": "int8", "embeddings": bool}; model/quant.py),
  or None for float weights."""
  spec = read_config(workdir).get("quantize")
  if spec is None:
    return None
  if not isinstance(spec, dict) or spec.get("weights") != "int8":
    raise WorkdirError(f"{config_path(workdir)}: unknown 'quantize' section {spec!r} "
                       "(expected {'weights': 'int8', 'embeddings': bool})")
  return spec


def load_model_config(workdir: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(read_config(workdir)["model"])
  except (TypeError, ValueError) as e:
    if isinstance(e, WorkdirError):
      raise
    raise WorkdirError(f"{config_path(workdir)}: {e}") from None


def load_tokenizer(workdir: str) -> Tokenizer:
  spec = read_config(workdir).get("tokenizer")
  if not isinstance(spec, dict):
    raise WorkdirError(f"{config_path(workdir)} names no tokenizer")
  try:
    return tokenizer_from_spec(spec, workdir)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"the tokenizer of workdir {workdir!r}: {e}") from None
