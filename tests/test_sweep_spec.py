"""The sweep format: the shape ladder, isoFLOP layouts, run configs, and the shipped sweeps'
promises (sizes, budgets, no repeated data) checked without training anything."""

import math

import numpy as np
import pytest

from experiments.scaling import spec
from model.config import ModelConfig

MODEL = ModelConfig(vocab_size=259, max_seq_len=128, position="rope", norm="rmsnorm",
                    attn_bias=False, mlp_bias=False)


def test_ladder_keeps_aspect_ratio_and_doubles_size():
  shapes = spec.ladder(max_layers=8)
  assert [s.name for s in shapes[:4]] == ["L1d32", "L1d48", "L1d64", "L2d64"]
  for s in shapes:
    assert 32 <= s.aspect_ratio <= 64
    assert s.d_model // s.n_heads == (16 if s.d_model < 128 else 32)
  n = np.array([spec.non_embedding_params(s, MODEL) for s in shapes])
  ratios = n[1:] / n[:-1]
  assert np.all(ratios > 1.5) and np.all(ratios < 2.6)
  # N is the textbook 12 L d^2 plus the norms' gains.
  for s, count in zip(shapes, n, strict=True):
    assert count == 12 * s.n_layers * s.d_model ** 2 + (2 * s.n_layers + 1) * s.d_model


def test_isoflop_layout_spends_each_budget():
  shapes = spec.ladder(max_layers=4)
  runs = spec.isoflop_runs([1e11, 1e12], shapes, MODEL, per_budget=5, tokens_per_param=20,
                           tokens_per_step=1)
  assert len(runs) == 10
  for budget in (1e11, 1e12):
    group = [r for r in runs if r.budget == budget]
    sizes = [spec.non_embedding_params(r.shape, MODEL) for r in group]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5
    for r, n in zip(group, sizes, strict=True):
      assert 6 * n * r.tokens == pytest.approx(budget, rel=1e-4)
    # centred on the ladder's closest size to sqrt(C / (6 * 20)), unless at the ladder's end
    ladder_sizes = [spec.non_embedding_params(s, MODEL) for s in shapes]
    target = math.sqrt(budget / 120)
    closest = min(ladder_sizes, key=lambda n: abs(math.log(n / target)))
    assert sizes[2] == closest or (closest in sizes and sizes[0] == ladder_sizes[0])
  assert runs[0].name == "C1e11-L1d32"
  assert [spec.budget_tag(c) for c in (1e12, 1.25e12, 2.5e11)] == ["1e12", "1.25e12", "2.5e11"]


def test_isoflop_layout_with_exact_flops():
  from model.counting import flops_per_token

  shapes = spec.ladder(max_layers=4)
  runs = spec.isoflop_runs([1e12], shapes, MODEL, per_budget=3, tokens_per_param=100,
                           compute="exact")
  for r in runs:
    cfg = MODEL.replace(n_layers=r.shape.n_layers, d_model=r.shape.d_model,
                        n_heads=r.shape.n_heads)
    assert r.tokens * flops_per_token(cfg, MODEL.max_seq_len) == pytest.approx(1e12, rel=1e-4)
    assert spec.flops_per_token_of(r.shape, MODEL, "exact") > 6 * spec.non_embedding_params(
        r.shape, MODEL)
  with pytest.raises(spec.SweepError, match="compute='7nd'"):
    spec.isoflop_runs([1e12], shapes, MODEL, compute="7nd")


def test_isoflop_layout_moves_up_to_respect_max_tokens_and_min_steps():
  shapes = spec.ladder(max_layers=4)
  free = spec.isoflop_runs([1e12], shapes, MODEL, per_budget=3, tokens_per_param=100)
  capped = spec.isoflop_runs([1e12], shapes, MODEL, per_budget=3, tokens_per_param=100,
                             max_tokens=free[0].tokens - 1)
  assert max(r.tokens for r in capped) < free[0].tokens
  assert capped[0].shape == free[1].shape
  with pytest.raises(spec.SweepError, match="under 50 steps"):
    spec.isoflop_runs([1e9], shapes, MODEL, per_budget=3, tokens_per_step=2048)
  with pytest.raises(spec.SweepError, match="at least 3 sizes"):
    spec.isoflop_runs([1e12], shapes, MODEL, per_budget=2)


