"""The lm-evaluation-harness adapter (experiments/lm_eval.py), offline.

A tiny random GPT-2 is saved with a locally trained tokenizer, imported into a
workdir, and evaluated on three tasks defined here over local JSONL files (one
per request type): through the adapter and through lm-eval's own Hugging Face
backend, which must agree request by request.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
task_lib = pytest.importorskip("lm_eval.tasks")
transformers = pytest.importorskip("transformers")

from experiments import lm_eval as adapter  # noqa: E402
from model.hf.convert import import_to_workdir  # noqa: E402
from tests import hf_testlib as lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    ("The capital of France is", [" Paris.", " Rome.", " the dog."], 0),
    ("The capital of Italy is", [" Paris.", " Rome.", " the fox."], 1),
    ("The quick brown fox jumps over the", [" lazy dog.", " question.", " Rome."], 0),
    ("To be, or not to be, that is the", [" fox.", " question.", " capital."], 1),
    ("Paris is in France and Rome is in", [" Italy.", " France.", " the dog."], 0),
    ("", [" To be.", " Paris."], 1),  # an empty context: scored after the start token
]
STOP = "</s>"  # one token of the tiny tokenizer (seed 0's model emits it in some rows, not all)
DOCS = [" ".join(lib.CORPUS[i:i + 5]) for i in range(4)]  # longer than the 64-token context
TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                 "doc_to_target": "{{choices[answer]}}",
                 "generation_kwargs": {"until": [STOP], "max_gen_toks": 12, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                 "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
}


@pytest.fixture(scope="module", autouse=True)
def offline():
  """No network (before the module's other fixtures: autouse runs first within a scope)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(HF model directory, imported workdir, task directory)."""
  root = tmp_path_factory.mktemp("lm_eval")
  hf_dir = lib.save(lib.hf_model("gpt2", seed=0), str(root / "gpt2"))
  lib.train_tokenizer(str(root / "tok" / "tokenizer.json"))
  # lm-eval's HF backend reads the tokenizer with AutoTokenizer: a tokenizer_config.json too
  transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(root / "tok" / "tokenizer.json"), bos_token="<|endoftext|>",
      eos_token="<|endoftext|>").save_pretrained(hf_dir)
  workdir = str(root / "workdir")
  import_to_workdir(hf_dir, workdir)
  tasks = root / "tasks"
  tasks.mkdir()
  data = {"tiny_mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
          "tiny_ppl": [{"text": d} for d in DOCS]}
  data["tiny_gen"] = data["tiny_mc"][:5]
  for name, config in TASKS.items():
    path = tasks / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data[name]))
    # JSON is YAML: the task file lm-eval's TaskManager finds under include_path
    (tasks / f"{name}.yaml").write_text(json.dumps({
        "task": name, "dataset_path": "json", "dataset_kwargs": {
            "data_files": {"test": str(path)}, "cache_dir": str(root / "datasets")},
        "test_split": "test", **config}))
  return hf_dir, workdir, str(tasks)




def responses(results, task):
  """Each request's raw response, in document then request order."""
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [r[0] for s in samples for r in s["resps"]]


@pytest.fixture(scope="module")
def both(setup):
  """lm-eval's results through the HF backend and through the adapter."""
  hf_dir, workdir, tasks = setup
  manager = task_lib.TaskManager(include_path=tasks, include_defaults=False)
  hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf_dir, "device": "cpu"},
                               tasks=list(TASKS), task_manager=manager, batch_size=1,
                               bootstrap_iters=0, log_samples=True)
  ours = adapter.evaluate(workdir, list(TASKS), include_path=tasks, include_defaults=False,
                          batch_size=4, log_samples=True)
  return hf, ours


