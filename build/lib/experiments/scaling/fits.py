"""Scaling-law fits with bootstrap confidence intervals and R^2 (NumPy + SciPy, no JAX).

Power laws, the textbook's form (section 8.8.1; Kaplan et al. 2020), X in {N, D, C}:

    L(X) = (X_c / X)^alpha_X      fitted as   ln L = alpha ln X_c - alpha ln X   (least squares)

Parametric loss (Hoffmann et al. 2022, "approach 3"):

    L(N, D) = E + A / N^alpha + B / D^beta

    fitted by minimizing  sum_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i)
    over (a, b, e, alpha, beta) = (ln A, ln B, ln E, alpha, beta) with L-BFGS started from every
    point of a grid. Under C = 6 N D its compute-optimal allocation is
      N_opt(C) = G (C/6)^a,  D_opt(C) = (C/6)^b / G,  a = beta/(alpha+beta), b = alpha/(alpha+beta),
      G = (alpha A / (beta B))^(1/(alpha+beta)).

IsoFLOP profiles (Hoffmann et al. 2022, "approach 2"): for each compute budget C a parabola
L = p0 + p1 x + p2 x^2 in x = ln N; its vertex is N_opt(C) = exp(-p1 / (2 p2)), and
D_opt(C) = C / (6 N_opt) (or, when C counts FLOPs exactly, the runs' D interpolated at
N_opt). Least squares in log-log then gives N_opt ~ C^a, D_opt ~ C^b.

Every fitted number is an `Estimate`: the fit to all points, plus a percentile interval
from a case bootstrap (points resampled with replacement; for isoFLOP profiles, resampled
within each budget). Too few points raise `InsufficientData` naming the fit and the count.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits


class InsufficientData(ValueError):
  """A fit was asked for with too few (or degenerate) points."""


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A fitted value with a bootstrap percentile interval [lo, hi] from `n_boot` valid refits."""

  value: float
  lo: float = math.nan
  hi: float = math.nan
  n_boot: int = 0

  def format(self, digits: int = 3, sci: bool = False) -> str:
    fmt = (lambda v: f"{v:.{digits - 1}e}") if sci else (lambda v: f"{v:.{digits}g}")
    if self.n_boot == 0 or not (math.isfinite(self.lo) and math.isfinite(self.hi)):
      return fmt(self.value)
    return f"{fmt(self.value)} [{fmt(self.lo)}, {fmt(self.hi)}]"

  def contains(self, x: float) -> bool:
    return self.n_boot > 0 and self.lo <= x <= self.hi


# ---- shared helpers ---------------------------------------------------------------------------


def as_positive(values, name: str) -> np.ndarray:
  """A 1-D float array of finite positive values (what a log needs), or a clear ValueError."""
  arr = np.asarray(values, dtype=np.float64).reshape(-1)
  bad = ~np.isfinite(arr) | (arr <= 0)
  if bad.any():
    raise ValueError(f"{name} must be finite and positive; got {arr[bad][:5].tolist()} "
                     f"at positions {np.flatnonzero(bad)[:5].tolist()}")
  return arr


def r_squared(y, y_hat) -> float:
  """Coefficient of determination 1 - SS_res / SS_tot (nan when y is constant)."""
  y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  if ss_tot == 0.0:
    return math.nan
  return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot


def group_levels(values, rel_tol: float = 0.1) -> np.ndarray:
  """Integer level of each value: sorted values within a factor (1 + rel_tol) of their
  neighbour share a level (single linkage in log space). Groups e.g. token budgets that
  differ only by rounding to whole steps."""
  x = np.log(as_positive(values, "values"))
  order = np.argsort(x)
  levels = np.empty(len(x), dtype=np.int64)
  level = 0
  for i, j in enumerate(order):
    if i and x[j] - x[order[i - 1]] > math.log1p(rel_tol):
      level += 1
    levels[j] = level
  return levels


def best_per_level(levels, loss) -> np.ndarray:
  """Indices of the lowest loss within each level, ordered by level."""
  levels, loss = np.asarray(levels), np.asarray(loss)
  return np.array([np.flatnonzero(levels == lv)[np.argmin(loss[levels == lv])]
                   for lv in np.unique(levels)], dtype=np.int64)


def pareto_frontier(cost, loss) -> np.ndarray:
  """Indices of points no cheaper-or-equal point beats: the lower envelope of loss vs cost,
  ordered by cost."""
  cost, loss = np.asarray(cost, np.float64), np.asarray(loss, np.float64)
  front, best = [], math.inf
  for i in np.lexsort((loss, cost)):
    if loss[i] < best:
      front.append(i)
      best = loss[i]
  return np.array(front, dtype=np.int64)


