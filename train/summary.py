"""The end-of-run summary: what was trained, how well, how fast, where it is, how to sample."""

from __future__ import annotations

import math
import os
import shlex
from typing import Any

from model.lora import LoraCount


def _shell_quote(text: str) -> str:
  """A shell word for `text`; newlines and tabs as bash's $'...' escapes."""
  if text.isprintable():
    return shlex.quote(text)
  return "$'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def sample_command(workdir: str, prompt: str) -> str:
  rel = os.path.relpath(workdir)
  shown = workdir if rel.startswith("..") else rel
  return f"python -m sample --workdir={shlex.quote(shown)} --prompt={_shell_quote(prompt)}"


def _fmt(value, spec: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec)


def format_summary(s: dict[str, Any]) -> str:
  """A few aligned lines for the console."""
  rows = [
      ("status", f"{s['status']} at step {s['step']}/{s['num_steps']} "
                 f"({_fmt(s['tokens_seen'], ',.0f')} tokens seen)"),
      ("model", f"{s['n_params']:,} parameters ({s['n_params_non_embedding']:,} non-embedding), "
                f"vocab {s['vocab_size']}, context {s['seq_len']}"),
      ("train loss", _fmt(s["train_loss"], ".4f")),
      ("validation loss", f"{_fmt(s['val_loss'], '.4f')} nats/token "
                          f"(perplexity {_fmt(s['val_ppl'], '.2f')}, best "
                          f"{_fmt(s['best_val_loss'], '.4f')})"),
      ("bits per byte", _fmt(s["val_bpb"], ".4f")),
      ("throughput", f"{_fmt(s['tokens_per_sec'], ',.0f')} tokens/s, " + (
          f"MFU {_fmt(100 * s['mfu'] if s['mfu'] is not None else None, '.1f')}% of "
          f"{s['peak_flops'] / 1e9:.0f} GFLOP/s" if s["peak_flops"] else
          "MFU unavailable (no peak FLOP/s for this device)") + f" ({s['devices']} device(s))"),
      ("wall time", f"{s['wall_time_s']:.0f} s this session"),
      ("checkpoint", f"{s['checkpoint_dir']}/{s['checkpoint_step']}"),
      ("sample with", s["sample_command"]),
  ]
  if s.get("init_from"):  # a LoRA fine-tune: what trains, and where it started
    lora = s["lora"]
    rows[2:2] = [
        ("LoRA", f"{LoraCount(s['trainable_params'], s['total_params'])}: rank "
                 f"{lora['rank']}, alpha {lora['alpha']:g} on {', '.join(lora['targets'])}"),
        ("base model", f"{s['init_from']} step {s['init_step']}; validation loss before "
                       f"fine-tuning {_fmt(s['base_val_loss'], '.4f')}"),
    ]
  width = max(len(k) for k, _ in rows)
  lines = ["", "=" * 30 + " training summary " + "=" * 30]
  lines += [f"{k:>{width}} : {v}" for k, v in rows]
  return "\n".join(lines)
