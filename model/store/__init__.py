"""The workdir format every package reads and writes: config.json, tokenizer, checkpoints.

  from model import store
  cfg = store.load_model_config(workdir); tokenizer = store.load_tokenizer(workdir)
  loaded = store.load_params(workdir)                 # cfg + params, LoRA adapters merged
  ckpt = store.restore(workdir, items=("params", "opt_state", "meta"), targets=...)
  store.write_config(workdir, cfg, tokenizer, train={...}); store.save_params(workdir, params)
  with store.atomic_open(path, "wb") as f: ...         # the one atomic write

Files: workdir.py (layout, config.json), tokenizer.py (the tokenizers a workdir names),
checkpoint.py (orbax items, one restore), files.py (atomic writes).
"""

from model.store.checkpoint import (
    JSON_ITEMS,
    BackgroundErrors,
    Checkpoint,
    CheckpointError,
    LoadedParams,
    all_steps,
    checkpoint_items,
    checkpoint_manager,
    error_cause,
    latest_step,
    load_params,
    quarantine,
    quiet_orbax_errors,
    release_free_memory,
    restore,
    save_params,
    with_shardings,
)
from model.store.files import atomic_open, atomic_path, copy_file, write_json
from model.store.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    tokenizer_from_spec,
)
from model.store.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    WorkdirError,
    checkpoint_dir,
    config_path,
    ensure_writable,
    has_config,
    load_model_config,
    load_quantization,
    load_tokenizer,
    read_config,
    resolve,
    write_config,
)

__all__ = [
    "BackgroundErrors", "CHECKPOINT_DIR", "CONFIG_FILE", "JSON_ITEMS", "ByteTokenizer",
    "Checkpoint", "CheckpointError", "HFTokenizer", "LoadedParams", "SentencePieceTokenizer",
    "Tokenizer", "WorkdirError", "all_steps", "atomic_open", "atomic_path", "checkpoint_dir",
    "checkpoint_items", "checkpoint_manager", "config_path", "copy_file", "ensure_writable",
    "error_cause", "has_config", "latest_step", "load_model_config", "load_params",
    "load_quantization", "load_tokenizer", "quarantine", "quiet_orbax_errors", "read_config",
    "release_free_memory",
    "resolve", "restore", "save_params", "tokenizer_from_spec", "with_shardings",
    "write_config", "write_json",
]
