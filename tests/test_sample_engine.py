"""The decode engine against the full forward pass: greedy, cached logits, stops, seeds,
overflow, recompilation, streaming chunks, the no-cache mode and LoRA."""

import functools

import jax
import numpy as np
import pytest

import model
from model import lora as lora_lib
from sample import engine
from sample.strategies import Greedy, Sampling, Temperature, TopK
from tests.conftest import tiny_config

PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]  # ragged: lengths 5, 1, 3
init = jax.jit(model.init, static_argnums=0)  # compiled once per config: faster than eager


@pytest.fixture(scope="module", params=["learned-mha", "rope-gqa"])
def setup(request):
  if request.param == "learned-mha":
    cfg = tiny_config()
  else:
    cfg = tiny_config(position="rope", n_kv_heads=2, norm="rmsnorm", ffn="swiglu")
  # Larger init so the random model's predictions vary with the context.
  cfg = cfg.replace(init_std=0.5)
  return cfg, init(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(init_std=0.5)
  return cfg, init(cfg, jax.random.PRNGKey(1))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens_BT, lora):
  return model.apply(cfg, params, tokens_BT, lora=lora)[0]


def full_forward_logits(cfg, params, rows, lora=None):
  """Full forward pass of each row (right-padded to a fixed width: causal attention makes the
  padding invisible), as a list of [len(row), V] arrays."""
  tokens_BT = np.zeros((len(rows), cfg.max_seq_len), np.int32)
  for r, ids in enumerate(rows):
    tokens_BT[r, :len(ids)] = ids
  logits_BTV = np.asarray(_forward(cfg, params, tokens_BT, lora))
  return [logits_BTV[r, :len(ids)] for r, ids in enumerate(rows)]


def argmax_loop(cfg, params, prompts, n, lora=None):
  """The textbook decode: the full forward pass over everything so far, every step."""
  rows = [list(p) for p in prompts]
  for _ in range(n):
    logits = full_forward_logits(cfg, params, rows, lora)
    rows = [ids + [int(np.argmax(lg[-1]))] for ids, lg in zip(rows, logits, strict=True)]
  return [ids[len(p):] for ids, p in zip(rows, prompts, strict=True)]


def test_greedy_equals_argmax_loop_on_a_ragged_batch(setup):
  cfg, params = setup
  expected = argmax_loop(cfg, params, PROMPTS, 12)
  assert len({tuple(e) for e in expected}) > 1, "degenerate model: rows should differ"
  assert engine.generate_ids(cfg, params, PROMPTS, 12) == expected
  if cfg.position == "learned":
    assert engine.generate(cfg, params, PROMPTS, 12, use_cache=False).tokens == expected


def test_cached_step_logits_equal_full_forward_logits(setup):
  cfg, params = setup
  out = engine.generate(cfg, params, PROMPTS, 10, sampling=Temperature(1.0), seed=3,
                        return_logits=True, return_logprobs=True)
  fulls = full_forward_logits(cfg, params, [p + new for p, new in zip(PROMPTS, out.tokens,
                                                                       strict=True)])
  for prompt, new, logits, logprobs, full in zip(PROMPTS, out.tokens, out.logits, out.logprobs,
                                                 fulls, strict=True):
    assert len(new) == 10 and logits.shape == (10, cfg.vocab_size)
    full = full[len(prompt) - 1:-1]
    np.testing.assert_allclose(logits, full, atol=2e-4, rtol=1e-4)
    log_softmax = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - full.max(-1, keepdims=True)
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(10), new], atol=2e-4)


def test_rows_stop_at_their_first_stop_id(tiny):
  cfg, params = tiny
  free = engine.generate_ids(cfg, params, PROMPTS, 16, temperature=1.0, seed=5)
  # A token that row 0 first emits at step j >= 3; other rows may or may not contain it.
  j = next(i for i in range(3, 16) if free[0][i] not in free[0][:i])
  stop = free[0][j]
  other = next(t for t in range(cfg.vocab_size) if t not in free[0][:j] and t != stop)
  out = engine.generate(cfg, params, PROMPTS, 16, sampling=Temperature(1.0), seed=5,
                        stop_ids=(stop, other))
  for row, full in zip(out.tokens, free, strict=True):
    hits = [i for i, t in enumerate(full) if t in (stop, other)]
    assert row == full[:hits[0] if hits else None]
  assert out.tokens[0] == free[0][:j]
  assert out.stopped[0]


def test_same_seed_is_deterministic_and_seeds_differ(tiny):
  cfg, params = tiny
  a = engine.generate_ids(cfg, params, PROMPTS, 16, temperature=1.0, seed=11)
  b = engine.generate_ids(cfg, params, PROMPTS, 16, temperature=1.0, seed=11)
  c = engine.generate_ids(cfg, params, PROMPTS, 16, temperature=1.0, seed=12)
  assert a == b
  assert a != c


def test_a_rows_sample_does_not_depend_on_the_batch(tiny):
  cfg, params = tiny
  batch = engine.generate_ids(cfg, params, PROMPTS, 12, temperature=1.0, seed=2)
  alone = engine.generate_ids(cfg, params, PROMPTS[:1], 12, temperature=1.0, seed=2)
  assert alone[0] == batch[0]


def test_temperature_zero_is_greedy_whatever_the_filters(tiny):
  cfg, params = tiny
  greedy = engine.generate_ids(cfg, params, PROMPTS, 8)
  assert engine.generate_ids(cfg, params, PROMPTS, 8, temperature=0.0, top_k=3, top_p=0.5,
                             seed=9) == greedy
  assert Sampling(0.0, top_k=3).kind == Greedy().kind


