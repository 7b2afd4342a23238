"""Sweeps past one process, without training: job-array shards split the plan exactly, n
shards run each member once and --merge collects their records; results.jsonl is derived
from the run records (an older appended file is taken over); the Ray launcher's arguments
and its absence give one clear error."""

import json
import os
import re
import sys

import pytest

from experiments import sweep
from experiments.scaling import launch_ray, runner, spec
from experiments.scaling.results import (
    merge_records,
    read_records,
    results_path,
    run_record_path,
    write_records,
)
from tests.test_scaling_report import synthetic_records

SMOKE = "experiments/sweeps/smoke.py"
SWEEPS = sorted(n[:-3] for n in os.listdir("experiments/sweeps")
                if n.endswith(".py") and n != "__init__.py")


@pytest.mark.parametrize("name", SWEEPS)
def test_shards_split_every_plan_exactly_and_evenly(name, monkeypatch):
  monkeypatch.setenv("SCALING_CORPUS", "stdlib")  # the accelerator sweeps name their corpus
  rows = runner.plan(spec.load_sweep(sweep.resolve_sweep_path(name)))
  names = [r["name"] for r in rows]
  for count in (1, 2, 3, 7):
    shards = [sweep.shard_names(rows, i, count) for i in range(count)]
    assert sorted(n for s in shards for n in s) == sorted(names)  # each run exactly once
    assert shards == [sweep.shard_names(rows, i, count) for i in range(count)]  # deterministic
    for s in shards:
      assert s == [n for n in names if n in s]  # plan order within a shard
    flops = {r["name"]: r["flops"] for r in rows}  # balanced: none above the mean plus one run
    loads = [sum(flops[n] for n in s) for s in shards]
    assert max(loads) <= sum(loads) / count + max(flops.values())


def test_n_shards_run_each_member_once_and_merge_collects_them(tmp_path, monkeypatch):
  trained = []

  def fake_training(config, workdir):
    trained.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    return {"status": "completed", "step": config.num_steps, "n_params": 200,
            "n_params_non_embedding": 100, "tokens_seen": 1000.0, "flops_per_token": 900.0,
            "val_loss": 2.0, "best_val_loss": 2.0, "val_bpb": 3.0, "total_wall_time_s": 1.0}

  monkeypatch.setattr(runner, "train_and_evaluate", fake_training)
  smoke = spec.load_sweep(SMOKE)
  workdir = str(tmp_path)
  rows = runner.plan(smoke)
  for i in range(2):  # two jobs of an array: each trains its own share
    trained.clear()
    sweep.run_sweep(smoke, workdir, shard=(i, 2), log=lambda *_: None)
    assert trained == sweep.shard_names(rows, i, 2) and trained
  trained.clear()
  for i in range(2):  # each job run again (a requeued array): nothing is trained twice
    assert sweep.run_sweep(smoke, workdir, shard=(i, 2), log=lambda *_: None) == []
  assert trained == []
  names = [r.name for r in smoke.runs]
  os.remove(results_path(workdir))
  assert [r["name"] for r in merge_records(workdir)] == names  # plan order, whoever ran them
  assert [r["name"] for r in read_records(results_path(workdir))] == names


def test_shard_and_resource_flags_are_checked():
  assert sweep.parse_shard("3/8") == (3, 8)
  for bad in ("8/8", "-1/2", "1", "a/b", ""):
    with pytest.raises(spec.SweepError, match="--shard"):
      sweep.parse_shard(bad)
  assert launch_ray.parse_resources(None) == {"CPU": 1.0}
  options = launch_ray.task_options('{"GPU": 1, "TPU": 4}', 3)
  assert options["num_gpus"] == 1 and options["num_cpus"] == 0
  assert options["resources"] == {"TPU": 4.0} and options["max_retries"] == 3
  for bad, match in (("{CPU: 1}", "not JSON"), ("[1]", "JSON object"),
                     ('{"CPU": -1}', "non-negative"), ('{"GPU": "one"}', "non-negative")):
    with pytest.raises(spec.SweepError, match=match):
      launch_ray.parse_resources(bad)
  for retries, concurrent, match in ((-1, None, "--retries"), (1, 0, "--max_concurrent")):
    with pytest.raises(spec.SweepError, match=match):
      launch_ray.task_options(None, retries, concurrent)


def test_the_ray_launcher_without_ray_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
  with pytest.raises(spec.SweepError, match="needs Ray: pip install ray"):
    with launch_ray.cluster():
      pass


def test_an_older_appended_results_file_is_taken_over(tmp_path):
  """A workdir of the runner that appended to results.jsonl: its records move into their run
  directories; one whose run directory was deleted (to redo it) is dropped."""
  workdir = str(tmp_path)
  kept, deleted = synthetic_records(budgets=(1e12,), per_budget=2)
  write_records(results_path(workdir), [kept, deleted])
  os.makedirs(os.path.join(workdir, "runs", kept["name"]))
  with pytest.warns(UserWarning, match=re.escape(f"dropping the record of '{deleted['name']}'")):
    records = merge_records(workdir)
  assert [r["name"] for r in records] == [kept["name"]]
  with open(run_record_path(workdir, kept["name"])) as f:
    assert json.load(f)["final_val_loss"] == kept["final_val_loss"]
  # From then on the run directories alone count: a run being redone (its directory made
  # again, no record yet) does not get its old line back.
  write_records(results_path(workdir), [kept, deleted])
  os.makedirs(os.path.join(workdir, "runs", deleted["name"]))
  assert [r["name"] for r in merge_records(workdir)] == [kept["name"]]
  assert not os.path.exists(run_record_path(workdir, deleted["name"]))
  # A workdir without run directories (results.jsonl kept beside a report) is only read.
  copy = tmp_path / "copy"
  write_records(results_path(str(copy)), [kept, deleted])
  before = (copy / "results.jsonl").read_text()
  assert len(merge_records(str(copy))) == 2 and (copy / "results.jsonl").read_text() == before


def test_merge_orders_records_as_the_plan(tmp_path):
  """The plan's order (sweep.json), not the order runs finished in, nor their names'."""
  workdir = str(tmp_path)
  records = synthetic_records(budgets=(1e12,), per_budget=3)
  plan_order = [r["name"] for r in reversed(records)]
  with open(tmp_path / "sweep.json", "w") as f:
    json.dump({"runs": [{"name": n} for n in plan_order[1:]]}, f)  # one run not in the plan
  write_records(results_path(workdir), records)
  for r in records:
    os.makedirs(os.path.join(workdir, "runs", r["name"]))
  assert [r["name"] for r in merge_records(workdir)] == plan_order[1:] + plan_order[:1]
