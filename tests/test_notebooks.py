"""The Colab notebooks run headless, top to bottom, on a plain CPU kernel (so they cannot rot)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")


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