def test_no_cache_mode_samples_the_same_tokens(tiny):
  cfg, params = tiny
  kwargs = dict(sampling=TopK(10, temperature=0.9), seed=4)  # the program of the next test
  cached = engine.generate(cfg, params, PROMPTS, 12, **kwargs).tokens
  assert engine.generate(cfg, params, PROMPTS, 12, use_cache=False, **kwargs).tokens == cached


def test_overflow_raises_before_decoding(tiny):
  cfg, params = tiny  # max_seq_len 64
  with pytest.raises(ValueError, match="KV cache overflow.*60 tokens.*needs 70"):
    engine.generate_ids(cfg, params, [[1] * 60, [2]], 10)
  with pytest.raises(ValueError, match="overflow.*cache_len"):
    engine.generate(cfg, params, [[1, 2, 3]], 10, cache_len=12)
  with pytest.raises(ValueError, match="exceeds the learned position table"):
    engine.generate(cfg, params, [[1]], 10, cache_len=128)


@pytest.mark.parametrize("bad, match", [
    ([[]], "prompt 0 is empty"), ([[1], [99]], "outside the vocabulary"),
    ([1, 2, 3], "list of token-id lists"), ([], "empty")])
def test_bad_prompts_get_clear_errors(tiny, bad, match):
  cfg, params = tiny
  with pytest.raises(ValueError, match=match):
    engine.generate_ids(cfg, params, bad, 4)


def test_bad_lengths_and_stops_get_clear_errors(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="max_new_tokens"):
    engine.generate_ids(cfg, params, PROMPTS, -1)
  assert engine.generate_ids(cfg, params, PROMPTS, 0) == [[], [], []]
  with pytest.raises(ValueError, match="stop id"):
    engine.generate_ids(cfg, params, PROMPTS, 4, stop_ids=(cfg.vocab_size,))


def test_no_recompilation_within_a_bucket(tiny):
  cfg, params = tiny
  engine.generate_ids(cfg, params, PROMPTS, 12, temperature=0.9, top_k=10, seed=4)
  before = engine.compiled_programs()
  # Other prompts, lengths, batch sizes, seeds, values and stops within the same buckets.
  engine.generate_ids(cfg, params, [[4, 5, 6, 7, 8, 9], [3, 3], [1]], 14, temperature=1.3,
                      top_k=9, seed=7, stop_ids=(3, 4))
  engine.generate_ids(cfg, params, [[1], [2], [3], [4, 5]], 16, temperature=0.5, top_k=2,
                      seed=1)
  engine.generate_ids(cfg, params, [[1, 2]] * 4, 1, temperature=0.5, top_k=2, seed=1)
  assert engine.compiled_programs() == before
  engine.generate_ids(cfg, params, PROMPTS, 17, temperature=0.5, top_k=2)  # the next N bucket
  assert engine.compiled_programs() == before + 1


def test_bucketed_shapes():
  cfg = tiny_config()  # max_seq_len 64
  assert engine.plan(cfg, [5, 1, 3], 12) == engine.Plan(4, 8, 16, 24)
  assert engine.plan(cfg, [40], 20) == engine.Plan(1, 64, 32, 64)
  assert engine.plan(cfg, [3], 5, cache_len=40).cache_len == 40
  assert engine.plan(cfg, [54], 10).cache_len == 64  # exactly full fits
  with pytest.raises(ValueError, match="overflow"):
    engine.plan(cfg, [55], 10)
  # RoPE has no position table: the cache may grow past max_seq_len (bucketed), unless
  # an explicit cache_len says otherwise.
  rope = tiny_config(position="rope")
  assert engine.plan(rope, [60], 10) == engine.Plan(1, 64, 16, 80)
  with pytest.raises(ValueError, match="overflow"):
    engine.plan(rope, [60], 10, cache_len=64)


def test_stream_chunks_concatenate_to_generate(tiny):
  cfg, params = tiny
  kwargs = dict(sampling=Temperature(1.0), seed=8, stop_ids=(7,))
  whole = engine.generate(cfg, params, PROMPTS, 19, **kwargs).tokens
  chunks = list(engine.stream_ids(cfg, params, PROMPTS, 19, chunk_size=4, **kwargs))
  assert len(chunks) > 2
  joined = [sum((c[r] for c in chunks), []) for r in range(len(PROMPTS))]
  assert joined == whole


def test_merged_lora_adapters_decode_as_the_adapted_model():
  """The sampler has no LoRA mode: adapters are merged into the weights once, at load."""
  cfg = tiny_config(init_std=0.5, lora_rank=2, lora_targets=("q", "v", "up"))
  params = init(cfg, jax.random.PRNGKey(0))
  lora = jax.jit(model.init_lora, static_argnums=0)(cfg, jax.random.PRNGKey(1))
  lora = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                      lora)  # B = 0 at init would make the adapters a no-op
  expected = argmax_loop(cfg, params, PROMPTS, 8, lora)
  merged = lora_lib.merge(cfg, params, lora)
  assert engine.generate_ids(lora_lib.without_lora(cfg), merged, PROMPTS, 8) == expected
  with_lora, without = (full_forward_logits(cfg, params, PROMPTS, a) for a in (lora, None))
  assert not np.allclose(with_lora[0], without[0], atol=1e-3)  # the adapters matter
