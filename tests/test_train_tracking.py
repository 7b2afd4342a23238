"""Trackers and profiling of a training run (config.trackers, config.profile).

One tiny run with every tracker, resumed once: TensorBoard's own event reader finds the
scalars of metrics.jsonl; the offline W&B run (read back with W&B's own record protobuf)
holds the same metrics and the resolved config; resuming the workdir continues the same W&B
run id; each session's profiled steps leave an xplane trace annotated with their step
numbers, the first session's although the run ended inside its window.
"""

import glob
import gzip
import json
import os
import struct

import pytest

from train import config_lib
from train.config_lib import ConfigError, load_config
from train.metrics import (
    WANDB_RUN_FILE,
    MetricsWriter,
    TrackerError,
    read_metrics,
    wandb_run_id,
)
from train.trainer import train_and_evaluate

STEPS, MORE = 6, 8
# (start_step, num_steps) per session: the first window runs past the end of its session.
PROFILES = ((4, 5), (6, 1))


def settings(root, **extra):
  return {"num_steps": STEPS, "log_every": 2, "eval_every": 3, "checkpoint_every": 3,
          "trackers": ("jsonl", "tensorboard", "wandb"), "wandb.project": "tracking-test",
          "profile.start_step": PROFILES[0][0], "profile.num_steps": PROFILES[0][1],
          "data.cache_dir": os.path.join(root, "cache"), **extra}


pytestmark = pytest.mark.slow  # two short training sessions with every tracker


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """STEPS steps, then the same workdir resumed to MORE (W&B offline, into the workdir)."""
  root = str(tmp_path_factory.mktemp("tracking"))
  workdir = os.path.join(root, "run")
  saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
  os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
  try:
    train_and_evaluate(load_config("train/configs/tiny.py", settings(root)), workdir)
    first = wandb_run_id(workdir)
    offline = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    train_and_evaluate(load_config("train/configs/tiny.py", settings(
        root, num_steps=MORE, **{"profile.start_step": PROFILES[1][0],
                                 "profile.num_steps": PROFILES[1][1]})), workdir)
  finally:
    import wandb

    wandb.teardown()  # its process-wide settings (offline mode) must not outlive the fixture
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  return workdir, first, offline


def wandb_records(path):
  """The records of a .wandb file (a LevelDB-style log of W&B's Record protobufs)."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  block, pos, chunk, records = 32768, 7, b"", []  # 7 bytes of ':W&B' header
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # a block's tail too short for a chunk header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      pos += left
      continue
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b""
  return records


def history(records):
  """{step: {key: value}} of the logged rows."""
  rows = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
             for item in r.history.item}
      rows.setdefault(row["_step"], {}).update(row)
  return rows


def test_tensorboard_reads_the_logged_scalars(run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  workdir, _, _ = run
  events = EventAccumulator(workdir)
  events.Reload()
  logged = {(r["step"], r["loss"]) for r in read_metrics(workdir, "train")}
  read = {(e.step, e.value) for e in events.Scalars("train/loss")}
  assert len(logged) == MORE // 2 and {s for s, _ in read} == {s for s, _ in logged}
  for (step, value), (_, expected) in zip(sorted(read), sorted(logged), strict=True):
    assert value == pytest.approx(expected, rel=1e-6), step
  evals = {e.step: e.value for e in events.Scalars("eval/val_loss")}
  assert evals == pytest.approx({r["step"]: r["val_loss"] for r in read_metrics(workdir, "eval")})


def test_wandb_offline_run_holds_metrics_and_config_and_resumes_its_id(run):
  workdir, first_id, first_dirs = run
  assert first_id and len(first_dirs) == 1 and first_dirs[0].endswith(first_id)
  with open(os.path.join(workdir, WANDB_RUN_FILE)) as f:
    assert json.load(f) == {"id": first_id}
  dirs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
  assert len(dirs) == 2 and all(d.endswith(f"-{first_id}") for d in dirs)  # resumed: same id
  logged = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}
  seen = {}
  for d in dirs:
    (path,) = glob.glob(os.path.join(d, f"run-{first_id}.wandb"))
    records = wandb_records(path)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == first_id and start.project == "tracking-test"
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["num_steps"] in (STEPS, MORE) and config["model"]["d_model"] == 32
    assert config["trackers"] == ["jsonl", "tensorboard", "wandb"]
    seen.update({s: row["train/loss"] for s, row in history(records).items()
                 if "train/loss" in row})
  assert seen == pytest.approx(logged)
  assert max(seen) == MORE  # the resumed session logged into the same run


def test_profile_traces_the_chosen_steps(run):
  workdir, _, _ = run
  xplanes = sorted(glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"),
                             recursive=True))
  assert len(xplanes) == len(PROFILES)  # one trace per session
  for xplane, (start, num_steps) in zip(xplanes, PROFILES, strict=True):
    assert os.path.getsize(xplane) > 0
    (trace,) = glob.glob(os.path.join(os.path.dirname(xplane), "*.trace.json.gz"))
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
    steps = {int(e["args"]["step_num"]) for e in events
             if e.get("name") == "train" and "step_num" in e.get("args", {})}
    last = min(start + num_steps, STEPS if start < STEPS else MORE)  # the session's end
    assert steps == set(range(start, last))


def test_bad_trackers_fail_in_one_line(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match=r"config.trackers=\('jsonl', 'neptune'\): must be a "
                                        r"tuple of \('jsonl', 'tensorboard', 'wandb'\)"):
    load_config("train/configs/tiny.py", {"trackers": ("jsonl", "neptune")})
  real = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install -e "
                                        r"'\.\[wandb\]'"):
    load_config("train/configs/tiny.py", {"trackers": ("wandb",)})
  with pytest.raises(ValueError, match="unknown trackers"):
    MetricsWriter(str(tmp_path), trackers=("csv",))
  # Online without an account: one line that says what to do. (wandb keeps its settings, the
  # mode included, in a process-wide singleton: drop the one an earlier offline run made.)
  import wandb

  wandb.teardown()
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
  monkeypatch.setenv("WANDB_MODE", "online")
  with pytest.raises(TrackerError, match=r"did not start: .*API key.*WANDB_MODE=offline"):
    MetricsWriter(str(tmp_path / "run"), trackers=("jsonl", "wandb"))
