"""Sampling: a jitted prefill + while-loop decode with a KV cache, strategies, text API, CLI.

  from sample import generate_ids, Generator
  new_ids = generate_ids(cfg, params, [[5, 7, 9]], max_new_tokens=20)      # token ids in/out
  gen = Generator.from_workdir("runs/tiny")                                # text in/out
  print(gen.generate("To be", max_new_tokens=50, temperature=0.8))

See sample/README.md.
"""

from sample.engine import Generation, generate, generate_ids, stream_ids
from sample.generator import Generator
from sample.speculative import DraftModel, PromptLookup, Speculation
from sample.strategies import Greedy, Sampling, Temperature, TopK, TopP

__all__ = [
    "DraftModel", "Generation", "Generator", "Greedy", "PromptLookup", "Sampling", "Speculation",
    "Temperature", "TopK", "TopP", "generate", "generate_ids", "stream_ids",
]
