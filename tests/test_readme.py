"""The README is the front door: its two commands, its links and the modules it runs exist.

The commands themselves run elsewhere (tests/test_train_cli.py runs the training
CLI end to end, .ci/run the test command); this checks the README has not
drifted from the repository.
"""

import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ["README.md", "model/README.md", "model/hf/README.md", "train/README.md",
           "sample/README.md", "experiments/scaling/README.md", "experiments/interp/README.md",
           "experiments/speedrun/README.md"]


def read(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def test_readme_starts_with_the_install_and_run_commands():
  first_block = read("README.md").split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [line for line in first_block.splitlines() if not line.startswith("#")]
  assert commands == [
      "pip install -r requirements.txt && python -m train --config=train/configs/default.py "
      "--workdir=runs/default",
      "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest -n 2 "
      "--dist loadfile",
  ]
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert f.read().rstrip().endswith("python -m pytest -n 2 --dist loadfile")


@pytest.mark.parametrize("readme", READMES)
def test_relative_links_point_at_files(readme):
  base = os.path.dirname(os.path.join(REPO, readme))
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(readme))
  missing = [t for t in targets if "://" not in t
             and not os.path.exists(os.path.normpath(os.path.join(base, t)))]
  assert not missing, f"{readme} links to missing files: {missing}"


@pytest.mark.parametrize("readme", READMES)
def test_commands_name_modules_and_configs_that_exist(readme):
  text = read(readme)
  modules = set(re.findall(r"python -m ([a-z_][\w.]*)", text)) - {"pip", "pytest"}
  missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
  assert not missing, f"{readme} runs modules that do not exist: {missing}"
  configs = set(re.findall(r"--config=([\w/]+\.py)", text))
  configs |= set(re.findall(r"--sweep=([\w/]+\.py)", text))
  missing = [c for c in sorted(configs)  # NAME: a placeholder for the reader's own
             if "NAME" not in c and not os.path.exists(os.path.join(REPO, c))]
  assert not missing, f"{readme} names config files that do not exist: {missing}"