def test_loglikelihoods_match_lm_evals_hf_backend(both):
  hf, ours = both
  hf_ll, our_ll = responses(hf, "tiny_mc"), responses(ours, "tiny_mc")
  assert len(our_ll) == sum(len(c) for _, c, _ in QUESTIONS)
  np.testing.assert_allclose([ll for ll, _ in our_ll], [ll for ll, _ in hf_ll], atol=1e-4)
  assert [g for _, g in our_ll] == [g for _, g in hf_ll]
  assert ours["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
  # a random model: the scores differ between choices, so the comparison has teeth
  assert np.ptp([ll for ll, _ in our_ll]) > 1.0


@pytest.fixture(scope="module")
def lm(setup):
  return adapter.make_lm(setup[1], batch_size=2)


def test_rolling_loglikelihood_matches_over_several_windows(both, lm):
  hf, ours = both
  tokens = [len(lm.tok_encode(d)) for d in DOCS]
  assert min(tokens) > 64  # each document spans more than one window of the model's context
  np.testing.assert_allclose(responses(ours, "tiny_ppl"), responses(hf, "tiny_ppl"), atol=1e-4)
  np.testing.assert_allclose(ours["results"]["tiny_ppl"]["word_perplexity,none"],
                             hf["results"]["tiny_ppl"]["word_perplexity,none"], rtol=1e-5)


def test_generate_until_matches_and_stops_at_until(both, lm):
  hf, ours = both
  texts = responses(ours, "tiny_gen")
  assert texts == responses(hf, "tiny_gen")
  assert all(STOP not in t for t in texts) and len(set(texts)) > 1
  full = generate(lm, [q for q, _, _ in QUESTIONS[:5]], until=[], max_gen_toks=12)
  assert [t.split(STOP)[0] for t in full] == texts and full != texts  # some rows were cut


def generate(lm, contexts, **gen_kwargs):
  from lm_eval.api.instance import Instance

  return lm.generate_until([Instance("generate_until", {}, (c, {"do_sample": False, **gen_kwargs}),
                                     i) for i, c in enumerate(contexts)])


def test_generate_until_honors_max_gen_toks_and_multi_token_stop_strings(lm):
  contexts = [q for q, _, _ in QUESTIONS[:3]]
  free = generate(lm, contexts, until=[], max_gen_toks=10)
  assert all(0 < len(lm.tok_encode(t)) <= 10 for t in free), free
  assert generate(lm, contexts, until=[], max_gen_toks=3) == [  # a prefix of the same decode
      lm.tok_decode(lm.tok_encode(t)[:3]) for t in free]
  # a stop string of several tokens, from inside the first completion: cut there, every row
  text = free[0]
  stop = next(text[i:i + 3] for i in range(1, len(text) - 3)
              if len(lm.tok_encode(text[i:i + 3])) > 1)
  cut = generate(lm, contexts, until=[stop], max_gen_toks=10)
  assert cut == [t.split(stop)[0] for t in free] and cut[0] != free[0]


def test_registered_by_name_and_bad_model_args_are_one_line(setup):
  from lm_eval.api.registry import get_model

  cls = adapter.adapter_class()
  assert get_model(adapter.MODEL_NAME) is cls  # simple_evaluate(model="transformer-lab", ...)
  lm = cls.create_from_arg_string(f"workdir={setup[1]},batch_size=3", {"device": "cpu"})
  assert lm.batch_size == 3 and lm.max_length == 64
  with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['temperature'\]"):
    cls.create_from_arg_string(f"workdir={setup[1]},temperature=0.5")
  with pytest.raises(ValueError, match="'auto' is not supported"):
    cls(setup[1], batch_size="auto")


@pytest.mark.slow  # two interpreters that import jax, lm-eval and transformers: ~50 s
def test_cli_writes_results_and_bad_input_is_one_line(setup, tmp_path):
  _, workdir, tasks = setup
  out = tmp_path / "results.json"
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  run = subprocess.run([sys.executable, "-m", "experiments.lm_eval", f"--workdir={workdir}",
                        "--tasks=tiny_mc", f"--include_path={tasks}", "--batch_size=2",
                        "--limit=3", f"--output={out}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "tiny_mc" in run.stdout and "acc" in run.stdout
  saved = json.loads(out.read_text())
  assert 0.0 <= saved["results"]["tiny_mc"]["acc,none"] <= 1.0
  bad = subprocess.run([sys.executable, "-m", "experiments.lm_eval", f"--workdir={workdir}",
                        "--tasks=no_such_task", f"--include_path={tasks}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "error: unknown task(s) ['no_such_task']" in bad.stderr


def test_missing_lm_eval_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
  with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
    adapter.require_lm_eval()