def bootstrap(refit: Callable[[np.ndarray], dict[str, float]], strata, *, n_boot: int,
              seed: int, level: float = 0.95) -> tuple[dict[str, tuple[float, float, int]], int]:
  """Percentile intervals of `refit`'s outputs over `n_boot` case resamples.

  Each stratum (points sharing a `strata` value) is resampled with replacement on its own.
  A resample `refit` rejects with InsufficientData, and non-finite outputs, are skipped.
  Returns ({name: (lo, hi, n_valid)}, n_rejected).
  """
  strata = np.asarray(strata)
  groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  rejected = 0
  for _ in range(n_boot):
    idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
    try:
      out = refit(np.sort(idx))
    except InsufficientData:
      rejected += 1
      continue
    for name, v in out.items():
      if v is not None and math.isfinite(v):
        draws.setdefault(name, []).append(float(v))
  tail = 100 * (1 - level) / 2
  intervals = {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)), len(v))
               for name, v in draws.items()}
  return intervals, rejected


def with_intervals(point: dict[str, float], intervals) -> dict[str, Estimate]:
  return {name: Estimate(float(v), *intervals.get(name, (math.nan, math.nan, 0)))
          for name, v in point.items()}


# ---- L(X) = (X_c / X)^alpha -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(X) = (X_c / X)^alpha fitted to `x`, `loss` (the points used)."""

  variable: str
  alpha: Estimate
  log10_x_c: Estimate
  r2: float  # in ln L vs ln X, the space of the fit
  x: np.ndarray
  loss: np.ndarray
  n_rejected: int = 0

  @property
  def x_c(self) -> float:
    return 10.0 ** self.log10_x_c.value

  def predict(self, x) -> np.ndarray:
    return (self.x_c / np.asarray(x, np.float64)) ** self.alpha.value


def _power_law_coefficients(x, loss) -> dict[str, float]:
  u, y = np.log(x), np.log(loss)
  if np.ptp(u) == 0:
    raise InsufficientData("all points have the same X")
  slope, intercept = np.polyfit(u, y, 1)
  alpha = -slope
  return {"alpha": float(alpha),
          "log10_x_c": float(intercept / alpha / math.log(10)) if alpha else math.nan}


def fit_power_law(x, loss, *, variable: str, n_boot: int = 1000, seed: int = 0,
                  min_points: int = 3) -> PowerLawFit:
  """Fit L(X) = (X_c / X)^alpha by least squares on ln L = alpha ln X_c - alpha ln X."""
  x, loss = as_positive(x, variable), as_positive(loss, "loss")
  if len(x) != len(loss):
    raise ValueError(f"L({variable}): {len(x)} values of {variable} but {len(loss)} losses")
  distinct = len(np.unique(x))
  if distinct < min_points:
    raise InsufficientData(f"L({variable}) = ({variable}_c/{variable})^a needs at least "
                           f"{min_points} points with distinct {variable}; got {distinct}")
  point = _power_law_coefficients(x, loss)
  intervals, rejected = bootstrap(lambda i: _power_law_coefficients(x[i], loss[i]),
                                  np.zeros(len(x)), n_boot=n_boot, seed=seed)
  est = with_intervals(point, intervals)
  fit = PowerLawFit(variable, est["alpha"], est["log10_x_c"], math.nan, x, loss, rejected)
  return dataclasses.replace(fit, r2=r_squared(np.log(loss), np.log(fit.predict(x))))


# ---- L(N, D) = E + A / N^alpha + B / D^beta ----------------------------------------------------

# Hoffmann et al. (2022), appendix D.2: the initialization grid and the Huber delta.
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}
HUBER_DELTA = 1e-3
_PARAM_ORDER = ("a", "b", "e", "alpha", "beta")
# Exponents stay non-negative; the log-constants get wide finite bounds so L-BFGS-B is safe.
_BOUNDS = [(-30.0, 80.0), (-30.0, 80.0), (-20.0, 10.0), (0.0, 5.0), (0.0, 5.0)]


def huber(r, delta: float):
  """Huber loss of residuals r and its derivative."""
  abs_r = np.abs(r)
  quad = abs_r <= delta
  value = np.where(quad, 0.5 * r ** 2, delta * (abs_r - 0.5 * delta))
  grad = np.where(quad, r, delta * np.sign(r))
  return value, grad


