"""The Colab notebooks run headless, top to bottom, on a plain CPU kernel (so they cannot rot)."""

import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NOTEBOOKS_ALL = ("quickstart.ipynb", "scaling_laws.ipynb", "interpretability.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "quickstart"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a plain kernel
  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = ["".join(o.get("text", "") for o in cell.get("outputs", []))
             for cell in nb.cells if cell.cell_type == "code"]
  joined = "\n".join(outputs)
  for expected in ("--- greedy", "--- top-p 0.9", "pieces", "'def '", "with the cache",
                   "same tokens: True", "final validation loss"):
    assert expected in joined, expected
  assert (tmp_path / "quickstart" / "metrics.jsonl").exists()


def execute(name, monkeypatch, **env):
  """Run a notebook top to bottom on a plain one-device CPU kernel; the code cells' text."""
  for key, value in {"MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu", **env}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  return ["".join(o.get("text", "") for o in cell.get("outputs", []))
          for cell in nb.cells if cell.cell_type == "code"]


def test_scaling_laws_notebook_fits_the_recorded_sweep(monkeypatch):
  """The notebook's exponents are the committed report's (same records, same fits)."""
  text = "\n".join(execute("scaling_laws.ipynb", monkeypatch))
  with open(os.path.join(REPO, "experiments", "results", "scaling_cpu", "fits.json")) as f:
    recorded = json.load(f)
  expected = {"L(N): aN": recorded["L(N)"]["alpha"], "L(D): aD": recorded["L(D)"]["alpha"],
              "L(C): aC": recorded["L(C)"]["alpha"], "L(N, D): alpha": recorded["L(N,D)"]["alpha"],
              "L(N, D): beta": recorded["L(N,D)"]["beta"],
              "isoFLOP: N_opt ~ C^a": recorded["isoflop"]["a"]}
  for label, estimate in expected.items():
    printed = re.search(re.escape(label) + r"\s+([0-9.]+)", text)
    assert printed, f"{label} not printed"
    assert float(printed.group(1)) == pytest.approx(estimate["value"], rel=5e-3), label
  assert "not fitted" not in text and "20 runs from" in text


def test_interpretability_notebook_finds_the_handmade_circuit(monkeypatch):
  text = "\n".join(execute("interpretability.ipynb", monkeypatch))
  assert "top induction head: L1H0" in text
  assert "previous-token heads: ['L0H0 (1.00)', 'L1H1" in text
  lens = dict(re.findall(r"(layer \d)\s+p\(next token\): first copy [0-9.]+\s+second copy "
                         r"([0-9.]+)", text))
  assert float(lens["layer 0"]) < 0.2 and float(lens["layer 1"]) > 0.9
  ablated = re.search(r"top induction head \[\(1, 0\)\] ablated: ([0-9.]+); control .*: ([0-9.]+)",
                      text)
  assert float(ablated.group(1)) > 10 * float(ablated.group(2))


def setup_cell():
  cells = [nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4).cells
           for name in NOTEBOOKS_ALL]
  sources = [next(c.source for c in nb if c.cell_type == "code") for nb in cells]
  assert all(s == sources[0] for s in sources), "the notebooks' setup cells differ"
  return sources[0]


@pytest.mark.parametrize("runtime, jax_install", [
    ({}, None), ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "jax[tpu]"),
    ({"nvidia-smi": True}, "jax[cuda12]")])
def test_setup_cell_installs_only_outside_a_checkout(runtime, jax_install, tmp_path, monkeypatch):
  """Inside the checkout: no command at all. Elsewhere: clone, install the package, and the
  accelerator's jax within requirements.txt's range (commands recorded, not run)."""
  source = setup_cell()
  commands = []

  def fake_run(args, **kwargs):
    commands.append(list(args))
    if args[:2] == ["git", "clone"]:
      for name in ("model", "sample", "train", "experiments"):
        os.makedirs(os.path.join(args[-1], name))
      shutil.copy(os.path.join(REPO, "requirements.txt"), args[-1])
    return subprocess.CompletedProcess(args, 0, b"", b"")

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name
                      if name == "nvidia-smi" and runtime.get("nvidia-smi") else None)
  for key in ("COLAB_TPU_ADDR", "TPU_NAME"):
    monkeypatch.delenv(key, raising=False)
  for key, value in runtime.items():
    if key.isupper():
      monkeypatch.setenv(key, value)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(os.path.join(REPO, "experiments", "notebooks"))
  exec(compile(source, "setup", "exec"), {})
  assert commands == []  # a checkout: found, nothing installed

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("TRANSFORMER_LAB_REPO", "https://example.org/transformer-lab.git")
  namespace = {}
  exec(compile(source, "setup", "exec"), namespace)
  clone = str(tmp_path / "transformer-lab")
  assert namespace["REPO"] == clone and sys.path[0] == clone
  assert commands[0] == ["git", "clone", "--depth=1", "https://example.org/transformer-lab.git",
                         clone]
  assert commands[1][-4:] == ["install", "-q", "-e", clone]
  installs = [c for c in commands if "pip" in c and any(a.startswith("jax[") for a in c)]
  if jax_install is None:
    assert installs == []
  else:
    assert installs == [[sys.executable, "-m", "pip", "install", "-q", "-U",
                         jax_install + ">=0.7,<0.11"]]

  monkeypatch.delenv("TRANSFORMER_LAB_REPO")
  with pytest.raises(RuntimeError, match="set REPO_URL"):  # no checkout, no address: one line
    exec(compile(source, "setup", "exec"), {"__name__": "setup"})
