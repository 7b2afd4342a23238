"""The module-tree summary: phi3-mini from the command line without allocating its weights."""

import re
import subprocess
import sys
from pathlib import Path

import model
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI as the only child of a small wrapper, so that RUSAGE_CHILDREN is its peak RSS.
_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run([sys.executable, "-m", "model.summary", "--preset=phi3-mini"],
                   capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)
"""


def test_phi3_mini_summary_cli_without_allocating_weights():
  result = subprocess.run([sys.executable, "-c", _WRAPPER], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  for expected in ["(embed): Embedding(32064, 3072)", "(layers): 32 x Block(",
                   "(qkv): Linear(3072 -> 9216, bias=False)",
                   "(o): Linear(3072 -> 3072, bias=False)",
                   "(gate_up): Linear(3072 -> 16384, bias=False)",
                   "(down): Linear(8192 -> 3072, bias=False)",
                   "(lm_head): Linear(3072 -> 32064, bias=False)", "RMSNorm(3072)",
                   "3,821,079,552", "(3,821.1M)"]:
    assert expected in out, expected
  # 3.8B float32 weights would be 15 GB; shapes alone stay far below 2 GB.
  peak_kb = int(re.search(r"PEAK_RSS_KB (\d+)", out).group(1))
  assert peak_kb < 2 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"


def _count(line):
  return int(line.rsplit(None, 1)[-1].replace(",", ""))


def test_summary_rows_add_up():
  """Top-level rows sum to the total; inside the scanned stack rows count one layer, and the
  stack row is L times the sum of its children."""
  cfg = tiny_config(n_kv_heads=2, tie_embeddings=False, n_layers=3)
  lines = model.summary(cfg).splitlines()
  counted = [line for line in lines if line.rstrip()[-1:].isdigit() and "(" in line
             and not line.startswith(("total", "non-embedding", "12 L"))]
  depth1 = [line for line in counted if re.match(r"^  \(", line)]
  depth2 = [line for line in counted if re.match(r"^    \(", line)]
  total = model.count_params(cfg).total
  assert sum(_count(line) for line in depth1) == total
  assert re.search(rf"total parameters +{total:,}", "\n".join(lines))
  stack = next(line for line in depth1 if "(layers): 3 x Block(" in line)
  assert _count(stack) == 3 * sum(_count(line) for line in depth2)
  assert any("(k): Linear(32 -> 16, bias=True)" in line for line in lines)  # K H = 2 x 8


def test_unrolled_summary_lists_every_block():
  text = model.summary(tiny_config(scan_layers=False, n_layers=3))
  assert all(f"(layers_{i}): Block(" in text for i in range(3))
  assert "PositionEmbedding(64, 32)" in text and "Embedding(61, 32)" in text
