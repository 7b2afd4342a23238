"""The sweep format: a sweep file expands into named runs, each a normal training config.

A sweep file (experiments/sweeps/NAME.py) defines `get_sweep() -> Sweep`:

  Sweep(name, base_config="train/configs/default.py", batch_size=16, seq_len=128,
        overrides={...},            # training-config keys every run shares
        runs=[Run(name, Shape(n_layers, d_model, n_heads), tokens=D, lr=..., seed=0,
                  budget=C or None, overrides={...}), ...])

`Sweep.training_config(run)` is `train.config_lib.load_config(base_config, overrides)` with
the run's shape, learning rate and seed, and `num_steps = ceil(D / (batch_size * seq_len))`;
warmup, evaluation and checkpoint intervals follow from the run's length.

The shape ladder (`ladder`): depths L = 1, 2, 4, 8, ... and for each depth the widths
d = 32 L, 48 L, 64 L, so the aspect ratio d / L stays in [32, 64] (Kaplan et al. 2020,
fig. 5: at fixed N the loss barely depends on the shape over aspect ratios ~20-200, so
keeping it in one narrow band keeps shape out of the N-dependence). Heads have width
16 below d = 128 and 32 from there (n_heads = d / 16 or d / 32); d_ff = 4 d. Consecutive
rungs differ by ~2x in non-embedding parameters N ~ 12 L d^2.

`isoflop_runs` lays out approach 2: for each compute budget C, the `per_budget`
consecutive rungs centred on the one whose D / N is closest to r (the guessed tokens per
parameter at the optimum), each trained on D = C / (FLOPs per token) tokens, counting
FLOPs as 6 N (Kaplan) or exactly, with attention and the LM head (Hoffmann et al.).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from model.config import ModelConfig
from model.counting import count_params, flops_per_token
from train.config_lib import load_config, model_config


class SweepError(ValueError):
  """A sweep file or a run in it is malformed."""


COMPUTE_COUNTS = ("6nd", "exact")  # ways to count a budget's FLOPs (flops_per_token_of)


@dataclasses.dataclass(frozen=True)
class Shape:
  n_layers: int
  d_model: int
  n_heads: int

  def __post_init__(self):
    for field in ("n_layers", "d_model", "n_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise SweepError(f"Shape.{field}={value!r} must be a positive integer")
    if self.d_model % self.n_heads:
      raise SweepError(f"Shape d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

  @property
  def name(self) -> str:
    return f"L{self.n_layers}d{self.d_model}"

  @property
  def aspect_ratio(self) -> float:
    return self.d_model / self.n_layers

  def overrides(self) -> dict[str, int]:
    return {"model.n_layers": self.n_layers, "model.d_model": self.d_model,
            "model.n_heads": self.n_heads}


def heads_for(d_model: int) -> int:
  """The ladder's head count: head width 16 below d = 128, 32 from there."""
  return d_model // 16 if d_model < 128 else d_model // 32


def ladder(max_layers: int = 8, widths_per_layer: Sequence[int] = (32, 48, 64), *,
           min_layers: int = 1, heads=heads_for) -> list[Shape]:
  """Shapes (L, d) with L = 1, 2, 4, ... in [min_layers, max_layers] and d = w L for w in
  widths_per_layer, `heads(d)` heads each, without repeats, in increasing size."""
  shapes, seen, n_layers = [], set(), 1
  while n_layers <= max_layers:
    for width in widths_per_layer:
      d = width * n_layers
      if n_layers >= min_layers and (n_layers, d) not in seen:
        seen.add((n_layers, d))
        shapes.append(Shape(n_layers, d, heads(d)))
    n_layers *= 2
  return sorted(shapes, key=lambda s: 12 * s.n_layers * s.d_model ** 2)


@functools.lru_cache(maxsize=256)
def non_embedding_params(shape: Shape, model: ModelConfig) -> int:
  """N of `shape` with every other architectural choice from `model` (exact, via eval_shape)."""
  return count_params(model.replace(n_layers=shape.n_layers, d_model=shape.d_model,
                                    n_heads=shape.n_heads)).non_embedding


def kaplan_lr(n_params: float) -> float:
  """Kaplan et al. (2020) eq. D.1, the learning rate their sweep found best at size N:
  LR(N) ~ 0.003239 - 0.0001395 ln N."""
  return 0.003239 - 0.0001395 * math.log(n_params)


