"""results.jsonl: one record per finished sweep run (the schema below), read and written safely.

A record is appended (one line, flushed and fsynced) only after its run has finished, so
the file lists exactly the finished runs; a line cut short by a kill is ignored with a
warning when the file is read back, and that run is simply run (resumed) again.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

RESULTS_FILE = "results.jsonl"
SCHEMA_VERSION = 1

# field -> what it holds. Every record carries every field (None where it does not apply).
RECORD_FIELDS: dict[str, str] = {
    "schema_version": f"{SCHEMA_VERSION}",
    "sweep": "the sweep's name",
    "name": "the run's name, unique within the sweep",
    "status": "'completed', or 'diverged: ...' (then the losses are nan)",
    "budget": "nominal compute budget (FLOPs) of the run's isoFLOP group (None: not in one)",
    "budget_flops": "how `budget` counts FLOPs: '6nd' (6 N D) or 'exact' (like `flops`)",
    "n_layers": "L, transformer blocks",
    "d_model": "D_model, residual width",
    "n_heads": "attention heads",
    "n_params": "N_total: every parameter",
    "n_params_non_embedding": "N: without the token/position embeddings and an untied LM head",
    "tokens": "D: training tokens seen (steps x batch x sequence length)",
    "flops_6nd": "C = 6 N D with N non-embedding (Kaplan et al. 2020)",
    "flops": "C with the attention term and the LM head: model.flops_per_token(cfg, T) x D",
    "final_val_loss": "validation loss (nats/token) at the end of training",
    "best_val_loss": "lowest validation loss over the run's evaluations",
    "final_val_bpb": "validation bits per byte at the end of training",
    "best_val_bpb": "bits per byte at the evaluation with the lowest loss",
    "val_curve": "the evaluations: [[step, tokens, val_loss, val_bpb], ...]",
    "train_curve": "the logged training loss (interval means): [[step, tokens, loss], ...]",
    "steps": "optimizer steps",
    "seq_len": "T, tokens per sequence",
    "batch_size": "sequences per step",
    "lr": "peak learning rate",
    "seed": "the run's seed",
    "metrics_path": "the run's metrics.jsonl (the full loss curve), relative to the sweep workdir",
    "run_dir": "the run's workdir (checkpoints, config.json), relative to the sweep workdir",
    "wall_time_s": "training wall time the trainer reports",
    "runner_wall_time_s": "seconds the runner spent on the run in the invocation that finished it",
    "finished_at": "UTC time the record was written (ISO 8601)",
    "load_average": "the machine's 1/5/15-minute load averages when the run finished",
    "config_hash": "sha256 of the resolved training config (detects an edited sweep)",
    "config": "the resolved training config",
    "summary": "the trainer's summary dict, verbatim",
}


class ResultsError(ValueError):
  """results.jsonl is unreadable or holds records that do not fit the schema."""


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def check_record(record: dict[str, Any]) -> None:
  missing = sorted(set(RECORD_FIELDS) - set(record))
  if missing:
    raise ResultsError(f"record {record.get('name')!r} lacks fields {missing}")


def append_record(path: str, record: dict[str, Any]) -> None:
  """Append one record as a JSON line, durably (flush + fsync)."""
  check_record(record)
  line = json.dumps(record, sort_keys=True, default=_json_default, allow_nan=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A previous writer killed mid-line leaves no newline: start on a fresh line.
  needs_newline = os.path.exists(path) and os.path.getsize(path) > 0 and not _ends_in_newline(path)
  with open(path, "a") as f:
    f.write(("\n" if needs_newline else "") + line + "\n")
    f.flush()
    os.fsync(f.fileno())


def _ends_in_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _json_default(value):
  if hasattr(value, "item"):  # numpy / jax scalars
    return value.item()
  if isinstance(value, (set, tuple)):
    return list(value)
  return str(value)


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a results.jsonl (a missing file: none). Unparseable lines are skipped with a
  warning (a write cut short by a kill); a later record with the same name replaces an earlier."""
  if not os.path.exists(path):
    return []
  by_name: dict[str, dict[str, Any]] = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        warnings.warn(f"{path}:{lineno}: skipping an unreadable line (a write cut short?)",
                      stacklevel=2)
        continue
      if not isinstance(record, dict) or "name" not in record:
        raise ResultsError(f"{path}:{lineno}: not a run record: {line[:80]!r}")
      by_name[record["name"]] = record
  return list(by_name.values())


def finite(records: Iterable[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
  """Records whose `keys` all hold finite positive numbers (a diverged run has a nan loss)."""
  def ok(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
  return [r for r in records if all(ok(r.get(k)) for k in keys)]
