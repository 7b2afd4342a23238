"""EleutherAI's lm-evaluation-harness on a workdir: the model as an lm-eval `LM`.

  python -m experiments.lm_eval --workdir=runs/NAME --tasks=hellaswag,lambada_openai \
      [--include_path=DIR] [--batch_size=8] [--limit=N] [--output=results.json]

  lm = make_lm("runs/NAME", batch_size=8)             # a registered lm_eval LM subclass
  results = evaluate("runs/NAME", ["my_task"], include_path="my_tasks/", limit=100)

The adapter answers lm-eval's three request types with the project's own code:
  loglikelihood          log p(continuation | context) and whether greedy decoding would
                         produce it: one batched, right-padded `model.apply` per batch
  loglikelihood_rolling  a document's total log-likelihood over disjoint windows of the
                         model's context (lm-eval's own windowing, as its HF backend does)
  generate_until         the sampler (sample.engine: prefill into a KV cache, jitted decode
                         loop), batched, greedy unless the task samples, stopped at eos and
                         cut at the task's `until` strings, at most max_gen_toks tokens
Tokenization follows lm-eval's `TemplateLM` (the context's trailing spaces move to the
continuation; an empty context is the start token), so a model imported from Hugging Face
scores what lm-eval's HF backend scores (tests/test_lm_eval.py checks it to 1e-4).
`lm_eval` is optional: `pip install -e ".[eval]"` (or requirements-dev.txt).
Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import model
from model import store
from sample import engine
from sample.generator import Generator
from sample.strategies import from_args

MODEL_NAME = "transformer-lab"  # the name lm-eval's registry knows the adapter by
MIN_LENGTH_BUCKET = 16
MISSING = ("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval, "
           "listed in requirements-dev.txt)")


def require_lm_eval():
  """The lm_eval package, or an ImportError naming the extra that installs it."""
  try:
    import lm_eval
    import lm_eval.api.model
    import lm_eval.api.registry
    import lm_eval.models.utils
    import lm_eval.tasks
    import lm_eval.utils
  except ImportError as e:
    raise ImportError(MISSING) from e
  return lm_eval


# ---- scoring: one padded forward pass per batch ---------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _score_jit(cfg, params, tokens_BT, targets_BT):
  """log p(targets_BT[b, t] | tokens_BT[b, :t + 1]) and whether it is the argmax: [B, T] each."""
  logits_BTV = model.apply(cfg, params, tokens_BT)[0].astype(jnp.float32)
  # log softmax at the targets only: no second [B, T, V] array (V is 128k for Llama 3)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
  return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def score(cfg, params, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int,
          max_length: int) -> list[tuple[float, bool]]:
  """(sum of log p(continuation tokens), all of them greedy) for each (context, continuation).

  A pair longer than max_length + 1 keeps its last max_length + 1 tokens (the
  context is cut from the left, as lm-eval's HF backend does). Rows are sorted by
  length so that a batch pads little; lengths are bucketed to powers of two
  (MIN_LENGTH_BUCKET at least, max_length at most) and every batch has
  batch_size rows, so a run compiles a handful of programs.
  """
  rows = []
  for context, continuation in pairs:
    if not continuation:
      raise ValueError("loglikelihood: a request's continuation encodes to no tokens")
    if len(continuation) > max_length:
      raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens exceeds "
                       f"the model's context of {max_length}")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    rows.append((whole[:-1], whole[1:], len(continuation)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    t = min(engine.bucket(len(rows[chunk[0]][0]), MIN_LENGTH_BUCKET), max_length)
    tokens_BT = np.zeros((batch_size, t), np.int32)
    targets_BT = np.zeros((batch_size, t), np.int32)
    for b, i in enumerate(chunk):
      inputs, targets, _ = rows[i]
      tokens_BT[b, :len(inputs)] = inputs  # right padding: causal attention never sees it
      targets_BT[b, :len(targets)] = targets
    logp_BT, greedy_BT = jax.device_get(_score_jit(cfg, params, tokens_BT, targets_BT))
    for b, i in enumerate(chunk):
      end, n = len(rows[i][0]), rows[i][2]
      out[i] = (float(logp_BT[b, end - n:end].sum(dtype=np.float64)),
                bool(greedy_BT[b, end - n:end].all()))
  return out


# ---- the lm-eval model ----------------------------------------------------------------------

class _Adapter:
  """The methods of the lm-eval model; `adapter_class()` mixes them into lm-eval's TemplateLM."""

  backend = "causal"

  def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = 8,
               max_gen_toks: int = 256, max_batch_size: int | None = None, device=None,
               seed: int = 0, **unused):
    """`max_batch_size` and `device` are lm-eval's generic model arguments: jax places the
    arrays itself and the batch size is fixed."""
    super().__init__()
    del max_batch_size, device
    if unused:
      raise ValueError(f"{MODEL_NAME}: unknown model argument(s) {sorted(unused)} (known: "
                       "workdir, step, batch_size, max_gen_toks, seed)")
    if isinstance(batch_size, str) and not batch_size.isdigit():
      raise ValueError(f"{MODEL_NAME}: batch_size={batch_size!r} must be a positive integer "
                       "('auto' is not supported)")
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"{MODEL_NAME}: batch_size={batch_size} must be >= 1")
    self.gen = Generator.from_workdir(workdir, None if step is None else int(step))
    self.workdir, self.max_gen_toks, self.seed = workdir, int(max_gen_toks), int(seed)
    self.tokenizer_ = self.gen.tokenizer

  @property
  def max_length(self) -> int:
    return self.gen.cfg.max_seq_len

  @property
  def eot_token_id(self) -> int:
    eos = self.tokenizer_.eos_id
    return self.prefix_token_id if eos is None else eos

  @property
  def prefix_token_id(self) -> int:
    """What an empty context becomes: the Generator's start token (bos where the tokenizer
    prepends one, else eos, the separator training packs between documents)."""
    return self.gen.encode("")[0]

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The workdir tokenizer's ids; add_special_tokens=False drops a bos it prepends."""
    del kwargs
    ids = list(self.tokenizer_.encode(string))
    bos = self.tokenizer_.bos_id
    if add_special_tokens is False and getattr(self.tokenizer_, "add_bos", False) and (
        ids[:1] == [bos]):
      ids = ids[1:]
    return ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer_.decode(list(ids))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    pairs = [(context, continuation) for _, context, continuation in requests]
    results = score(self.gen.cfg, self.gen.params, pairs, batch_size=self.batch_size,
                    max_length=self.max_length)
    for (key, _, _), result in zip(requests, results, strict=True):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's log-likelihood: disjoint windows of max_length tokens, each conditioned
    on the tokens before it (lm-eval's windowing with context_len=1, as its HF backend)."""
    from lm_eval import utils

    windows, owners = [], []
    for r, (text,) in enumerate(req.args for req in requests):
      for window in utils.get_rolling_token_windows(
          token_list=self.tok_encode(text, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1):
        windows.append(utils.make_disjoint_window(window))
        owners.append(r)
    totals = [0.0] * len(requests)
    for r, (logp, _) in zip(owners, score(self.gen.cfg, self.gen.params, windows,
                                          batch_size=self.batch_size,
                                          max_length=self.max_length), strict=True):
      totals[r] += logp
    for req, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Decode each context with the sampler until eos, an `until` string or max_gen_toks."""
    from lm_eval.models.utils import (
      handle_stop_sequences,
      normalize_gen_kwargs,
      postprocess_generated_text,
    )

    groups: dict[str, list[int]] = {}  # one sampler call per batch of equal gen_kwargs
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out = [""] * len(requests)
    eos_text = self.tok_decode([self.eot_token_id])
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      if max_gen_toks >= self.max_length:
        raise ValueError(f"generate_until: max_gen_toks={max_gen_toks} leaves no room for a "
                         f"prompt in the model's context of {self.max_length}")
      sampling = from_args(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                           else 0.0, int(kwargs.get("top_k") or 0),
                           float(kwargs.get("top_p") or 1.0))
      # eos, the model's own stop ids and the `until` strings that are one token end a row
      # early; longer ones are cut from the text
      stop_ids = (self.eot_token_id, *self.gen.stops(until)[1])
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        # the context keeps its last tokens so that prompt + new tokens fit the context
        prompts = [self.gen.encode(requests[i].args[0])[-(self.max_length - max_gen_toks):]
                   for i in chunk]
        new = engine.generate(self.gen.cfg, self.gen.params, prompts, max_gen_toks,
                              sampling=sampling, seed=self.seed, stop_ids=stop_ids).tokens
        for i, ids in zip(chunk, new, strict=True):
          out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out


@functools.cache
def adapter_class():
  """The lm-eval model class (TemplateLM + _Adapter), registered as MODEL_NAME on first use."""
  lm_eval = require_lm_eval()
  cls = type("TransformerLabLM", (_Adapter, lm_eval.api.model.TemplateLM),
             {"__module__": __name__, "__doc__": "A transformer-lab workdir as an lm-eval LM."})
  return lm_eval.api.registry.register_model(MODEL_NAME)(cls)


def make_lm(workdir: str, **kwargs):
  """The workdir's model as an lm-eval LM (kwargs: step, batch_size, max_gen_toks, seed)."""
  return adapter_class()(workdir, **kwargs)


def evaluate(workdir: str, tasks: Sequence[str], *, include_path: str | None = None,
             include_defaults: bool = True, batch_size: int = 8, limit: float | None = None,
             num_fewshot: int | None = None, step: int | None = None,
             max_gen_toks: int = 256, log_samples: bool = False) -> dict:
  """`lm_eval.simple_evaluate` of the workdir on `tasks` (lm-eval's results dict).

  include_path: a directory of the user's task YAMLs, searched before lm-eval's
  own tasks (include_defaults=False skips indexing those, which takes seconds).
  """
  lm_eval = require_lm_eval()
  tasks = [t for t in tasks if t]
  if not tasks:
    raise ValueError("no tasks given: --tasks=name[,name...]")
  if include_path is not None and not os.path.isdir(include_path):
    raise ValueError(f"include_path {include_path!r} is not a directory")
  manager = lm_eval.tasks.TaskManager(include_path=include_path,
                                      include_defaults=include_defaults)
  unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}" + ("" if include_path else
                     " (a task of your own needs --include_path=DIR)"))
  lm = make_lm(workdir, step=step, batch_size=batch_size, max_gen_toks=max_gen_toks)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                 limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                                 bootstrap_iters=0)


