"""report.md: the runs, every fitted law with its interval and R^2, the comparison with
Kaplan et al. (2020), Hoffmann et al. (2022) and Besiroglu et al. (2024), and what differs
at this scale and why. Every number in it is computed from the records."""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any

import numpy as np

from experiments.scaling.analysis import BESIROGLU, CHINCHILLA, KAPLAN, Analysis
from experiments.scaling.fits import Estimate


def _num(x: float, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  if abs(x) >= 1e5 or (x != 0 and abs(x) < 1e-3):
    return f"{x:.{digits - 1}e}"
  return f"{x:.{digits}g}"


def _pow10(e: Estimate) -> str:
  """An Estimate of log10(x), shown as x."""
  s = _num(10 ** e.value)
  if e.n_boot:
    s += f" [{_num(10 ** e.lo)}, {_num(10 ** e.hi)}]"
  return s


def _decades(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.log10(x.max() / x.min())) if len(x) else math.nan


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _compare(name: str, est: Estimate, published: dict[str, float]) -> str:
  """One sentence: where the fitted value lies relative to the published ones."""
  refs = ", ".join(f"{who} {v:g}" for who, v in published.items())
  if est.n_boot == 0:
    return f"- {name} = {est.format()} (no bootstrap interval); published: {refs}."
  inside = [who for who, v in published.items() if est.contains(v)]
  above = all(est.lo > v for v in published.values())
  below = all(est.hi < v for v in published.values())
  where = ("above every published value" if above else "below every published value" if below
           else f"its interval contains {', '.join(inside)}" if inside
           else "between the published values, none inside its interval")
  return f"- {name} = {est.format()}: {where} (published: {refs})."


def _runs_section(a: Analysis) -> list[str]:
  rows = []
  for i, r in enumerate(a.records):
    rows.append([
        f"`{r['name']}`", r.get("n_layers"), r.get("d_model"), r.get("n_heads"),
        _num(a.n_params[i]), _num(r.get("n_params")), _num(a.tokens[i]),
        _num(a.tokens[i] / a.n_params[i]), _num(a.flops_6nd[i]), _num(a.flops[i]),
        f"{a.loss[i]:.4f}", f"{a.bpb[i]:.4f}" if math.isfinite(a.bpb[i]) else "–",
        _num(r.get("wall_time_s"), 3)])
  return ["## Runs", "", *_table(
      ["run", "L", "d", "heads", "N", "N total", "D", "D/N", "C=6ND", "C (+attn, head)",
       f"{a.settings.loss} loss", "bpb", "wall s"], rows), ""]


def _fits_section(a: Analysis) -> list[str]:
  rows = []

  def law_rows(name, law, symbol, published):
    fit = a.fit(name)
    if fit is None:
      rows.append([law, "–", f"not fitted: {a.fits.get(name)}", "–", "–", "–"])
      return
    pts = len(fit.x)
    rows.append([law, symbol, fit.alpha.format(), f"{fit.r2:.3f}", pts, published])
    rows.append(["", f"{symbol[1]}c" if len(symbol) > 1 else "Xc", _pow10(fit.log10_x_c), "", "",
                 ""])

  law_rows("L(N)", "L(N) = (Nc/N)^aN", "aN", f"Kaplan {KAPLAN['aN']}")
  law_rows("L(D)", "L(D) = (Dc/D)^aD", "aD", f"Kaplan {KAPLAN['aD']}")
  law_rows("L(C)", "L(C) = (Cc/C)^aC, C = 6ND", "aC", f"Kaplan {KAPLAN['aC']}")
  law_rows("L(C_attn)", "L(C), C with attention + LM head", "aC", f"Kaplan {KAPLAN['aC']}")
  p = a.fit("L(N,D)")
  if p is None:
    rows.append(["L(N, D) = E + A/N^α + B/D^β", "–", f"not fitted: {a.fits.get('L(N,D)')}",
                 "–", "–", "–"])
  else:
    pts = len(p.n)
    rows += [
        ["L(N, D) = E + A/N^α + B/D^β", "α", p.alpha.format(), f"{p.r2:.3f}", pts,
         f"Chinchilla {CHINCHILLA['alpha']}, Besiroglu {BESIROGLU['alpha']}"],
        ["", "β", p.beta.format(), "", "", f"Chinchilla {CHINCHILLA['beta']}, "
         f"Besiroglu {BESIROGLU['beta']}"],
        ["", "E (nats/token)", p.E.format(), "", "", f"Chinchilla {CHINCHILLA['E']}, "
         f"Besiroglu {BESIROGLU['E']} (other data and tokenizer)"],
        ["", "A", _pow10(p.log10_A), "", "", f"Chinchilla {CHINCHILLA['A']}, "
         f"Besiroglu {BESIROGLU['A']}"],
        ["", "B", _pow10(p.log10_B), "", "", f"Chinchilla {CHINCHILLA['B']}, "
         f"Besiroglu {BESIROGLU['B']}"],
        ["", "a = β/(α+β): N_opt ∝ C^a", p.a.format(), "", "",
         f"Chinchilla {CHINCHILLA['a']}, Kaplan {KAPLAN['a']}"],
        ["", "b = α/(α+β): D_opt ∝ C^b", p.b.format(), "", "",
         f"Chinchilla {CHINCHILLA['b']}, Kaplan {KAPLAN['b']}"],
    ]
  iso = a.fit("isoflop")
  if iso is None:
    rows.append(["IsoFLOP minima (approach 2)", "–", f"not fitted: {a.fits.get('isoflop')}",
                 "–", "–", "–"])
  else:
    budgets = sum(p.valid for p in iso.profiles)
    rows += [["IsoFLOP minima (approach 2)", "a: N_opt ∝ C^a", iso.a.format(), f"{iso.r2_n:.3f}",
              budgets, f"Chinchilla {CHINCHILLA['a2']}, Kaplan {KAPLAN['a']}"],
             ["", "b: D_opt ∝ C^b", iso.b.format(), f"{iso.r2_d:.3f}", budgets,
              f"Chinchilla {CHINCHILLA['b2']}, Kaplan {KAPLAN['b']}"]]
  note = ("R² is computed in the space of each fit: ln L vs ln X for the power laws, ln L for "
          "L(N, D), ln N_opt and ln D_opt vs ln C for the isoFLOP minima. With two budgets the "
          "isoFLOP line passes exactly through both minima (R² = 1 says nothing).")
  return ["## Fitted laws (95% bootstrap intervals)", "", *_table(
      ["law", "quantity", "fit [95% CI]", "R²", "points", "published"], rows), "", note, ""]


def _isoflop_section(a: Analysis) -> list[str]:
  iso = a.fit("isoflop")
  if iso is None:
    return ["## IsoFLOP profiles", "", f"Not fitted: {a.fits.get('isoflop')}", ""]
  rows = []
  for p, est in zip(iso.profiles, iso.per_budget, strict=True):
    status = "ok" if p.valid else p.problem
    rows.append([_num(p.budget), len(p.n), f"{_num(p.n.min())} – {_num(p.n.max())}",
                 est["n_opt"].format() if "n_opt" in est else "–",
                 est["d_opt"].format() if "d_opt" in est else "–",
                 est["tokens_per_param"].format() if "tokens_per_param" in est else "–",
                 est["loss_opt"].format(4) if "loss_opt" in est else "–",
                 f"{p.r2:.3f}" if math.isfinite(p.r2) else "–", status])
  budget = "C = 6ND" if a.budget_flops == "6nd" else "C (FLOPs with attention, LM head)"
  return ["## IsoFLOP profiles (approach 2)", "", *_table(
      [f"budget {budget}", "runs", "N sampled", "N_opt", "D_opt", "D_opt/N_opt", "L at N_opt",
       "parabola R²", "status"], rows), "",
          "Chinchilla's compute-optimal models see about 20 tokens per parameter; Kaplan's "
          "allocation (N ∝ C^0.73) gives far fewer at large C.", ""]


def _comparison_section(a: Analysis) -> list[str]:
  lines = ["## Compared with the published exponents", ""]
  for name, key, symbol in (("L(N)", "aN", "aN"), ("L(D)", "aD", "aD"), ("L(C)", "aC", "aC")):
    fit = a.fit(name)
    if fit is not None:
      lines.append(_compare(symbol, fit.alpha, {"Kaplan": KAPLAN[key]}))
  p = a.fit("L(N,D)")
  if p is not None:
    lines.append(_compare("α", p.alpha, {"Chinchilla": CHINCHILLA["alpha"],
                                         "Besiroglu": BESIROGLU["alpha"]}))
    lines.append(_compare("β", p.beta, {"Chinchilla": CHINCHILLA["beta"],
                                        "Besiroglu": BESIROGLU["beta"]}))
    lines.append(_compare("a (approach 3)", p.a, {"Chinchilla": CHINCHILLA["a"],
                                                  "Kaplan": KAPLAN["a"]}))
  iso = a.fit("isoflop")
  if iso is not None:
    lines.append(_compare("a (approach 2)", iso.a, {"Chinchilla": CHINCHILLA["a2"],
                                                    "Kaplan": KAPLAN["a"]}))
  if len(lines) == 2:
    lines.append("Nothing could be fitted, so there is nothing to compare.")
  return [*lines, ""]


def _differences_section(a: Analysis) -> list[str]:
  """What differs at this scale, with this sweep's own numbers."""
  n_total = np.array([r.get("n_params") or np.nan for r in a.records], np.float64)
  n_core = np.array([r.get("n_params_non_embedding") or np.nan for r in a.records], np.float64)
  embed_share = np.nanmean(1 - n_core / n_total)
  extra_flops = np.mean(a.flops / a.flops_6nd - 1)
  steps = [r.get("steps") for r in a.records if r.get("steps")]
  cfg = a.records[0].get("config") or {}
  tokenizer = (cfg.get("tokenizer") or {}).get("kind", "?")
  vocab = (cfg.get("model") or {}).get("vocab_size") or (a.records[0].get("summary") or {}).get(
      "vocab_size", "?")
  lines = ["## What differs at this scale, and why", "",
           f"- **Scale and range.** N spans {_num(a.n_params.min())} – {_num(a.n_params.max())} "
           f"{a.params_label} ({_decades(a.n_params):.1f} decades), D "
           f"{_num(a.tokens.min())} – {_num(a.tokens.max())} tokens, C "
           f"{_num(a.flops.min())} – {_num(a.flops.max())} FLOPs with attention and LM head "
           f"({_decades(a.flops):.1f} decades; 6ND: {_decades(a.flops_6nd):.1f}), over "
           f"{len(a.records)} runs. Kaplan et al. "
           "fitted over about six decades of N (10^3 – 10^9) and Chinchilla over 70M – 16B "
           "parameters with 400+ runs: a short lever arm and few points make wide intervals, "
           "and any curvature of the true law over the range shows up as a different local "
           "slope."]
  p = a.fit("L(N,D)")
  if p is not None:
    share = float(np.mean(1 - p.E.value / a.loss))
    loose = (" (its interval reaches almost 0: this sweep does not pin E down)"
             if p.E.n_boot and p.E.lo < 0.1 * p.E.value else "")
    lines.append(
        f"- **No irreducible term in the textbook form.** L = (X_c/X)^a has no floor, so its "
        f"exponent is a local slope; for L = E + (X_c/X)^α it is α (L - E) / L. "
        f"Our L(N, D) fit puts E at {p.E.format()} nats/token{loose}: the reducible part "
        f"L - E is {share:.0%} of the measured loss on average here. At Kaplan's and Chinchilla's "
        f"scales it is a tenth to a third (Chinchilla's E = 1.69 under losses of 1.9 – 2.6), "
        f"and 0.34 x (0.1 – 0.33) = 0.03 – 0.11 brackets Kaplan's aN, aD, aC (0.05 – 0.1). A "
        f"sweep far above its floor gets textbook-form exponents closer to α and β.")
  iso = a.fit("isoflop")
  ratios = [est["tokens_per_param"].value for est in iso.per_budget
            if "tokens_per_param" in est] if iso is not None else []
  if ratios:
    lines.append(
        f"- **Far more tokens per parameter at the optimum.** The isoFLOP minima sit at "
        f"D/N = {_num(min(ratios))} – {_num(max(ratios))} tokens per parameter, against "
        f"Chinchilla's ~20. Three reasons compound here: a byte carries less than a BPE token "
        f"(code runs ~3-4 bytes per GPT-2 token), so the same text is several times more "
        f"tokens; N leaves out the embeddings and LM head, which are most of these models; "
        f"and with a fixed batch of {a.records[0].get('batch_size')} x "
        f"{a.records[0].get('seq_len')} tokens the large models of a small budget get as few "
        f"as {min(steps) if steps else '?'} optimizer steps, too few to use their capacity, "
        f"which pushes the optimum toward smaller models trained longer.")
  lines += _allocation_lines(a)
  lines += [
      f"- **Embeddings and attention are not negligible.** Embeddings are {embed_share:.0%} of "
      f"all parameters on average and attention plus the LM head add {extra_flops:.0%} to 6ND "
      f"FLOPs (`flops` vs `flops_6nd` in results.jsonl); both are < 10% at GPT-3 scale, so "
      f"L(C) fitted in 6ND and in exact FLOPs differ here and not there.",
      f"- **Data and tokenizer.** The corpus is Python source (the standard library) with the "
      f"`{tokenizer}` tokenizer (vocabulary {vocab}); Kaplan used WebText2 with GPT-2's BPE and "
      f"Chinchilla MassiveText with SentencePiece. Losses are per token of a different "
      f"tokenizer, so E, A, B, N_c, D_c are not comparable; exponents are unit-free in N and D "
      f"but depend on the data distribution.",
      f"- **Short runs, one recipe.** Runs take {min(steps) if steps else '?'} – "
      f"{max(steps) if steps else '?'} steps with a cosine schedule to their own length (as "
      f"Chinchilla; Kaplan et al. used one schedule length for all runs, which Hoffmann et al. "
      f"name as a reason Kaplan's allocation favoured model size), a fixed batch, one seed "
      f"and a learning rate from a rule (not tuned per run). "
      f"Porian et al. (2024) show that warmup, batch size and AdamW's β2 move small-scale "
      f"exponents by amounts comparable to the Kaplan–Chinchilla gap.",
  ]
  return [*lines, ""]


def _allocation_lines(a: Analysis) -> list[str]:
  """Where the compute-optimal exponent a lands, and how much the parameter count moves it."""
  iso, p = a.fit("isoflop"), a.fit("L(N,D)")
  if iso is None:
    return []
  kaplan_like = iso.a.value > (CHINCHILLA["a2"] + KAPLAN["a"]) / 2
  text = (f"- **{'Kaplan' if kaplan_like else 'Chinchilla'}-like allocation.** N_opt grows as "
          f"C^{iso.a.format()} (approach 2)")
  if p is not None:
    text += (f" and C^{p.a.format()} (approach 3, a = β/(α+β) with β = {p.beta.value:.2f} "
             f"{'>' if p.beta.value > p.alpha.value else '<'} α = {p.alpha.value:.2f})")
  text += f", against Chinchilla's {CHINCHILLA['a2']} and Kaplan's {KAPLAN['a']}."
  other = a.isoflop_other_params
  if other is not None and not isinstance(other, str):
    label = "all parameters" if a.settings.params == "non_embedding" else "non-embedding ones"
    text += (f" Counting {label} instead (`--params`) gives a = {other.a.format()}: at this "
             f"size the embeddings are a large, shrinking share of each model, which is how "
             f"Pearce & Song (2024) reconcile Kaplan's 0.73 with Chinchilla's 0.5.")
  text += (" The optimal D/N falls as the budget grows, as it must when a > 0.5; the few "
           "optimizer steps that the large models of the small budgets get (a fixed batch) "
           "likely steepen it further, since that handicap fades with compute (Porian et al. "
           "2024 find batch size and warmup move small-scale allocations this much).")
  return [text]


def _timing_section(a: Analysis, sweep_meta: dict[str, Any] | None) -> list[str]:
  walls = [r.get("wall_time_s") or 0.0 for r in a.records]
  runner = [r.get("runner_wall_time_s") or 0.0 for r in a.records]
  loads = [r["load_average"][0] for r in a.records if r.get("load_average")]
  lines = ["## Time and machine", ""]
  start = (sweep_meta or {}).get("started_at")
  ends = sorted(r["finished_at"] for r in a.records if r.get("finished_at"))
  if start and ends:
    span = (dt.datetime.fromisoformat(ends[-1]) - dt.datetime.fromisoformat(start))
    lines.append(f"- First invocation started {start}, last run finished {ends[-1]} "
                 f"({span.total_seconds() / 60:.1f} minutes, including any pauses between "
                 "invocations).")
  lines.append(f"- Training wall time summed over runs: {sum(walls) / 60:.1f} minutes; the "
               f"runner's time (including compilation and data loading): "
               f"{sum(runner) / 60:.1f} minutes.")
  if loads:
    cores = (sweep_meta or {}).get("cpu_count", "?")
    lines.append(f"- 1-minute load average when runs finished: {min(loads):.1f} – "
                 f"{max(loads):.1f} (median {np.median(loads):.1f}) on {cores} cores. A load "
                 "above the core count means the machine was shared: wall times (and "
                 "tokens/s) are inflated accordingly; FLOP counts and losses are not.")
  return [*lines, ""]


def render_report(a: Analysis, *, title: str, commands: list[str], figures: list[str],
                  sweep_meta: dict[str, Any] | None = None) -> str:
  lines = [f"# {title}", "", "Made by:", "", "```bash", *commands, "```", ""]
  if a.dropped:
    lines += ["Runs left out: " + "; ".join(a.dropped), ""]
  if not a.records:
    return "\n".join([*lines, "No finished runs with finite losses yet: nothing to fit.", ""])
  not_fitted = {k: v for k, v in a.fits.items() if isinstance(v, str)}
  if not_fitted:
    lines += ["**Not fitted** (too few or unsuitable points):", "",
              *[f"- {k}: {v}" for k, v in not_fitted.items()], ""]
  lines += _fits_section(a) + _isoflop_section(a) + _comparison_section(a)
  lines += _differences_section(a) + _timing_section(a, sweep_meta)
  lines += ["## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})"
                                 for f in figures] + [""]
  lines += _runs_section(a)
  p = a.fit("L(N,D)")
  method = [
      "## Method", "",
      f"- Loss: the {a.settings.loss} validation loss of each run (nats/token); N: "
      f"{a.params_label}.",
      "- Power laws: least squares on ln L = a ln X_c - a ln X. L(N): each model size's "
      f"lowest-loss run if it saw D/N ≥ {a.split:.3g}; L(D): each token level's lowest-loss "
      f"run if D/N ≤ {a.split:.3g} ({a.split_source}); L(C): the compute frontier of the "
      "final points (circled in the figures).",
      f"- L(N, D): Huber loss (δ = 1e-3) on ln L, L-BFGS-B from each of "
      f"{p.n_inits if p else '–'} grid points (Hoffmann et al. 2022, D.2)"
      + (f"; {p.n_at_best} reached the best objective" if p else "") + ".",
      f"- Intervals: 2.5–97.5 percentiles of {a.settings.n_boot} bootstrap refits "
      f"({a.settings.n_boot_parametric} for L(N, D), each started from the best distinct "
      "minima of the full grid); runs resampled with replacement, within each budget for "
      "the isoFLOP fit; resamples that cannot be fitted are skipped.",
      "",
  ]
  return "\n".join(lines + method)
