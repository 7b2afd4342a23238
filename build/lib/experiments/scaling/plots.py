"""The report's figures (matplotlib, drawn off-screen through Figure objects; no pyplot state).

  loss_vs_params.png   loss vs N, coloured by token budget D; L(N) fit; L(N, D) at each D level
  loss_vs_tokens.png   loss vs D, coloured by N; L(D) fit; L(N, D) at each model size
  loss_vs_compute.png  every run's validation curve vs C = 6 N D, the frontier, the L(C) fit
  isoflop.png          loss vs N per compute budget with parabolas and minima; N_opt, D_opt vs C
  parametric_fit.png   observed vs L(N, D)-predicted loss (approach 3)

Each figure draws whatever fits exist and says in its title which could not be made.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.figure import Figure

from experiments.scaling.analysis import Analysis, frontier_indices, per_d_indices, per_n_indices
from model.store.files import atomic_open

DPI = 110


def _figure(ncols: int = 1) -> tuple[Figure, list]:
  fig = Figure(figsize=(6.4 * ncols, 4.8), dpi=DPI, layout="constrained")
  return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _colours(values, cmap="viridis"):
  values = np.asarray(values, np.float64)
  lo, hi = values.min(), values.max()
  norm = colors.LogNorm(lo, hi if hi > lo else lo * 1.001)
  mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
  return mappable, lambda v: mappable.to_rgba(v)


def _span(x, pad: float = 1.3) -> np.ndarray:
  return np.geomspace(np.min(x) / pad, np.max(x) * pad, 100)


def _missing(a: Analysis, *names: str) -> str:
  lacking = [n for n in names if a.fit(n) is None]
  return f"\n(not fitted: {', '.join(lacking)})" if lacking else ""


def _budget_name(a: Analysis) -> str:
  return "6 N D FLOPs" if a.budget_flops == "6nd" else "FLOPs with attention and LM head"


def _finish(fig: Figure, ax_list, path: str) -> str:
  for ax in ax_list:
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_xscale() == "log":
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if ax.get_yscale() == "log" and "nats/token" in ax.get_ylabel():
      # Losses span less than a decade: a few plain numbers read better than 2 x 10^0.
      lo, hi = ax.get_ylim()
      ticks = ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
      ax.set_yticks([t for t in ticks if lo <= t <= hi])
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_ylim(lo, hi)
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  return path


def plot_loss_vs_variable(a: Analysis, path: str, variable: str) -> str:
  """Loss vs N coloured by D level (variable='N'), or loss vs D coloured by N (variable='D')."""
  fig, (ax,) = _figure()
  by_n = variable == "N"
  x = a.n_params if by_n else a.tokens
  groups = a.d_levels if by_n else np.unique(a.n_params, return_inverse=True)[1]
  colour_of = a.tokens if by_n else a.n_params
  mappable, colour = _colours(colour_of, "viridis" if by_n else "plasma")
  parametric = a.fit("L(N,D)")
  for g in np.unique(groups):
    idx = np.flatnonzero(groups == g)
    idx = idx[np.argsort(x[idx])]
    level = float(np.exp(np.mean(np.log(colour_of[idx]))))
    ax.plot(x[idx], a.loss[idx], "o-", color=colour(level), ms=5, lw=1)
  if parametric is not None:  # the fitted law at up to five levels of the other variable
    levels = np.unique(colour_of)
    if len(levels) > 5:
      levels = np.geomspace(levels.min(), levels.max(), 5)
    xs = _span(x)
    for level in levels:
      ys = parametric.predict(xs, level) if by_n else parametric.predict(level, xs)
      ax.plot(xs, ys, ":", color=colour(level), lw=1)
  best = per_n_indices(a) if by_n else per_d_indices(a)
  ax.plot(x[best], a.loss[best], "o", mfc="none", mec="k", ms=9,
          label=(f"L(N) points: best per size, D/N ≥ {a.split:.3g}" if by_n else
                 f"L(D) points: best per token level, D/N ≤ {a.split:.3g}"))
  law = a.fit(f"L({variable})")
  if law is not None:
    xs = _span(x, 2.0)
    ax.plot(xs, law.predict(xs), "k--", lw=1.5,
            label=f"L({variable}) = ({variable}c/{variable})^{law.alpha.value:.3f}, "
                  f"R²={law.r2:.3f}")
  if parametric is not None:
    ax.plot([], [], "k:", label="L(N, D) fit (approach 3)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(a.params_label if by_n else "training tokens D")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"Loss vs {'model size' if by_n else 'data'}"
               + _missing(a, f"L({variable})", "L(N,D)"), fontsize=10)
  fig.colorbar(mappable, ax=ax, label="tokens D" if by_n else "parameters N")
  ax.legend(fontsize=8)
  return _finish(fig, [ax], path)


def plot_loss_vs_compute(a: Analysis, path: str) -> str:
  fig, (ax,) = _figure()
  mappable, colour = _colours(a.n_params, "plasma")
  for r, n in zip(a.records, a.n_params, strict=True):
    curve = np.array([p for p in (r.get("train_curve") or []) if p[1] and p[2]], np.float64)
    if len(curve):
      ax.plot(6 * n * curve[:, 1], curve[:, 2], "-", color=colour(n), lw=0.8, alpha=0.6)
  ax.plot([], [], "-", color="0.5", lw=0.8, label="training loss during each run (means per "
          "logging interval, training split)")
  ax.scatter(a.flops_6nd, a.loss, c=[colour(n) for n in a.n_params], s=22, zorder=3,
             label="final validation loss of each run")
  front = frontier_indices(a, "L(C)")
  ax.plot(a.flops_6nd[front], a.loss[front], "s", mfc="none", mec="r", ms=9, zorder=4,
          label="compute frontier")
  law = a.fit("L(C)")
  if law is not None:
    xs = _span(a.flops_6nd, 2.0)
    ax.plot(xs, law.predict(xs), "r--", lw=1.5,
            label=f"L(C) = (Cc/C)^{law.alpha.value:.3f}, R²={law.r2:.3f}")
  iso = a.fit("isoflop")
  if iso is not None:
    minima = [(6 * p.n_opt * p.d_opt, p.loss_opt) for p in iso.profiles if p.valid]
    ax.plot(*zip(*minima, strict=True), "*", color="k", ms=12, zorder=5,
            label="isoFLOP minima (approach 2)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C = 6 N D (FLOPs)")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Loss vs compute: learning curves and frontier" + _missing(a, "L(C)"), fontsize=10)
  fig.colorbar(mappable, ax=ax, label="parameters N")
  ax.legend(fontsize=8)
  return _finish(fig, [ax], path)


def plot_isoflop(a: Analysis, path: str) -> str:
  fig, (ax, ax_opt) = _figure(2)
  iso = a.fit("isoflop")
  in_group = np.isfinite(a.budget)
  budgets = np.unique(a.budget[in_group])
  if len(budgets):
    mappable, colour = _colours(budgets, "viridis")
    profiles = {p.budget: p for p in iso.profiles} if iso is not None else {}
    for c in budgets:
      idx = np.flatnonzero(a.budget == c)
      idx = idx[np.argsort(a.n_params[idx])]
      ax.plot(a.n_params[idx], a.loss[idx], "o", color=colour(c), label=f"C = {c:.2g}")
      p = profiles.get(c)
      if p is not None and p.coeffs is not None:
        xs = _span(a.n_params[idx], 1.15)
        ax.plot(xs, p.predict(xs), "-", color=colour(c), lw=1)
        if p.valid:
          ax.plot(p.n_opt, p.loss_opt, "*", color=colour(c), mec="k", ms=14, zorder=4)
    ax.legend(fontsize=8, title=f"budget ({_budget_name(a)})", title_fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel(a.params_label)
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("IsoFLOP profiles (parabola in ln N; * minimum)" + _missing(a, "isoflop"),
               fontsize=10)
  if iso is not None:
    valid = [p for p in iso.profiles if p.valid]
    c = np.array([p.budget for p in valid])
    n_opt = np.array([p.n_opt for p in valid])
    cs = _span(c, 3.0)
    ax_opt.plot(c, n_opt, "o", color="C0", label="N_opt (isoFLOP minima)")
    ax_opt.plot(c, [p.d_opt for p in valid], "s", color="C1", label="D_opt at N_opt")
    ax_opt.plot(cs, iso.n_opt(cs), "-", color="C0", label=f"N_opt ∝ C^{iso.a.value:.2f}")
    ax_opt.plot(cs, iso.d_opt(cs), "-", color="C1", label=f"D_opt ∝ C^{iso.b.value:.2f}")
    parametric = a.fit("L(N,D)")
    # Approach 3's allocation is for C = 6 N D; it shares the axis only with such budgets.
    if (parametric is not None and np.isfinite(parametric.a.value)
        and a.budget_flops == "6nd"):
      n3, d3 = parametric.optimal_allocation(cs)
      ax_opt.plot(cs, n3, "--", color="C0", lw=1, label=f"approach 3: N_opt ∝ C^"
                  f"{parametric.a.value:.2f}")
      ax_opt.plot(cs, d3, "--", color="C1", lw=1, label=f"approach 3: D_opt ∝ C^"
                  f"{parametric.b.value:.2f}")
    ax_opt.set_xscale("log")
    ax_opt.set_yscale("log")
    ax_opt.legend(fontsize=8)
  ax_opt.set_xlabel(f"compute budget C ({_budget_name(a)})")
  ax_opt.set_ylabel("compute-optimal N, D")
  ax_opt.set_title("Compute-optimal allocation", fontsize=10)
  return _finish(fig, [ax, ax_opt], path)


def plot_parametric_fit(a: Analysis, path: str) -> str:
  fig, (ax,) = _figure()
  fit = a.fit("L(N,D)")
  if fit is not None:
    mappable, colour = _colours(a.n_params, "plasma")
    predicted = fit.predict(a.n_params, a.tokens)
    ax.scatter(predicted, a.loss, c=[colour(n) for n in a.n_params], s=24, zorder=3)
    lo, hi = min(predicted.min(), a.loss.min()), max(predicted.max(), a.loss.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="observed = predicted")
    ax.set_title(f"L(N, D) = {fit.E.value:.3g} + {10 ** fit.log10_A.value:.3g}/N^"
                 f"{fit.alpha.value:.3f} + {10 ** fit.log10_B.value:.3g}/D^{fit.beta.value:.3f}"
                 f"  (R² of ln L = {fit.r2:.3f})", fontsize=9)
    fig.colorbar(mappable, ax=ax, label="parameters N")
    ax.legend(fontsize=8)
  else:
    ax.set_title(f"L(N, D) not fitted: {a.fits.get('L(N,D)')}", fontsize=8, wrap=True)
  ax.set_xlabel("predicted loss")
  ax.set_ylabel("observed loss")
  return _finish(fig, [ax], path)


def write_plots(a: Analysis, out_dir: str) -> list[str]:
  """Every figure into out_dir; returns their paths. Nothing is drawn without runs."""
  os.makedirs(out_dir, exist_ok=True)
  if not a.records:
    return []
  join = lambda name: os.path.join(out_dir, name)
  return [
      plot_loss_vs_variable(a, join("loss_vs_params.png"), "N"),
      plot_loss_vs_variable(a, join("loss_vs_tokens.png"), "D"),
      plot_loss_vs_compute(a, join("loss_vs_compute.png")),
      plot_isoflop(a, join("isoflop.png")),
      plot_parametric_fit(a, join("parametric_fit.png")),
  ]
