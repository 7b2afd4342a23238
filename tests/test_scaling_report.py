"""From results.jsonl records to fits, figures and report.md, including too-small sweeps."""

import json
import math

import numpy as np
import pytest

from experiments import scaling_fit
from experiments.scaling import analysis
from experiments.scaling.results import RECORD_FIELDS, read_records, write_records
from tests.test_scaling_fits import SMALL_GRID

LAW = dict(E=0.8, A=40.0, B=60.0, alpha=0.34, beta=0.28)
SETTINGS = analysis.FitSettings(n_boot=100, n_boot_parametric=10, grid=SMALL_GRID)


def synthetic_records(budgets=(1e12, 3e12, 1e13), per_budget=5, sigma=0.005, seed=0):
  """Records of an isoFLOP sweep over a ladder of sizes (x2 apart), losses from LAW."""
  rng = np.random.default_rng(seed)
  sizes = 1e4 * 2.0 ** np.arange(12)
  records = []
  for budget in budgets:
    centre = int(np.argmin(np.abs(np.log(sizes / math.sqrt(budget / 120)))))
    for n in sizes[centre - per_budget // 2: centre - per_budget // 2 + per_budget]:
      d = budget / (6 * n)
      loss = (LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]) * math.exp(
          rng.normal(0, sigma))
      record = {k: None for k in RECORD_FIELDS}
      record.update(
          schema_version=1, sweep="synthetic", name=f"C{budget:.0e}-N{n:.0f}", status="completed",
          budget=budget, n_layers=2, d_model=64, n_heads=4, n_params=1.2 * n,
          n_params_non_embedding=n, tokens=d, flops_6nd=6 * n * d, flops=6 * n * d * 1.3,
          final_val_loss=loss, best_val_loss=loss, final_val_bpb=loss / math.log(2) / 2,
          best_val_bpb=loss / math.log(2) / 2, steps=100, lr=1e-3,
          val_curve=[[100, d, loss, loss / math.log(2) / 2]],
          train_curve=[[s, d * s / 4, loss * (1 + 0.5 / s)] for s in (1, 2, 3, 4)],
          wall_time_s=1.0, runner_wall_time_s=2.0, finished_at="2025-01-01T00:00:00+00:00",
          load_average=[1.0, 1.0, 1.0], config={"tokenizer": {"kind": "byte"}})
      records.append(record)
  return records


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  results = out / "results.jsonl"
  write_records(str(results), synthetic_records())
  summary = scaling_fit.fit_and_report(results=str(results), out=str(out), settings=SETTINGS,
                                       command="python -m experiments.scaling_fit --test")
  return out, summary


