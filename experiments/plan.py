"""Memory plan of a training run: what each device holds, before any accelerator is rented.

  python -m experiments.plan --preset=phi3-mini --mesh=1,8,1 --batch=8 --seq_len=1024 \
      --remat=full --dtype=bfloat16 --hbm=16GiB
  python -m experiments.plan --preset=gpt2-small --mesh=1,-1,1 --devices=64 --batch=512 \
      --seq_len=1024 --grad_accum=8 --remat=dots --dtype=bfloat16 --hbm=95GiB
      # train/configs/gpt2_small.py on a 64-chip slice, planned on one CPU

The real train step (`train.steps.make_train_step`: the jit training runs, with its
in/out shardings and the donated state) is lowered and compiled ahead of time on
forced CPU devices, one per mesh position, for abstract arguments
(jax.ShapeDtypeStruct; the state's shapes and shardings come from
`train.state.state_shardings`, one trace of init): no weight is allocated. Printed
per device:

  parameters, optimizer state   from the state's shardings (exact)
  arguments, outputs, aliased, temporaries   the compiled executable's memory_analysis()
  collectives                   all-gather, reduce-scatter, all-reduce, all-to-all and
                                collective-permute instructions in its HLO (an op inside
                                the layers' scan runs once per layer)
  needed = arguments + outputs - aliased + temporaries (the donated state's outputs reuse
           its buffers), and with --hbm whether that fits, with the headroom.

The state and argument bytes are what a TPU or GPU holds too. Temporaries are the
CPU compiler's: an accelerator's compiler fuses and schedules differently, and its
attention kernel ('auto': splash, cuDNN) is not the chunked one a CPU runs, so
take them as an estimate. The optimizer is the default config's AdamW (two float32
moments per parameter).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import model
from model.sharding import make_mesh
from train import state as state_lib
from train import xla_flags
from train.configs import default
from train.optimizer import make_optimizer, make_schedule
from train.steps import make_train_step
from train.tasks import Pretrain

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", None, f"Model preset: one of {sorted(model.PRESETS)}.")
flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes; one may be -1 (the rest).")
flags.DEFINE_integer("devices", 0, "Devices to plan for (0: the product of --mesh).")
flags.DEFINE_integer("batch", 8, "Global batch rows per optimizer step.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
flags.DEFINE_integer("grad_accum", 1, "Gradient-accumulation micro-batches per step.")
flags.DEFINE_string("remat", None, "ModelConfig.remat (default: the preset's).")
flags.DEFINE_string("dtype", None, "ModelConfig.dtype, the compute dtype (default: the "
                    "preset's); parameters and optimizer state stay param_dtype (float32).")
flags.DEFINE_string("attention_impl", "chunked", "ModelConfig.attention_impl compiled on CPU.")
flags.DEFINE_string("hbm", None, "Memory per device, e.g. 16GiB, 80GB, 95e9: say if it fits.")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10,
          "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
GiB = 2 ** 30


class PlanError(ValueError):
  """A bad request: the message is the one line the CLI prints."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device of one compiled train step (see the module docstring)."""

  mesh: dict[str, int]
  state_bytes_total: int     # params + optimizer state, all devices together (unsharded)
  params_bytes: int          # per device, from the shardings
  opt_state_bytes: int       # per device
  argument_bytes: int        # per device, memory_analysis(): state + batch
  output_bytes: int
  alias_bytes: int           # outputs that reuse donated argument buffers
  temp_bytes: int
  collectives: dict[str, int]

  @property
  def needed_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def parse_mesh(text: str, devices: int = 0) -> tuple[int, int, int]:
  """'1,8,1' (one entry may be -1) -> (data, fsdp, tensor), checked against `devices`
  (0: the product)."""
  try:
    shape = [int(s) for s in text.split(",")]
  except ValueError:
    shape = []
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise PlanError(f"--mesh={text!r}: expected three sizes data,fsdp,tensor (positive, one may "
                    "be -1), e.g. --mesh=1,8,1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if devices <= 0 or devices % known:
      raise PlanError(f"--mesh={text}: -1 needs --devices, a multiple of {known}"
                      + (f" (got {devices})" if devices > 0 else ""))
    shape[shape.index(-1)] = devices // known
  if devices and math.prod(shape) != devices:
    raise PlanError(f"--mesh={text} spans {math.prod(shape)} devices, not --devices={devices}")
  return tuple(shape)


def parse_bytes(text: str) -> int:
  """'16GiB', '80GB', '95e9', '512 MiB' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
  if not m or m.group(2) not in _UNITS:
    raise PlanError(f"--hbm={text!r}: expected a size such as 16GiB, 80GB or 95e9")
  return int(float(m.group(1)) * _UNITS[m.group(2)])


def per_device_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs placed by `shardings`."""
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))


