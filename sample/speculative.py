"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): draft X tokens, verify at once.

  out = generate(cfg, params, [[5, 7, 9], [3]], 64, draft=PromptLookup(), draft_tokens=4)
  out = generate(cfg, params, prompts, 64, draft=DraftModel(draft_cfg, draft_params))
  out.tokens, out.speculation.acceptance_rate

Each round of the jitted `lax.while_loop`, per row:
  1. a draft proposes X tokens d_1..d_X after the row's last token t:
     PromptLookup: the continuation of the latest earlier occurrence of the
       row's last n-gram (n = max_ngram..1) in its prompt and text so far;
     DraftModel: X cached one-token steps of a small model with the same
       vocabulary (it re-feeds the token before t, so its cache never lags);
  2. the target runs one cached forward over [t, d_1..d_X] (T = X + 1 slots);
  3. d_i is accepted while it passes the test below; the first rejected
     position (or position X when all pass) emits one token of the target's
     own, so a round emits 1..X+1 tokens;
  4. the cache is rolled back past the first rejection: its per-row length
     becomes old + accepted + 1 (slots past a row's length are masked and
     overwritten), so rows accept different numbers of tokens in one batch.

Exactness. Greedy: d_i is accepted iff it equals the target's argmax after
d_1..d_{i-1}, and the emitted token is that argmax, so the output is plain
greedy decoding's token for token (up to float rounding between a T = 1 and a
T = X + 1 forward on exact ties). Sampling (rejection sampling): with p_i the
target's and q_i the draft's distributions after temperature / top-k / top-p,
d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first
rejection draws from norm(max(p_i - q_i, 0)), an all-accepted round from
p_{X+1}; every emitted token is then distributed exactly as p. Prompt lookup
is the draft whose q is a point mass on its proposal.

Stop ids end a row as in the plain engine (the stop token excluded), and so does
max_new_tokens, wherever they fall inside a round. Randomness: token 0 of row r
is the plain engine's (key fold_in(fold_in(PRNGKey(seed), r), 0)); round i draws
from key i + 1, so unlike the plain engine a row's later tokens depend on how
many tokens earlier rounds accepted (the distribution does not).

Legend (model/README.md): B batch, P prompt slots, E emitted slots, X draft
tokens per round, T = X + 1 verified slots, Y history slots (prompt + emitted),
S cache slots, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import model
from model.config import ModelConfig
from sample import engine
from sample.strategies import Sampling, SamplingKind, SamplingValues, filter_logits, next_tokens


@dataclasses.dataclass(frozen=True)
class PromptLookup:
  """Draft by n-gram lookup in the row's own prompt and text (no second model)."""

  max_ngram: int = 3

  def __post_init__(self):
    if not 1 <= self.max_ngram <= 8:
      raise ValueError(f"max_ngram={self.max_ngram} must be in [1, 8]")


@dataclasses.dataclass(frozen=True)
class DraftModel:
  """Draft with a smaller model of the same vocabulary (its params travel separately)."""

  cfg: ModelConfig
  params: object = dataclasses.field(compare=False, hash=False, repr=False)


@dataclasses.dataclass
class Speculation:
  """Acceptance statistics of one call (over the real rows)."""

  rounds: int        # target forward passes after the prefill
  drafted: int       # draft tokens proposed to rows that were still running
  accepted: int      # of which the target accepted

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else 0.0


class _Static(NamedTuple):
  """The compile-cache key besides the configs and the sampling kind."""

  plan: engine.Plan
  draft_tokens: int                 # X
  max_ngram: int                    # prompt lookup (0: a draft model)


