"""int8 weight-only quantization: the arithmetic, the model running on it, the workdir format."""

import os

import jax
import numpy as np
import pytest

import model
from model import quant, store
from model.hf import convert
from tests import hf_testlib as lib
from tests.conftest import tiny_config

TOKENS = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], np.int32)


@pytest.fixture(scope="module", params=["scanned-untied", "unrolled-tied"])
def setup(request):
  if request.param == "scanned-untied":
    cfg = tiny_config(tie_embeddings=False, scan_layers=True)
  else:
    cfg = tiny_config(tie_embeddings=True, scan_layers=False, position="rope", ffn="swiglu")
  return cfg, model.init(cfg, jax.random.PRNGKey(0))


def test_per_output_channel_int8_within_half_a_step(setup):
  cfg, params = setup
  q = quant.quantize(params, embeddings=True)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  deq = dict(jax.tree_util.tree_flatten_with_path(quant.dequantize(q))[0])
  qflat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(q)[0]}
  kernels = 0
  for path, w in flat.items():
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']") or name.endswith("['embedding']"):
      kernels += 1
      scale = qflat[name[:-2] + "_scale']"]
      assert qflat[name].dtype == np.int8 and scale.dtype == np.float32
      # kernels [..., I, O]: one scale per output channel; the embedding [V, D]: one per row
      expected = (*w.shape[:-2], 1, w.shape[-1]) if "kernel" in name else (w.shape[0], 1)
      assert scale.shape == expected
      assert np.all(np.abs(np.asarray(deq[path]) - np.asarray(w)) <= scale / 2 + 1e-7)
      assert np.abs(np.asarray(qflat[name])).max() == 127  # absmax maps to 127
    else:
      np.testing.assert_array_equal(deq[path], w)  # biases, norms stay float
  assert kernels >= 2 * cfg.n_layers


def test_the_model_runs_on_int8_weights_as_on_their_dequantized_floats(setup):
  cfg, params = setup
  for embeddings in (False, True):
    q = quant.quantize(params, embeddings=embeddings)
    assert quant.is_quantized(q) and not quant.is_quantized(params)
    logits_q = np.asarray(model.apply(cfg, q, TOKENS)[0])
    logits_d = np.asarray(model.apply(cfg, quant.dequantize(q), TOKENS)[0])
    logits_f = np.asarray(model.apply(cfg, params, TOKENS)[0])
    np.testing.assert_allclose(logits_q, logits_d, atol=1e-4, rtol=1e-4)
    # and close to the float model: rounding changes logits by a little, not a lot
    assert np.abs(logits_q - logits_f).max() < 0.05 * np.abs(logits_f).max()


def test_a_quarter_of_the_memory():
  cfg = tiny_config(d_model=128, n_heads=4, vocab_size=512)
  params = model.init(cfg, jax.random.PRNGKey(0))
  ratio = quant.param_bytes(quant.quantize(params, embeddings=True)) / quant.param_bytes(params)
  assert 0.25 < ratio < 0.3, ratio


def test_bad_input_gets_one_clear_error(setup):
  cfg, params = setup
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize(quant.quantize(params))
  with pytest.raises(ValueError, match="quantize='int4'"):
    quant.check_mode("int4")


@pytest.mark.slow
def test_import_quantize_int8_writes_an_int8_workdir_that_loads_and_exports(tmp_path):
  hf_dir = lib.save(lib.hf_model("gpt2", seed=3), str(tmp_path / "hf"))
  lib.train_tokenizer(os.path.join(hf_dir, "tokenizer.json"))
  float_dir, int8_dir = str(tmp_path / "f32"), str(tmp_path / "int8")
  convert.import_to_workdir(hf_dir, float_dir)
  convert.import_to_workdir(hf_dir, int8_dir, quantize="int8")
  assert store.load_quantization(int8_dir) == {"weights": "int8", "embeddings": False}
  assert store.load_quantization(float_dir) is None
  floats, ints = store.load_params(float_dir), store.load_params(int8_dir)
  assert quant.is_quantized(ints.params) and not quant.is_quantized(floats.params)
  assert quant.param_bytes(ints.params) < 0.5 * quant.param_bytes(floats.params)
  logits_f = np.asarray(model.apply(floats.cfg, floats.params, TOKENS)[0])
  logits_q = np.asarray(model.apply(ints.cfg, ints.params, TOKENS)[0])
  assert np.abs(logits_q - logits_f).max() < 0.05 * np.abs(logits_f).max()
  out_dir = str(tmp_path / "exported")
  convert.export_workdir(int8_dir, out_dir)  # HF gets float weights back
  np.testing.assert_allclose(lib.logits(lib.reload("gpt2", out_dir), TOKENS), logits_q,
                             atol=1e-3, rtol=1e-3)
