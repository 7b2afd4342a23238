"""The decode engine: one prefill pass into a fixed-size KV cache, then one jitted loop.

  new_ids = generate_ids(cfg, params, [[5, 7, 9], [3]], max_new_tokens=20)

Prefill: the prompts, right-padded to [B, P], go through the model in one
forward pass that writes their keys and values into an empty cache of S
slots; the cache's per-row lengths are then set to the true prompt lengths,
so padding slots are never attended to and are overwritten by the first
decoded tokens. Each row's first new token comes from the logits at its last
prompt token.

Decode: `lax.while_loop` feeds each row's last token (one [B, 1] forward per
step, continuing at slot lengths_B) until max_new_tokens, every row done, or
the cache full. A row is done when it emits one of `stop_ids`; the stop token
is NOT part of the returned tokens. No Python runs per token.

Static shapes are bucketed (powers of two): batch, prompt length P, new-token
buffer E, and the cache S = P + E (at most max_seq_len for learned positions,
whose table ends there, or an explicit cache_len). Changing max_new_tokens,
the prompts, the seed, temperature/top-k/top-p values or the stop ids within
a bucket reuses the compiled program. A request that cannot fit raises
ValueError before anything runs; nothing is truncated.

The no-cache mode (use_cache=False) recomputes the full forward pass over the
tokens so far at every step (the textbook's slow path): the token buffer is
[B, S] and each step runs the model on its first ceil(t / c) * c tokens
(c = max(16, S / 8), chosen by `lax.switch`), so the cost grows with t as it should.

Layers run unrolled while decoding (scan_layers=False on a copy of the
config; parameters unstacked once per call, outside the loop): a scanned layer
stack slices every weight and cache layer out of its stacked array at every
step, which costs more than the step itself for small models.

Randomness: row r's token i is drawn with fold_in(fold_in(PRNGKey(seed), r), i),
so a row's sample depends only on (seed, row, step): not on the batch size, the
chunking of a stream, or whether the cache is used.

Legend (model/README.md): B batch, P prompt slots, E emitted (new-token) slots, S cache
slots, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import model
from model.config import ModelConfig
from sample.strategies import Greedy, Sampling, SamplingKind, SamplingValues, from_args, next_tokens

NO_TOKEN = -1          # fills output slots after a row stopped
MIN_PROMPT_BUCKET = 8
MIN_NEW_BUCKET = 16
MIN_STOP_BUCKET = 4
GREEDY = Greedy()


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


class Plan(NamedTuple):
  """The static shapes of one generate call (the compile-cache key, with cfg and options)."""

  batch: int        # B, rows (padded to a power of two)
  prompt_len: int   # P, prompt slots
  new_tokens: int   # E, output slots
  cache_len: int    # S, KV-cache slots (or token-buffer length without a cache)


def plan(cfg: ModelConfig, prompt_lengths: Sequence[int], max_new_tokens: int,
         cache_len: int | None = None) -> Plan:
  """Bucketed shapes for these prompts; ValueError if they cannot fit.

  The cache holds at most `cache_len` slots if given, else at most max_seq_len
  for learned positions (the table ends there); RoPE, sinusoidal and
  position-free models may run past max_seq_len (beyond their training
  context), as `model.init_cache` allows.
  """
  longest = max(prompt_lengths)
  if cache_len is not None:
    limit = int(cache_len)
  elif cfg.position == "learned":
    limit = cfg.max_seq_len
  else:
    limit = max(cfg.max_seq_len,
                bucket(longest, MIN_PROMPT_BUCKET) + bucket(max_new_tokens, MIN_NEW_BUCKET))
  if cache_len is not None:
    if limit <= 0:
      raise ValueError(f"cache_len={cache_len} must be > 0")
    if cfg.position == "learned" and limit > cfg.max_seq_len:
      raise ValueError(f"cache_len={limit} exceeds the learned position table "
                       f"(max_seq_len={cfg.max_seq_len})")
  if longest + max_new_tokens > limit:
    row = int(np.argmax(prompt_lengths))
    raise ValueError(
        f"KV cache overflow: prompt {row} has {longest} tokens and max_new_tokens="
        f"{max_new_tokens}, which needs {longest + max_new_tokens} cache slots, but the cache "
        f"holds {limit} ({'cache_len' if cache_len is not None else 'the model max_seq_len'}); "
        "shorten the prompt or generate fewer tokens")
  p = min(bucket(longest, MIN_PROMPT_BUCKET), limit)
  n = bucket(max_new_tokens, MIN_NEW_BUCKET)
  s = limit if cache_len is not None else min(p + n, limit)
  return Plan(bucket(len(prompt_lengths)), p, n, s)


class Options(NamedTuple):
  """Static options of the compiled loop."""

  plan: Plan
  use_cache: bool = True
  logprobs: bool = False
  logits: bool = False


@flax.struct.dataclass
class DecodeState:
  """Everything the loop carries; a pytree, so it can stay on device between chunks.

  context: the KVCache (cache mode) or (tokens_BS, lengths_B) (no-cache mode).
  """

  step: jnp.ndarray         # i32: new tokens decided so far
  token_B: jnp.ndarray      # i32: each row's latest token (the next input)
  done_B: jnp.ndarray       # bool: row emitted a stop id (or is batch padding)
  count_B: jnp.ndarray      # i32: tokens emitted per row
  tokens_BE: jnp.ndarray    # i32: emitted tokens, NO_TOKEN after a stop
  logprobs_BE: jnp.ndarray | None   # f32: log p(token) under the model (temperature 1)
  logits_BEV: jnp.ndarray | None    # f32: the raw next-token logits of every step
  keys_B: jnp.ndarray       # per-row PRNG keys
  context: object


@dataclasses.dataclass
class Generation:
  """What `generate` returns, per prompt.

  tokens: the new tokens (without the prompt and without the stop token).
  stopped: True when the row ended at a stop id, False when it ran out of tokens.
  logprobs: [n] model log-probabilities of the emitted tokens (when asked).
  logits: [n, V] raw logits each emitted token was drawn from (when asked).
  speculation: acceptance statistics of speculative decoding (sample/speculative.py).
  """

  tokens: list[list[int]]
  stopped: list[bool]
  logprobs: list[np.ndarray] | None = None
  logits: list[np.ndarray] | None = None
  speculation: object = None


# ---- model plumbing -----------------------------------------------------------------------

def decode_model(cfg: ModelConfig, params):
  """(cfg, params) with the layers unrolled: what the decode loop runs."""
  if not cfg.scan_layers:
    return cfg, params
  return cfg.replace(scan_layers=False), model.unstack_layers(params, cfg.n_layers)


def step_config(cfg: ModelConfig) -> ModelConfig:
  """The config of the cached decode steps: the chunked kernel becomes the dense one.

  Blocking keys into chunks bounds memory for long queries (the prefill keeps it); a step
  of 1 (or k + 1 speculative) queries only pays its extra ops: measured on the default
  run's model, dense steps decode 1.3x (batch 1) to 1.6x (batch 32) more tokens/s. Same
  numbers up to float rounding (tests/test_model_attention.py).
  """
  return cfg.replace(attention_impl="dense") if cfg.attention_impl == "chunked" else cfg


def _last_logits(logits_BTV, lengths_B):
  """Logits at each row's last real token: [B, V]."""
  return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


