"""Scaling-law fits recover the laws they are fitted to, and refuse too few points clearly.

Synthetic data are drawn from a known law with multiplicative log-normal noise; the
tolerances below are stated per fit and hold for the fixed seeds used.
"""

import math

import numpy as np
import pytest

from experiments.scaling import fits

# A 2x2x2x3x3 initialization grid (72 starts) keeps the L(N, D) tests to about a second.
SMALL_GRID = {"alpha": [0.2, 0.8], "beta": [0.2, 0.8], "e": [-0.5, 0.5],
              "a": [0.0, 5.0, 10.0], "b": [0.0, 5.0, 10.0]}

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU = dict(E=1.82, A=482.01, B=2085.43, alpha=0.35, beta=0.37)


def chinchilla_loss(n, d, E, A, B, alpha, beta):
  return E + A / np.asarray(n) ** alpha + B / np.asarray(d) ** beta


@pytest.mark.parametrize("alpha, x_c, x_lo, x_hi", [
    (0.076, 8.8e13, 1e4, 1e8),   # Kaplan L(N)
    (0.095, 5.4e13, 1e6, 1e10),  # Kaplan L(D)
    (0.050, 2.7e28, 1e12, 1e18),  # Kaplan L(C): 3.1e8 PF-days in FLOPs
])
def test_power_law_recovers_exponent_and_scale(alpha, x_c, x_lo, x_hi):
  rng = np.random.default_rng(0)
  x = np.geomspace(x_lo, x_hi, 12)
  loss = (x_c / x) ** alpha * np.exp(rng.normal(0, 0.005, x.size))
  fit = fits.fit_power_law(x, loss, variable="N", n_boot=300, seed=1)
  # Tolerances: 0.004 on the exponent, 0.35 decades on X_c (X_c = exp(c / alpha) magnifies
  # the intercept's error by 1/alpha), R^2 above 0.99; the 95% intervals cover the truth.
  assert abs(fit.alpha.value - alpha) < 0.004
  assert abs(fit.log10_x_c.value - math.log10(x_c)) < 0.35
  assert fit.alpha.contains(alpha)
  assert fit.log10_x_c.contains(math.log10(x_c))
  assert fit.r2 > 0.99
  np.testing.assert_allclose(fit.predict(x), (x_c / x) ** alpha, rtol=0.02)


def test_power_law_interval_narrows_with_less_noise():
  x = np.geomspace(1e4, 1e7, 10)
  widths = []
  for sigma in (0.05, 0.005):
    loss = (1e12 / x) ** 0.1 * np.exp(np.random.default_rng(3).normal(0, sigma, x.size))
    est = fits.fit_power_law(x, loss, variable="N", n_boot=300).alpha
    widths.append(est.hi - est.lo)
  assert widths[1] < widths[0] / 4


@pytest.mark.parametrize("law", [CHINCHILLA, BESIROGLU], ids=["chinchilla", "besiroglu"])
def test_parametric_fit_recovers_chinchilla_law(law):
  rng = np.random.default_rng(0)
  n, d = np.meshgrid(np.geomspace(1e7, 1e10, 7), np.geomspace(1e8, 1e12, 7))
  n, d = n.ravel(), d.ravel()
  loss = chinchilla_loss(n, d, **law) * np.exp(rng.normal(0, 0.003, n.size))
  fit = fits.fit_parametric(n, d, loss, grid=SMALL_GRID, n_boot=30, seed=0)
  # Tolerances: 0.03 on alpha and beta, 5% on E, 0.3 decades on A and B (A and alpha trade
  # off along a ridge), 0.03 on a = beta / (alpha + beta).
  assert abs(fit.alpha.value - law["alpha"]) < 0.03
  assert abs(fit.beta.value - law["beta"]) < 0.03
  assert abs(fit.E.value / law["E"] - 1) < 0.05
  assert abs(fit.log10_A.value - math.log10(law["A"])) < 0.3
  assert abs(fit.log10_B.value - math.log10(law["B"])) < 0.3
  assert abs(fit.a.value - law["beta"] / (law["alpha"] + law["beta"])) < 0.03
  assert fit.alpha.lo <= fit.alpha.value <= fit.alpha.hi and fit.alpha.n_boot >= 25
  assert fit.r2 > 0.99
  # The compute-optimal allocation satisfies C = 6 N D and beats its neighbours on the law.
  n_opt, d_opt = fit.optimal_allocation(1e21)
  assert 6 * n_opt * d_opt == pytest.approx(1e21, rel=1e-9)
  at = lambda scale: chinchilla_loss(n_opt * scale, d_opt / scale, **law)
  assert at(1.0) < at(1.5) and at(1.0) < at(1 / 1.5)