@flax.struct.dataclass
class SpecState:
  """What the loop carries (a pytree: it stays on device between stream chunks)."""

  rounds: jnp.ndarray       # i32: verification rounds so far
  token_B: jnp.ndarray      # i32: each row's last token (emitted, not yet in the cache)
  prev_B: jnp.ndarray       # i32: the token before it (the draft model re-feeds it)
  done_B: jnp.ndarray       # bool: the row stopped or is batch padding
  count_B: jnp.ndarray      # i32: tokens emitted per row
  tokens_BE: jnp.ndarray    # i32: emitted tokens (E = the bucket + T spare slots)
  history_BY: jnp.ndarray   # i32: prompt then emitted tokens (what prompt lookup searches)
  prompt_len_B: jnp.ndarray
  drafted_B: jnp.ndarray    # i32: draft tokens proposed while the row ran
  accepted_B: jnp.ndarray   # i32: of which accepted
  keys_B: jnp.ndarray
  cache: model.KVCache
  draft_cache: model.KVCache | None


# ---- drafts --------------------------------------------------------------------------------

def _lookup_draft(history_BY, filled_B, max_ngram: int, x: int):
  """X tokens following the latest earlier match of each row's last n-gram (longest n first).

  A row without any match proposes its last token X times (verification rejects
  whatever is wrong; the round still emits the target's token).
  """
  b, y = history_BY.shape
  j_Y = jnp.arange(y)
  last_B = jnp.take_along_axis(history_BY, (filled_B - 1)[:, None], axis=1)[:, 0]
  start_B = jnp.full((b,), -1, jnp.int32)
  for n in range(1, max_ngram + 1):  # longer n-grams overwrite shorter ones' matches
    # match_BY[r, j]: history[r, j - n + 1 .. j] == the row's last n tokens, j < filled - 1
    match_BY = j_Y[None, :] < (filled_B - 1)[:, None]
    match_BY &= j_Y[None, :] >= n - 1
    for i in range(n):
      tail_B = jnp.take_along_axis(history_BY, jnp.maximum(filled_B - 1 - i, 0)[:, None],
                                   axis=1)[:, 0]
      shifted_BY = jnp.roll(history_BY, i, axis=1)  # shifted[j] = history[j - i]
      match_BY &= shifted_BY == tail_B[:, None]
    latest_B = jnp.max(jnp.where(match_BY, j_Y[None, :], -1), axis=1)
    enough_B = filled_B >= n + 1
    start_B = jnp.where((latest_B >= 0) & enough_B, latest_B + 1, start_B)
  idx_BX = jnp.minimum(start_B[:, None] + jnp.arange(x)[None, :], y - 1)
  drafted_BX = jnp.take_along_axis(history_BY, idx_BX, axis=1)
  return jnp.where(start_B[:, None] >= 0, drafted_BX, last_B[:, None])