def _prefix_sizes(s: int) -> tuple[int, ...]:
  """Forward lengths of the no-cache mode: multiples of ceil(S / 8) (at least 16), up to S."""
  c = max(16, math.ceil(s / 8))
  return tuple(sorted({min(s, c * j) for j in range(1, math.ceil(s / c) + 1)}))


def _full_forward_last(cfg, params, tokens_BS, lengths_B):
  """No-cache step: the full forward over the shortest prefix covering every row."""
  sizes = _prefix_sizes(tokens_BS.shape[1])

  def branch(size):
    return lambda t: _last_logits(model.apply(cfg, params, t[:, :size])[0], lengths_B)

  index = jnp.searchsorted(jnp.array(sizes), jnp.max(lengths_B))
  return lax.switch(index, [branch(s) for s in sizes], tokens_BS)


def _start(cfg, opts: Options, params, prompts_BP, lengths_B):
  """(logits at the last prompt token [B, V], context) from one pass over the prompts."""
  b, p = prompts_BP.shape
  s = opts.plan.cache_len
  if opts.use_cache:
    cache = model.init_cache(cfg, b, max_len=s)
    logits_BPV, cache = model.apply(cfg, params, prompts_BP, cache=cache)
    return _last_logits(logits_BPV, lengths_B), cache.replace(lengths_B=lengths_B)
  tokens_BS = jnp.pad(prompts_BP, ((0, 0), (0, s - p)))
  return _full_forward_last(cfg, params, tokens_BS, lengths_B), (tokens_BS, lengths_B)


