"""Sweep results: each run's record in its own directory, results.jsonl derived from them.

  runs/NAME/result.json   written (atomically) by the process that finished the run
  results.jsonl           one line per record, in the sweep's plan order: merge_records()
                          rewrites it (atomically) from the run directories

Records are written only after a run has finished, so the run directories say exactly
which runs are done, whatever ran them (one process, Ray tasks on many nodes, a job array):
no two writers ever append to one file, and merging again gives the same file.
A workdir of the older runner (one line appended to results.jsonl per run, no result.json)
is taken over by the first merge, which copies those records into their run directories.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

from model import store

RESULTS_FILE = "results.jsonl"
RUN_RECORD_FILE = "result.json"  # in each run's directory
RUNS_DIR = "runs"  # the sweep workdir's run directories: RUNS_DIR/NAME
SWEEP_META_FILE = "sweep.json"  # the sweep, its plan and the commands that ran it
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


def run_record_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, RUNS_DIR, name, RUN_RECORD_FILE)


def _dumps(record: dict[str, Any], **kwargs) -> str:
  return json.dumps(record, sort_keys=True, default=_json_default, allow_nan=True, **kwargs)


def write_run_record(workdir: str, record: dict[str, Any]) -> str:
  """Write a finished run's record into its run directory (atomically); returns the path."""
  check_record(record)
  path = run_record_path(workdir, record["name"])
  with store.atomic_open(path) as f:
    f.write(_dumps(record, indent=1) + "\n")
  return path


def read_run_record(workdir: str, name: str) -> dict[str, Any] | None:
  """The record of run `name`, or None while it has not finished."""
  path = run_record_path(workdir, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ResultsError(f"{path}: unreadable run record ({e}); delete that run's directory "
                       "to run it again") from None
  if not isinstance(record, dict) or record.get("name") != name:
    raise ResultsError(f"{path}: not the record of run {name!r}")
  return record


def write_records(path: str, records: Iterable[dict[str, Any]]) -> None:
  """Write a results.jsonl holding `records` (atomically: a reader sees the old or new file)."""
  with store.atomic_open(path) as f:
    for record in records:
      check_record(record)
      f.write(_dumps(record) + "\n")


def merge_records(workdir: str) -> list[dict[str, Any]]:
  """Rewrite WORKDIR/results.jsonl from the run records; returns them.

  The order is the plan's (sweep.json), then any other runs by name. A workdir of the older
  runner (run directories, none with a result.json) has the records of its results.jsonl
  written into their run directories first; a workdir without run directories (a copy of
  results.jsonl kept beside a report) is only read.
  """
  runs_dir = os.path.join(workdir, RUNS_DIR)
  if not os.path.isdir(runs_dir):
    return read_records(results_path(workdir))
  names = {n for n in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, n))}
  found = {n: r for n in sorted(names) if (r := read_run_record(workdir, n)) is not None}
  if not found:  # perhaps a workdir of the runner that appended to results.jsonl
    for old in read_records(results_path(workdir)):
      if old["name"] in names:
        found[old["name"]] = old
        write_run_record(workdir, old)
      else:
        warnings.warn(f"{results_path(workdir)}: dropping the record of {old['name']!r}: its "
                      "run directory is gone", stacklevel=2)
  meta_path = os.path.join(workdir, SWEEP_META_FILE)
  plan = []
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      plan = [r["name"] for r in json.load(f).get("runs", [])]
  ordered = [n for n in dict.fromkeys(plan) if n in found]
  ordered += sorted(set(found) - set(ordered))
  records = [found[n] for n in ordered]
  write_records(results_path(workdir), records)
  return records


def _json_default(value):
  if hasattr(value, "item"):  # numpy / jax scalars
    return value.item()
  if isinstance(value, (set, tuple)):
    return list(value)
  return str(value)


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a results.jsonl (a missing file: none). Unparseable lines are skipped with a
  warning (an older file appended to by a killed writer); a later record with the same name
  replaces an earlier."""
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
