"""Run a sweep's members as Ray tasks: each in a worker process on a node with the resources.

  with cluster(address="auto"):
    finished, failed = run_on_ray(sweep_path, workdir, names, max_concurrent=8,
                                  resources={"GPU": 1}, retries=2)

The driver (the sweep command) submits at most `max_concurrent` members at a time; each
task loads the sweep file and calls runner.run_member, which trains in (or resumes) the
member's run directory and writes its record there, so the workdir must be storage every
node sees (NFS, a mounted bucket) and the repository must be importable on every node
(the same checkout, or `ray job submit --working-dir=.`). A member whose worker dies
(preempted node, crash) or that raises is retried up to `retries` times and resumes from
its own last checkpoint; a bad sweep or config fails at once. SIGINT/SIGTERM to the driver
stops it submitting and cancels the running members (their trainers save first); a driver
that is killed outright takes its tasks with it. Either way, the same command again skips
the finished members and resumes the rest.

Ray is an optional dependency (requirements-dev.txt; `pip install ray`), imported here only
when this launcher runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from experiments.scaling import runner, spec
from model import store
from train import config_lib
from train.corpus import CorpusError
from train.signals import StopSignals

DEFAULT_RESOURCES = {"CPU": 1}
# Errors a retry cannot fix: reported at once, not retried.
DETERMINISTIC_ERRORS = (spec.SweepError, config_lib.ConfigError, store.WorkdirError, CorpusError)


class MemberInterrupted(RuntimeError):
  """The member's trainer stopped on SIGTERM/SIGINT (a node being drained) after saving."""


def parse_resources(text: str | dict[str, float] | None) -> dict[str, float]:
  """'{"CPU": 1}' / '{"GPU": 1}' / '{"TPU": 4}' -> a dict of what each member needs."""
  if text is None or text == "":
    return dict(DEFAULT_RESOURCES)
  if isinstance(text, str):
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise spec.SweepError(f"--resources_per_run={text!r} is not JSON ({e.msg}); write e.g. "
                            '\'{"CPU": 1}\' or \'{"GPU": 1}\'') from None
  else:
    value = text
  if not isinstance(value, dict) or not value:
    raise spec.SweepError(f"--resources_per_run={text!r}: give a JSON object of resource "
                          'amounts, e.g. {"CPU": 1} or {"GPU": 1, "CPU": 4}')
  for key, amount in value.items():
    if (isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0
        or not isinstance(key, str)):
      raise spec.SweepError(f"--resources_per_run: {key!r} must be a non-negative number, "
                            f"not {amount!r}")
  return {k: float(v) for k, v in value.items()}


def task_options(resources: str | dict[str, float] | None, retries: int,
                 max_concurrent: int | None = None) -> dict[str, Any]:
  """ray.remote options of a member (CPU and GPU are Ray's own arguments, the rest custom
  resources), after checking the launcher's flags."""
  if retries < 0:
    raise spec.SweepError(f"--retries must be >= 0, not {retries}")
  if max_concurrent is not None and max_concurrent < 1:
    raise spec.SweepError(f"--max_concurrent must be >= 1, not {max_concurrent}")
  resources = parse_resources(resources)
  rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
  options: dict[str, Any] = {"num_cpus": resources.get("CPU", 0),
                             "num_gpus": resources.get("GPU", 0),
                             "max_retries": retries, "retry_exceptions": True}
  if rest:
    options["resources"] = rest
  return options


def member_task(sweep_path: str, workdir: str, name: str) -> dict[str, Any]:
  """The Ray task: train member `name` and write its record; its summary for the driver's log.

  A deterministic failure comes back as {'name', 'error'} (no retry); an interrupted
  trainer raises MemberInterrupted so that Ray runs the member again (it resumes).
  """
  try:
    sweep = spec.load_sweep(sweep_path)
    record = runner.run_member(sweep, sweep.run(name), workdir, peak=runner.measured_peak(sweep))
  except DETERMINISTIC_ERRORS as e:
    return {"name": name, "error": str(e)}
  if record is None:
    raise MemberInterrupted(f"{name}: the trainer stopped on a signal after saving")
  return {"name": name, "status": record["status"], "final_val_loss": record["final_val_loss"],
          "runner_wall_time_s": record["runner_wall_time_s"]}


def _ray():
  try:
    import ray  # optional: only this launcher needs it
  except ImportError:
    raise spec.SweepError("--launcher=ray needs Ray: pip install ray (requirements-dev.txt "
                          "has it)") from None
  return ray


@contextlib.contextmanager
def cluster(address: str | None = None):
  """Be a Ray driver for the block: connect to the cluster at `address` ('auto': the one
  `ray start` runs on this machine; HOST:PORT; 'local': a new private one; None: a running
  one, else a new one), unless this process already is a driver. Enter it before JAX
  starts (Ray forks its processes)."""
  ray = _ray()
  owned = not ray.is_initialized()
  if owned:
    try:
      ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, ValueError) as e:  # no cluster there, a malformed address
      raise spec.SweepError(f"--address={address}: {_last_line(e)}") from None
  try:
    yield
  finally:
    if owned:
      ray.shutdown()  # ends the job, and with it any member still running


def _last_line(error: BaseException) -> str:
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def run_on_ray(sweep_path: str, workdir: str, names: list[str], *,
               max_concurrent: int | None = None, resources: str | dict[str, float] | None = None,
               retries: int = 2, on_finished: Callable[[str], None] = lambda name: None,
               log=print) -> tuple[list[str], dict[str, str]]:
  """Run members `names` as Ray tasks; returns (finished names, {name: error}).

  Runs inside `cluster()`. `on_finished(name)` runs in the driver after each member's
  record is written.
  """
  ray = _ray()
  options = task_options(resources, retries, max_concurrent)
  task = ray.remote(member_task).options(**options)
  workdir = os.path.abspath(workdir)
  queue = collections.deque(names)
  pending: dict[Any, str] = {}
  finished, failed = [], {}
  limit = max_concurrent or len(names)
  cancelled = False
  log(f"ray: {len(names)} member(s), at most {limit} at a time, each needing "
      f"{parse_resources(resources)}, "
      f"up to {retries} retries; the cluster has {ray.cluster_resources()}")
  with StopSignals() as stop:
    while pending or (queue and stop.received is None):
      while queue and stop.received is None and len(pending) < limit:
        name = queue.popleft()
        pending[task.remote(sweep_path, workdir, name)] = name
        log(f"  submitted {name}")
      if stop.received is not None and not cancelled:
        log(f"  {stop.name}: cancelling {len(pending)} running member(s) (they save first); "
            "rerun to continue")
        for ref in pending:
          ray.cancel(ref)
        cancelled = True
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
      for ref in ready:
        name = pending.pop(ref)
        try:
          result = ray.get(ref)
        except ray.exceptions.RayError as e:
          if cancelled:  # cancelled before it started, or its trainer saved and stopped
            log(f"  {name}: stopped; rerun to resume it")
          else:
            failed[name] = _last_line(e)
            log(f"  {name} failed (retried up to {retries} times): {failed[name]}")
          continue
        if "error" in result:
          failed[name] = result["error"]
          log(f"  {name} failed: {result['error']}")
          continue
        finished.append(name)
        on_finished(name)
        log(f"  {name}: {result['status']}, val_loss {result['final_val_loss']:.4f}, "
            f"{result['runner_wall_time_s']:.0f} s")
  return finished, failed