def _advance(cfg, opts: Options, params, context, token_B):
  """Feed one token per row: (next-token logits [B, V], context)."""
  if opts.use_cache:
    logits_B1V, cache = model.apply(step_config(cfg), params, token_B[:, None], cache=context)
    return logits_B1V[:, 0], cache
  tokens_BS, lengths_B = context
  tokens_BS = jax.vmap(lambda row, t, i: row.at[i].set(t))(tokens_BS, token_B, lengths_B)
  lengths_B = lengths_B + 1
  return _full_forward_last(cfg, params, tokens_BS, lengths_B), (tokens_BS, lengths_B)


def _filled_B(opts: Options, context):
  return context.lengths_B if opts.use_cache else context[1]


# ---- the loop -----------------------------------------------------------------------------

def _choose_and_record(kind: SamplingKind, opts: Options, state: DecodeState, logits_BV,
                       stop_ids, values: SamplingValues) -> DecodeState:
  """Pick token `state.step` of every row from logits_BV and write it down."""
  i = state.step
  keys_B = None if kind.greedy else jax.vmap(jax.random.fold_in, (0, None))(state.keys_B, i)
  token_B = next_tokens(logits_BV, keys_B, kind, values)
  is_stop_B = (token_B[:, None] == stop_ids[None, :]).any(-1)
  emit_B = ~state.done_B & ~is_stop_B
  column_B1 = jnp.where(emit_B, token_B, NO_TOKEN)[:, None]
  updates = dict(
      step=i + 1, token_B=token_B, done_B=state.done_B | is_stop_B,
      count_B=state.count_B + emit_B.astype(jnp.int32),
      tokens_BE=lax.dynamic_update_slice_in_dim(state.tokens_BE, column_B1, i, axis=1))
  if opts.logprobs:
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(jnp.float32)),
                                 token_B[:, None], axis=-1)
    updates["logprobs_BE"] = lax.dynamic_update_slice_in_dim(state.logprobs_BE, logp_B, i, axis=1)
  if opts.logits:
    updates["logits_BEV"] = lax.dynamic_update_slice_in_dim(
        state.logits_BEV, logits_BV[:, None].astype(jnp.float32), i, axis=1)
  return state.replace(**updates)


def _prefill(cfg, kind, opts, params, prompts_BP, lengths_B, done_B, stop_ids, values,
             seed) -> DecodeState:
  """The prompt pass and token 0 of every row."""
  b = prompts_BP.shape[0]
  n, v = opts.plan.new_tokens, cfg.vocab_size
  logits_BV, context = _start(cfg, opts, params, prompts_BP, lengths_B)
  base = jax.random.PRNGKey(seed)
  state = DecodeState(
      step=jnp.int32(0), token_B=jnp.zeros((b,), jnp.int32), done_B=done_B,
      count_B=jnp.zeros((b,), jnp.int32), tokens_BE=jnp.full((b, n), NO_TOKEN, jnp.int32),
      logprobs_BE=jnp.zeros((b, n), jnp.float32) if opts.logprobs else None,
      logits_BEV=jnp.zeros((b, n, v), jnp.float32) if opts.logits else None,
      keys_B=jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(b)),
      context=context)
  return _choose_and_record(kind, opts, state, logits_BV, stop_ids, values)


def _decode(cfg, kind, opts, params, state: DecodeState, end, max_new, stop_ids,
            values) -> DecodeState:
  """Decode until `end` (or max_new) tokens, every row done, or the cache full."""
  limit = jnp.minimum(end, max_new)
  s = opts.plan.cache_len

  def cond(st: DecodeState):
    room = jnp.max(_filled_B(opts, st.context)) < s
    return (st.step < limit) & ~jnp.all(st.done_B) & room

  def body(st: DecodeState):
    logits_BV, context = _advance(cfg, opts, params, st.context, st.token_B)
    return _choose_and_record(kind, opts, st.replace(context=context), logits_BV, stop_ids,
                              values)

  return lax.while_loop(cond, body, state)