def _model_draft(dcfg, dparams, kind, values, cache, prev_B, token_B, keys_B, x: int):
  """X tokens of the draft model and their distributions q [B, X, V] (None when greedy).

  The first step feeds [prev, token] (prev re-written at its own slot, same K/V), so the
  draft cache never misses the last token of a fully accepted round.
  """
  logits_B2V, cache = model.apply(dcfg, dparams, jnp.stack([prev_B, token_B], 1), cache=cache)

  def pick(logits_BV, i):
    keys = None if kind.greedy else jax.vmap(jax.random.fold_in, (0, None))(keys_B, i)
    tok_B = next_tokens(logits_BV, keys, kind, values)
    q_BV = None if kind.greedy else jax.nn.softmax(filter_logits(logits_BV, kind, values), -1)
    return tok_B, q_BV

  tok_B, q_BV = pick(logits_B2V[:, 1], 0)

  def body(carry, i):
    cache, tok_B = carry
    logits_B1V, cache = model.apply(dcfg, dparams, tok_B[:, None], cache=cache)
    nxt_B, q_BV = pick(logits_B1V[:, 0], i)
    return (cache, nxt_B), (nxt_B, q_BV)

  (cache, _), (rest_XB, rest_q) = lax.scan(body, (cache, tok_B), jnp.arange(1, x))
  drafted_BX = jnp.concatenate([tok_B[:, None], rest_XB.T], axis=1)
  q_BXV = None
  if not kind.greedy:
    q_BXV = jnp.concatenate([q_BV[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1)
  return drafted_BX, q_BXV, cache


# ---- verification ----------------------------------------------------------------------------

def _verify(kind: SamplingKind, values: SamplingValues, logits_BTV, drafted_BX, q_BXV, key_B):
  """(accepted count n_B, the T candidate tokens e_BT: e_i = d_{i+1} for i < n, e_n the
  target's own token).

  q_BXV None means a point mass on the drafted token (prompt lookup).
  """
  b, t, v = logits_BTV.shape
  x = t - 1
  if kind.greedy:
    target_BT = jnp.argmax(logits_BTV, -1).astype(jnp.int32)
    ok_BX = drafted_BX == target_BT[:, :x]
    n_B = jnp.cumprod(ok_BX, axis=1).sum(1).astype(jnp.int32)
    return n_B, target_BT
  p_BTV = jax.nn.softmax(filter_logits(logits_BTV.reshape(b * t, v), kind, values), -1)
  p_BTV = p_BTV.reshape(b, t, v)
  if q_BXV is None:
    q_BXV = jax.nn.one_hot(drafted_BX, v, dtype=jnp.float32)
  key_u, key_x = jax.vmap(lambda k: jax.random.split(k, 2), out_axes=1)(key_B)
  u_BX = jax.vmap(lambda k: jax.random.uniform(k, (x,)))(key_u)
  p_d_BX = jnp.take_along_axis(p_BTV[:, :x], drafted_BX[..., None], -1)[..., 0]
  q_d_BX = jnp.take_along_axis(q_BXV, drafted_BX[..., None], -1)[..., 0]
  ok_BX = u_BX * q_d_BX < p_d_BX  # u < p / q, without dividing
  n_B = jnp.cumprod(ok_BX, axis=1).sum(1).astype(jnp.int32)
  # The corrected distribution at position n: norm(max(p - q, 0)), or p when all passed.
  q_pad_BTV = jnp.concatenate([q_BXV, jnp.zeros((b, 1, v), q_BXV.dtype)], axis=1)
  p_n_BV = jnp.take_along_axis(p_BTV, n_B[:, None, None], axis=1)[:, 0]
  q_n_BV = jnp.take_along_axis(q_pad_BTV, n_B[:, None, None], axis=1)[:, 0]
  resid_BV = jnp.maximum(p_n_BV - q_n_BV, 0.0)
  mass_B1 = resid_BV.sum(-1, keepdims=True)
  resid_BV = jnp.where(mass_B1 > 0, resid_BV / jnp.where(mass_B1 > 0, mass_B1, 1.0), p_n_BV)
  own_B = jax.vmap(jax.random.categorical)(key_x, jnp.log(resid_BV)).astype(jnp.int32)
  e_BT = jnp.concatenate([drafted_BX, own_B[:, None]], axis=1)
  e_BT = jnp.where(jnp.arange(t)[None, :] == n_B[:, None], own_B[:, None], e_BT)
  return n_B, e_BT


def _write_rows(buf_BN, new_BT, start_B):
  return jax.vmap(lambda row, new, i: lax.dynamic_update_slice(row, new, (i,)))(
      buf_BN, new_BT, start_B)


def _round(cfg, dcfg, kind, st: _Static, params, dparams, state: SpecState, max_new, stop_ids,
           values) -> SpecState:
  """One draft-and-verify round for every row."""
  x = st.draft_tokens
  t = x + 1
  keys_B = jax.vmap(jax.random.fold_in, (0, None))(state.keys_B, state.rounds + 1)
  key_draft_B, key_verify_B = jax.vmap(lambda k: jax.random.split(k, 2), out_axes=1)(keys_B)
  q_BXV, draft_cache = None, state.draft_cache
  if st.max_ngram:
    drafted_BX = _lookup_draft(state.history_BY, state.prompt_len_B + state.count_B,
                               st.max_ngram, x)
  else:
    drafted_BX, q_BXV, draft_cache = _model_draft(engine.step_config(dcfg), dparams, kind,
                                                  values, draft_cache,
                                                  state.prev_B, state.token_B, key_draft_B, x)
  inputs_BT = jnp.concatenate([state.token_B[:, None], drafted_BX], axis=1)
  start_B = state.cache.lengths_B
  logits_BTV, cache = model.apply(engine.step_config(cfg), params, inputs_BT, cache=state.cache)
  n_B, e_BT = _verify(kind, values, logits_BTV, drafted_BX, q_BXV, key_verify_B)

  # What the row keeps of e_0..e_n: up to its first stop id and its max_new budget.
  running_B = ~state.done_B
  j_T = jnp.arange(t)[None, :]
  is_stop_BT = (e_BT[..., None] == stop_ids[None, None, :]).any(-1)
  first_stop_B = jnp.min(jnp.where(is_stop_BT & (j_T <= n_B[:, None]), j_T, t), axis=1)
  budget_B = max_new - state.count_B
  keep_B = jnp.minimum(jnp.minimum(n_B + 1, first_stop_B), budget_B)
  keep_B = jnp.where(running_B, keep_B, 0)
  stopped_B = running_B & (first_stop_B < jnp.minimum(n_B + 1, budget_B))
  written_BT = jnp.where(j_T < keep_B[:, None], e_BT, engine.NO_TOKEN)
  tokens_BE = _write_rows(state.tokens_BE, written_BT, state.count_B)
  history_BY = _write_rows(state.history_BY, jnp.where(j_T < keep_B[:, None], e_BT, 0),
                           state.prompt_len_B + state.count_B)
  count_B = state.count_B + keep_B
  done_B = state.done_B | stopped_B | (count_B >= max_new)

  # Roll the caches back past the first rejection: [t, d_1..d_n] stay, e_n is the next input.
  new_len_B = jnp.where(running_B, start_B + n_B + 1, start_B)
  e_n_B = jnp.take_along_axis(e_BT, n_B[:, None], axis=1)[:, 0]
  prev_B = jnp.take_along_axis(inputs_BT, n_B[:, None], axis=1)[:, 0]
  if draft_cache is not None:
    draft_cache = draft_cache.replace(lengths_B=new_len_B - 1)
  return state.replace(
      rounds=state.rounds + 1,
      token_B=jnp.where(running_B, e_n_B, state.token_B),
      prev_B=jnp.where(running_B, prev_B, state.prev_B),
      done_B=done_B, count_B=count_B, tokens_BE=tokens_BE, history_BY=history_BY,
      drafted_B=state.drafted_B + jnp.where(running_B, x, 0),
      accepted_B=state.accepted_B + jnp.where(running_B, n_B, 0),
      cache=cache.replace(lengths_B=new_len_B), draft_cache=draft_cache)


def _prefill(cfg, dcfg, kind, st: _Static, params, dparams, prompts_BP, lengths_B, done_B,
             max_new, stop_ids, values, seed) -> SpecState:
  """The prompt pass of the target (and the draft model) and token 0 of every row."""
  b, p = prompts_BP.shape
  plan = st.plan
  cache = model.init_cache(cfg, b, max_len=plan.cache_len)
  logits_BPV, cache = model.apply(cfg, params, prompts_BP, cache=cache)
  keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(b))
  first_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, 0)  # as the engine's
  token_B = next_tokens(engine._last_logits(logits_BPV, lengths_B),
                        None if kind.greedy else first_keys_B, kind, values)
  is_stop_B = (token_B[:, None] == stop_ids[None, :]).any(-1)
  emit_B = ~done_B & ~is_stop_B
  e = plan.new_tokens + st.draft_tokens + 1
  tokens_BE = jnp.full((b, e), engine.NO_TOKEN, jnp.int32)
  tokens_BE = tokens_BE.at[:, 0].set(jnp.where(emit_B, token_B, engine.NO_TOKEN))
  history_BY = jnp.zeros((b, p + e), jnp.int32).at[:, :p].set(prompts_BP)
  history_BY = _write_rows(history_BY, token_B[:, None], lengths_B)
  count_B = emit_B.astype(jnp.int32)
  prev_B = jnp.take_along_axis(prompts_BP, (lengths_B - 1)[:, None], axis=1)[:, 0]
  draft_cache = None
  if dcfg is not None:
    draft_cache = model.init_cache(dcfg, b, max_len=plan.cache_len)
    _, draft_cache = model.apply(dcfg, dparams, prompts_BP, cache=draft_cache)
    draft_cache = draft_cache.replace(lengths_B=lengths_B - 1)
  zeros_B = jnp.zeros((b,), jnp.int32)
  return SpecState(
      rounds=jnp.int32(0), token_B=token_B, prev_B=prev_B,
      done_B=done_B | is_stop_B | (count_B >= max_new), count_B=count_B, tokens_BE=tokens_BE,
      history_BY=history_BY, prompt_len_B=lengths_B, drafted_B=zeros_B, accepted_B=zeros_B,
      keys_B=keys_B, cache=cache.replace(lengths_B=lengths_B), draft_cache=draft_cache)


