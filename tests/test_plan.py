"""The memory planner (experiments/plan.py) on 8 forced CPU devices: sharded state is exactly
its share per device, tensor parallelism splits heads and the FFN, the HBM verdict flips at
the bytes needed, bad meshes are one error line."""

import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

import model
from experiments import plan as plan_lib
from model.sharding import make_mesh
from tests.conftest import tiny_config
from train import state as state_lib
from train.optimizer import make_optimizer
from train.tasks import Pretrain

# Every matrix dimension divides by 8, so each weight is split over any 8-device axis; no
# biases (the FFN's and heads' would be whole on an fsdp axis).
CFG = tiny_config(vocab_size=256, d_model=256, n_heads=8, d_ff=1024, max_seq_len=32,
                  position="rope", norm="rmsnorm", ffn="swiglu", attn_bias=False,
                  mlp_bias=False, attention_impl="chunked", attn_chunk_size=16)
BATCH, T = 8, 32
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module", params=[(1, 8, 1), (1, 1, 8)], ids=["fsdp", "tensor"])
def sharded(request):
  return plan_lib.plan(CFG, make_mesh(request.param), batch=BATCH, seq_len=T)


def test_each_device_holds_its_share_of_the_state(sharded):
  p = sharded
  share = p.state_bytes_total / 8
  state = p.params_bytes + p.opt_state_bytes
  # Only norm gains (on a tensor mesh) and scalar counts are whole on every device: < 1%.
  assert state == pytest.approx(share, rel=0.01)
  assert p.opt_state_bytes == pytest.approx(2 * p.params_bytes, rel=0.01)  # AdamW's mu, nu
  # The compiled executable's arguments are that state plus this device's rows of the batch.
  dp = p.mesh["data"] * p.mesh["fsdp"]
  batch_bytes = 5 * 4 * BATCH // dp * T
  assert state + batch_bytes <= p.argument_bytes <= state + batch_bytes + 64
  assert p.alias_bytes >= state  # the donated state is updated in place
  assert sum(p.collectives.values()) > 0  # a sharded step communicates


def test_a_tensor_mesh_splits_attention_heads_and_the_ffn_hidden_axis():
  mesh = make_mesh((1, 2, 4))
  tx = make_optimizer(plan_lib.default.get_config().optim, 1000)
  abstract, shardings = state_lib.state_shardings(Pretrain(CFG), tx, mesh)
  layers = shardings.params["layers"]
  attn, mlp = layers["attn"], layers["mlp"]
  # Stacked [L, in, out] kernels: q/k/v's outputs are the heads (N x H), o's inputs; the FFN's
  # hidden axis F is up's and gate's output, down's input. 'tensor' splits exactly those.
  axes = model.logical_axes(CFG)["layers"]
  assert axes["attn"]["q"]["kernel"] == P("layers", "embed", "heads")
  assert axes["mlp"]["down"]["kernel"] == P("layers", "mlp", "embed")
  for name in ("q", "k", "v"):
    assert attn[name]["kernel"].spec == P(None, "fsdp", "tensor"), name
  assert attn["o"]["kernel"].spec == P(None, "tensor", "fsdp")
  for name in ("up", "gate"):
    assert mlp[name]["kernel"].spec == P(None, "fsdp", "tensor"), name
  assert mlp["down"]["kernel"].spec == P(None, "tensor", "fsdp")
  shape = abstract.params["layers"]["mlp"]["up"]["kernel"].shape
  assert mlp["up"]["kernel"].shard_shape(shape) == (2, 256 // 2, 1024 // 4)
  mu = shardings.opt_state[1][0].mu["layers"]  # AdamW's first moment sits with its parameter
  assert mu["attn"]["q"]["kernel"].spec == attn["q"]["kernel"].spec
  assert mu["mlp"]["down"]["kernel"].spec == mlp["down"]["kernel"].spec


def test_the_verdict_flips_at_the_bytes_needed(sharded):
  need = sharded.needed_bytes
  assert need == (sharded.argument_bytes + sharded.output_bytes - sharded.alias_bytes
                  + sharded.temp_bytes) > 0
  assert ": YES, headroom 0.00 GiB" in plan_lib.verdict(sharded, need + 1)
  assert ": YES" in plan_lib.verdict(sharded, need)
  assert ": NO, short by 0.00 GiB" in plan_lib.verdict(sharded, need - 1)


def test_sizes_and_meshes_parse_or_fail_with_one_line():
  assert plan_lib.parse_bytes("16GiB") == 16 * 2 ** 30
  assert plan_lib.parse_bytes("80GB") == 80 * 10 ** 9
  assert plan_lib.parse_bytes("95e9") == 95 * 10 ** 9
  assert plan_lib.parse_mesh("1,8,1") == (1, 8, 1)
  assert plan_lib.parse_mesh("2,-1,2", devices=16) == (2, 4, 2)
  for text, devices, words in [("1,8", 0, "three sizes"), ("1,x,1", 0, "three sizes"),
                               ("1,0,8", 0, "three sizes"), ("1,-1,-1", 8, "three sizes"),
                               ("1,4,1", 8, "spans 4 devices, not --devices=8"),
                               ("1,-1,3", 8, "a multiple of 3"), ("1,-1,1", 0, "needs --devices")]:
    with pytest.raises(plan_lib.PlanError, match=words):
      plan_lib.parse_mesh(text, devices)
  with pytest.raises(plan_lib.PlanError, match="--hbm='lots'"):
    plan_lib.parse_bytes("lots")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.plan", *args], env=ENV,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, line", [
    (("--mesh=1,8",), "--mesh='1,8': expected three sizes data,fsdp,tensor"),
    (("--mesh=1,3,1", "--devices=8"), "--mesh=1,3,1 spans 3 devices, not --devices=8"),
    (("--mesh=1,8,1", "--preset=gpt3"), "unknown preset 'gpt3'")])
def test_a_bad_request_is_one_error_line(args, line):
  result = _cli("--preset=nanogpt-baby", *args)
  assert result.returncode == 1
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert result.stderr.startswith(f"error: {line}"), result.stderr


@pytest.mark.slow
def test_the_command_plans_a_preset_on_its_own_forced_devices():
  result = _cli("--preset=nanogpt-baby", "--mesh=1,2,2", "--batch=4", "--seq_len=64",
                "--hbm=1GiB")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2} (4 devices)" in out
  assert "collectives in the HLO: all-gather" in out
  assert "fits 1.00 GiB per device: YES" in out