_STATIC = ("cfg", "kind", "opts")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jit(cfg, kind, opts, params, prompts_BP, lengths_B, done_B, max_new,
                  stop_ids, values, seed):
  cfg, params = decode_model(cfg, params)
  state = _prefill(cfg, kind, opts, params, prompts_BP, lengths_B, done_B, stop_ids, values,
                   seed)
  return _decode(cfg, kind, opts, params, state, max_new, max_new, stop_ids, values)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_jit(cfg, kind, opts, params, prompts_BP, lengths_B, done_B, stop_ids, values,
                 seed):
  return _prefill(cfg, kind, opts, params, prompts_BP, lengths_B, done_B, stop_ids, values,
                  seed)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _decode_jit(cfg, kind, opts, params, state, end, max_new, stop_ids, values):
  return _decode(cfg, kind, opts, params, state, end, max_new, stop_ids, values)


def compiled_programs() -> int:
  """How many programs the engine has compiled so far (for recompilation tests)."""
  return sum(f._cache_size() for f in (_generate_jit, _prefill_jit, _decode_jit))


# ---- host-side preparation -----------------------------------------------------------------

def _check_prompts(cfg: ModelConfig, prompts_ids) -> list[list[int]]:
  if isinstance(prompts_ids, (str, bytes)) or not isinstance(prompts_ids, Sequence):
    raise ValueError("prompts_ids must be a list of token-id lists, e.g. [[5, 7, 9]]")
  if not prompts_ids:
    raise ValueError("prompts_ids is empty: give at least one prompt")
  rows = []
  for r, ids in enumerate(prompts_ids):
    if isinstance(ids, (int, np.integer)):
      raise ValueError("prompts_ids must be a list of token-id lists (one list per prompt), "
                       f"got a flat list starting {list(prompts_ids)[:4]}")
    ids = [int(t) for t in ids]
    if not ids:
      raise ValueError(f"prompt {r} is empty: the model needs at least one token to condition "
                       "on (e.g. the tokenizer's bos id)")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {r} has token id(s) {bad[:5]} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
    rows.append(ids)
  return rows


def _stop_array(cfg: ModelConfig, stop_ids) -> jnp.ndarray:
  if isinstance(stop_ids, (int, np.integer)):
    stop_ids = (stop_ids,)
  stop = sorted({int(t) for t in stop_ids if t is not None})
  bad = [t for t in stop if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f"stop id(s) {bad} outside the vocabulary [0, {cfg.vocab_size})")
  size = bucket(len(stop), MIN_STOP_BUCKET)
  return jnp.array(stop + [NO_TOKEN] * (size - len(stop)), jnp.int32)


class _Request(NamedTuple):
  rows: int
  kind: SamplingKind
  opts: Options
  prompts_BP: np.ndarray
  lengths_B: np.ndarray
  done_B: np.ndarray
  stop_ids: jnp.ndarray
  values: SamplingValues


def _request(cfg, prompts_ids, max_new_tokens, sampling, stop_ids, use_cache, cache_len,
             return_logprobs, return_logits) -> _Request:
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a Sampling strategy (Greedy(), TopK(40), ...), "
                     f"got {sampling!r}")
  if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
  rows = _check_prompts(cfg, prompts_ids)
  lengths = [len(r) for r in rows]
  shapes = plan(cfg, lengths, max(int(max_new_tokens), 1), cache_len)
  prompts_BP = np.zeros((shapes.batch, shapes.prompt_len), np.int32)
  lengths_B = np.ones((shapes.batch,), np.int32)
  for r, ids in enumerate(rows):
    prompts_BP[r, :len(ids)] = ids
    lengths_B[r] = len(ids)
  done_B = np.arange(shapes.batch) >= len(rows)  # batch padding never emits
  opts = Options(shapes, bool(use_cache), bool(return_logprobs), bool(return_logits))
  return _Request(len(rows), sampling.kind, opts, prompts_BP, lengths_B, done_B,
                  _stop_array(cfg, stop_ids), sampling.values())


def _seed(seed) -> np.uint32:
  if isinstance(seed, bool) or int(seed) != seed:
    raise ValueError(f"seed={seed!r} must be an integer")
  return np.uint32(int(seed) % 2**32)


