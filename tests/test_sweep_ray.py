"""The sweep's Ray launcher on a local Ray cluster started inside the test (2 CPUs, nothing
external): the smoke sweep two members at a time, a member whose worker dies once is retried
and resumes from its checkpoint, a killed driver's rerun skips what finished, and every
record holds the same numbers as `--launcher=local`'s."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep
from experiments.scaling import spec
from experiments.scaling.results import read_records, results_path, run_record_path

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install ray "
                          "(requirements-dev.txt has it)")
pytestmark = [
    pytest.mark.slow,
    # Ray starts its processes with subprocess (fork, then exec at once): JAX's warning about
    # forking a multithreaded process does not apply.
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
]

SMOKE = "experiments/sweeps/smoke.py"
NAMES = [r.name for r in spec.load_sweep(SMOKE).runs]
# What a run computed (not when, where or how fast).
RESULT_KEYS = ("status", "n_params", "n_params_non_embedding", "tokens", "flops", "flops_6nd",
               "final_val_loss", "best_val_loss", "final_val_bpb", "best_val_bpb", "val_curve",
               "train_curve", "steps", "config_hash")

# A sweep file that is the smoke sweep, except that in a Ray worker (never in the test's own
# process) the first member's process dies right after its first checkpoint, once.
CRASH_ONCE = """
import json, os
import train.run
from experiments.sweeps import smoke
from train.checkpoints import Checkpointer

MARKER = {marker!r}


class DieAfterFirstCheckpoint(Checkpointer):
  def save(self, state, **kwargs):
    wrote = super().save(state, **kwargs)
    if wrote and self.workdir.endswith({first!r}) and not os.path.exists(MARKER):
      self.wait()
      with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
        lines = len(f.readlines())
      with open(MARKER, "w") as f:
        json.dump({{"step": int(state.step), "metrics_lines": lines}}, f)
      os._exit(1)  # like a preempted node: no exception, no cleanup
    return wrote


if os.getpid() != {driver_pid}:
  train.run.Checkpointer = DieAfterFirstCheckpoint


def get_sweep():
  return smoke.get_sweep()
"""


def quiet(*_):
  pass


def results(workdir):
  return {r["name"]: {k: r[k] for k in RESULT_KEYS} for r in read_records(results_path(workdir))}


def read_text(path):
  with open(path) as f:
    return f.read()


def metrics(workdir, name):
  with open(os.path.join(workdir, "runs", name, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def cluster():
  """A local Ray cluster of 2 CPUs; its workers inherit this process's environment (the
  test suite's 8 CPU devices), as the local launcher's runs do."""
  ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
  yield ray.get_runtime_context().gcs_address
  ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("local"))
  sweep.run_sweep(spec.load_sweep(SMOKE), workdir, log=quiet)
  return results(workdir)


def test_members_run_two_at_a_time_a_dead_worker_is_retried_and_results_match_local(
    cluster, local, tmp_path):
  workdir, marker = str(tmp_path / "sweep"), str(tmp_path / "died.json")
  path = tmp_path / "crash_once.py"
  path.write_text(CRASH_ONCE.format(marker=marker, first=NAMES[0], driver_pid=os.getpid()))
  # Half a CPU each: the cluster would take 4 at a time; --max_concurrent=2 holds them to 2.
  done, failed = sweep.run_sweep_on_ray(spec.load_sweep(str(path)), workdir,
                                        sweep_path=str(path), max_concurrent=2, retries=1,
                                        resources='{"CPU": 0.5}', log=quiet)
  assert failed == {} and sorted(done) == sorted(NAMES)
  # The first attempt died after its first checkpoint; the retry resumed from it.
  with open(marker) as f:
    died = json.load(f)
  lines = metrics(workdir, NAMES[0])
  resumed = [m["step"] for m in lines[died["metrics_lines"]:] if m["kind"] == "train"]
  assert died["step"] > 0 and min(resumed) > died["step"]
  # Two members at a time, never three.
  times = [[m["time"] for m in metrics(workdir, n)] for n in NAMES]
  spans = [(min(t), max(t)) for t in times]
  running = [sum(start <= t < end for start, end in spans) for t, _ in spans]
  assert max(running) == 2
  # The same numbers as one process running them one after another; results.jsonl in plan
  # order, each line its run's own record.
  assert results(workdir) == local
  records = read_records(results_path(workdir))
  assert [r["name"] for r in records] == NAMES
  for r in records:
    with open(run_record_path(workdir, r["name"])) as f:
      assert json.load(f)["finished_at"] == r["finished_at"]


def _wait_for(condition, timeout, what):
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.5)


def test_a_killed_driver_reruns_without_redoing_finished_members(cluster, local, tmp_path):
  workdir = str(tmp_path / "sweep")
  cmd = [sys.executable, "-m", "experiments.sweep", f"--sweep={SMOKE}", f"--workdir={workdir}",
         "--launcher=ray", f"--address={cluster}", "--max_concurrent=2"]
  first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def finished_now():
    return [n for n in NAMES if os.path.exists(run_record_path(workdir, n))]

  try:
    _wait_for(lambda: finished_now() or first.poll() is not None, 400, "a finished member")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # Ray ends a dead driver's tasks; wait until their CPUs are free again.
  _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "the killed job's tasks")
  before = {n: read_text(run_record_path(workdir, n)) for n in finished_now()}
  metrics_before = {n: metrics(workdir, n) for n in before}
  # Killed mid-sweep: the third member starts only when one of the first two has finished.
  assert 1 <= len(before) < len(NAMES)
  second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  for name, text in before.items():  # not redone: the same record, no new training
    assert read_text(run_record_path(workdir, name)) == text
    assert metrics(workdir, name) == metrics_before[name]
  assert results(workdir) == local