# ---- command line ---------------------------------------------------------------------------

def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  store.quiet_orbax_errors()
  f = flags.FLAGS
  try:
    lm_eval = require_lm_eval()
    results = evaluate(f.workdir, f.tasks, include_path=f.include_path,
                       batch_size=f.batch_size, limit=f.limit, num_fewshot=f.num_fewshot,
                       step=f.step, max_gen_toks=f.max_gen_toks, log_samples=f.log_samples)
  except (ImportError, ValueError, store.WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(lm_eval.utils.make_table(results))
  if f.output:
    # numpy scalars and other values json cannot hold, as lm-eval's own writer converts them
    store.write_json(f.output, json.loads(json.dumps(
        results, default=lm_eval.utils.handle_non_serializable)))
    print(f"wrote {f.output}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A workdir written by train or the HF importer.",
                      required=True)
  flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma-separated.",
                    required=True)
  flags.DEFINE_string("include_path", None, "A directory of task YAMLs of your own.")
  flags.DEFINE_integer("batch_size", 8, "Requests per forward pass / sampler call.")
  flags.DEFINE_float("limit", None, "At most this many examples per task (< 1: a fraction).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("max_gen_toks", 256, "generate_until's default new-token limit.")
  flags.DEFINE_bool("log_samples", False, "Keep every request and response in the output.")
  flags.DEFINE_string("output", None, "Write lm-eval's results as JSON to this file.")
  sys.exit(app.run(main))
