"""Text in, text out: the Generator built from a workdir, streaming (incl. multi-byte UTF-8 and
stop strings), the next-token view and the CLI in a subprocess."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import model
from model import lora as lora_lib
from model import quant, store
from model.store import ByteTokenizer, save_params, write_config
from sample.distribution import prompt_logits
from sample.generator import Generator, _Detokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = model.ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_seq_len=96,
                        init_std=0.3)


def make_workdir(path, cfg=CFG, lora=False):
  """A workdir as training writes it: config.json + byte tokenizer + a params checkpoint."""
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  adapters = None
  if lora:
    adapters = jax.jit(model.init_lora, static_argnums=0)(cfg, jax.random.PRNGKey(1))
    adapters = jax.tree.map(lambda x: x + 0.3, adapters)  # B = 0 at init would be a no-op
  write_config(str(path), cfg, ByteTokenizer())
  save_params(str(path), params, step=7, lora=adapters)
  return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def gen(workdir):
  return Generator.from_workdir(workdir)


def test_generate_text_from_a_workdir(gen):
  assert gen.step == 7
  one = gen.generate("Hello", max_new_tokens=12)
  assert isinstance(one, str)
  both = gen.generate(["Hello", "Hi"], max_new_tokens=12)
  assert both[0] == one and len(both) == 2
  full = gen.generate("Hello", max_new_tokens=12, return_full_text=True)
  assert full == "Hello" + one
  ids = gen.tokenizer.encode("Hello")
  from sample.engine import generate_ids
  new = generate_ids(gen.cfg, gen.params, [ids], 12, stop_ids=(gen.tokenizer.eos_id,))[0]
  assert one == gen.tokenizer.decode(new)


def test_stream_concatenates_to_generate(gen):
  kwargs = dict(max_new_tokens=30, temperature=1.0, top_k=50, seed=3)
  pieces = list(gen.stream("Once upon", chunk_size=4, **kwargs))
  assert len(pieces) > 1
  assert "".join(pieces) == gen.generate("Once upon", **kwargs)


def test_stop_strings_end_the_text(gen):
  free = gen.generate("Hello", max_new_tokens=40, temperature=1.0, seed=1)
  stop = free[5:7]  # a two-character string the free-running sample contains
  cut = gen.generate("Hello", max_new_tokens=40, temperature=1.0, seed=1, stop=stop)
  assert cut == free[:free.index(stop)]
  streamed = "".join(gen.stream("Hello", 40, temperature=1.0, seed=1, stop=[stop], chunk_size=3))
  assert streamed == cut


def test_workdir_stop_ids_end_generation(tmp_path, gen):
  """Ids recorded in config.json["source"]["stop_ids"] (an HF import) stop a row like eos."""
  from sample.engine import generate_ids
  prompt = gen.tokenizer.encode("Hello")
  free_ids = generate_ids(gen.cfg, gen.params, [prompt], 12, stop_ids=(gen.tokenizer.eos_id,))[0]
  stop = free_ids[3]
  path = make_workdir(tmp_path / "stops")
  write_config(path, CFG, ByteTokenizer(), source={"stop_ids": [stop]})
  stopped = Generator.from_workdir(path).generate("Hello", max_new_tokens=12)
  assert stopped == gen.tokenizer.decode(free_ids[:free_ids.index(stop)])
  assert stopped != gen.generate("Hello", max_new_tokens=12)


def test_detokenizer_never_splits_a_multibyte_character():
  tok = ByteTokenizer()
  text = "naïve café: 3€ 🙂 ok"
  detok = _Detokenizer(tok, tok.encode("> "))
  pieces = [detok.push([b]) for b in tok.encode(text)] + [detok.flush()]
  assert "".join(pieces) == text
  assert not any("\ufffd" in p for p in pieces)
  assert "" in pieces  # some bytes were held back until their character was complete


def test_detokenizer_holds_back_a_possible_stop_string():
  tok = ByteTokenizer()
  detok = _Detokenizer(tok, tok.encode("x"), stops=["END"])
  out = [detok.push(tok.encode(s)) for s in ["abc E", "N", "D tail"]]
  assert out == ["abc ", "", ""] and detok.stopped
  assert detok.flush() == ""


def test_top_next_tokens_is_the_softmax_of_the_last_logits(gen):
  top = gen.top_next_tokens("The capital of France is", k=5)
  logits = prompt_logits(gen.cfg, gen.params, gen.tokenizer.encode("The capital of France is"))
  assert logits.shape == (24, CFG.vocab_size)
  probs = np.exp(logits[-1] - logits[-1].max())
  probs /= probs.sum()
  order = np.argsort(-probs)[:5]
  assert [t for t, _ in top] == [gen.tokenizer.decode([int(i)]) for i in order]
  np.testing.assert_allclose([p for _, p in top], probs[order], rtol=1e-5)


def test_empty_prompt_starts_from_the_end_of_text_separator(gen):
  # Trained workdirs join documents with eos, so an unconditional sample starts after one.
  assert gen.encode("") == [ByteTokenizer.eos_id]
  assert isinstance(gen.generate("", max_new_tokens=4), str)


def test_empty_prompt_starts_from_bos_when_the_tokenizer_prepends_it(gen):
  class PrependsBos(ByteTokenizer):
    add_bos = True

  with_bos = Generator(gen.cfg, gen.params, PrependsBos())
  assert with_bos.encode("") == [ByteTokenizer.bos_id]


def test_lora_adapters_are_merged_at_load(tmp_path):
  cfg = CFG.replace(lora_rank=2, lora_targets=("q", "v"))
  path = make_workdir(tmp_path / "lora", cfg, lora=True)
  gen = Generator.from_workdir(path)
  assert gen.cfg.lora_rank == 0  # a plain model: the adapters are in the weights
  ckpt = store.restore(path, items=("params", "lora"))
  params, adapters = ckpt.items["params"], ckpt.items["lora"]
  tokens_1T = np.asarray([gen.encode("Hello")])
  adapted, _ = model.apply(cfg, params, tokens_1T, lora=adapters)
  np.testing.assert_allclose(gen.logits("Hello"), np.asarray(adapted)[0], atol=1e-4)
  base = Generator(lora_lib.without_lora(cfg), params, gen.tokenizer)
  assert not np.allclose(gen.logits("Hello"), base.logits("Hello"), atol=1e-4)
  with pytest.raises(ValueError, match="Generator takes a plain model"):
    Generator(cfg, params, gen.tokenizer)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "sample", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_streams_the_same_text_as_the_python_api(workdir, gen):
  result = run_cli(f"--workdir={workdir}", "--prompt=Hello", "--max_new_tokens=10",
                   "--temperature=0.9", "--top_p=0.95", "--seed=4", "--num_samples=2")
  assert result.returncode == 0, result.stderr
  expected = [gen.generate("Hello", 10, temperature=0.9, top_p=0.95, seed=s) for s in (4, 5)]
  assert result.stdout == (f"--- sample 1/2 (seed 4) ---\nHello{expected[0]}\n"
                           f"--- sample 2/2 (seed 5) ---\nHello{expected[1]}\n")
  assert "KV cache" in result.stderr


@pytest.mark.parametrize("which, message", [("missing", "does not exist"),
                                             ("empty", "has no config.json")])
def test_cli_explains_a_missing_or_empty_workdir(tmp_path, which, message):
  path = tmp_path / which
  if which == "empty":
    path.mkdir()
  result = run_cli(f"--workdir={path}", "--prompt=Hi")
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def draft_workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("draft"), cfg=CFG.replace(n_layers=1))


def test_generator_decodes_speculatively_with_the_same_text(workdir, draft_workdir, gen):
  expected = gen.generate(["Hello", "Hi there"], 16)
  for draft in ("prompt_lookup", draft_workdir):
    spec = Generator.from_workdir(workdir, draft=draft, draft_tokens=3)
    assert spec.generate(["Hello", "Hi there"], 16) == expected
    assert spec.last_speculation.drafted > 0
    assert "".join(spec.stream("Hello", 16, chunk_size=2)) == expected[0]
  with pytest.raises(ValueError, match="needs the KV cache"):
    spec.generate("Hello", 4, use_cache=False)


def test_generator_quantize_int8_runs_on_int8_weights(workdir):
  int8 = Generator.from_workdir(workdir, quantize="int8")
  assert quant.is_quantized(int8.params)
  assert isinstance(int8.generate("Hello", 8), str)


def test_cli_draft_and_int8_flags_report_the_acceptance(workdir, draft_workdir):
  result = run_cli(f"--workdir={workdir}", "--prompt=Hello", "--max_new_tokens=10",
                   "--temperature=0", f"--draft={draft_workdir}", "--draft_tokens=3",
                   "--quantize=int8")
  assert result.returncode == 0, result.stderr
  expected = Generator.from_workdir(workdir, quantize="int8").generate("Hello", 10)
  assert result.stdout == f"Hello{expected}\n"
  assert "int8 weights" in result.stderr and "acceptance" in result.stderr
  bad = run_cli(f"--workdir={workdir}", f"--draft={workdir}/missing")
  assert bad.returncode != 0 and "error: " in bad.stderr and "Traceback" not in bad.stderr