def _collect(req: _Request, state: DecodeState, start: int = 0) -> Generation:
  """Host copy of tokens [start, count) of each real row."""
  count_B = np.asarray(state.count_B)[:req.rows]
  tokens_BE = np.asarray(state.tokens_BE)
  done_B = np.asarray(state.done_B)[:req.rows]
  tokens = [tokens_BE[r, start:count_B[r]].tolist() for r in range(req.rows)]
  logprobs = logits = None
  if req.opts.logprobs:
    lp = np.asarray(state.logprobs_BE)
    logprobs = [lp[r, start:count_B[r]] for r in range(req.rows)]
  if req.opts.logits:
    lg = np.asarray(state.logits_BEV)
    logits = [lg[r, start:count_B[r]] for r in range(req.rows)]
  return Generation(tokens, done_B.tolist(), logprobs, logits)


# ---- public API ---------------------------------------------------------------------------

def generate(cfg: ModelConfig, params, prompts_ids, max_new_tokens: int, *,
             sampling: Sampling = GREEDY, seed: int = 0, stop_ids=(),
             use_cache: bool = True, cache_len: int | None = None,
             return_logprobs: bool = False, return_logits: bool = False) -> Generation:
  """New tokens for each prompt (a ragged list of token-id lists), with optional extras.

  sampling: a strategy from sample.strategies (default greedy).
  stop_ids: a row stops at the first of these it emits (not included in its tokens).
  cache_len: KV-cache slots (default: the bucketed need, at most cfg.max_seq_len).
  use_cache=False recomputes the full forward every step (slow; for comparison).
  """
  req = _request(cfg, prompts_ids, max_new_tokens, sampling, stop_ids, use_cache, cache_len,
                 return_logprobs, return_logits)
  if max_new_tokens == 0:
    empty = [np.zeros((0,), np.float32)] * req.rows
    return Generation([[] for _ in range(req.rows)], [False] * req.rows,
                      empty if return_logprobs else None,
                      [np.zeros((0, cfg.vocab_size), np.float32)] * req.rows
                      if return_logits else None)
  state = _generate_jit(cfg, req.kind, req.opts, params, req.prompts_BP, req.lengths_B,
                        req.done_B, np.int32(max_new_tokens), req.stop_ids, req.values,
                        _seed(seed))
  return _collect(req, state)


def generate_ids(cfg: ModelConfig, params, prompts_ids: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids=()) -> list[list[int]]:
  """Only the new tokens of each prompt; a row stops at its first stop id (excluded).

  temperature 0 (the default) is greedy decoding; otherwise temperature, then
  top-k (0: off), then top-p (1: off). Deterministic for a given seed.
  """
  return generate(cfg, params, prompts_ids, max_new_tokens,
                  sampling=from_args(temperature, top_k, top_p), seed=seed,
                  stop_ids=stop_ids).tokens


def stream_ids(cfg: ModelConfig, params, prompts_ids, max_new_tokens: int, *,
               sampling: Sampling = GREEDY, seed: int = 0, stop_ids=(),
               use_cache: bool = True, cache_len: int | None = None,
               chunk_size: int = 8) -> Iterator[list[list[int]]]:
  """Yield, every `chunk_size` decode steps, the new tokens of each row since the last yield.

  The chunks concatenate to exactly `generate(...)`'s tokens (same seed, same
  per-step keys); the loop state stays on device between chunks.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  req = _request(cfg, prompts_ids, max_new_tokens, sampling, stop_ids, use_cache, cache_len,
                 False, False)
  if max_new_tokens == 0:
    return
  dcfg, dparams = decode_model(cfg, params)
  state = _prefill_jit(dcfg, req.kind, req.opts, dparams, req.prompts_BP, req.lengths_B,
                       req.done_B, req.stop_ids, req.values, _seed(seed))
  sent = 0
  max_new = np.int32(max_new_tokens)
  while True:
    step = int(state.step)
    if step > sent:
      yield _since(req, state, sent)
      sent = step
    if step >= max_new_tokens or bool(np.all(np.asarray(state.done_B))):
      return
    state = _decode_jit(dcfg, req.kind, req.opts, dparams, state,
                        np.int32(step + chunk_size), max_new, req.stop_ids, req.values)
    if int(state.step) == step:  # no progress: the cache is full (plan() prevents this)
      return


def _since(req: _Request, state: DecodeState, start: int) -> list[list[int]]:
  """Tokens emitted at steps >= start, per real row."""
  tokens_BE = np.asarray(state.tokens_BE)[:req.rows, start:int(state.step)]
  return [[t for t in row if t != NO_TOKEN] for row in tokens_BE.tolist()]
