"""From sweep records to every fit of the report: which points each law is fitted to.

  L(N)     per model size, its lowest loss (the run with the most data), kept if that run saw
           at least `split` tokens per parameter (the sweep's compute-optimal D/N, or 20):
           the data-rich limit as far as the sweep reaches it.
  L(D)     per token-budget level (budgets within `d_level_tol` of each other share a level),
           its lowest loss (the largest model trained on that much data), kept if that run
           saw at most `split` tokens per parameter.
  L(C)     the compute frontier: runs no cheaper run beats; C = 6 N D, and again with C
           counting attention and the LM head.
  L(N, D)  every run (approach 3).
  isoFLOP  runs grouped by their nominal budget (approach 2).

A fit that lacks points is kept as the message of its InsufficientData, so a small sweep
still gets a report that says what could not be fitted and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments.scaling import fits
from experiments.scaling.results import finite

LOSS_KEYS = {"final": ("final_val_loss", "final_val_bpb"), "best": ("best_val_loss",
                                                                      "best_val_bpb")}

# Published values the report compares with.
KAPLAN = {"aN": 0.076, "aD": 0.095, "aC": 0.050, "a": 0.73, "b": 0.27}  # arXiv:2001.08361
CHINCHILLA = {"alpha": 0.34, "beta": 0.28, "E": 1.69, "A": 406.4, "B": 410.7,
              "a": 0.46, "b": 0.54, "a2": 0.49, "b2": 0.51}  # arXiv:2203.15556 (approach 3; a2, b2:
# approach 2)
BESIROGLU = {"alpha": 0.35, "beta": 0.37, "E": 1.82, "A": 482.01, "B": 2085.43}  # arXiv:2404.10102


PARAM_KEYS = {"non_embedding": "n_params_non_embedding", "total": "n_params"}


@dataclasses.dataclass(frozen=True)
class FitSettings:
  loss: str = "final"  # "final" or "best" validation loss
  params: str = "non_embedding"  # N counts "non_embedding" (Kaplan) or "total" parameters
  n_boot: int = 1000  # bootstrap refits of the power laws and the isoFLOP fit
  n_boot_parametric: int = 200  # refits of L(N, D) (each runs L-BFGS from several starts)
  grid: dict[str, Any] | None = None  # L(N, D) initialization grid (None: Hoffmann et al.'s)
  d_level_tol: float = 0.1
  # L(N) wants data-rich runs, L(D) model-rich ones: per model size the best run counts for
  # L(N) only with at least `split` tokens per parameter, per token level for L(D) only with
  # at most that many. The split is the sweep's own compute-optimal D/N (the geometric mean
  # of its isoFLOP minima) when approach 2 finds one, else this (Chinchilla's ratio).
  tokens_per_param_split: float = 20.0
  seed: int = 0


@dataclasses.dataclass
class Analysis:
  records: list[dict[str, Any]]  # the usable runs, sorted by (budget, N)
  settings: FitSettings
  n_params: np.ndarray  # N: non-embedding or total parameters (settings.params)
  tokens: np.ndarray  # D
  flops_6nd: np.ndarray
  flops: np.ndarray  # with attention and LM head
  loss: np.ndarray
  bpb: np.ndarray
  budget: np.ndarray  # nan where a run has none
  d_levels: np.ndarray
  fits: dict[str, Any]  # name -> fit object, or the str saying why it could not be fitted
  dropped: list[str]  # runs left out, with the reason
  split: float = 20.0  # D/N separating L(N)'s data-rich points from L(D)'s model-rich ones
  split_source: str = "the default"
  # Approach 2 again with N counting the other way (total vs non-embedding), or why not.
  isoflop_other_params: Any = None

  @property
  def params_label(self) -> str:
    return ("non-embedding parameters N" if self.settings.params == "non_embedding"
            else "parameters N (with embeddings)")

  @property
  def budget_flops(self) -> str:
    """How the isoFLOP budgets count FLOPs ('6nd' or 'exact'), from the records."""
    kinds = {r.get("budget_flops") or "6nd" for r in self.records if r.get("budget")}
    return kinds.pop() if len(kinds) == 1 else "6nd"

  def fit(self, name: str):
    """The fit object, or None when it could not be made (see `fits[name]`)."""
    value = self.fits.get(name)
    return None if isinstance(value, str) else value


def _try(fit_fn, *args, **kwargs):
  try:
    return fit_fn(*args, **kwargs)
  except fits.InsufficientData as e:
    return str(e)


def analyze(records: list[dict[str, Any]], settings: FitSettings | None = None) -> Analysis:
  settings = settings or FitSettings()
  if settings.loss not in LOSS_KEYS:
    raise ValueError(f"loss={settings.loss!r}: must be one of {sorted(LOSS_KEYS)}")
  if settings.params not in PARAM_KEYS:
    raise ValueError(f"params={settings.params!r}: must be one of {sorted(PARAM_KEYS)}")
  loss_key, bpb_key = LOSS_KEYS[settings.loss]
  n_key = PARAM_KEYS[settings.params]
  needed = ("n_params_non_embedding", "n_params", "tokens", "flops_6nd", "flops", loss_key)
  usable = finite(records, *needed)
  dropped = [f"{r.get('name')}: {loss_key} or sizes missing or not finite (diverged?)"
             for r in records if r not in usable]
  usable.sort(key=lambda r: (r.get("budget") or 0.0, r["n_params_non_embedding"]))

  def column(key, default=np.nan):
    return np.array([default if r.get(key) is None else float(r[key]) for r in usable])

  a = Analysis(
      records=usable, settings=settings, n_params=column(n_key),
      tokens=column("tokens"), flops_6nd=column("flops_6nd"), flops=column("flops"),
      loss=column(loss_key), bpb=column(bpb_key), budget=column("budget"),
      d_levels=np.zeros(len(usable), np.int64), fits={}, dropped=dropped)
  if not usable:
    message = "no finished runs with finite losses"
    a.fits = {k: message for k in ("L(N)", "L(D)", "L(C)", "L(C_attn)", "L(N,D)", "isoflop")}
    return a
  a.d_levels = fits.group_levels(a.tokens, settings.d_level_tol)
  boot = {"n_boot": settings.n_boot, "seed": settings.seed}
  in_group = np.isfinite(a.budget)
  if in_group.sum() == 0:
    a.fits["isoflop"] = "no run names a compute budget (Run.budget): not an isoFLOP sweep"
  else:
    a.fits["isoflop"] = _try(fits.fit_isoflop, a.n_params[in_group], a.loss[in_group],
                             a.budget[in_group], tokens=a.tokens[in_group], **boot)
    other = "total" if settings.params == "non_embedding" else "non_embedding"
    a.isoflop_other_params = _try(fits.fit_isoflop, column(PARAM_KEYS[other])[in_group],
                                  a.loss[in_group], a.budget[in_group],
                                  tokens=a.tokens[in_group], **boot)
  a.split = settings.tokens_per_param_split
  iso = a.fit("isoflop")
  if iso is not None:
    ratios = [e["tokens_per_param"].value for e in iso.per_budget if "tokens_per_param" in e]
    a.split = float(np.exp(np.mean(np.log(ratios))))
    a.split_source = "this sweep's compute-optimal D/N (isoFLOP minima, geometric mean)"

  by_n, by_d = per_n_indices(a), per_d_indices(a)
  a.fits["L(N)"] = _try(fits.fit_power_law, a.n_params[by_n], a.loss[by_n], variable="N", **boot)
  a.fits["L(D)"] = _try(fits.fit_power_law, a.tokens[by_d], a.loss[by_d], variable="D", **boot)
  for name, unit, sign in (("L(N)", "size", "≥"), ("L(D)", "D level", "≤")):
    if isinstance(a.fits[name], str):
      a.fits[name] += f" (its points: the best run per {unit} with D/N {sign} {a.split:.3g})"
  for name, flops in (("L(C)", a.flops_6nd), ("L(C_attn)", a.flops)):
    front = frontier_indices(a, name)
    a.fits[name] = _try(fits.fit_power_law, flops[front], a.loss[front], variable="C", **boot)
  a.fits["L(N,D)"] = _try(fits.fit_parametric, a.n_params, a.tokens, a.loss, grid=settings.grid,
                          n_boot=settings.n_boot_parametric, seed=settings.seed)
  a.fits = {k: a.fits[k] for k in ("L(N)", "L(D)", "L(C)", "L(C_attn)", "L(N,D)", "isoflop")}
  return a


def frontier_indices(a: Analysis, which: str = "L(C)") -> np.ndarray:
  flops = a.flops_6nd if which == "L(C)" else a.flops
  return fits.pareto_frontier(flops, a.loss) if len(a.loss) else np.array([], np.int64)


def per_n_indices(a: Analysis) -> np.ndarray:
  """Per model size, its lowest-loss run, if that run is data-rich (D/N >= the split)."""
  best = fits.best_per_level(np.unique(a.n_params, return_inverse=True)[1], a.loss)
  return best[a.tokens[best] / a.n_params[best] >= a.split]


def per_d_indices(a: Analysis) -> np.ndarray:
  """Per token level, its lowest-loss run, if that run is model-rich (D/N <= the split)."""
  best = fits.best_per_level(a.d_levels, a.loss)
  return best[a.tokens[best] / a.n_params[best] <= a.split]


def _estimates(obj) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if isinstance(value, fits.Estimate):
      out[field.name] = dataclasses.asdict(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[field.name] = value
  return out


def summary_dict(a: Analysis) -> dict[str, Any]:
  """Every fitted quantity as plain JSON: {fit: {quantity: {value, lo, hi, n_boot}} | {error}}."""
  out: dict[str, Any] = {"n_runs": len(a.records), "loss": a.settings.loss,
                         "params": a.settings.params, "tokens_per_param_split": a.split,
                         "dropped": a.dropped}
  for name, fit in a.fits.items():
    if isinstance(fit, str):
      out[name] = {"error": fit}
      continue
    entry = _estimates(fit)
    if isinstance(fit, fits.IsoFlopFit):
      entry["profiles"] = [
          {"budget": p.budget, "n_runs": len(p.n), "problem": p.problem, "r2": p.r2,
           **{q: dataclasses.asdict(e) for q, e in est.items()}}
          for p, est in zip(fit.profiles, fit.per_budget, strict=True)]
    else:
      entry["n_points"] = len(fit.loss)
    out[name] = entry
  other = a.isoflop_other_params
  if other is not None:
    out["isoflop_other_params"] = ({"error": other} if isinstance(other, str) else
                                   {"params": "total" if a.settings.params == "non_embedding"
                                    else "non_embedding", **_estimates(other)})
  return out
