"""A Hugging Face hub id (`meta-llama/Llama-3.2-1B`) -> a local model directory.

`resolve` returns a local directory unchanged; an id goes through
`huggingface_hub.snapshot_download`, which downloads the files the importer reads
(config.json, safetensors, tokenizer) when the hub can be reached, and otherwise
(no network, or HF_HUB_OFFLINE=1) returns the snapshot already in the local HF
cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub). huggingface_hub is an
optional dependency (transformers installs it), imported only here and only for
an id. Every failure is a `CheckpointError` of one line saying what to do.
"""

from __future__ import annotations

import os
import re

from model.hf.safetensors_io import CheckpointError

# What model.hf reads: config.json, generation_config.json, tokenizer*.json,
# model.safetensors.index.json, the shards, a sentencepiece model or GPT-2's BPE files.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt")
# The hub's repo ids: "name" or "namespace/name" of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
  """Could `name` be a hub repo id (rather than a path: no leading '/', '.', '~', no '..')?"""
  return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def resolve(name: str) -> str:
  """The local directory of `name`: itself if it is a directory (or not a hub id, so that
  loading it names the missing path), else the hub snapshot of that id (see the module)."""
  if os.path.isdir(name) or not is_hub_id(name):
    return name
  try:
    import huggingface_hub
    from huggingface_hub import constants, errors
  except ImportError:
    raise CheckpointError(
        f"{name!r} is not a local directory; to fetch it from the Hugging Face hub by id, "
        "install huggingface_hub (pip install huggingface_hub)") from None
  offline = bool(constants.HF_HUB_OFFLINE)
  try:
    return huggingface_hub.snapshot_download(name, allow_patterns=list(ALLOW_PATTERNS),
                                             local_files_only=offline)
  except errors.LocalEntryNotFoundError:
    why = "is switched off (HF_HUB_OFFLINE=1)" if offline else "cannot be reached"
    raise CheckpointError(
        f"{name!r} is not a local directory, the Hugging Face hub {why}, and the model is not "
        f"in the local HF cache {constants.HF_HUB_CACHE}: download it where the hub is "
        f"reachable (hf download {name}) or pass its directory") from None
  except errors.GatedRepoError:
    raise CheckpointError(
        f"{name!r} is gated on the Hugging Face hub: accept its license at "
        f"https://huggingface.co/{name} and log in (hf auth login)") from None
  except errors.RepositoryNotFoundError:
    raise CheckpointError(
        f"{name!r} is not a local directory nor a model on the Hugging Face hub (a private "
        "one needs hf auth login)") from None
  except (errors.HfHubHTTPError, OSError, ValueError) as e:
    raise CheckpointError(f"{name!r}: fetching it from the Hugging Face hub failed: "
                          + " ".join(str(e).split())) from None
