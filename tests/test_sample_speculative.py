"""Speculative decoding: greedy == plain greedy on ragged batches (prompt lookup and a draft
model), stop ids, streaming, acceptance statistics, and the sampled distribution == the
target's (chi-square on a small vocabulary)."""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

import model
from sample import engine
from sample import speculative as sp
from sample.strategies import Sampling, Temperature
from tests.conftest import tiny_config

PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [7], [9, 10, 11]]  # ragged: lengths 8, 1, 3
init = jax.jit(model.init, static_argnums=0)


def first_layer_draft(cfg, params):
  """The target's embedding, first block and head: a draft that agrees often, not always."""
  dcfg = cfg.replace(n_layers=1)
  if cfg.scan_layers:
    dparams = {**params, "layers": jax.tree.map(lambda a: a[:1], params["layers"])}
  else:
    dparams = {k: v for k, v in params.items() if not k.startswith("layers_") or k == "layers_0"}
  return sp.DraftModel(dcfg, dparams)


@pytest.fixture(scope="module", params=["learned-mha", "rope-gqa"])
def setup(request):
  if request.param == "learned-mha":
    cfg = tiny_config(init_std=0.5)
  else:
    cfg = tiny_config(position="rope", n_kv_heads=2, norm="rmsnorm", ffn="swiglu", init_std=0.5)
  params = init(cfg, jax.random.PRNGKey(0))
  return cfg, params, first_layer_draft(cfg, params)


@pytest.fixture(scope="module")
def learned():
  cfg = tiny_config(init_std=0.5)
  params = init(cfg, jax.random.PRNGKey(0))
  return cfg, params, first_layer_draft(cfg, params)


@pytest.mark.parametrize("method", ["prompt_lookup", "draft_model"])
def test_greedy_equals_plain_greedy_on_a_ragged_batch(setup, method):
  cfg, params, draft_model = setup
  draft = sp.PromptLookup() if method == "prompt_lookup" else draft_model
  expected = engine.generate(cfg, params, PROMPTS, 24)
  assert len({tuple(t) for t in expected.tokens}) == 3, "degenerate model: rows should differ"
  out = sp.generate(cfg, params, PROMPTS, 24, draft=draft, draft_tokens=3)
  assert out.tokens == expected.tokens
  assert out.stopped == expected.stopped == [False] * 3
  spec = out.speculation
  # rows accepted something, and not everything (else the test would not exercise rollback)
  assert 0 < spec.accepted < spec.drafted and spec.rounds < 24


def test_stop_ids_end_rows_inside_a_round_as_plain_greedy_does(learned):
  cfg, params, draft_model = learned
  plain = engine.generate(cfg, params, PROMPTS, 24).tokens
  stop = plain[0][5]  # a token row 0 emits mid-way (other rows may or may not)
  expected = engine.generate(cfg, params, PROMPTS, 24, stop_ids=(stop,))
  assert expected.stopped[0] and len(expected.tokens[0]) <= 5
  for draft in (sp.PromptLookup(), draft_model):
    out = sp.generate(cfg, params, PROMPTS, 24, draft=draft, draft_tokens=3, stop_ids=(stop,))
    assert out.tokens == expected.tokens and out.stopped == expected.stopped


def test_the_target_as_its_own_draft_accepts_everything(learned):
  cfg, params, _ = learned
  out = sp.generate(cfg, params, PROMPTS, 21, draft=sp.DraftModel(cfg, params), draft_tokens=4)
  assert out.tokens == engine.generate(cfg, params, PROMPTS, 21).tokens
  assert out.speculation.acceptance_rate == 1.0
  assert out.speculation.rounds == 4  # token 0 from the prefill, then 5 tokens per round


