"""Our side of the race: a train config on the race's char data, run until it reaches L*.

  result = run_ours(config, data_dir, target=1.69, max_seconds=60)
  result["reached"], result["seconds_to_target"], result["curve"]

The model, task, optimizer, state and jitted train/eval steps are train's own
(`train.run.setup` builds the same pieces); only the data differs: nanoGPT's
uint16 char ids of `experiments.speedrun.data` (one stream, no document masking),
batches of random offsets as nanoGPT's get_batch draws them (numpy, seeded), so both
sides learn from the same text and are evaluated on the same fixed windows.

The clock runs from before the data is read to the end of each training step and
includes compilation; it stops during evaluations (device work is finished first).
Every `config.eval_every` steps the validation loss over the fixed windows is compared
with the target; the first evaluation at or below it is where we reached it.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from experiments.speedrun import data as data_lib
from model.sharding import make_mesh
from train import config_lib
from train import state as state_lib
from train.optimizer import make_optimizer, make_schedule
from train.steps import make_eval_step, make_train_step
from train.tasks import Pretrain


def _batch(inputs_BT, targets_BT) -> dict:
  """[1, B, T] arrays in the train step's layout (one micro-batch, positions 0..T-1)."""
  rows, seq_len = inputs_BT.shape
  positions_BT = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
  return {"inputs": inputs_BT[None], "targets": targets_BT[None],
          "segment_ids": np.ones((1, rows, seq_len), np.int32),
          "positions": positions_BT[None].copy(),
          "loss_mask": np.ones((1, rows, seq_len), np.float32)}


def run_ours(config: ml_collections.ConfigDict, data_dir: str, *, target: float,
             max_seconds: float, eval_rows: int = 96, log=print) -> dict:
  """Train `config` on the race data until its validation loss <= target (or time/steps
  run out); returns the curve of (training seconds, validation loss) and the outcome."""
  t0 = time.perf_counter()
  paused = 0.0
  train_ids, val_ids, offsets, meta = data_lib.load(data_dir)
  seq_len, rows = int(config.data.seq_len), int(config.batch_size)
  cfg = config_lib.model_config(config, vocab_size=meta["vocab_size"])
  mesh = make_mesh(tuple(int(s) for s in config.mesh_shape))
  task = Pretrain(cfg, document_masking=False)
  tx = make_optimizer(config.optim, config.num_steps)
  schedule = make_schedule(config.optim, config.num_steps)
  _, shardings = state_lib.state_shardings(task, tx, mesh)
  state = state_lib.create_state(task, tx, mesh, jax.random.PRNGKey(config.seed), shardings)
  train_step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
  eval_step = make_eval_step(task, mesh=mesh, params_shardings=shardings.params)
  val_in_WT, val_tgt_WT = data_lib.windows(val_ids, offsets, meta["eval_seq_len"])
  ones_V = jax.numpy.ones((cfg.vocab_size,), jax.numpy.float32)
  rng = np.random.default_rng(config.seed)

  def evaluate(params) -> float:
    loss_sum = tokens = 0.0
    for start in range(0, len(offsets), eval_rows):
      batch = _batch(val_in_WT[start:start + eval_rows], val_tgt_WT[start:start + eval_rows])
      out = eval_step(params, state_lib.put_batch(batch, mesh, len(batch["inputs"][0])),
                      ones_V)
      loss_sum += float(out["loss_sum"])
      tokens += float(out["tokens"])
    return loss_sum / tokens

  curve, reached, step, loss = [], None, 0, None
  while step < config.num_steps:
    ix = rng.integers(0, len(train_ids) - seq_len, rows)
    inputs_BT, targets_BT = data_lib.windows(train_ids, ix, seq_len)
    state, metrics = train_step(state, state_lib.put_batch(_batch(inputs_BT, targets_BT),
                                                           mesh, rows))
    step += 1
    last = step == config.num_steps
    if step % config.eval_every == 0 or last:
      loss = float(metrics["loss"])  # waits for the step: the clock stops after the work
      e0 = time.perf_counter()
      seconds = e0 - t0 - paused
      val = evaluate(state.params)
      curve.append({"step": step, "seconds": seconds, "val_loss": val, "train_loss": loss})
      log(f"  ours      step {step:5d}  {seconds:7.1f} s  val {val:.4f}  (target {target:.4f})")
      paused += time.perf_counter() - e0
      if val <= target:
        reached = curve[-1]
        break
      if seconds > max_seconds:
        break
  return {"reached": reached is not None,
          "seconds_to_target": reached["seconds"] if reached else None,
          "steps_to_target": reached["step"] if reached else None,
          "steps": step, "seconds": curve[-1]["seconds"], "final_val_loss": curve[-1]["val_loss"],
          "tokens_per_sec": step * rows * seq_len / curve[-1]["seconds"], "curve": curve,
          "model": cfg.to_dict(), "devices": jax.device_count()}
