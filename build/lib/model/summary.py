"""Print a model as a module tree with shapes and parameter counts, like `print(torch_module)`.

  python -m model.summary --preset=phi3-mini
  python -m model.summary --preset=gpt2-small --set n_layers=24 --set d_model=1024

Nothing is allocated: shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

import math

import jax
from absl import app, flags

from model.api import abstract_params
from model.config import ModelConfig, parse_field_overrides
from model.counting import count_params, estimate_params
from model.presets import get_preset


def _n(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _describe(name: str, node, stacked: bool) -> str | None:
  """One-line description of a leaf module, or None for a container."""
  def shape(x):
    return x.shape[1:] if stacked else x.shape

  if not isinstance(node, dict):
    if name == "pos_embedding":
      return "PositionEmbedding({}, {})".format(*shape(node))
    return f"Param{tuple(shape(node))}"
  if "embedding" in node:
    return "Embedding({}, {})".format(*shape(node["embedding"]))
  if "kernel" in node:
    d_in, d_out = shape(node["kernel"])
    return f"Linear({d_in} -> {d_out}, bias={'bias' in node})"
  if "scale" in node:
    kind = "LayerNorm" if "bias" in node else "RMSNorm"
    return f"{kind}({shape(node['scale'])[0]})"
  return None


_ORDER = ["attn_norm", "attn", "mlp_norm", "mlp", "q", "k", "v", "qkv", "o", "gate", "up",
          "gate_up", "down"]


def _sorted_children(node: dict):
  def rank(item):
    return (_ORDER.index(item[0]) if item[0] in _ORDER else len(_ORDER), item[0])

  return sorted(node.items(), key=rank)


def _lines(name: str, node, depth: int, stacked: bool, layers: int):
  """(text, count) rows; inside a scanned stack the counts are per layer."""
  pad = "  " * depth
  leaf = _describe(name, node, stacked)
  count = _n(node) // layers if stacked and depth > 1 else _n(node)
  if leaf is not None:
    yield f"{pad}({name}): {leaf}", count
    return
  title = {"attn": "Attention", "mlp": "FeedForward"}.get(name, "Block")
  if name == "layers" and stacked:
    title = f"{layers} x Block"  # the count on this line is all layers; inside, one layer
  yield f"{pad}({name}): {title}(", count
  for child, sub in _sorted_children(node):
    yield from _lines(child, sub, depth + 1, stacked, layers)
  yield f"{pad})", None


def summary(cfg: ModelConfig, name: str = "Transformer") -> str:
  """The module tree of `cfg`, one module per line, parameter counts on the right."""
  shapes = abstract_params(cfg)
  rows = [(f"{name}(", None)]
  order = ["embed", "pos_embedding", "layers"] + [
      f"layers_{i}" for i in range(cfg.n_layers)] + ["final_norm", "lm_head"]
  for key in order:
    if key in shapes:
      rows += list(_lines(key, shapes[key], 1, cfg.scan_layers and key == "layers", cfg.n_layers))
  rows.append((")", None))
  width = max(len(text) for text, _ in rows) + 2
  out = [text.ljust(width) + (f"{count:>15,}" if count is not None else "") for text, count in rows]
  counts = count_params(cfg)
  tied = "tied to the embedding" if cfg.tie_embeddings else "untied"
  out += [
      "",
      f"total parameters          {counts.total:>15,}  ({counts.total / 1e6:,.1f}M)",
      f"non-embedding parameters  {counts.non_embedding:>15,}",
      f"12 L d^2 estimate         {estimate_params(cfg):>15,}  (eq. 8.52)",
      f"LM head: {tied}; attention: {cfg.n_heads} query heads, {cfg.kv_heads} kv heads, "
      f"head dim {cfg.head_size}; positions: {cfg.position}; norm: {cfg.norm} "
      f"({cfg.norm_placement}); ffn: {cfg.ffn} (d_ff {cfg.ffn_size})",
  ]
  return "\n".join(out)


def main(argv):
  del argv
  overrides = parse_field_overrides(flags.FLAGS.set)
  print(summary(get_preset(flags.FLAGS.preset, **overrides), name=flags.FLAGS.preset))


if __name__ == "__main__":
  flags.DEFINE_string("preset", "nanogpt-baby", "Model preset name (see model/presets.py).")
  flags.DEFINE_multi_string("set", [], "Override a ModelConfig field: --set n_layers=8.")
  app.run(main)