def test_stream_chunks_concatenate_to_generate(learned):
  cfg, params, draft_model = learned
  expected = sp.generate(cfg, params, PROMPTS, 24, draft=draft_model, draft_tokens=3)
  rows = [[] for _ in PROMPTS]
  stats_out = []
  for chunk in sp.stream_ids(cfg, params, PROMPTS, 24, draft=draft_model, draft_tokens=3,
                             chunk_size=2, stats=stats_out):
    for row, new in zip(rows, chunk, strict=True):
      row.extend(new)
  assert rows == expected.tokens and stats_out == [expected.speculation]


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
  history_BY = np.array([[1, 2, 3, 9, 1, 2, 4, 5, 1, 2, 0, 0],
                         [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7]], np.int32)
  filled_B = np.array([10, 3], np.int32)
  drafted = np.asarray(sp._lookup_draft(history_BY, filled_B, 3, 3))
  # row 0 ends "1 2": latest earlier "1 2" at 4..5, so "4 5 1"; row 1 "6 6 6": "6 ..." matches
  np.testing.assert_array_equal(drafted, [[4, 5, 1], [6, 6, 6]])


def test_bad_input_gets_one_clear_error(learned):
  cfg, params, _ = learned
  with pytest.raises(ValueError, match="draft_tokens=0"):
    sp.generate(cfg, params, PROMPTS, 4, draft_tokens=0)
  other = cfg.replace(vocab_size=cfg.vocab_size + 1)
  with pytest.raises(ValueError, match="vocabulary"):
    sp.generate(cfg, params, PROMPTS, 4, draft=sp.DraftModel(other, init(other,
                                                                         jax.random.PRNGKey(0))))
  with pytest.raises(ValueError, match="draft must be"):
    sp.generate(cfg, params, PROMPTS, 4, draft="prompt_lookup")


# ---- sampling: the output distribution is the target's ------------------------------------

VOCAB, NEW, DRAWS = 6, 3, 4096


@pytest.fixture(scope="module")
def small_vocab():
  cfg = tiny_config(vocab_size=VOCAB, init_std=0.4)
  dcfg = cfg.replace(n_layers=1)
  return cfg, init(cfg, jax.random.PRNGKey(2)), sp.DraftModel(dcfg, init(dcfg,
                                                                        jax.random.PRNGKey(3)))


def _exact_sequence_probs(cfg, params, prompt, sampling):
  """p(t0 t1 t2 | prompt) for all VOCAB**NEW continuations, from full forward passes."""
  seqs = np.array(list(itertools.product(range(VOCAB), repeat=NEW)), np.int32)
  tokens = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
  logits = np.asarray(model.apply(cfg, params, tokens)[0], np.float64)
  logp = logits[:, len(prompt) - 1:-1] / sampling.temperature
  if sampling.top_k:
    kth = np.sort(logp, axis=-1)[..., -sampling.top_k][..., None]
    logp = np.where(logp >= kth, logp, -np.inf)
  logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
  picked = np.take_along_axis(logp, seqs[..., None], -1)[..., 0]
  return np.exp(picked.sum(1)), seqs


@pytest.mark.slow
@pytest.mark.parametrize("method,sampling", [("draft_model", Temperature(1.0)),
                                             ("prompt_lookup", Temperature(1.0)),
                                             ("draft_model", Sampling(0.7, top_k=3))])
def test_sampled_sequences_follow_the_target_distribution(small_vocab, method, sampling):
  cfg, params, draft_model = small_vocab
  draft = sp.PromptLookup(max_ngram=1) if method == "prompt_lookup" else draft_model
  prompt = [1, 2, 1]
  out = sp.generate(cfg, params, [prompt] * DRAWS, NEW, draft=draft, draft_tokens=2,
                    sampling=sampling, seed=11)
  assert 0 < out.speculation.accepted < out.speculation.drafted
  probs, seqs = _exact_sequence_probs(cfg, params, np.array(prompt), sampling)
  index = {tuple(s): i for i, s in enumerate(seqs.tolist())}
  counts = np.zeros(len(seqs))
  for row in out.tokens:
    counts[index[tuple(row)]] += 1
  # cells expected >= 5 draws each; the rest pooled into one
  big = probs * DRAWS >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(probs[big], probs[~big].sum()) * DRAWS
  _, p_value = stats.chisquare(observed, expected * observed.sum() / expected.sum())
  assert p_value > 1e-3, p_value
