"""The CPU XLA flags the CLIs apply (train/xla_flags.py): a device thread that reaches a
collective late (a starved core on a busy machine) must not abort the process."""

import os
import subprocess
import sys

from train import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One device's thread is held back LATE seconds before an all-reduce over two CPU devices.
LATE_ALL_REDUCE = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh, PartitionSpec as P
from train import xla_flags
xla_flags.apply()
mesh = Mesh(np.array(jax.devices()), ("d",))
def late(i):
  if int(i[0]) == 0:
    time.sleep(float(sys.argv[1]))
  return i
def body(x_B):
  i = io_callback(late, jax.ShapeDtypeStruct((1,), jnp.int32), jax.lax.axis_index("d")[None])
  return jax.lax.psum(x_B + i.astype(x_B.dtype), "d")
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P(), check_vma=False))
print("sum", float(f(jnp.ones(2))[0]))
"""


def _late_all_reduce(late_s: float, xla_flags_env: str):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_env,
         "TRANSFORMER_LAB_CPU_DEVICES": "2"}
  env.pop("TRANSFORMER_LAB_NO_XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-c", LATE_ALL_REDUCE, str(late_s)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_a_late_device_aborts_with_a_short_rendezvous_timeout_and_waits_with_ours():
  # The flag is the one that decides: at 1 s a thread 3 s late kills the process (XLA's
  # default is 40 s, which a busy laptop exceeded) ...
  short = _late_all_reduce(3, "--xla_force_host_platform_device_count=2 "
                              "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
                              "--xla_cpu_collective_call_terminate_timeout_seconds=1")
  assert short.returncode != 0 and "Termination timeout" in short.stderr, short.stderr[-2000:]
  # ... and with the flags the CLIs apply it waits and the sum is right (1 + (1 + 1)).
  ours = _late_all_reduce(3, "")
  assert ours.returncode == 0, ours.stderr[-2000:]
  assert "sum 3.0" in ours.stdout


def test_the_cli_flags_wait_long_at_collectives_and_user_flags_win():
  flags = dict(f.lstrip("-").split("=", 1) for f in xla_flags.merged("").split())
  assert int(flags["xla_cpu_collective_call_terminate_timeout_seconds"]) >= 600
  user = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
  assert xla_flags.merged(user).split().count(user) == 1
  assert "terminate_timeout_seconds=1200" not in xla_flags.merged(user)