def test_parametric_objective_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  n, d = np.geomspace(1e6, 1e9, 8), np.geomspace(1e9, 1e7, 8)
  logs = np.log(n), np.log(d), np.log(chinchilla_loss(n, d, **CHINCHILLA) * 1.01)
  theta = np.array([5.0, 6.0, 0.4, 0.3, 0.25]) + rng.normal(0, 0.1, 5)
  value, grad = fits._parametric_objective(theta, *logs, 0.05)  # a delta with both branches
  eps = 1e-6
  numeric = [(fits._parametric_objective(theta + eps * e, *logs, 0.05)[0]
              - fits._parametric_objective(theta - eps * e, *logs, 0.05)[0]) / (2 * eps)
             for e in np.eye(5)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_parametric_objective_is_the_huber_sum_of_log_residuals(delta):
  """At a fixed theta the objective is sum_i Huber_delta(ln L_hat(N_i, D_i) - ln L_i), written
  out here from the definitions with residuals on both sides of delta, for two deltas that are
  not the default: the objective uses the delta it is given."""
  a, b, e, alpha, beta = theta = np.array([5.5, 6.5, 0.5, 0.3, 0.25])
  n, d = np.geomspace(1e6, 1e9, 6), np.geomspace(1e9, 1e7, 6)
  predicted = np.exp(e) + np.exp(a) / n ** alpha + np.exp(b) / d ** beta  # E + A/N^a + B/D^b
  r = np.array([-0.25, -0.05, -0.004, 0.002, 0.03, 0.2])  # |r| <= delta for some, not all
  loss = predicted * np.exp(-r)  # so that ln L_hat - ln L = r
  expected = sum(0.5 * ri ** 2 if abs(ri) <= delta else delta * (abs(ri) - delta / 2)
                 for ri in r)
  value, _ = fits._parametric_objective(theta, np.log(n), np.log(d), np.log(loss), delta)
  assert value == pytest.approx(expected, rel=1e-9)


def test_parametric_fit_resists_an_outlier_by_the_huber_delta():
  """One run with twice its loss: the default delta (1e-3, nearly L1 on ln L) still recovers
  the exponents; delta = 1 (above every residual: least squares) is pulled far off. So the
  delta given to fit_parametric reaches the objective."""
  n, d = np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e8, 1e12, 5))
  n, d = n.ravel(), d.ravel()
  loss = chinchilla_loss(n, d, **CHINCHILLA) * np.exp(
      np.random.default_rng(0).normal(0, 0.002, n.size))
  loss[0] *= 2.0  # the smallest model on the fewest tokens
  robust = fits.fit_parametric(n, d, loss, grid=SMALL_GRID, n_boot=0)
  squares = fits.fit_parametric(n, d, loss, grid=SMALL_GRID, delta=1.0, n_boot=0)
  assert abs(robust.alpha.value - CHINCHILLA["alpha"]) < 0.02
  assert abs(robust.beta.value - CHINCHILLA["beta"]) < 0.02
  assert abs(squares.alpha.value - CHINCHILLA["alpha"]) > 0.1  # 0.48 for the true 0.34


def isoflop_data(law, budgets, per_budget=9, span=8.0, sigma=0.002, seed=0):
  rng = np.random.default_rng(seed)
  a = law["beta"] / (law["alpha"] + law["beta"])
  g = (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / (law["alpha"] + law["beta"]))
  n, c = [], []
  for budget in budgets:
    n_opt = g * (budget / 6) ** a
    sizes = n_opt * np.geomspace(1 / span, span, per_budget)
    n.extend(sizes)
    c.extend([budget] * per_budget)
  n, c = np.array(n), np.array(c)
  d = c / (6 * n)
  loss = chinchilla_loss(n, d, **law) * np.exp(rng.normal(0, sigma, n.size))
  return n, loss, c, a, g


def test_isoflop_recovers_compute_optimal_exponents():
  budgets = [1e18, 1e19, 1e20, 1e21]
  n, loss, c, a, g = isoflop_data(CHINCHILLA, budgets)
  fit = fits.fit_isoflop(n, loss, c, n_boot=200, seed=0)
  # Tolerances: 0.03 on a and b (a parabola in ln N only approximates the true profile),
  # 20% on N_opt and on tokens per parameter at each budget.
  assert all(p.valid for p in fit.profiles)
  assert abs(fit.a.value - a) < 0.03
  assert abs(fit.b.value - (1 - a)) < 0.03
  assert fit.a.value + fit.b.value == pytest.approx(1.0, abs=1e-9)  # D_opt = C / (6 N_opt)
  assert fit.a.contains(a)
  assert fit.r2_n > 0.99
  for budget, est in zip(budgets, fit.per_budget, strict=True):
    n_true = g * (budget / 6) ** a
    assert est["n_opt"].value == pytest.approx(n_true, rel=0.2)
    ratio = (budget / 6 / n_true) / n_true
    assert est["tokens_per_param"].value == pytest.approx(ratio, rel=0.2)