def _loop(cfg, dcfg, kind, st, params, dparams, state, end, max_new, stop_ids, values):
  """Rounds until `end` rounds or every row done (plan() left T spare cache slots)."""

  def cond(s: SpecState):
    return (s.rounds < end) & ~jnp.all(s.done_B)

  def body(s: SpecState):
    return _round(cfg, dcfg, kind, st, params, dparams, s, max_new, stop_ids, values)

  return lax.while_loop(cond, body, state)


_STATIC = ("cfg", "dcfg", "kind", "st")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jit(cfg, dcfg, kind, st, params, dparams, prompts_BP, lengths_B, done_B, max_new,
                  stop_ids, values, seed):
  cfg, params = engine.decode_model(cfg, params)
  if dcfg is not None:
    dcfg, dparams = engine.decode_model(dcfg, dparams)
  state = _prefill(cfg, dcfg, kind, st, params, dparams, prompts_BP, lengths_B, done_B,
                   max_new, stop_ids, values, seed)
  return _loop(cfg, dcfg, kind, st, params, dparams, state, max_new, max_new, stop_ids, values)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_jit(cfg, dcfg, kind, st, params, dparams, prompts_BP, lengths_B, done_B, max_new,
                 stop_ids, values, seed):
  return _prefill(cfg, dcfg, kind, st, params, dparams, prompts_BP, lengths_B, done_B,
                  max_new, stop_ids, values, seed)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _loop_jit(cfg, dcfg, kind, st, params, dparams, state, end, max_new, stop_ids, values):
  return _loop(cfg, dcfg, kind, st, params, dparams, state, end, max_new, stop_ids, values)


