"""Command line: Hugging Face model directory <-> workdir.

  python -m model.hf import --hf_dir=PATH_OR_HUB_ID --workdir=runs/NAME [--dtype=bfloat16]
      [--tokenizer=PATH] [--set attention_impl=chunked] [--quantize=int8] [--overwrite]
  python -m model.hf export --workdir=runs/NAME --out_dir=PATH [--step=N]
      [--architecture=LlamaForCausalLM] [--dtype=bfloat16] [--max_shard_size=5GB] [--overwrite]

Bad input (a missing or malformed file, an unsupported model, a hub id that is
neither reachable nor cached, a workdir or out_dir already in use) prints one
`error: ...` line and exits with status 1.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from model import store
from model.config import parse_field_overrides
from model.counting import count_params
from model.hf import CheckpointError, UnsupportedModelError, convert
from model.hf.safetensors_io import DEFAULT_MAX_SHARD_SIZE

COMMANDS = ("import", "export")

flags.DEFINE_string("hf_dir", None, "import: the Hugging Face model directory to read, or a "
                    "hub id (meta-llama/Llama-3.2-1B): downloaded, or taken from the local HF "
                    "cache when the hub is unreachable or HF_HUB_OFFLINE=1.")
flags.DEFINE_string("workdir", None, "The workdir to write (import) or read (export).")
flags.DEFINE_string("out_dir", None, "export: the Hugging Face model directory to write.")
flags.DEFINE_string("dtype", None, "Parameter (and compute) dtype: float32 (default on import), "
                    "bfloat16, float16; on export the tensors' dtype (default: the params').")
flags.DEFINE_string("tokenizer", None, "import: a tokenizer.json / tokenizer.model (or a "
                    "directory holding one) to use instead of the model directory's.")
flags.DEFINE_multi_string("set", [], "import: override a ModelConfig field, e.g. "
                          "--set attention_impl=chunked --set scan_layers=false.")
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "import: store the matmul weights as "
                  "int8 with float32 per-output-channel scales (a quarter of the memory).")
flags.DEFINE_bool("overwrite", False, "import: replace a model already in --workdir; export: "
                  "write into a non-empty --out_dir.")
flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
flags.DEFINE_string("architecture", None, "export: GPT2LMHeadModel, LlamaForCausalLM, "
                    "MistralForCausalLM, Phi3ForCausalLM or Qwen2ForCausalLM (default: chosen "
                    "from the config).")
flags.DEFINE_string("max_shard_size", DEFAULT_MAX_SHARD_SIZE, "export: largest safetensors "
                    "shard, e.g. 5GB or 200MB.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m model.hf {{{'|'.join(COMMANDS)}}} --flags...; "
                         f"got {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
    store.quiet_orbax_errors()  # a damaged checkpoint is one line of ours
  try:
    return _run(argv[1])
  # Bad input: say what, no trace. CheckpointError and UnsupportedModelError are ValueErrors
  # (named for the reader); OSError covers FileExistsError, FileNotFoundError, PermissionError.
  except (CheckpointError, UnsupportedModelError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _run(command: str) -> int:
  if command == "import":
    if not FLAGS.hf_dir or not FLAGS.workdir:
      raise app.UsageError("import needs --hf_dir and --workdir")
    cfg = convert.import_to_workdir(FLAGS.hf_dir, FLAGS.workdir, dtype=FLAGS.dtype,
                                    tokenizer_path=FLAGS.tokenizer, overwrite=FLAGS.overwrite,
                                    quantize=FLAGS.quantize,
                                    **parse_field_overrides(FLAGS.set))
    print(f"imported {FLAGS.hf_dir} -> {FLAGS.workdir} ({count_params(cfg).total:,} params)")
    return 0
  if not FLAGS.workdir or not FLAGS.out_dir:
    raise app.UsageError("export needs --workdir and --out_dir")
  if FLAGS.set:
    raise app.UsageError("--set applies to import only")
  arch = convert.export_workdir(FLAGS.workdir, FLAGS.out_dir, step=FLAGS.step,
                                architecture=FLAGS.architecture, dtype=FLAGS.dtype,
                                max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite)
  print(f"exported {FLAGS.workdir} -> {FLAGS.out_dir} as {arch}")
  return 0


if __name__ == "__main__":
  app.run(main)