def lr_kaplan(shape: Shape, n_params: float) -> float:
  """A learning-rate rule (shape, N) -> LR: Kaplan et al.'s LR(N)."""
  del shape
  return kaplan_lr(n_params)


def lr_inverse_width(scale: float):
  """A learning-rate rule (shape, N) -> scale / d_model: Adam's learning rate for hidden
  matrices falls as 1 / width (muP, Yang et al. 2022)."""
  return lambda shape, n_params: scale / shape.d_model


def budget_tag(flops: float) -> str:
  """1e12 -> '1e12', 1.25e12 -> '1.25e12' (for run names)."""
  mantissa, exponent = f"{flops:.3e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exponent)}"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""

  name: str
  shape: Shape
  tokens: int  # D: training tokens (rounded up to whole steps)
  lr: float
  seed: int = 0
  budget: float | None = None  # nominal C = 6 N D of the run's isoFLOP group
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.name or any(c in self.name for c in "/\\ \t\n"):
      raise SweepError(f"run name {self.name!r} must be non-empty, without slashes or spaces")
    if not isinstance(self.tokens, int) or self.tokens <= 0:
      raise SweepError(f"run {self.name!r}: tokens={self.tokens!r} must be a positive integer")
    if not self.lr > 0:
      raise SweepError(f"run {self.name!r}: lr={self.lr!r} must be positive")
    if self.budget is not None and not self.budget > 0:
      raise SweepError(f"run {self.name!r}: budget={self.budget!r} must be positive or None")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Named runs sharing one base training config."""

  name: str
  runs: tuple[Run, ...]
  base_config: str = "train/configs/default.py"
  batch_size: int = 16
  seq_len: int = 128
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  warmup_fraction: float = 0.05  # warmup steps = this fraction of the run, within the bounds
  warmup_bounds: tuple[int, int] = (10, 200)
  evals_per_run: int = 1  # evenly spaced evaluations (the last at the final step)
  checkpoints_per_run: int = 4  # evenly spaced checkpoints: a kill loses at most 1/4 of a run
  budget_flops: str = "6nd"  # how Run.budget counts FLOPs: "6nd" or "exact" (COMPUTE_COUNTS)
  description: str = ""

  def __post_init__(self):
    object.__setattr__(self, "runs", tuple(self.runs))
    names = [r.name for r in self.runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise SweepError(f"sweep {self.name!r}: run names repeat: {repeated}")
    if not self.runs:
      raise SweepError(f"sweep {self.name!r} has no runs")
    if self.budget_flops not in COMPUTE_COUNTS:
      raise SweepError(f"sweep {self.name!r}: budget_flops={self.budget_flops!r} must be one "
                       f"of {COMPUTE_COUNTS}")
    reserved = {"num_steps", "batch_size", "data.seq_len", "seed", "optim.lr",
                "optim.warmup_steps", "model.n_layers", "model.d_model", "model.n_heads"}
    clash = sorted(reserved & set(self.overrides))
    if clash:
      raise SweepError(f"sweep {self.name!r}: overrides {clash} are set per run by the sweep "
                       "(use Sweep.batch_size/seq_len, Run.shape/lr/seed/tokens)")

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  def steps(self, run: Run) -> int:
    return -(-run.tokens // self.tokens_per_step)

  def run_overrides(self, run: Run) -> dict[str, Any]:
    """Every override of `run`'s training config, sweep-wide ones first."""
    steps = self.steps(run)
    lo, hi = self.warmup_bounds
    warmup = min(max(round(self.warmup_fraction * steps), lo), hi, max(steps - 1, 0))
    every = lambda k: max(1, -(-steps // max(k, 1)))
    out = {
        "model.max_seq_len": self.seq_len, "eval_every": every(self.evals_per_run),
        "checkpoint_every": every(self.checkpoints_per_run),
        "log_every": max(1, min(50, steps // 20)),
        **self.overrides,
        "batch_size": self.batch_size, "data.seq_len": self.seq_len, "num_steps": steps,
        "seed": run.seed, "optim.lr": run.lr, "optim.warmup_steps": warmup,
        **run.shape.overrides(), **run.overrides}
    return out

  def training_config(self, run: Run):
    """The run's ConfigDict (checked by train.config_lib.load_config)."""
    return load_config(self.base_config, self.run_overrides(run))

  def run(self, name: str) -> Run:
    for r in self.runs:
      if r.name == name:
        return r
    raise SweepError(f"sweep {self.name!r} has no run {name!r}; "
                     f"runs: {[r.name for r in self.runs]}")


def base_model_config(base_config: str, overrides: Mapping[str, Any], seq_len: int,
                      vocab_size: int = 256) -> ModelConfig:
  """The ModelConfig a sweep's runs share apart from their shape (to count N while designing
  the sweep; the vocabulary does not change the non-embedding count)."""
  config = load_config(base_config, {**overrides, "model.max_seq_len": seq_len,
                                     "data.seq_len": seq_len})
  return model_config(config, vocab_size=vocab_size)


def flops_per_token_of(shape: Shape, model: ModelConfig, compute: str) -> float:
  """Training FLOPs per token of `shape`: 6 N ('6nd', N non-embedding) or the full count with
  attention and the LM head ('exact': model.flops_per_token at T = model.max_seq_len)."""

  if compute == "6nd":
    return 6.0 * non_embedding_params(shape, model)
  if compute == "exact":
    return flops_per_token(model.replace(n_layers=shape.n_layers, d_model=shape.d_model,
                                         n_heads=shape.n_heads), model.max_seq_len)
  raise SweepError(f"compute={compute!r}: must be one of {COMPUTE_COUNTS}")


def isoflop_runs(budgets: Sequence[float], shapes: Sequence[Shape], model: ModelConfig, *,
                 per_budget: int = 5, tokens_per_param: float = 20.0, lr=lr_kaplan,
                 seed: int = 0, tokens_per_step: int = 1, min_steps: int = 50,
                 max_tokens: float = math.inf, compute: str = "6nd") -> list[Run]:
  """Approach 2's layout: per budget C the `per_budget` consecutive shapes centred on the one
  whose D / N is closest to `tokens_per_param`, each trained on D = C / (FLOPs per token).

  `compute` says how FLOPs are counted: "6nd" (C = 6 N D, Kaplan) or "exact" (attention and
  the LM head included, as Hoffmann et al. count them; see flops_per_token_of).
  `lr(shape, N)` gives each run's learning rate. The window moves up the ladder until its
  smallest model needs at most `max_tokens` (e.g. the corpus size: no run repeats data).
  A run shorter than `min_steps` steps of `tokens_per_step` tokens is an error.
  """
  if per_budget < 3:
    raise SweepError(f"per_budget={per_budget}: a parabola needs at least 3 sizes per budget")
  sized = sorted(((non_embedding_params(s, model), flops_per_token_of(s, model, compute), s)
                  for s in shapes), key=lambda x: x[0])
  if len(sized) < per_budget:
    raise SweepError(f"{len(sized)} shapes cannot give {per_budget} sizes per budget")
  runs = []
  for budget in budgets:
    ratio = [budget / fpt / n for n, fpt, _ in sized]
    centre = min(range(len(sized)), key=lambda i: abs(math.log(ratio[i] / tokens_per_param)))
    first = min(max(centre - per_budget // 2, 0), len(sized) - per_budget)
    while budget / sized[first][1] > max_tokens:
      if first + per_budget >= len(sized):
        raise SweepError(f"budget {budget:.3g}: even the largest {per_budget} shapes need more "
                         f"than max_tokens={max_tokens:.3g} tokens; add larger shapes")
      first += 1
    for n, fpt, shape in sized[first:first + per_budget]:
      tokens = round(budget / fpt)
      name = f"C{budget_tag(budget)}-{shape.name}"
      if tokens < min_steps * tokens_per_step:
        raise SweepError(f"run {name}: D = {tokens} tokens is under {min_steps} steps of "
                         f"{tokens_per_step} tokens; raise the budget or drop the size")
      runs.append(Run(name, shape, tokens=tokens, lr=float(lr(shape, n)), seed=seed,
                      budget=budget))
  return runs


def load_sweep(path: str) -> Sweep:
  """The Sweep that the file's get_sweep() returns."""
  if not os.path.isfile(path):
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps")
    names = sorted(n[:-3] for n in os.listdir(here) if n.endswith(".py") and n != "__init__.py")
    raise SweepError(f"sweep file not found: {path!r}; the sweeps in experiments/sweeps/ are "
                     f"{', '.join(names)}")
  spec = importlib.util.spec_from_file_location(
      f"_sweep_{abs(hash(os.path.abspath(path)))}", path)
  if spec is None or spec.loader is None:
    raise SweepError(f"sweep file {path!r} is not a Python file (sweeps are .py files "
                     "defining get_sweep())")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path!r} defines no get_sweep()")
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep")
  return sweep
