"""Training throughput: tokens/s and MFU of the real train step, against a measured peak.

  python -m experiments.bench_train                       # both presets of the issue
  python -m experiments.bench_train --presets=nanogpt-baby --torch   # + PyTorch eager reference
  python -m experiments.bench_train --remat=none --attention_impl=dense   # the plain model
  python -m experiments.bench_train --presets=gpt2-small --dtype=bfloat16 --attention_impl=auto
      # an accelerator (experiments/accelerator_check.sh)

Presets and shapes (dropout 0): nanogpt-baby, batch 12 x 64 tokens;
shakespeare-char, batch 64 x 256 tokens; gpt2-small, batch 16 x 1024 tokens (for
accelerators). The step timed is the one training
uses (`train.steps.make_train_step`: AdamW, clipping, the non-finite guard,
one jit with donated state) on random tokens.

MFU = tokens/s x model.flops_per_token(cfg, T) / peak, where the peak is the
matmul rate in the compute dtype (--dtype) measured in the same process between
timing rounds (the machine is shared: each round's MFU uses the peak measured
next to it, and the load average is printed). On a TPU or GPU the step runs data
parallel over the local devices and the peak is the chip's bfloat16 spec
(train/flops.py PEAK_BF16) times their count (a chip the table lacks: its measured
matmul times the count). Recomputation (remat) is not counted as model FLOPs.

Implementation knobs (they do not change the model's math): --remat (default
'dots': keep the matmul outputs, recompute the rest of each block in the
backward pass, which on CPU beats storing the scanned layers' residuals),
--attention_impl (default 'chunked': flash-style, skips masked blocks),
--scan_layers, and the CPU XLA flags of train/xla_flags.py (YNNPACK dot and
reduce fusions, two CPU devices running half a batch each; --noxla_flags to
compare without them, TRANSFORMER_LAB_CPU_DEVICES=1 for one device).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

import model
from experiments.speedrun import nanogpt
from model import store
from model.sharding import make_mesh
from train import optimizer as optim_lib
from train import state as state_lib
from train import xla_flags
from train.configs import default
from train.flops import measure_matmul_peak, table_peak, total_peak
from train.steps import make_train_step
from train.tasks import Pretrain

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["nanogpt-baby", "shakespeare-char"], "Presets to time.")
flags.DEFINE_integer("steps", 0, "Steps per timing round (0: about 1 second per round).")
flags.DEFINE_integer("rounds", 5, "Timing rounds per preset (a peak measurement between each).")
flags.DEFINE_string("remat", "dots", "ModelConfig.remat for the timed step.")
flags.DEFINE_string("attention_impl", "chunked", "ModelConfig.attention_impl for the timed step.")
flags.DEFINE_string("dtype", "float32", "ModelConfig.dtype (compute) for the timed step and peak.")
flags.DEFINE_bool("scan_layers", True, "ModelConfig.scan_layers for the timed step.")
flags.DEFINE_bool("xla_flags", True, "Apply the CPU XLA flags of train/xla_flags.py.")
flags.DEFINE_bool("torch", False, "Also time nanoGPT's own train.py loop (PyTorch eager, "
                  "experiments/speedrun/nanogpt.py) at the same shapes.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

SHAPES = {"nanogpt-baby": (12, 64), "shakespeare-char": (64, 256), "gpt2-small": (16, 1024)}


def _load() -> str:
  return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _batch(cfg, rows, seq_len, seed=0):
  x = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, rows, seq_len + 1))
  x = x.astype(np.int32)
  return {"inputs": x[..., :-1], "targets": x[..., 1:],
          "segment_ids": np.ones((1, rows, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                       (1, rows, seq_len)).copy(),
          "loss_mask": np.ones((1, rows, seq_len), np.float32)}


def _rounds(run_steps, tokens_per_step, flops_per_step, measure_peak):
  """Timed rounds; returns per-round dicts (tokens/s, step ms, peak, MFU)."""
  warm = time.perf_counter()
  run_steps(2)
  per_step = (time.perf_counter() - warm) / 2
  steps = FLAGS.steps or max(3, int(1.0 / max(per_step, 1e-4)))
  out = []
  for _ in range(FLAGS.rounds):
    peak = measure_peak()
    t0 = time.perf_counter()
    run_steps(steps)
    dt = (time.perf_counter() - t0) / steps
    out.append({"step_ms": dt * 1e3, "tokens_per_sec": tokens_per_step / dt,
                "peak_gflops": peak / 1e9, "mfu": flops_per_step / dt / peak})
  return out


def bench_jax(name, rows, seq_len):
  cfg = model.get_preset(name, dropout_rate=0.0, attn_dropout_rate=0.0, remat=FLAGS.remat,
                         attention_impl=FLAGS.attention_impl, scan_layers=FLAGS.scan_layers,
                         dtype=FLAGS.dtype)
  ocfg = default.get_config().optim
  tx, schedule = optim_lib.make_optimizer(ocfg, 10_000), optim_lib.make_schedule(ocfg, 10_000)
  mesh = make_mesh((-1, 1, 1))  # data parallel over the local devices
  task = Pretrain(cfg, document_masking=False)
  _, shardings = state_lib.state_shardings(task, tx, mesh)
  state = state_lib.create_state(task, tx, mesh, jax.random.PRNGKey(0), shardings)
  step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
  batch = state_lib.put_batch(_batch(cfg, rows, seq_len), mesh, rows)
  holder = {"state": state}

  def run_steps(n):
    s = holder["state"]
    for _ in range(n):
      s, metrics = step(s, batch)
    jax.block_until_ready(metrics["loss"])
    holder["state"] = s

  fpt = model.flops_per_token(cfg, seq_len)
  # The step runs on every local device: on an accelerator the peak is each chip's spec
  # (train/flops.py) times their count, or each one's measured matmul when the table lacks it.
  spec = None if jax.devices()[0].platform == "cpu" else table_peak(jax.devices()[0].device_kind)
  peak = ((lambda: spec) if spec else
          (lambda: measure_matmul_peak(seconds=0.3, repeats=2, dtype=FLAGS.dtype)))
  rounds = _rounds(run_steps, rows * seq_len, fpt * rows * seq_len, lambda: total_peak(peak()))
  for r in rounds:
    r["peak_source"] = "bf16 spec" if spec else "matmul, measured"
  return cfg, fpt, rounds


def bench_torch(cfg, rows, seq_len, fpt):
  """nanoGPT's train.py in PyTorch eager (experiments/speedrun/nanogpt.py), same shapes."""
  import torch

  r = nanogpt.Recipe(n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.d_model,
                     block_size=seq_len, batch_size=rows)
  torch.manual_seed(0)
  net = nanogpt.build_gpt(cfg.vocab_size, r)
  opt = nanogpt.configure_optimizers(net, r)
  data = np.random.default_rng(0).integers(0, cfg.vocab_size, 100_000).astype(np.uint16)
  it = [0]

  def run_steps(n):
    x, y = nanogpt.get_batch(data, r)
    for _ in range(n):
      for group in opt.param_groups:
        group["lr"] = nanogpt.get_lr(it[0], r)
      _, loss = net(x, y)
      x, y = nanogpt.get_batch(data, r)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), r.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
      it[0] += 1

  def torch_peak():
    a = torch.randn(1024, 1024)
    a @ a
    best = 0.0
    for _ in range(2):
      t0 = time.perf_counter()
      for _ in range(10):
        a @ a
      best = max(best, 2 * 1024 ** 3 * 10 / (time.perf_counter() - t0))
    return best

  with torch.no_grad():
    n_torch = sum(p.numel() for p in net.parameters())
  return n_torch, _rounds(run_steps, rows * seq_len, fpt * rows * seq_len, torch_peak)


