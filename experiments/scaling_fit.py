"""Fit scaling laws to a sweep's results and write report.md, fits.json and PNG figures.

  python -m experiments.scaling_fit --workdir=runs/sweeps/cpu [--out=DIR] [--loss=final|best]
      [--params=non_embedding|total] [--n_boot=1000] [--grid=chinchilla|small]

Reads the sweep workdir's run records (collected into WORKDIR/results.jsonl first, as
`python -m experiments.sweep --merge` does) or --results=FILE;
writes into --out (default: the workdir), with a copy of results.jsonl and sweep.json so
that --out regenerates on its own. See experiments/scaling/README.md.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

import numpy as np
from absl import app, flags

from experiments.scaling import analysis, plots, report
from experiments.scaling.results import (
    SWEEP_META_FILE,
    merge_records,
    read_records,
    results_path,
)
from model import store

# Initialization grids for L(N, D): Hoffmann et al.'s 4500 points, or 432 for quick looks.
GRIDS = {
    "chinchilla": None,
    "small": {"alpha": [0.25, 0.5, 1.0], "beta": [0.25, 0.5, 1.0], "e": [-1.0, 0.0, 1.0],
              "a": [0.0, 5.0, 10.0, 20.0], "b": [0.0, 5.0, 10.0, 20.0]},
}


def read_sweep_meta(workdir: str | None) -> dict[str, Any] | None:
  path = os.path.join(workdir, SWEEP_META_FILE) if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def fit_and_report(*, workdir: str | None = None, results: str | None = None,
                   out: str | None = None, settings: analysis.FitSettings | None = None,
                   command: str | None = None) -> dict[str, Any]:
  """Fit every law to the records and write report.md, fits.json and the figures into `out`.

  Returns the fits as a JSON-friendly dict (what fits.json holds).
  """
  if results is None:
    if workdir is None:
      raise ValueError("give --workdir (a sweep workdir) or --results (a results.jsonl)")
    merge_records(workdir)  # the records of every run finished so far, by any launcher
    results = results_path(workdir)
  if not os.path.exists(results):
    raise FileNotFoundError(f"no results file at {results!r}: run the sweep first "
                            "(python -m experiments.sweep --sweep=... --workdir=...)")
  out = out or workdir or os.path.dirname(os.path.abspath(results))
  os.makedirs(out, exist_ok=True)
  records = read_records(results)
  settings = settings or analysis.FitSettings()
  meta = read_sweep_meta(workdir) or read_sweep_meta(os.path.dirname(os.path.abspath(results)))
  a = analysis.analyze(records, settings)
  figures = plots.write_plots(a, out)
  commands = []
  if meta and meta.get("command"):
    commands.append(meta["command"])
  commands.append(command or "python -m experiments.scaling_fit " + " ".join(
      shlex.quote(x) for x in sys.argv[1:]))
  sweep_name = (meta or {}).get("sweep") or (records[0].get("sweep") if records else "?")
  text = report.render_report(a, title=f"Scaling laws: sweep `{sweep_name}`", commands=commands,
                              figures=figures, sweep_meta=meta)
  with store.atomic_open(os.path.join(out, "report.md")) as f:
    f.write(text)
  summary = analysis.summary_dict(a)
  with store.atomic_open(os.path.join(out, "fits.json")) as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=_finite_or_none)
  _copy_inputs(results, meta, out)
  return summary


def _copy_inputs(results: str, meta: dict[str, Any] | None, out: str) -> None:
  """An --out elsewhere gets results.jsonl and sweep.json too: it then regenerates alone
  (python -m experiments.scaling_fit --results=OUT/results.jsonl)."""
  target = os.path.join(out, "results.jsonl")
  if os.path.abspath(results) != os.path.abspath(target):
    store.copy_file(results, target)
  if meta is not None and not os.path.exists(os.path.join(out, SWEEP_META_FILE)):
    store.write_json(os.path.join(out, SWEEP_META_FILE), meta)


def _finite_or_none(x):
  if isinstance(x, np.generic):
    return x.item()
  return None


def main(argv):
  del argv
  f = flags.FLAGS
  settings = analysis.FitSettings(loss=f.loss, params=f.params, n_boot=f.n_boot,
                                  n_boot_parametric=f.n_boot_parametric, grid=GRIDS[f.grid],
                                  d_level_tol=f.d_level_tol, seed=f.seed)
  summary = fit_and_report(workdir=f.workdir, results=f.results, out=f.out, settings=settings)
  out = f.out or f.workdir or os.path.dirname(os.path.abspath(f.results))
  print(f"wrote {os.path.join(out, 'report.md')} ({summary['n_runs']} runs)")
  for name, entry in summary.items():
    if isinstance(entry, dict) and "error" in entry:
      print(f"  {name}: not fitted: {entry['error']}")


def _define_flags():
  flags.DEFINE_string("workdir", None, "sweep workdir holding results.jsonl (and sweep.json)")
  flags.DEFINE_string("results", None, "a results.jsonl to read instead of WORKDIR/results.jsonl")
  flags.DEFINE_string("out", None, "where report.md, fits.json and the PNGs go (default: workdir)")
  flags.DEFINE_enum("loss", "final", list(analysis.LOSS_KEYS), "which validation loss to fit")
  flags.DEFINE_enum("params", "non_embedding", list(analysis.PARAM_KEYS),
                    "N counts non-embedding (Kaplan) or all parameters")
  flags.DEFINE_integer("n_boot", 1000, "bootstrap refits for the power laws and isoFLOP fit")
  flags.DEFINE_integer("n_boot_parametric", 200, "bootstrap refits of L(N, D)")
  flags.DEFINE_enum("grid", "chinchilla", list(GRIDS), "L(N, D) initialization grid")
  flags.DEFINE_float("d_level_tol", 0.1, "token budgets within this ratio share a level")
  flags.DEFINE_integer("seed", 0, "bootstrap seed")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
