"""The sweep runner end to end on the `smoke` sweep: a fault mid-run, resume, skip, schema, fit.

One module-scoped sweep workdir is built in three invocations (the expensive part: four
short trainings), then inspected by the tests:
  1. the first run is cut by an injected fault right after its first checkpoint;
  2. `max_runs=1` resumes that run from the checkpoint and records it;
  3. a full rerun skips it and runs the other two.
"""

import json
import math
import os
import signal

import pytest

import train.run
from experiments import scaling_fit, sweep
from experiments.scaling import analysis, runner, spec
from experiments.scaling.results import (
    RECORD_FIELDS,
    SWEEP_META_FILE,
    merge_records,
    read_records,
    results_path,
    run_record_path,
)
from tests.test_scaling_fits import SMALL_GRID
from train.checkpoints import Checkpointer

SMOKE = "experiments/sweeps/smoke.py"


class InjectedFault(RuntimeError):
  pass


def _metrics(workdir, name):
  with open(os.path.join(workdir, "runs", name, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  smoke_sweep = spec.load_sweep(SMOKE)
  first = smoke_sweep.runs[0].name
  saved = []

  class FaultAfterFirstCheckpoint(Checkpointer):
    def save(self, state, **kwargs):
      wrote = super().save(state, **kwargs)
      if wrote:
        self.wait()
        saved.append(int(state.step))
        raise InjectedFault(f"killed after the checkpoint of step {int(state.step)}")
      return wrote

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.run, "Checkpointer", FaultAfterFirstCheckpoint)
    with pytest.raises(InjectedFault):
      sweep.run_sweep(smoke_sweep, workdir, sweep_path=SMOKE, command="first", log=lambda *_: None)
  after_fault = {"records": read_records(results_path(workdir)),
                 "metrics": _metrics(workdir, first), "checkpoint_step": saved[0]}
  resumed = sweep.run_sweep(smoke_sweep, workdir, sweep_path=SMOKE, command="second", max_runs=1,
                            log=lambda *_: None)
  after_resume = {"record": dict(read_records(results_path(workdir))[0]),
                  "metrics": _metrics(workdir, first)}
  rest = sweep.run_sweep(smoke_sweep, workdir, sweep_path=SMOKE, command="third",
                         log=lambda *_: None)
  return dict(workdir=workdir, sweep=smoke_sweep, first=first, after_fault=after_fault,
              resumed=resumed, after_resume=after_resume, rest=rest)


def test_a_run_cut_mid_way_leaves_no_record_and_resumes_from_its_checkpoint(smoke):
  fault = smoke["after_fault"]
  assert fault["records"] == []
  assert [r["name"] for r in smoke["resumed"]] == [smoke["first"]]
  before, after = fault["metrics"], smoke["after_resume"]["metrics"]
  assert before and after[:len(before)] == before  # the run directory was kept, not wiped
  first_new_step = min(m["step"] for m in after[len(before):] if m["kind"] == "train")
  assert first_new_step > fault["checkpoint_step"] > 0  # continued, not restarted at step 1
  record = smoke["after_resume"]["record"]
  steps = smoke["sweep"].steps(smoke["sweep"].runs[0])
  assert record["steps"] == steps
  assert record["tokens"] == steps * smoke["sweep"].tokens_per_step


def test_a_finished_run_is_not_redone(smoke):
  workdir, first = smoke["workdir"], smoke["first"]
  assert [r["name"] for r in smoke["rest"]] == [r.name for r in smoke["sweep"].runs[1:]]
  records = {r["name"]: r for r in read_records(results_path(workdir))}
  assert records[first] == smoke["after_resume"]["record"]  # same record, same finished_at
  assert _metrics(workdir, first) == smoke["after_resume"]["metrics"]  # no training since
  with open(results_path(workdir)) as f:
    assert len(f.readlines()) == 3
  again = sweep.run_sweep(smoke["sweep"], workdir, log=lambda *_: None)
  assert again == []


def test_results_jsonl_is_derived_from_the_run_records(smoke):
  workdir = smoke["workdir"]
  with open(results_path(workdir)) as f:
    before = f.read()
  for r in read_records(results_path(workdir)):  # each line is its run's own record
    with open(run_record_path(workdir, r["name"])) as f:
      assert json.load(f)["finished_at"] == r["finished_at"]
  os.remove(results_path(workdir))
  assert [r["name"] for r in merge_records(workdir)] == [r.name for r in smoke["sweep"].runs]
  merge_records(workdir)  # idempotent
  with open(results_path(workdir)) as f:
    assert f.read() == before


def test_records_carry_the_documented_schema(smoke):
  workdir = smoke["workdir"]
  for r in read_records(results_path(workdir)):
    assert set(RECORD_FIELDS) <= set(r), set(RECORD_FIELDS) - set(r)
    assert r["status"] == "completed" and r["sweep"] == "smoke"
    assert 0 < r["n_params_non_embedding"] < r["n_params"]
    assert r["flops_6nd"] == pytest.approx(6 * r["n_params_non_embedding"] * r["tokens"])
    assert r["flops"] == pytest.approx(r["summary"]["flops_per_token"] * r["tokens"])
    assert r["flops"] > r["flops_6nd"]
    assert r["budget"] == 4e8 and r["flops_6nd"] == pytest.approx(4e8, rel=0.1)
    for key in ("final_val_loss", "best_val_loss", "final_val_bpb", "best_val_bpb"):
      assert math.isfinite(r[key]) and r[key] > 0
    assert r["best_val_loss"] <= r["final_val_loss"]
    assert os.path.exists(os.path.join(workdir, r["metrics_path"]))
    assert r["val_curve"][-1][0] == r["steps"] and r["train_curve"][-1][0] == r["steps"]
    assert r["config"]["num_steps"] == r["steps"] and r["config"]["optim"]["lr"] == r["lr"]
    assert r["config_hash"] == runner.config_hash(r["config"])
    assert r["wall_time_s"] > 0 and r["runner_wall_time_s"] > 0 and len(r["load_average"]) == 3
  with open(os.path.join(workdir, SWEEP_META_FILE)) as f:
    meta = json.load(f)
  assert meta["command"] == "first"  # the first invocation's command and start are kept
  assert [i["command"] for i in meta["invocations"]][:3] == ["first", "second", "third"]
  assert [r["name"] for r in meta["runs"]] == [r.name for r in smoke["sweep"].runs]


def test_fit_and_report_run_on_the_smoke_results(smoke, tmp_path):
  settings = analysis.FitSettings(n_boot=50, n_boot_parametric=5, grid=SMALL_GRID)
  summary = scaling_fit.fit_and_report(workdir=smoke["workdir"], out=str(tmp_path),
                                       settings=settings, command="fit")
  assert summary["n_runs"] == 3
  assert "needs at least 6 runs; got 3" in summary["L(N,D)"]["error"]
  assert ">= 2 budgets" in summary["isoflop"]["error"]
  text = (tmp_path / "report.md").read_text()
  assert "first" in text and "Scaling laws: sweep `smoke`" in text  # the sweep's command
  assert (tmp_path / "isoflop.png").exists()
  # --out elsewhere is self-contained: it regenerates from its own copy of the inputs.
  again = scaling_fit.fit_and_report(results=str(tmp_path / "results.jsonl"), settings=settings,
                                     command="refit")
  assert again["n_runs"] == 3 and json.loads((tmp_path / "sweep.json").read_text())["sweep"]
  assert "first" in (tmp_path / "report.md").read_text()


def test_an_edited_sweep_is_refused(smoke):
  edited = spec.Sweep("smoke", [
      spec.Run(r.name, r.shape, r.tokens, r.lr * 2, r.seed, r.budget) for r in smoke["sweep"].runs
  ], base_config=smoke["sweep"].base_config, batch_size=smoke["sweep"].batch_size,
      seq_len=smoke["sweep"].seq_len, overrides=smoke["sweep"].overrides)
  with pytest.raises(spec.SweepError, match="different config"):
    sweep.run_sweep(edited, smoke["workdir"], log=lambda *_: None)


def test_an_interrupted_run_stops_the_sweep_without_a_record(tmp_path, monkeypatch):
  calls = []

  def interrupted(config, workdir):
    calls.append(workdir)
    return {"status": "interrupted by SIGTERM"}

  monkeypatch.setattr(runner, "train_and_evaluate", interrupted)
  written = sweep.run_sweep(spec.load_sweep(SMOKE), str(tmp_path), log=lambda *_: None)
  assert written == [] and len(calls) == 1
  assert read_records(results_path(str(tmp_path))) == []


def test_a_signal_between_runs_stops_the_sweep_after_the_current_run(tmp_path, monkeypatch):
  calls = []

  def signalled_then_finished(config, workdir):
    calls.append(workdir)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives outside the trainer's own handler
    return {"status": "completed", "step": config.num_steps, "n_params": 200,
            "n_params_non_embedding": 100, "tokens_seen": 1000.0, "flops_per_token": 900.0,
            "val_loss": 2.0, "best_val_loss": 2.0, "val_bpb": 3.0, "total_wall_time_s": 1.0}

  monkeypatch.setattr(runner, "train_and_evaluate", signalled_then_finished)
  written = sweep.run_sweep(spec.load_sweep(SMOKE), str(tmp_path), log=lambda *_: None)
  assert len(calls) == 1 and [r["name"] for r in written] == [spec.load_sweep(SMOKE).runs[0].name]
  assert len(read_records(results_path(str(tmp_path)))) == 1
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the runner's handler is gone


def test_plan_and_sweep_names():
  assert sweep.resolve_sweep_path("cpu") == os.path.join("experiments", "sweeps", "cpu.py")
  assert sweep.resolve_sweep_path("my/sweep.py") == "my/sweep.py"
  smoke_sweep = spec.load_sweep(SMOKE)
  rows = runner.plan(smoke_sweep)
  text = runner.format_plan(rows, {rows[0]["name"]})
  assert all(r.name in text for r in smoke_sweep.runs)
  assert "done" in text and "3 runs" in text