def _parametric_objective(theta, log_n, log_d, log_loss, delta):
  """sum_i Huber(LSE(a - alpha ln N, b - beta ln D, e) - ln L) and its gradient in theta."""
  a, b, e, alpha, beta = theta
  t_n, t_d = a - alpha * log_n, b - beta * log_d
  top = np.maximum(np.maximum(t_n, t_d), e)  # a hand-written LSE: this runs ~10^5 times per fit
  w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
  total = w_n + w_d + w_e
  value, dr = huber(top + np.log(total) - log_loss, delta)
  dr = dr / total  # times d LSE / d term = w / total
  g_n, g_d = dr * w_n, dr * w_d
  grad = np.array([g_n.sum(), g_d.sum(), (dr * w_e).sum(), -(g_n @ log_n), -(g_d @ log_d)])
  return float(value.sum()), grad


def _minimize_from(inits, log_n, log_d, log_loss, delta) -> list[tuple[float, np.ndarray]]:
  """L-BFGS-B from each initial theta; [(objective, theta)] sorted best first."""
  solutions = []
  for theta0 in inits:
    res = optimize.minimize(_parametric_objective, np.asarray(theta0, np.float64),
                            args=(log_n, log_d, log_loss, delta), jac=True, method="L-BFGS-B",
                            bounds=_BOUNDS,
                            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    if np.isfinite(res.fun):
      solutions.append((float(res.fun), res.x))
  solutions.sort(key=lambda s: s[0])
  return solutions


def _distinct(solutions, k: int, tol: float = 0.05) -> list[np.ndarray]:
  """The first k solutions that differ from each other (a grid converges to few minima)."""
  kept: list[np.ndarray] = []
  for _, theta in solutions:
    if all(np.max(np.abs(theta - t)) > tol for t in kept):
      kept.append(theta)
    if len(kept) == k:
      break
  return kept


def _parametric_quantities(theta) -> dict[str, float]:
  a, b, e, alpha, beta = (float(v) for v in theta)
  out = {"E": math.exp(e), "log10_A": a / math.log(10), "log10_B": b / math.log(10),
         "alpha": alpha, "beta": beta, "a": math.nan, "b": math.nan, "log10_G": math.nan}
  if alpha > 0 and beta > 0:
    out["a"] = beta / (alpha + beta)
    out["b"] = alpha / (alpha + beta)
    out["log10_G"] = (math.log(alpha / beta) + a - b) / (alpha + beta) / math.log(10)
  return out


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3) and what follows from it."""

  E: Estimate
  log10_A: Estimate
  log10_B: Estimate
  alpha: Estimate
  beta: Estimate
  a: Estimate  # N_opt ~ C^a
  b: Estimate  # D_opt ~ C^b
  log10_G: Estimate
  r2: float  # of ln L, the space of the fit
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray
  objective: float
  n_inits: int
  n_at_best: int  # initializations that reached the best objective (within 0.1%)
  n_rejected: int = 0

  @property
  def theta(self) -> np.ndarray:
    return np.array([self.log10_A.value * math.log(10), self.log10_B.value * math.log(10),
                     math.log(self.E.value), self.alpha.value, self.beta.value])

  def predict(self, n, d) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return (self.E.value + 10 ** self.log10_A.value / n ** self.alpha.value
            + 10 ** self.log10_B.value / d ** self.beta.value)

  def optimal_allocation(self, flops) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = C."""
    c6 = np.asarray(flops, np.float64) / 6.0
    g = 10 ** self.log10_G.value
    return g * c6 ** self.a.value, c6 ** self.b.value / g


def fit_parametric(n, d, loss, *, grid: dict[str, Sequence[float]] | None = None,
                   delta: float = HUBER_DELTA, n_boot: int = 200, boot_starts: int = 4,
                   seed: int = 0, min_points: int = 6) -> ParametricFit:
  """Fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on ln L, L-BFGS-B from every grid point).

  The grid (default: Hoffmann et al.'s 4500 points) locates the global basin once; each
  bootstrap refit starts from the `boot_starts` best distinct minima the grid reached.
  """
  n, d, loss = as_positive(n, "N"), as_positive(d, "D"), as_positive(loss, "loss")
  if not len(n) == len(d) == len(loss):
    raise ValueError(f"L(N, D): lengths differ (N {len(n)}, D {len(d)}, loss {len(loss)})")
  if len(n) < min_points:
    raise InsufficientData(f"L(N, D) = E + A/N^alpha + B/D^beta has 5 parameters and needs at "
                           f"least {min_points} runs; got {len(n)}")
  for name, v in (("N", n), ("D", d)):
    if len(np.unique(v)) < 2:
      raise InsufficientData(f"L(N, D) needs at least 2 distinct values of {name}")
  grid = CHINCHILLA_GRID if grid is None else grid
  missing = set(_PARAM_ORDER) - set(grid)
  if missing:
    raise ValueError(f"the initialization grid lacks {sorted(missing)}; it needs {_PARAM_ORDER}")
  inits = list(itertools.product(*(np.asarray(grid[k], np.float64) for k in _PARAM_ORDER)))
  logs = np.log(n), np.log(d), np.log(loss)
  # L-BFGS-B calls BLAS on 5-vectors; a multi-threaded BLAS spins and is ~10-100x slower.
  with threadpool_limits(1):
    return _fit_parametric(inits, logs, n, d, loss, delta, n_boot, boot_starts, seed)