def total_bytes(abstract) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions in an HLO module's text, by kind (async pairs counted once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def abstract_batch(batch: int, seq_len: int, accum: int = 1) -> dict:
  """The loader's batch [A, B/A, T] (train/packing.py dtypes) as ShapeDtypeStructs."""
  shape = (accum, batch // accum, seq_len)
  return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
          "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
          "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
          "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
          "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}


def compile_step(cfg, mesh, *, batch: int, seq_len: int, accum: int = 1):
  """(abstract state, its shardings, the compiled train step) of `cfg` on `mesh`."""
  rows = batch // accum
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % accum or rows % dp:
    raise PlanError(f"--batch={batch} / --grad_accum={accum} must be whole rows that divide over "
                    f"the {dp} data-parallel devices of mesh {dict(mesh.shape)}")
  if cfg.position == "learned" and seq_len > cfg.max_seq_len:
    raise PlanError(f"--seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  optim = default.get_config().optim
  tx, schedule = make_optimizer(optim, 1000), make_schedule(optim, 1000)
  task = Pretrain(cfg)
  abstract, shardings = state_lib.state_shardings(task, tx, mesh)
  step = make_train_step(task, tx, schedule, mesh=mesh, shardings=shardings)
  compiled = step.lower(abstract, abstract_batch(batch, seq_len, accum)).compile()
  return abstract, shardings, compiled


def plan(cfg, mesh, *, batch: int, seq_len: int, accum: int = 1) -> Plan:
  """Compile `cfg`'s train step on `mesh` for abstract arguments and measure it."""
  abstract, shardings, compiled = compile_step(cfg, mesh, batch=batch, seq_len=seq_len,
                                               accum=accum)
  mem = compiled.memory_analysis()
  return Plan(
      mesh=dict(mesh.shape),
      state_bytes_total=total_bytes((abstract.params, abstract.opt_state)),
      params_bytes=per_device_bytes(abstract.params, shardings.params),
      opt_state_bytes=per_device_bytes(abstract.opt_state, shardings.opt_state),
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      collectives=count_collectives(compiled.as_text()))


def verdict(p: Plan, hbm_bytes: int) -> str:
  """One line: does the step fit `hbm_bytes` per device, and by how much."""
  room = hbm_bytes - p.needed_bytes
  return (f"fits {hbm_bytes / GiB:.2f} GiB per device: {'YES' if room >= 0 else 'NO'}, "
          f"{'headroom' if room >= 0 else 'short by'} {abs(room) / GiB:.2f} GiB "
          f"(needs {p.needed_bytes / GiB:.2f} GiB)")


def report(p: Plan, title: str, hbm_bytes: int | None = None) -> str:
  shards = math.prod(p.mesh[a] for a in ("fsdp", "tensor"))
  rows = [("state (params + optimizer), all devices", p.state_bytes_total),
          ("per device: parameters", p.params_bytes),
          ("            optimizer state", p.opt_state_bytes),
          (f"            all state / {shards} (fsdp x tensor)", p.state_bytes_total / shards),
          ("            arguments (state + batch)", p.argument_bytes),
          ("            outputs", p.output_bytes),
          ("            of which reuse donated args", p.alias_bytes),
          ("            temporaries", p.temp_bytes),
          ("            needed", p.needed_bytes)]
  width = max(len(label) for label, _ in rows)
  lines = [f"{title}; mesh {p.mesh} ({math.prod(p.mesh.values())} devices)"]
  lines += [f"{label:<{width}} : {n / GiB:8.3f} GiB" for label, n in rows]
  lines.append("collectives in the HLO: " + ", ".join(f"{k} {v}"
                                                      for k, v in p.collectives.items()))
  if hbm_bytes is not None:
    lines.append(verdict(p, hbm_bytes))
  return "\n".join(lines)


def _request():
  """The CLI's flags, checked before JAX starts: (mesh shape, ModelConfig, hbm bytes)."""
  if not FLAGS.preset:
    raise PlanError(f"--preset is required: one of {sorted(model.PRESETS)}")
  shape = parse_mesh(FLAGS.mesh, FLAGS.devices)
  hbm = parse_bytes(FLAGS.hbm) if FLAGS.hbm else None
  overrides = {k: v for k, v in (("remat", FLAGS.remat), ("dtype", FLAGS.dtype),
                                 ("attention_impl", FLAGS.attention_impl)) if v}
  try:
    cfg = model.get_preset(FLAGS.preset, **overrides)
  except ValueError as e:
    raise PlanError(str(e).splitlines()[0]) from e
  return shape, cfg, hbm


def main(argv):
  del argv
  try:
    shape, cfg, hbm = _request()
    # One CPU device per mesh position (replacing any count in XLA_FLAGS); XLA reads this
    # once, when the backend starts.
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                                     os.environ.get("XLA_FLAGS", ""))
    xla_flags.apply((f"--xla_force_host_platform_device_count={math.prod(shape)}",))
    jax.config.update("jax_platforms", "cpu")
    mesh = make_mesh(shape)
    p = plan(cfg, mesh, batch=FLAGS.batch, seq_len=FLAGS.seq_len, accum=FLAGS.grad_accum)
  except ValueError as e:  # PlanError, and the mesh or model config refusing
    print(f"error: {e}", file=sys.stderr)
    return 1
  title = (f"{FLAGS.preset}, batch {FLAGS.batch} x {FLAGS.seq_len}"
           f"{f' in {FLAGS.grad_accum} micro-batches' if FLAGS.grad_accum > 1 else ''}, "
           f"remat {cfg.remat}, compute {cfg.dtype}, params {cfg.param_dtype}, "
           f"attention {cfg.attention_impl}")
  print(report(p, title, hbm))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