def test_run_config_follows_the_run():
  run = spec.Run("a", spec.Shape(2, 64, 4), tokens=10_000, lr=2e-3, seed=3, budget=1e10)
  sweep = spec.Sweep("t", [run], base_config="train/configs/tiny.py", batch_size=4, seq_len=32,
                     overrides={"eval_batches": 1}, warmup_fraction=0.1, evals_per_run=2)
  config = sweep.training_config(run)
  assert config.num_steps == math.ceil(10_000 / 128) == 79
  assert (config.model.n_layers, config.model.d_model, config.model.n_heads) == (2, 64, 4)
  assert config.optim.lr == 2e-3 and config.seed == 3 and config.batch_size == 4
  assert config.data.seq_len == 32 and config.eval_batches == 1
  assert config.optim.warmup_steps == 10  # 10% of 79, at least the lower bound 10
  assert config.eval_every == 40  # two evaluations: step 40 and the final step


def test_malformed_sweeps_are_refused():
  shape = spec.Shape(1, 32, 2)
  with pytest.raises(spec.SweepError, match="repeat"):
    spec.Sweep("t", [spec.Run("a", shape, 10, 1e-3), spec.Run("a", shape, 20, 1e-3)])
  with pytest.raises(spec.SweepError, match="set per run"):
    spec.Sweep("t", [spec.Run("a", shape, 10, 1e-3)], overrides={"optim.lr": 1.0})
  with pytest.raises(spec.SweepError, match="slashes"):
    spec.Run("a/b", shape, 10, 1e-3)
  with pytest.raises(spec.SweepError, match="divisible"):
    spec.Shape(1, 30, 4)
  with pytest.raises(spec.SweepError, match="not found"):
    spec.load_sweep("experiments/sweeps/nope.py")


def test_kaplan_learning_rate_rule():
  assert spec.kaplan_lr(1e6) == pytest.approx(0.003239 - 0.0001395 * math.log(1e6))
  assert spec.kaplan_lr(1e4) > spec.kaplan_lr(1e6)


@pytest.mark.parametrize("name", ["smoke", "cpu", "lr_probe", "pilot", "gpu_8x", "tpu_v4_32"])
def test_shipped_sweeps_load_and_expand(name, monkeypatch):
  monkeypatch.setenv("SCALING_CORPUS", "stdlib")  # the accelerator sweeps name their corpus
  sweep = spec.load_sweep(f"experiments/sweeps/{name}.py")
  for run in sweep.runs[:2]:
    sweep.training_config(run)  # every override is a real config key


def test_accelerator_sweeps_ask_for_a_corpus(monkeypatch):
  monkeypatch.delenv("SCALING_CORPUS", raising=False)
  with pytest.raises(spec.SweepError, match="set SCALING_CORPUS"):
    spec.load_sweep("experiments/sweeps/gpu_8x.py")


def test_cpu_sweep_meets_its_promises():
  from experiments.sweep import plan

  sweep = spec.load_sweep("experiments/sweeps/cpu.py")
  rows = plan(sweep)
  n = np.array([r["n_params_non_embedding"] for r in rows])
  c = np.array([r["flops"] for r in rows])
  budgets = {r["budget"] for r in rows}
  assert len(rows) >= 12 and sweep.budget_flops == "exact"
  assert math.log10(n.max() / n.min()) >= 1.5
  assert math.log10(c.max() / c.min()) >= 1.0
  for r in rows:  # exact isoFLOP groups: every run spends its budget
    assert r["flops"] == pytest.approx(r["budget"], rel=0.01)
  assert len(budgets) >= 3 and all(sum(r["budget"] == b for r in rows) >= 5 for b in budgets)
  assert max(r["tokens"] for r in rows) <= 11.5e6  # the stdlib corpus's 11.8M training bytes
  assert min(r["steps"] for r in rows) >= 50
  # The compute the sweep is designed around: 45 minutes at 15 GFLOP/s (these models reach
  # about 9 GFLOP/s on 2 cores shared four ways, more on idle ones).
  assert sum(r["flops"] for r in rows) < 45 * 60 * 15e9