def test_isoflop_with_exact_flops_interpolates_d_opt():
  """Budgets that count more than 6 N per token (attention, LM head): D = C / (6 N + k)."""
  law, k = CHINCHILLA, 6 * 2048 * 50257  # a wide LM head's 6 d V FLOPs per token
  budgets = [1e19, 1e20, 1e21]
  sizes_all, loss_all, c_all, d_all = [], [], [], []
  a = law["beta"] / (law["alpha"] + law["beta"])
  centre = lambda c: 1.4 * (c / 6) ** a  # near the optimum of this law and FLOP count
  for budget in budgets:
    sizes = centre(budget) * np.geomspace(1 / 8, 8, 11)
    d = budget / (6 * sizes + k)
    sizes_all += list(sizes)
    loss_all += list(chinchilla_loss(sizes, d, **law))
    c_all += [budget] * sizes.size
    d_all += list(d)
  fit = fits.fit_isoflop(sizes_all, loss_all, c_all, tokens=d_all, n_boot=50)
  for budget, est in zip(budgets, fit.per_budget, strict=True):
    grid = centre(budget) * np.geomspace(1 / 8, 8, 20001)  # the optimum under this count
    n_true = grid[np.argmin(chinchilla_loss(grid, budget / (6 * grid + k), **law))]
    # Tolerance: 6% on N_opt and D_opt (the parabola approximates the profile); C / (6 N_opt)
    # would be 20-40% off here.
    assert est["n_opt"].value == pytest.approx(n_true, rel=0.06)
    assert est["d_opt"].value == pytest.approx(budget / (6 * n_true + k), rel=0.06)


def test_isoflop_profiles_say_why_they_have_no_minimum():
  n = np.array([1e5, 2e5, 4e5, 8e5])
  assert "3 model sizes" in fits.fit_isoflop_profile(n[:2], [3.0, 2.9], 1e15).problem
  falling = fits.fit_isoflop_profile(n, [3.0, 2.8, 2.7, 2.65], 1e15)  # minimum past 8e5
  assert not falling.valid and "outside the sampled sizes" in falling.problem
  concave = fits.fit_isoflop_profile(n, [3.0, 3.2, 3.2, 3.0], 1e15)
  assert not concave.valid and "not convex" in concave.problem
  bowl = fits.fit_isoflop_profile(n, [3.0, 2.8, 2.8, 3.0], 1e15)
  assert bowl.valid and bowl.n_opt == pytest.approx(math.sqrt(2e5 * 4e5), rel=1e-6)


def test_too_few_points_raise_clear_messages():
  with pytest.raises(fits.InsufficientData, match="at least 3 points with distinct N; got 2"):
    fits.fit_power_law([1e5, 1e6, 1e6], [3.0, 2.5, 2.4], variable="N")
  with pytest.raises(fits.InsufficientData, match="needs at least 6 runs; got 5"):
    fits.fit_parametric(np.geomspace(1e5, 1e6, 5), np.geomspace(1e7, 1e8, 5), [3.0] * 5)
  n, loss, c, _, _ = isoflop_data(CHINCHILLA, [1e19])
  with pytest.raises(fits.InsufficientData, match=">= 2 budgets with an interior minimum"):
    fits.fit_isoflop(n, loss, c)
  with pytest.raises(ValueError, match="must be finite and positive"):
    fits.fit_power_law([1e5, -1.0, 1e7], [3.0, 2.0, 1.0], variable="N")


def test_point_selection_helpers():
  cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0])
  loss = np.array([5.0, 4.0, 4.5, 4.2, 3.0, 3.5])
  assert fits.pareto_frontier(cost, loss).tolist() == [0, 1, 4]
  levels = fits.group_levels([100, 105, 200, 210, 1000], rel_tol=0.1)
  assert levels.tolist() == [0, 0, 1, 1, 2]
  assert fits.best_per_level(levels, [3.0, 2.0, 1.0, 1.5, 0.5]).tolist() == [1, 2, 4]


def test_bootstrap_resamples_within_strata():
  strata = np.array([0, 0, 0, 1, 1])
  seen = []

  def refit(idx):
    seen.append(idx)
    return {"x": float(len(idx))}

  fits.bootstrap(refit, strata, n_boot=20, seed=0)
  for idx in seen:
    assert np.sum(idx < 3) == 3 and np.sum(idx >= 3) == 2