def _fit_parametric(inits, logs, n, d, loss, delta, n_boot, boot_starts, seed) -> ParametricFit:
  solutions = _minimize_from(inits, *logs, delta)
  if not solutions:
    raise InsufficientData("L(N, D): no initialization converged to a finite objective")
  starts = _distinct(solutions, boot_starts)
  point = _parametric_quantities(solutions[0][1])

  def refit(idx):
    sub = [x[idx] for x in logs]
    if len(np.unique(sub[0])) < 2 or len(np.unique(sub[1])) < 2:
      raise InsufficientData("resample has a single N or D")
    best = _minimize_from(starts, *sub, delta)
    if not best:
      raise InsufficientData("no convergence")
    return _parametric_quantities(best[0][1])

  intervals, rejected = bootstrap(refit, np.zeros(len(n)), n_boot=n_boot, seed=seed)
  est = with_intervals(point, intervals)
  fit = ParametricFit(**est, r2=math.nan, n=n, d=d, loss=loss, objective=solutions[0][0],
                      n_inits=len(inits),
                      n_at_best=sum(s[0] <= solutions[0][0] * 1.001 for s in solutions),
                      n_rejected=rejected)
  return dataclasses.replace(fit, r2=r_squared(np.log(loss), np.log(fit.predict(n, d))))


# ---- IsoFLOP profiles --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IsoFlopProfile:
  """Loss vs model size at one compute budget: L = p0 + p1 x + p2 x^2, x = ln N."""

  budget: float
  n: np.ndarray
  loss: np.ndarray
  coeffs: tuple[float, float, float] | None  # (p2, p1, p0), np.polyfit order
  problem: str | None  # why there is no usable minimum (None: valid)
  r2: float = math.nan
  d: np.ndarray | None = None  # the runs' tokens (None: D = C / 6N)

  @property
  def valid(self) -> bool:
    return self.problem is None

  @property
  def n_opt(self) -> float:
    p2, p1, _ = self.coeffs
    return math.exp(-p1 / (2 * p2)) if p2 > 0 else math.nan

  @property
  def d_opt(self) -> float:
    """Tokens at N_opt: C / (6 N_opt), or interpolated in ln N between the runs' own D when
    the budget counts FLOPs otherwise (attention and LM head included)."""
    if self.d is None:
      return self.budget / (6 * self.n_opt)
    order = np.argsort(self.n)
    return float(np.exp(np.interp(math.log(self.n_opt), np.log(self.n[order]),
                                  np.log(self.d[order]))))

  @property
  def loss_opt(self) -> float:
    return float(np.polyval(self.coeffs, math.log(self.n_opt))) if self.coeffs else math.nan

  def predict(self, n) -> np.ndarray:
    return np.polyval(self.coeffs, np.log(np.asarray(n, np.float64)))


