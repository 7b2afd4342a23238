"""The speedrun: nanoGPT's CPU recipe in PyTorch against our config, time to the same loss.

  python -m experiments.speedrun                                  # 3 repeats, stdlib chars
  python -m experiments.speedrun --repeats=1 --corpus=input.txt   # any text (Shakespeare)
  python -m experiments.speedrun --config.optim.muon_lr=0.03      # any key of the config

Each repeat, on the same char data (experiments/speedrun/data.py) and split:
  1. the reference: nanoGPT's "baby" CPU run (experiments/speedrun/nanogpt.py: 4 layers,
     4 heads, d 128, context 64, batch 12, --reference_iters iterations of AdamW) in PyTorch
     eager, in a child process (torch's default threads, nothing of JAX's in it). Its final
     validation loss on the fixed windows is the target L*, its training time W.
  2. ours: --config (default train/configs/speedrun_char.py) until its validation loss on
     the same windows is <= L* (experiments/speedrun/race.py), or --max_seconds pass.
Both clocks include data set-up and (ours) compilation, and exclude evaluation.

Writes to --out: data/ (train.bin, val.bin, eval_offsets.npy, meta.json), report.json
(every repeat's curves and figures), report.md (the table) and curve.png (validation loss
against wall-clock seconds, both sides, every repeat). Exit status 0 whether or not L* was
reached (the report says); 1 on a bad config.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags
from matplotlib.figure import Figure

from experiments.speedrun import data as data_lib
from experiments.speedrun import nanogpt
from experiments.speedrun.race import run_ours
from model.store.files import atomic_open
from train import config_lib, xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/speedrun", "Directory of the data, report and figure.")
flags.DEFINE_string("corpus", "stdlib", "train.corpus source of the text (stdlib: no download).")
flags.DEFINE_integer("corpus_chars", 1_000_000, "Characters of the corpus to use (90/10 split).")
flags.DEFINE_integer("eval_windows", 480, "Fixed validation windows of 64 characters.")
flags.DEFINE_integer("reference_iters", 2000, "nanoGPT's max_iters (and lr_decay_iters).")
flags.DEFINE_integer("reference_eval_interval", 250, "Reference validation every N iters.")
flags.DEFINE_float("max_seconds", 600.0, "Stop our side after this much training time.")
flags.DEFINE_integer("repeats", 3, "Reference + ours pairs, run one after the other.")
flags.DEFINE_string("reference", "", "Reuse this reference_<i>.json instead of running one "
                    "(for ablations of our side: compare steps and seconds to L*).")
flags.DEFINE_bool("reference_omp_passive", True,
                  "Run the reference with OMP_WAIT_POLICY=PASSIVE unless set "
                  "(nanogpt.passive_openmp: spinning OpenMP threads on a shared machine).")

DEFAULT_CONFIG = "train/configs/speedrun_char.py"
EVAL_SEQ_LEN = 64  # the reference's context: both sides are scored on these windows
_config = None


def _parse_flags(argv):
  global _config
  ours, config_args = config_lib.split_command_line(argv)
  if not any(a.startswith("--config=") for a in config_args):
    config_args.insert(0, f"--config={DEFAULT_CONFIG}")
  try:
    rest = FLAGS(ours)
    _config = config_lib.from_command_line(config_args)
  except (flags.Error, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  return rest


def run_reference(data_dir: str, out_json: str, *, iters: int, eval_interval: int,
                  seed: int) -> dict:
  """nanoGPT's loop in a child process (so neither framework's threads disturb the other)."""
  cmd = [sys.executable, "-m", "experiments.speedrun.nanogpt", f"--data_dir={data_dir}",
         f"--out={out_json}", f"--max_iters={iters}", f"--eval_interval={eval_interval}",
         f"--seed={seed}"]
  env = dict(os.environ)
  if FLAGS.reference_omp_passive:
    nanogpt.passive_openmp(env)
  env.pop("XLA_FLAGS", None)
  subprocess.run(cmd, check=True, env=env)
  with open(out_json) as f:
    return json.load(f)


def plot(repeats: list[dict], path: str) -> None:
  fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
  ax = fig.add_subplot(1, 1, 1)
  for i, rep in enumerate(repeats):
    ref, ours = rep["reference"], rep["ours"]
    label = i == 0
    ax.plot([p["seconds"] for p in ref["curve"]], [p["val_loss"] for p in ref["curve"]],
            "o-", color="tab:blue", alpha=0.7, label="nanoGPT (PyTorch eager)" if label else None)
    ax.plot([p["seconds"] for p in ours["curve"]], [p["val_loss"] for p in ours["curve"]],
            ".-", color="tab:orange", alpha=0.7, label="ours (speedrun_char)" if label else None)
    ax.axhline(ref["final_val_loss"], color="gray", lw=0.8, ls="--",
               label="L* (reference's final loss)" if label else None)
  ax.set_xlabel("training wall-clock seconds (compilation and data set-up in, evaluation out)")
  ax.set_ylabel("validation loss (nats/char, fixed windows)")
  lo = min(r["reference"]["final_val_loss"] for r in repeats)
  ax.set_ylim(lo - 0.15, lo + 1.2)
  ax.legend()
  ax.grid(alpha=0.3)
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")


def summarize(repeats: list[dict]) -> dict:
  ratios = [r["ours"]["seconds_to_target"] / r["reference"]["seconds"] for r in repeats
            if r["ours"]["reached"]]
  speed = [r["ours"]["tokens_per_sec"] / r["reference"]["tokens_per_sec"] for r in repeats]
  out = {"repeats": len(repeats), "reached": sum(r["ours"]["reached"] for r in repeats),
         "time_ratio": ratios, "tokens_per_sec_ratio": speed}
  if ratios:
    out["time_ratio_median"] = statistics.median(ratios)
  return out


def markdown(repeats: list[dict], summary: dict, meta: dict) -> str:
  lines = [f"Corpus: {meta['source']}, {meta['chars']:,} characters, vocab "
           f"{meta['vocab_size']}, {meta['eval_windows']} validation windows of "
           f"{meta['eval_seq_len']}.", "",
           "| repeat | reference L* | reference W (s) | ours: seconds to L* | steps | ratio |",
           "|---|---|---|---|---|---|"]
  for i, r in enumerate(repeats):
    ref, ours = r["reference"], r["ours"]
    if ours["reached"]:
      ratio = f"{ours['seconds_to_target'] / ref['seconds']:.1%}"
      took = f"{ours['seconds_to_target']:.1f}"
    else:
      ratio, took = "not reached", f"> {ours['seconds']:.1f} (val {ours['final_val_loss']:.4f})"
    lines.append(f"| {i + 1} | {ref['final_val_loss']:.4f} | {ref['seconds']:.1f} | {took} | "
                 f"{ours['steps_to_target'] or ours['steps']} | {ratio} |")
  if summary.get("time_ratio"):
    ratios = summary["time_ratio"]
    lines += ["", f"Time to L*: {summary['time_ratio_median']:.1%} of the reference's wall "
              f"time (median of {len(ratios)}; range {min(ratios):.1%}-{max(ratios):.1%})."]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_flags.apply()  # before JAX starts (train/xla_flags.py)
  os.makedirs(FLAGS.out, exist_ok=True)
  data_dir = os.path.join(FLAGS.out, "data")
  meta = data_lib.write_char_data(FLAGS.corpus, data_dir, max_chars=FLAGS.corpus_chars,
                                  eval_windows=FLAGS.eval_windows, seq_len=EVAL_SEQ_LEN)
  print(f"data: {meta}", flush=True)
  repeats = []
  for i in range(FLAGS.repeats):
    print(f"repeat {i + 1}/{FLAGS.repeats}: reference (nanoGPT, PyTorch eager)", flush=True)
    if FLAGS.reference:
      with open(FLAGS.reference) as f:
        ref = json.load(f)
    else:
      ref = run_reference(data_dir, os.path.join(FLAGS.out, f"reference_{i}.json"),
                          iters=FLAGS.reference_iters,
                          eval_interval=FLAGS.reference_eval_interval, seed=1337)
    print(f"repeat {i + 1}/{FLAGS.repeats}: ours, target L* = {ref['final_val_loss']:.4f}",
          flush=True)
    ours = run_ours(_config, data_dir, target=ref["final_val_loss"],
                    max_seconds=FLAGS.max_seconds)
    repeats.append({"reference": ref, "ours": ours})
  summary = summarize(repeats)
  report = {"data": meta, "config": config_lib.to_dict(_config), "summary": summary,
            "repeats": repeats, "load_average": os.getloadavg()}
  with atomic_open(os.path.join(FLAGS.out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  table = markdown(repeats, summary, meta)
  with atomic_open(os.path.join(FLAGS.out, "report.md"), "w") as f:
    f.write(table)
  plot(repeats, os.path.join(FLAGS.out, "curve.png"))
  print(table, flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