# ---- host side -------------------------------------------------------------------------------

def _prepare(cfg, prompts_ids, max_new_tokens, draft, draft_tokens, sampling, stop_ids,
             cache_len):
  if isinstance(draft_tokens, bool) or int(draft_tokens) != draft_tokens or not (
      1 <= draft_tokens <= 32):
    raise ValueError(f"draft_tokens={draft_tokens!r} must be an integer in [1, 32]")
  if isinstance(draft, PromptLookup):
    dcfg, dparams, ngram = None, None, draft.max_ngram
  elif isinstance(draft, DraftModel):
    dcfg, dparams, ngram = draft.cfg, draft.params, 0
    if dcfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"the draft model's vocabulary ({dcfg.vocab_size}) differs from the "
                       f"target's ({cfg.vocab_size}); they must share a tokenizer")
  else:
    raise ValueError(f"draft must be PromptLookup() or DraftModel(cfg, params), got {draft!r}")
  # Each round writes T = X + 1 slots past a row's length before rolling back: plan for them.
  req = engine._request(cfg, prompts_ids, int(max_new_tokens) + int(draft_tokens) + 1,
                        sampling, stop_ids, True, cache_len, False, False)
  if dcfg is not None:
    lengths = [len(r) for r in engine._check_prompts(cfg, prompts_ids)]
    engine.plan(dcfg, lengths, int(max_new_tokens) + int(draft_tokens) + 1,
                req.opts.plan.cache_len)  # the draft's cache has the target's slots
  return req, dcfg, dparams, _Static(req.opts.plan, int(draft_tokens), ngram)


