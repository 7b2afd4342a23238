"""The project installs as a package: pyproject's dependencies are requirements.txt's, and
`pip wheel .` builds a wheel holding every package of the four layers (and the configs)."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_pyproject_dependencies_are_the_requirements():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["dependencies"] == requirements(os.path.join(REPO, "requirements.txt"))
  assert project["requires-python"] == ">=3.11"
  assert {"data", "cloud", "hf", "eval"} <= set(project["optional-dependencies"])


def test_a_wheel_builds_with_every_package(tmp_path):
  # Built from a copy: setuptools leaves build/ and *.egg-info/ next to the sources.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".git", ".venv", ".ci", "runs", "build", "dist", "*.egg-info", "__pycache__"))
  out = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), "-q"], cwd=source,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
  names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
  for module in ("model/__init__.py", "model/store/checkpoint.py", "model/hf/__main__.py",
                 "sample/generator.py", "train/__main__.py", "train/configs/default.py",
                 "experiments/sweep.py", "experiments/sweeps/cpu.py"):
    assert module in names, module
  assert not any(n.startswith("tests/") for n in names)
