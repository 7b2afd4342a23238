"""Logical axis names on every parameter, the rules table, meshes (8 forced CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model
from model import abstract_params, sharding
from tests import numpy_reference as ref
from tests.conftest import tiny_config

# Every weight kind at once: GQA, fused qkv and gate/up, learned positions, untied head.
FULL_CFG = tiny_config(vocab_size=64, n_kv_heads=2, ffn="swiglu", d_ff=48, fused_qkv=True,
                       fused_gate_up=True, tie_embeddings=False)
RULES = dict(sharding.LOGICAL_RULES)


def _leaves_with_paths(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]


@pytest.mark.parametrize("cfg", [FULL_CFG, tiny_config(scan_layers=False, n_layers=1),
                                 tiny_config(norm="rmsnorm", ffn="relu", position="rope")],
                         ids=["scanned-fused", "unrolled", "separate"])
def test_every_param_dimension_has_a_logical_name(cfg):
  axes = model.logical_axes(cfg)
  shapes = abstract_params(cfg)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(shapes)
  for (path, spec), shape in zip(_leaves_with_paths(axes), jax.tree.leaves(shapes), strict=True):
    assert len(spec) == len(shape.shape), path
    assert all(name in RULES for name in spec), f"{jax.tree_util.keystr(path)}: {spec}"
  if cfg.scan_layers:
    assert all(spec[0] == "layers" for path, spec in _leaves_with_paths(axes["layers"]))


def test_known_names_of_key_params():
  axes = model.logical_axes(FULL_CFG)
  assert axes["embed"]["embedding"] == P("vocab", "embed")
  assert axes["lm_head"]["kernel"] == P("embed", "vocab")
  assert axes["layers"]["attn"]["qkv"]["kernel"] == P("layers", "embed", "qkv")
  assert axes["layers"]["attn"]["o"]["kernel"] == P("layers", "heads", "embed")
  assert axes["layers"]["mlp"]["gate_up"]["kernel"] == P("layers", "embed", "mlp")
  assert axes["layers"]["mlp"]["down"]["kernel"] == P("layers", "mlp", "embed")
  sep = model.logical_axes(tiny_config(n_kv_heads=2))
  assert sep["layers"]["attn"]["k"]["kernel"] == P("layers", "embed", "kv_heads")
  assert sep["layers"]["attn"]["q"]["kernel"] == P("layers", "embed", "heads")


def _expected(spec, shape, mesh):
  """The LOGICAL_RULES table read by hand: name -> mesh axis, replicated if it does not divide."""
  out = []
  for name, dim in zip(spec, shape, strict=True):
    axis = RULES[name]
    out.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
  return P(*out)


@pytest.mark.parametrize("cfg", [FULL_CFG, tiny_config(d_ff=51, n_kv_heads=1, head_dim=5)],
                         ids=["divisible", "non-divisible"])
def test_param_shardings_follow_the_rules_table(cfg):
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(cfg, mesh)
  axes = model.logical_axes(cfg)
  shapes = abstract_params(cfg)
  for (path, spec), shape, sh in zip(_leaves_with_paths(axes), jax.tree.leaves(shapes),
                                     jax.tree.leaves(shardings), strict=True):
    assert sh.mesh == mesh
    assert tuple(sh.spec) == tuple(_expected(spec, shape.shape, mesh)), jax.tree_util.keystr(path)


def test_concrete_shardings_on_a_2x2x2_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  divisible = sharding.param_shardings(FULL_CFG, mesh)
  assert divisible["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert divisible["layers"]["attn"]["qkv"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert divisible["layers"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert divisible["lm_head"]["kernel"].spec == P("fsdp", "tensor")
  gqa = sharding.param_shardings(tiny_config(n_kv_heads=2, scan_layers=False), mesh)
  assert gqa["layers_1"]["attn"]["k"]["kernel"].spec == P("fsdp", "tensor")
  assert gqa["layers_1"]["attn"]["o"]["kernel"].spec == P("tensor", "fsdp")
  assert gqa["layers_1"]["attn_norm"]["scale"].spec == P("fsdp")
  assert gqa["pos_embedding"].spec == P(None, "fsdp")
  # vocab 61, d_ff 51 and K H = 5 are odd: those dimensions are replicated.
  odd = sharding.param_shardings(tiny_config(d_ff=51, n_kv_heads=1, head_dim=5), mesh)
  assert odd["embed"]["embedding"].spec == P(None, "fsdp")
  assert odd["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", None)
  assert odd["layers"]["attn"]["k"]["kernel"].spec == P(None, "fsdp", None)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


def test_sharded_forward_equals_single_device():
  cfg = FULL_CFG
  params = ref.random_params(abstract_params(cfg))
  tokens_BT = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 8))
  apply = jax.jit(model.apply, static_argnums=0)
  expected = np.asarray(apply(cfg, params, tokens_BT)[0])
  mesh = sharding.make_mesh((2, 2, 2))
  placed = jax.device_put(params, sharding.param_shardings(cfg, mesh))
  assert placed["layers"]["mlp"]["gate_up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  tokens = jax.device_put(tokens_BT, sharding.batch_sharding(mesh))
  logits = apply(cfg, placed, tokens)[0]
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sharding.make_mesh().axis_names == ("data", "fsdp", "tensor")
  for shape, words in [((2, 2), "3 entries"), ((-1, -1, 2), "at most one -1"),
                       ((0, 2, 2), "positive"), ((-1, 3, 1), "does not divide"),
                       ((2, 2, 1), "needs 4 devices")]:
    with pytest.raises(ValueError, match=words):
      sharding.make_mesh(shape)