def fit_isoflop_profile(n, loss, budget: float, d=None) -> IsoFlopProfile:
  """A parabola in ln N through one budget's runs (`d`: their tokens, if not C / 6N);
  `problem` says why it has no usable minimum (fewer than 3 sizes, not convex, or the
  vertex outside the sampled sizes)."""
  n, loss = as_positive(n, "N"), as_positive(loss, "loss")
  d = None if d is None else as_positive(d, "D")
  sizes = len(np.unique(n))
  if sizes < 3:
    return IsoFlopProfile(budget, n, loss, None, f"needs >= 3 model sizes, has {sizes}", d=d)
  x = np.log(n)
  coeffs = tuple(float(c) for c in np.polyfit(x, loss, 2))
  r2 = r_squared(loss, np.polyval(coeffs, x))
  if coeffs[0] <= 0:
    return IsoFlopProfile(budget, n, loss, coeffs, "not convex: no minimum", r2, d)
  vertex = -coeffs[1] / (2 * coeffs[0])
  if not x.min() <= vertex <= x.max():
    return IsoFlopProfile(budget, n, loss, coeffs,
                          f"minimum at N={math.exp(vertex):.3g} lies outside the sampled sizes "
                          f"[{n.min():.3g}, {n.max():.3g}]", r2, d)
  return IsoFlopProfile(budget, n, loss, coeffs, None, r2, d)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """Approach 2: the profiles' minima and the power laws N_opt ~ C^a, D_opt ~ C^b through them.

  `per_budget[i]` holds Estimates of N_opt, D_opt, tokens_per_param and loss_opt for
  `profiles[i]` (empty for a profile without a usable minimum).
  """

  profiles: list[IsoFlopProfile]
  a: Estimate
  b: Estimate
  log10_n_coef: Estimate  # N_opt = 10^coef C^a
  log10_d_coef: Estimate  # D_opt = 10^coef C^b
  r2_n: float
  r2_d: float
  per_budget: list[dict[str, Estimate]]
  n_rejected: int = 0

  def n_opt(self, flops) -> np.ndarray:
    return 10 ** self.log10_n_coef.value * np.asarray(flops, np.float64) ** self.a.value

  def d_opt(self, flops) -> np.ndarray:
    return 10 ** self.log10_d_coef.value * np.asarray(flops, np.float64) ** self.b.value


def _isoflop_quantities(n, loss, budgets, budget_values, d=None):
  profiles = [fit_isoflop_profile(n[budgets == k], loss[budgets == k], c,
                                  None if d is None else d[budgets == k])
              for k, c in enumerate(budget_values)]
  valid = [p for p in profiles if p.valid]
  out: dict[str, float] = {}
  for k, p in enumerate(profiles):
    if p.valid:
      d_opt = p.d_opt
      out.update({f"n_opt_{k}": p.n_opt, f"d_opt_{k}": d_opt,
                  f"tokens_per_param_{k}": d_opt / p.n_opt, f"loss_opt_{k}": p.loss_opt})
  if len(valid) < 2:
    problems = "; ".join(f"C={p.budget:.3g}: {p.problem}" for p in profiles if not p.valid)
    raise InsufficientData(f"approach 2 needs >= 2 budgets with an interior minimum; got "
                           f"{len(valid)}" + (f" ({problems})" if problems else ""))
  log_c = np.log([p.budget for p in valid])
  log_n = np.log([p.n_opt for p in valid])
  log_d = np.log([p.d_opt for p in valid])
  a, n_coef = np.polyfit(log_c, log_n, 1)
  b, d_coef = np.polyfit(log_c, log_d, 1)
  out.update({"a": float(a), "b": float(b), "log10_n_coef": float(n_coef / math.log(10)),
              "log10_d_coef": float(d_coef / math.log(10))})
  return profiles, out, (log_c, log_n, log_d)


def fit_isoflop(n, loss, budget, *, tokens=None, n_boot: int = 1000, seed: int = 0
                ) -> IsoFlopFit:
  """Approach 2 over runs grouped by their compute budget `budget` (one value per run).

  `tokens` (each run's D) gives D_opt by interpolation when the budget does not count FLOPs
  as 6 N D; without it D_opt = C / (6 N_opt).
  """
  n, loss, budget = as_positive(n, "N"), as_positive(loss, "loss"), as_positive(budget, "budget")
  d = None if tokens is None else as_positive(tokens, "D")
  if not len(n) == len(loss) == len(budget) == (len(n) if d is None else len(d)):
    raise ValueError(f"isoFLOP: lengths differ (N {len(n)}, loss {len(loss)}, C {len(budget)})")
  budget_values, budgets = np.unique(budget, return_inverse=True)
  profiles, point, (log_c, log_n, log_d) = _isoflop_quantities(n, loss, budgets, budget_values,
                                                                d)
  intervals, rejected = bootstrap(
      lambda i: _isoflop_quantities(n[i], loss[i], budgets[i], budget_values,
                                    None if d is None else d[i])[1], budgets,
      n_boot=n_boot, seed=seed)
  est = with_intervals(point, intervals)
  per_budget = []
  for k in range(len(profiles)):
    per_budget.append({q: est[f"{q}_{k}"] for q in ("n_opt", "d_opt", "tokens_per_param",
                                                      "loss_opt") if f"{q}_{k}" in est})
  r2_n = r_squared(log_n, np.log(10) * est["log10_n_coef"].value + est["a"].value * log_c)
  r2_d = r_squared(log_d, np.log(10) * est["log10_d_coef"].value + est["b"].value * log_c)
  return IsoFlopFit(profiles, est["a"], est["b"], est["log10_n_coef"], est["log10_d_coef"],
                    r2_n, r2_d, per_budget, rejected)
