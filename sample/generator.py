"""Text in, text out: a Generator built from a workdir.

  gen = Generator.from_workdir("runs/tiny")
  gen.generate("To be", max_new_tokens=50)                        # greedy -> str
  gen.generate(["To be", "O Romeo"], 50, temperature=0.8, top_k=40, seed=1)   # -> [str, str]
  for piece in gen.stream("To be", 50, temperature=0.8):
    print(piece, end="", flush=True)
  gen.top_next_tokens("The capital of France is", k=5)            # [(text, prob), ...]

Completions are the text of prompt + new tokens minus the text of the prompt,
so a tokenizer that marks spaces on the following token (sentencepiece,
GPT-2) keeps the space in front of the first new word. Generation stops at
the tokenizer's eos id and at any `stop` string (not included in the text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from model import quant, store
from sample import distribution, engine, speculative
from sample.strategies import Sampling, from_args

PROMPT_LOOKUP = "prompt_lookup"


class Generator:
  """A model, its parameters (layers unrolled once for decoding) and its tokenizer."""

  def __init__(self, cfg, params, tokenizer, *, step: int | None = None,
               stop_ids: Sequence[int] = (), quantize: str = "none",
               draft: speculative.PromptLookup | speculative.DraftModel | None = None,
               draft_tokens: int = 4):
    """`params` of a plain model (a LoRA run's adapters merged: `model.store.load_params`);
    `stop_ids`: token ids that end a row besides the tokenizer's eos (Phi-3 has three).
    quantize='int8': int8 matmul weights (model/quant.py; params already int8 stay so).
    draft: decode speculatively (sample/speculative.py) with `draft_tokens` per round;
    `last_speculation` then holds the acceptance statistics of the latest call."""
    if cfg.lora_rank:
      raise ValueError("Generator takes a plain model: merge the LoRA adapters first "
                       "(model.store.load_params does, or model.lora.merge)")
    if quant.check_mode(quantize) == "int8" and not quant.is_quantized(params):
      params = quant.quantize(params)
    self.cfg, self.params = engine.decode_model(cfg, params)
    self.tokenizer = tokenizer
    self.step = step
    self.stop_ids = tuple(int(i) for i in stop_ids)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                       f"{cfg.vocab_size}")
    if isinstance(draft, speculative.DraftModel):
      dcfg, dparams = engine.decode_model(draft.cfg, draft.params)
      draft = speculative.DraftModel(dcfg, dparams)
    self.draft, self.draft_tokens = draft, draft_tokens
    self.last_speculation: speculative.Speculation | None = None

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *, quantize: str = "none",
                   draft: str | None = None, draft_tokens: int = 4) -> Generator:
    """Config, tokenizer and the latest (or given) checkpoint's params (LoRA adapters merged).

    draft: 'prompt_lookup', or the workdir of a smaller model with the same tokenizer.
    """
    loaded = store.load_params(workdir, step)
    # An imported checkpoint records every id its generation config stops at (model/hf).
    stop_ids = store.read_config(workdir).get("source", {}).get("stop_ids") or ()
    tokenizer = store.load_tokenizer(workdir)
    return cls(loaded.cfg, loaded.params, tokenizer, step=loaded.step, stop_ids=stop_ids,
               quantize=quantize, draft=_load_draft(draft, tokenizer, quantize),
               draft_tokens=draft_tokens)

  # ---- tokens ----------------------------------------------------------------------------
  def encode(self, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt becomes one start token (a model needs one token).

    The start token is bos where the tokenizer prepends it to every text (Llama, Phi-3);
    otherwise eos, the end-of-text separator training packs between documents (GPT-2's
    convention for unconditional samples).
    """
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = list(self.tokenizer.encode(prompt))
    if not ids:
      tok = self.tokenizer
      start = tok.bos_id if getattr(tok, "add_bos", False) or tok.eos_id is None else tok.eos_id
      if start is None:
        raise ValueError("the prompt is empty and the tokenizer has no bos/eos token to start from")
      ids = [start]
    return ids

  def stops(self, stop) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(stop strings, stop ids): eos always; a stop string that is one token also stops early."""
    if stop is None:
      stop = ()
    elif isinstance(stop, str):
      stop = (stop,)
    strings = tuple(s for s in stop if s)
    if any(not isinstance(s, str) for s in strings):
      raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    ids = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
    ids += [i for i in self.stop_ids if i not in ids]
    for s in strings:
      encoded = self.tokenizer.encode(s)
      if len(encoded) == 1 and self.tokenizer.decode(encoded) == s:
        ids.append(encoded[0])
    return strings, tuple(ids)

  def _completion(self, prompt_ids: list[int], new_ids: list[int], stops) -> str:
    return _Detokenizer(self.tokenizer, prompt_ids, stops).finish(new_ids)

  # ---- generation ------------------------------------------------------------------------
  def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 100, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop: str | Sequence[str] | None = None, return_full_text: bool = False,
               use_cache: bool = True) -> str | list[str]:
    """Completion(s) of a prompt (-> str) or a list of prompts (-> list of str).

    temperature 0 (default) is greedy; otherwise temperature, top-k (0: off),
    top-p (1: off), deterministic for a seed. return_full_text prepends the prompt.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    texts = self._generate(prompts, max_new_tokens, from_args(temperature, top_k, top_p), seed,
                           stop, return_full_text, use_cache)
    return texts[0] if single else texts

  def _generate(self, prompts, max_new_tokens, sampling: Sampling, seed, stop, return_full_text,
                use_cache) -> list[str]:
    strings, stop_ids = self.stops(stop)
    prompt_ids = [self.encode(p) for p in prompts]
    if self.draft is None:
      out = engine.generate(self.cfg, self.params, prompt_ids, max_new_tokens,
                            sampling=sampling, seed=seed, stop_ids=stop_ids, use_cache=use_cache)
    else:
      self._check_speculative(use_cache)
      out = speculative.generate(self.cfg, self.params, prompt_ids, max_new_tokens,
                                 draft=self.draft, draft_tokens=self.draft_tokens,
                                 sampling=sampling, seed=seed, stop_ids=stop_ids)
      self.last_speculation = out.speculation
    texts = [self._completion(p, new, strings)
             for p, new in zip(prompt_ids, out.tokens, strict=True)]
    if return_full_text:
      texts = [p + t for p, t in zip(prompts, texts, strict=True)]
    return texts

  def stream(self, prompt: str, max_new_tokens: int = 100, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop: str | Sequence[str] | None = None, use_cache: bool = True,
             chunk_size: int = 8) -> Iterator[str]:
    """Yield the completion of one prompt in pieces as it is decoded (chunk_size tokens per
    jitted call); the pieces concatenate to `generate(prompt, ...)` with the same arguments."""
    if not isinstance(prompt, str):
      raise ValueError("stream takes one prompt string; call it once per prompt")
    strings, stop_ids = self.stops(stop)
    prompt_ids = self.encode(prompt)
    detok = _Detokenizer(self.tokenizer, prompt_ids, strings)
    sampling = from_args(temperature, top_k, top_p)
    if self.draft is None:
      chunks = engine.stream_ids(self.cfg, self.params, [prompt_ids], max_new_tokens,
                                 sampling=sampling, seed=seed, stop_ids=stop_ids,
                                 use_cache=use_cache, chunk_size=chunk_size)
    else:
      self._check_speculative(use_cache)
      stats = []
      chunks = speculative.stream_ids(self.cfg, self.params, [prompt_ids], max_new_tokens,
                                      draft=self.draft, draft_tokens=self.draft_tokens,
                                      sampling=sampling, seed=seed, stop_ids=stop_ids,
                                      chunk_size=chunk_size, stats=stats)
      chunks = self._recording(chunks, stats)
    for rows in chunks:
      piece = detok.push(rows[0])
      if piece:
        yield piece
      if detok.stopped:
        chunks.close()
        return
    piece = detok.flush()
    if piece:
      yield piece

  def _check_speculative(self, use_cache: bool):
    if not use_cache:
      raise ValueError("speculative decoding needs the KV cache (use_cache=True)")

  def _recording(self, chunks, stats):
    """Pass the chunks through; keep the acceptance statistics when they end."""
    try:
      yield from chunks
    finally:
      chunks.close()
      self.last_speculation = stats[-1] if stats else None

  # ---- the next-token distribution -------------------------------------------------------
  def logits(self, prompt: str) -> np.ndarray:
    """[T, V]: the next-token logits after each prompt token."""
    return distribution.prompt_logits(self.cfg, self.params, self.encode(prompt))

  def top_next_tokens(self, prompt: str, k: int = 5,
                      temperature: float = 1.0) -> list[tuple[str, float]]:
    """The k most likely next tokens as (decoded text, probability)."""
    ids, probs = distribution.top_next_tokens(self.cfg, self.params, self.encode(prompt), k,
                                              temperature=temperature)
    return [(self.tokenizer.decode([int(i)]), float(p)) for i, p in zip(ids, probs, strict=True)]


def _load_draft(draft: str | None, tokenizer, quantize: str):
  """'prompt_lookup' -> PromptLookup(); a workdir -> its model, checked to share the tokenizer."""
  if not draft:
    return None
  if draft == PROMPT_LOOKUP:
    return speculative.PromptLookup()
  loaded = store.load_params(draft)
  probe = "def f(x):\n  return x + 1  # ok"
  other = store.load_tokenizer(draft)
  if other.vocab_size != tokenizer.vocab_size or other.encode(probe) != tokenizer.encode(probe):
    raise ValueError(f"draft workdir {draft!r} has another tokenizer than the target's; a draft "
                     "model must share the target's tokenizer")
  params = loaded.params
  if quant.check_mode(quantize) == "int8" and not quant.is_quantized(params):
    params = quant.quantize(params)
  return speculative.DraftModel(loaded.cfg, params)


class _Detokenizer:
  """Turns a growing list of token ids into text pieces that are safe to print.

  The text of prompt + new ids is decoded whole each time (so pieces never
  split a multi-byte UTF-8 character or lose a sentencepiece space) and the
  new part is released except for a tail that may still change: replacement
  characters of an unfinished UTF-8 sequence, and a suffix that could be the
  start of a stop string. A complete stop string ends the text before it.
  """

  def __init__(self, tokenizer, prompt_ids, stops: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.ids = list(prompt_ids)
    self.offset = len(tokenizer.decode(self.ids))
    self.stops = tuple(stops)
    self.sent = ""
    self.stopped = False

  def _new_text(self) -> str:
    return self.tokenizer.decode(self.ids)[self.offset:]

  def _cut_at_stop(self, text: str) -> str:
    cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
    if cuts:
      self.stopped = True
      return text[:min(cuts)]
    return text

  def _release(self, text: str) -> str:
    piece = text[len(self.sent):] if text.startswith(self.sent) else ""
    self.sent += piece
    return piece

  def push(self, new_ids) -> str:
    self.ids.extend(int(i) for i in new_ids)
    text = self._cut_at_stop(self._new_text())
    if self.stopped:
      return self._release(text)
    complete = len(text.rstrip("\ufffd"))
    safe = complete
    for s in self.stops:
      for k in range(min(len(s) - 1, complete), 0, -1):
        if text[:complete].endswith(s[:k]):
          safe = min(safe, complete - k)
          break
    return self._release(text[:safe])

  def flush(self) -> str:
    return self._release(self._cut_at_stop(self._new_text()))

  def finish(self, new_ids) -> str:
    """The whole completion at once."""
    self.ids.extend(int(i) for i in new_ids)
    return self._cut_at_stop(self._new_text())
