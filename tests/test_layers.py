"""The import layers: model <- sample <- train <- experiments, every import checked.

A module may import from its own layer and the layers below it, never above:

  experiments/   sweeps, fits, benchmarks, interpretability, notebooks
  train/         runs: config -> setup -> Trainer loop -> checkpoints, metrics
  sample/        decoding from params + tokenizer
  model/         the pure model and the workdir format (model/store)

Imports inside functions count too, and only optional heavy dependencies may be
imported there (so no arrow hides in a function body). The rules are parsed
from the source with `ast`; nothing is imported.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("model", "sample", "train", "experiments")  # bottom to top
# Optional heavy dependencies: imported where they are used, so the rest runs without them.
LAZY_ALLOWED = {"torch", "transformers", "wandb", "ray", "lm_eval", "datasets",
                "huggingface_hub", "gcsfs", "s3fs", "pyarrow", "zstandard"}


def python_files(root, layer):
  for dirpath, _, filenames in os.walk(os.path.join(root, layer)):
    for name in sorted(filenames):
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def imports(path):
  """(line, top-level module, inside a function) of every absolute import in `path`."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((child.lineno, a.name.split(".")[0], inner) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        assert child.level == 0, f"{path}:{child.lineno}: relative import"
        found.append((child.lineno, (child.module or "").split(".")[0], inner))
      visit(child, inner)

  visit(tree, False)
  return found


def violations(layer, root=REPO):
  rank = LAYERS.index(layer)
  out = []
  for path in python_files(root, layer):
    rel = os.path.relpath(path, root)
    for line, module, in_function in imports(path):
      if module in LAYERS and LAYERS.index(module) > rank:
        out.append(f"{rel}:{line}: {layer} imports {module} (a layer above it)")
      if in_function and module not in LAZY_ALLOWED:
        out.append(f"{rel}:{line}: imports {module} inside a function (only optional heavy "
                   f"dependencies may: {sorted(LAZY_ALLOWED)})")
  return out


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_points_up_and_none_hides_in_a_function(layer):
  assert violations(layer) == []


def test_the_checker_sees_upward_and_hidden_imports(tmp_path):
  """The rules catch what they are for (a test that cannot fail guards nothing)."""
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "bad.py").write_text(
      "import train.trainer\n\ndef f():\n  from sample import engine\n  import torch\n")
  found = violations("model", root=str(tmp_path))
  assert any("model imports train" in v for v in found)
  assert any("model imports sample" in v for v in found)
  assert any("imports sample inside a function" in v for v in found)
  assert not any("imports torch" in v for v in found)