def _report(label, rounds):
  tps = [r["tokens_per_sec"] for r in rounds]
  mfu = [r["mfu"] for r in rounds]
  peaks = [r["peak_gflops"] for r in rounds]
  best = max(range(len(rounds)), key=lambda i: mfu[i])
  print(f"  {label:8s} {statistics.median(tps):9,.0f} tok/s (best {max(tps):,.0f})  "
        f"step {statistics.median(r['step_ms'] for r in rounds):7.1f} ms  "
        f"MFU {100 * statistics.median(mfu):5.1f}% median, {100 * mfu[best]:5.1f}% best  "
        f"(peak {statistics.median(peaks):.0f} GFLOP/s "
        f"{rounds[0].get('peak_source', 'matmul, measured')})", flush=True)
  return {"tokens_per_sec_median": statistics.median(tps), "tokens_per_sec_best": max(tps),
          "mfu_median": statistics.median(mfu), "mfu_best": mfu[best],
          "peak_gflops_median": statistics.median(peaks), "rounds": rounds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.xla_flags:
    xla_flags.apply()
  if FLAGS.torch:
    nanogpt.passive_openmp()  # before torch starts its OpenMP threads
  results = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": os.getloadavg(),
             "devices": str(jax.devices()[0]), "presets": {}}
  print(f"{_load()}; {os.cpu_count()} CPUs; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x {jax.device_count()} devices; remat={FLAGS.remat} "
        f"attention_impl={FLAGS.attention_impl} dtype={FLAGS.dtype} "
        f"scan_layers={FLAGS.scan_layers}; "
        f"XLA_FLAGS={results['xla_flags']!r}", flush=True)
  for name in FLAGS.presets:
    if name not in SHAPES:
      raise app.UsageError(f"unknown preset {name!r}; choose from {sorted(SHAPES)}")
    rows, seq_len = SHAPES[name]
    cfg, fpt, rounds = bench_jax(name, rows, seq_len)
    print(f"{name}: batch {rows} x {seq_len}, {fpt / 1e6:.2f} MFLOPs/token "
          f"({cfg.n_layers} layers, d={cfg.d_model}, vocab {cfg.vocab_size})", flush=True)
    entry = {"batch": [rows, seq_len], "flops_per_token": fpt, "jax": _report("jax", rounds)}
    if FLAGS.torch:
      _, torch_rounds = bench_torch(cfg, rows, seq_len, fpt)
      entry["torch"] = _report("torch", torch_rounds)
    results["presets"][name] = entry
  results["load_after"] = os.getloadavg()
  print(_load(), flush=True)
  if FLAGS.out:
    store.write_json(FLAGS.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