def _stats(req, state: SpecState) -> Speculation:
  return Speculation(int(state.rounds), int(np.asarray(state.drafted_B)[:req.rows].sum()),
                     int(np.asarray(state.accepted_B)[:req.rows].sum()))


def generate(cfg: ModelConfig, params, prompts_ids, max_new_tokens: int, *,
             draft: PromptLookup | DraftModel = PromptLookup(), draft_tokens: int = 4,
             sampling: Sampling = engine.GREEDY, seed: int = 0, stop_ids=(),
             cache_len: int | None = None) -> engine.Generation:
  """New tokens of each prompt by speculative decoding; `.speculation` holds the acceptance.

  Same tokens as `engine.generate` when greedy; the same distribution when sampling.
  """
  req, dcfg, dparams, st = _prepare(cfg, prompts_ids, max_new_tokens, draft, draft_tokens,
                                    sampling, stop_ids, cache_len)
  if max_new_tokens == 0:
    return engine.Generation([[] for _ in range(req.rows)], [False] * req.rows,
                             speculation=Speculation(0, 0, 0))
  state = _generate_jit(cfg, dcfg, req.kind, st, params, dparams, req.prompts_BP, req.lengths_B,
                        req.done_B, np.int32(max_new_tokens), req.stop_ids, req.values,
                        engine._seed(seed))
  return _finish(req, state, max_new_tokens)


def _finish(req, state: SpecState, max_new_tokens: int) -> engine.Generation:
  count_B = np.asarray(state.count_B)[:req.rows]
  tokens_BE = np.asarray(state.tokens_BE)
  done_B = np.asarray(state.done_B)[:req.rows]
  tokens = [tokens_BE[r, :count_B[r]].tolist() for r in range(req.rows)]
  # done covers both ends; a row stopped at a stop id when it ended short of its budget or the
  # plain engine's rule says so (the stop token was drawn within the budget).
  stopped = [bool(d) and int(c) < max_new_tokens for d, c in zip(done_B, count_B, strict=True)]
  return engine.Generation(tokens, stopped, speculation=_stats(req, state))


def stream_ids(cfg: ModelConfig, params, prompts_ids, max_new_tokens: int, *,
               draft: PromptLookup | DraftModel = PromptLookup(), draft_tokens: int = 4,
               sampling: Sampling = engine.GREEDY, seed: int = 0, stop_ids=(),
               cache_len: int | None = None, chunk_size: int = 8,
               stats: list | None = None) -> Iterator[list[list[int]]]:
  """Yield each row's new tokens every `chunk_size` rounds; the chunks concatenate to
  `generate(...)`'s tokens. `stats`, a list, receives the final Speculation."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  req, dcfg, dparams, st = _prepare(cfg, prompts_ids, max_new_tokens, draft, draft_tokens,
                                    sampling, stop_ids, cache_len)
  if max_new_tokens == 0:
    return
  cfg, params = engine.decode_model(cfg, params)
  if dcfg is not None:
    dcfg, dparams = engine.decode_model(dcfg, dparams)
  max_new = np.int32(max_new_tokens)
  state = _prefill_jit(cfg, dcfg, req.kind, st, params, dparams, req.prompts_BP, req.lengths_B,
                       req.done_B, max_new, req.stop_ids, req.values, engine._seed(seed))
  sent_B = np.zeros(req.rows, np.int64)
  while True:
    count_B = np.asarray(state.count_B)[:req.rows]
    if (count_B > sent_B).any():
      tokens_BE = np.asarray(state.tokens_BE)
      yield [tokens_BE[r, sent_B[r]:count_B[r]].tolist() for r in range(req.rows)]
      sent_B = count_B.copy()
    if bool(np.all(np.asarray(state.done_B))):
      break
    state = _loop_jit(cfg, dcfg, req.kind, st, params, dparams, state,
                      state.rounds + np.int32(chunk_size), max_new, req.stop_ids, req.values)
  if stats is not None:
    stats.append(_stats(req, state))
