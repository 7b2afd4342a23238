"""Hugging Face model directory <-> workdir (what `python -m model.hf import|export` runs).

  import   config.json + safetensors + tokenizer (a directory, or a hub id resolved to one by
           model.hf.hub) -> workdir/config.json (with a "source" section: the HF directory,
           the hub id if any, its architecture, its stop token ids),
           workdir/tokenizer.json (or tokenizer.model), workdir/checkpoints/0/params
  export   a workdir's latest (or given) checkpoint -> config.json + safetensors +
           the tokenizer file; LoRA adapters in the checkpoint are merged into the weights

Neither replaces anything unasked: import refuses a workdir that already holds a
model, export a non-empty out_dir, unless `overwrite=True` (`--overwrite`).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from model import quant, store
from model.config import ModelConfig
from model.hf import architecture_of, load, read_hf_config, resolve, save
from model.hf.safetensors_io import DEFAULT_MAX_SHARD_SIZE
from model.hf.tokenizer import export_tokenizer, install_tokenizer


def import_to_workdir(hf_dir: str, workdir: str, *, dtype: str | None = None,
                      tokenizer_path: str | None = None, overwrite: bool = False,
                      quantize: str = "none", **overrides) -> ModelConfig:
  """Write a workdir holding the HF model in hf_dir (a directory or a hub id); returns its
  ModelConfig. quantize='int8' stores int8 matmul weights with float32 scales (model/quant.py)."""
  quant.check_mode(quantize)
  if store.has_config(workdir) and not overwrite:
    raise FileExistsError(f"{workdir} already holds a model ({store.CONFIG_FILE}); choose "
                          "another workdir or pass --overwrite")
  name, hf_dir = hf_dir, resolve(hf_dir)
  hub = {"hub_id": name} if hf_dir != name else {}
  architecture = architecture_of(read_hf_config(hf_dir))
  cfg, params = load(hf_dir, dtype=dtype, **overrides)
  tokenizer, stop_ids = install_tokenizer(hf_dir, workdir, tokenizer_path)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"embedding only {cfg.vocab_size} rows")
  sections = {}
  if quantize == "int8":
    params = quant.quantize(params)
    sections["quantize"] = {"weights": "int8", "embeddings": False}
  store.save_params(workdir, params, step=0)
  store.write_config(workdir, cfg, tokenizer, source={
      "format": "huggingface", "hf_dir": os.path.abspath(hf_dir), **hub,
      "architecture": architecture, "stop_ids": stop_ids}, **sections)
  return cfg


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None,
                   architecture: str | None = None, dtype: str | None = None,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                   overwrite: bool = False) -> str:
  """Write a workdir's checkpoint as an HF model directory (LoRA adapters merged); returns the
  architecture. An existing out_dir must be empty unless `overwrite`."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} is a file, not a directory to export into")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty; choose another out_dir or pass --overwrite "
                          "to replace the model files in it")
  loaded = store.load_params(workdir, step)
  cfg, params = loaded.cfg, quant.dequantize(loaded.params)  # HF formats hold float weights
  tokenizer = store.load_tokenizer(workdir)
  token_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
  source = store.read_config(workdir).get("source", {})
  # An imported model goes back out as the architecture it came from (unless told otherwise).
  architecture = architecture or source.get("architecture")
  stop_ids = source.get("stop_ids")
  if stop_ids and len(stop_ids) > 1:
    token_ids["eos_token_id"] = stop_ids
  for name, value in token_ids.items():
    if value is not None and any(not 0 <= i < cfg.vocab_size for i in np.atleast_1d(value)):
      logging.warning("not exporting %s=%s: outside the model's vocabulary of %d", name, value,
                      cfg.vocab_size)
      token_ids[name] = None
  architecture = save(cfg, params, out_dir, architecture=architecture,
                      dtype=dtype, max_shard_size=max_shard_size, token_ids=token_ids)
  export_tokenizer(tokenizer, out_dir)
  return architecture