def test_full_sweep_gives_every_fit_and_figure(full_report):
  out, summary = full_report
  for name in ("L(N)", "L(D)", "L(C)", "L(C_attn)", "L(N,D)", "isoflop"):
    assert "error" not in summary[name], (name, summary[name])
  # The law's own exponents come back from 15 runs (tolerance 0.05).
  assert summary["L(N,D)"]["alpha"]["value"] == pytest.approx(LAW["alpha"], abs=0.05)
  assert summary["L(N,D)"]["beta"]["value"] == pytest.approx(LAW["beta"], abs=0.05)
  a_true = LAW["beta"] / (LAW["alpha"] + LAW["beta"])
  assert summary["isoflop"]["a"]["value"] == pytest.approx(a_true, abs=0.1)
  assert all(p["problem"] is None for p in summary["isoflop"]["profiles"])
  for png in ("loss_vs_params", "loss_vs_tokens", "loss_vs_compute", "isoflop", "parametric_fit"):
    data = (out / f"{png}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert json.loads((out / "fits.json").read_text())["n_runs"] == 15
  assert len(read_records(str(out / "results.jsonl"))) == 15


def test_report_states_fits_intervals_and_comparisons(full_report):
  out, summary = full_report
  text = (out / "report.md").read_text()
  assert "python -m experiments.scaling_fit --test" in text
  alpha = summary["L(N,D)"]["alpha"]
  assert f"{alpha['value']:.3g} [{alpha['lo']:.3g}, {alpha['hi']:.3g}]" in text
  for published in ("Kaplan 0.076", "Kaplan 0.095", "Kaplan 0.05", "Chinchilla 0.34",
                    "Besiroglu 0.35", "Besiroglu 0.37", "Chinchilla 0.28"):
    assert published in text
  assert "What differs at this scale" in text
  assert "![isoflop.png](isoflop.png)" in text
  assert "Not fitted" not in text


def test_few_runs_degrade_to_messages(tmp_path):
  results = tmp_path / "results.jsonl"
  write_records(str(results), synthetic_records(budgets=(1e12,), per_budget=3))
  summary = scaling_fit.fit_and_report(results=str(results), out=str(tmp_path),
                                       settings=SETTINGS, command="fit")
  assert "needs at least 6 runs; got 3" in summary["L(N,D)"]["error"]
  assert ">= 2 budgets" in summary["isoflop"]["error"]
  text = (tmp_path / "report.md").read_text()
  assert "**Not fitted**" in text and "needs at least 6 runs; got 3" in text
  assert (tmp_path / "isoflop.png").exists()


def test_no_usable_runs_still_writes_a_report(tmp_path):
  record = synthetic_records(budgets=(1e12,), per_budget=3)[0]
  record.update(final_val_loss=float("nan"), status="diverged: nan loss")
  write_records(str(tmp_path / "results.jsonl"), [record])
  summary = scaling_fit.fit_and_report(workdir=str(tmp_path), settings=SETTINGS, command="fit")
  assert summary["n_runs"] == 0 and "diverged" in summary["dropped"][0]
  assert "nothing to fit" in (tmp_path / "report.md").read_text()


def test_missing_results_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the sweep first"):
    scaling_fit.fit_and_report(workdir=str(tmp_path / "nowhere"))


def test_total_parameter_count_is_a_setting():
  records = synthetic_records()
  default = analysis.analyze(records, SETTINGS)
  total = analysis.analyze(records, analysis.FitSettings(params="total", n_boot=10,
                                                         n_boot_parametric=2, grid=SMALL_GRID))
  np.testing.assert_allclose(total.n_params, 1.2 * default.n_params)
  assert total.params_label.startswith("parameters N (with")
  with pytest.raises(ValueError, match="params='all'"):
    analysis.analyze(records, analysis.FitSettings(params="all"))


def test_points_for_each_law():
  a = analysis.analyze(synthetic_records(), SETTINGS)
  ratio = a.tokens / a.n_params
  # L(N) takes each size's best run only when data-rich, L(D) each token level's only when
  # model-rich, split at the sweep's compute-optimal D/N; the frontier is non-increasing.
  optimal = [e["tokens_per_param"].value for e in a.fit("isoflop").per_budget]
  assert a.split == pytest.approx(np.exp(np.mean(np.log(optimal))))
  assert min(optimal) <= a.split <= max(optimal)
  assert np.all(ratio[analysis.per_n_indices(a)] >= a.split)
  assert np.all(ratio[analysis.per_d_indices(a)] <= a.split)
  assert len(analysis.per_n_indices(a)) >= 3 and len(analysis.per_d_indices(a)) >= 3
  front = analysis.frontier_indices(a)
  assert np.all(np.diff(a.loss[front]) < 0) and np.all(np.diff(a.flops_6nd[front]) >= 0)


def test_an_older_results_file_survives_a_torn_line(tmp_path):
  """A results.jsonl of the older runner, which appended: a writer killed mid-line."""
  path = tmp_path / "results.jsonl"
  first, second = synthetic_records(budgets=(1e12,), per_budget=3)[:2]
  write_records(str(path), [first])
  with open(path, "a") as f:
    f.write('{"name": "half a rec\n' + json.dumps(second) + "\n")
  with pytest.warns(UserWarning, match="unreadable line"):
    names = [r["name"] for r in read_records(str(path))]
  assert names == [first["name"], second["name"]]


def test_readme_documents_every_record_field():
  with open("experiments/scaling/README.md") as f:
    text = f.read()
  missing = [k for k in RECORD_FIELDS if f"`{k}`" not in text]
  assert not missing, f"experiments/scaling/README.md does not document {missing}"
