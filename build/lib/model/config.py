"""ModelConfig: every architectural choice of the decoder-only transformer.

A frozen (hashable) dataclass, so it can be a static argument of `jax.jit`.
It is validated at construction: a bad value raises `ValueError` naming the
field. Derived sizes (`kv_heads`, `head_size`, `ffn_size`) are properties so
that `dataclasses.replace` never leaves a stale derived value behind.
`RopeScaling` (Llama 3's rescaled RoPE frequencies) is its one nested field: a
dict in JSON and in `--set`, a frozen dataclass inside.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

POSITIONS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
FFNS = ("relu", "gelu", "gelu_exact", "swiglu", "geglu", "none")
MLP_LORA_TARGETS = ("up", "gate", "gate_up", "down")
ATTENTION_KINDS = ("global", "local", "strided")
ATTENTION_IMPLS = ("dense", "chunked", "xla", "splash", "cudnn", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q", "k", "v", "o", "qkv", "up", "gate", "gate_up", "down")
# Fields that change how a model runs, not which weights it has or how they are laid out
# (scan_layers is not one: it stacks the layers' params on one axis or keeps them apart).
ROPE_SCALING_TYPES = ("llama3",)
RUNTIME_FIELDS = ("attention_impl", "attn_chunk_size", "dropout_rate", "attn_dropout_rate",
                  "remat", "dtype")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's RoPE frequency rescaling (transformers' rope_type "llama3"; model/positions.py).

  A pair j of wavelength lambda_j = 2 pi / omega_j keeps its frequency omega_j when lambda_j
  is short (below original_max_position_embeddings / high_freq_factor), is slowed to
  omega_j / factor when long (above original_max_position_embeddings / low_freq_factor), and
  is interpolated between the two in between.

  Attributes:
    factor: how much the longest wavelengths are stretched (8 in Llama 3.1, 32 in 3.2).
    low_freq_factor, high_freq_factor: bounds of the interpolated band (1 and 4 in Llama 3.x).
    original_max_position_embeddings: the context the model was pretrained on (8192).
    rope_type: "llama3", the only kind.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int
  rope_type: str = "llama3"

  def __post_init__(self):
    def fail(field, message):
      raise ValueError(f"ModelConfig.rope_scaling.{field}={getattr(self, field)!r}: {message}")

    if self.rope_type not in ROPE_SCALING_TYPES:
      fail("rope_type", f"must be one of {ROPE_SCALING_TYPES}")
    for field in ("factor", "low_freq_factor", "high_freq_factor"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        fail(field, "must be a positive number")
    if self.high_freq_factor <= self.low_freq_factor:
      fail("high_freq_factor", f"must exceed low_freq_factor={self.low_freq_factor} (the "
           "interpolated band would be empty or inverted)")
    value = self.original_max_position_embeddings
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      fail("original_max_position_embeddings", "must be a positive integer")

  @classmethod
  def from_value(cls, value) -> RopeScaling | None:
    """None, a RopeScaling, or a mapping of its fields (config.json, `--set`, ml_collections)."""
    if value is None or isinstance(value, cls):
      return value
    if not isinstance(value, Mapping):
      raise ValueError(f"ModelConfig.rope_scaling={value!r}: must be null or a mapping with "
                       f"keys {_ROPE_SCALING_KEYS}")
    unknown = sorted(set(value) - set(_ROPE_SCALING_KEYS))
    missing = [k for k in _ROPE_SCALING_KEYS if k != "rope_type" and k not in value]
    if unknown or missing:
      problems = [f"{what} key(s) {keys}" for what, keys in (("unknown", unknown),
                                                              ("missing", missing)) if keys]
      raise ValueError(f"ModelConfig.rope_scaling={dict(value)!r}: {', '.join(problems)}; "
                       f"keys: {_ROPE_SCALING_KEYS}")
    return cls(**value)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_ROPE_SCALING_KEYS = tuple(f.name for f in dataclasses.fields(RopeScaling))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder-only transformer language model.

  Attributes (dimension letters of the shape legend in brackets):
    vocab_size: V, rows of the token embedding E [V, D].
    d_model: D, width of the residual stream.
    n_layers: L, number of transformer blocks.
    n_heads: N, query heads.
    n_kv_heads: K, key/value heads (None: K = N, multi-head; 1: multi-query;
      1 < K < N: grouped-query with G = N / K query heads per kv head).
    head_dim: H, per-head width d_k (None: D / N).
    d_ff: F, feed-forward hidden width (None: 4D, or 8D/3 rounded up to a
      multiple of 32 for gated FFNs, which keeps the parameter count of 4D).
    max_seq_len: longest sequence (size of the learned position table, and
      the default KV-cache length).
    position: "learned" | "sinusoidal" | "rope" | "none".
    rope_theta: RoPE base frequency.
    rope_scaling: None (the textbook's RoPE) or a `RopeScaling` (Llama 3's
      rescaled frequencies); a dict of its fields is accepted and converted.
    norm: "layernorm" (gain and bias) | "rmsnorm" (gain only).
    norm_placement: "pre" (norm inside the residual branch, plus a final norm)
      | "post" (norm after each residual add, as in Vaswani et al. 2017).
    norm_eps: epsilon inside the norm's square root.
    ffn: "relu" | "gelu" (tanh approximation, GPT-2) | "gelu_exact" |
      "swiglu" | "geglu" | "none" (no MLP sublayer: an attention-only model).
    attn_bias: biases on the q/k/v/o projections.
    o_bias: with attn_bias, whether the output projection o has one too
      (False: biases on q/k/v only, the Qwen2 layout); no effect without attn_bias.
    mlp_bias: biases on the feed-forward projections.
    fused_qkv: one [D, (N + 2K) H] projection instead of three (Phi-3 layout).
    fused_gate_up: one [D, 2F] projection for gated FFNs (Phi-3 layout).
    tie_embeddings: LM head is E^T (the "unembedding") instead of its own
      [D, V] matrix.
    causal: causal mask (a language model) or bidirectional attention.
    attention_pattern: per-layer attention kinds, cycled over the layers:
      "global" (full), "local" (sliding window of `window_size` keys),
      "strided" (Child et al. 2019: the previous `sparse_stride` keys plus
      every `sparse_stride`-th key before them). ("global", "local")
      alternates dense and banded layers like GPT-3.
    window_size: keys a "local" query sees (itself included).
    sparse_stride: stride of "strided" layers.
    attention_impl: "dense" (reference, eq. 8.33-8.37), "chunked"
      (flash-style online softmax, O(T * block) memory), "xla"
      (`jax.nn.dot_product_attention`), "splash" (Pallas TPU kernel; TPU only),
      "cudnn" (cuDNN flash attention; NVIDIA GPU only) or "auto" (splash on TPU,
      cudnn on GPU where it serves the call, chunked otherwise; picked from
      jax.devices()[0].platform when the model is traced). model/kernels.py says
      which masks the accelerator kernels serve.
    attn_chunk_size: query/key block of the chunked kernel, and of splash (rounded up
      to a multiple of 128).
    dropout_rate: dropout on the embeddings and on both residual branches.
    attn_dropout_rate: dropout on the attention weights (dense kernel only).
    scan_layers: stack the blocks' params on a leading L axis and run them with
      `nn.scan` (compile time independent of depth); False unrolls them.
    remat: activation rematerialization policy for each block.
    dtype: compute dtype; softmax, norms and logits stay float32.
    param_dtype: storage dtype of the parameters.
    init_std: std of the normal initializers; residual output projections use
      init_std / sqrt(2 L) (GPT-2).
    lora_rank, lora_alpha, lora_targets: LoRA adapters (rank r, scale
      alpha / r) on the named projections; 0 disables them.
  """

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int | None = None
  max_seq_len: int = 256
  position: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm: str = "layernorm"
  norm_placement: str = "pre"
  norm_eps: float = 1e-5
  ffn: str = "gelu"
  attn_bias: bool = True
  o_bias: bool = True
  mlp_bias: bool = True
  fused_qkv: bool = False
  fused_gate_up: bool = False
  tie_embeddings: bool = True
  causal: bool = True
  attention_pattern: tuple[str, ...] = ("global",)
  window_size: int = 0
  sparse_stride: int = 0
  attention_impl: str = "dense"
  attn_chunk_size: int = 128
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  def __post_init__(self):
    # Lists from JSON or ml_collections become tuples so the config stays hashable.
    for name in ("attention_pattern", "lora_targets"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      object.__setattr__(self, name, tuple(value))
    object.__setattr__(self, "rope_scaling", RopeScaling.from_value(self.rope_scaling))
    self._validate()

  # ---- derived sizes -------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    """K: key/value heads."""
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_size(self) -> int:
    """H: per-head width d_k."""
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  @property
  def gated_ffn(self) -> bool:
    return self.ffn in ("swiglu", "geglu")

  @property
  def ffn_size(self) -> int:
    """F: feed-forward hidden width (0 for an attention-only model)."""
    if self.ffn == "none":
      return 0
    if self.d_ff is not None:
      return self.d_ff
    if self.gated_ffn:
      return 32 * math.ceil(8 * self.d_model / 3 / 32)
    return 4 * self.d_model

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """Attention kind of each of the L layers (the pattern, cycled)."""
    pattern = self.attention_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

  # ---- validation ----------------------------------------------------------
  def _validate(self):
    def fail(field, message):
      raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {message}")

    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                  "attn_chunk_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(field, "must be a positive integer")
    for field in ("n_kv_heads", "head_dim", "d_ff"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value <= 0):
        fail(field, "must be a positive integer or None")
    choices = {
        "position": POSITIONS, "norm": NORMS, "norm_placement": NORM_PLACEMENTS,
        "ffn": FFNS, "attention_impl": ATTENTION_IMPLS, "remat": REMAT_POLICIES,
        "dtype": DTYPES, "param_dtype": DTYPES,
    }
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        fail(field, f"must be one of {allowed}")
    if self.n_heads % self.kv_heads:
      fail("n_kv_heads", f"n_heads={self.n_heads} must be divisible by n_kv_heads")
    if self.head_dim is None and self.d_model % self.n_heads:
      fail("n_heads", f"d_model={self.d_model} must be divisible by n_heads "
           "when head_dim is not set")
    if self.position == "rope" and self.head_size % 2:
      fail("head_dim", f"RoPE needs an even head size, got {self.head_size}")
    if self.position == "sinusoidal" and self.d_model % 2:
      fail("d_model", "sinusoidal positions need an even d_model")
    if self.rope_theta <= 0:
      fail("rope_theta", "must be positive")
    if self.rope_scaling is not None and self.position != "rope":
      fail("rope_scaling", f"rescales RoPE frequencies; position={self.position!r} has none")
    if self.norm_eps <= 0:
      fail("norm_eps", "must be positive")
    if not self.attention_pattern:
      fail("attention_pattern", "must name at least one attention kind")
    for kind in self.attention_pattern:
      if kind not in ATTENTION_KINDS:
        fail("attention_pattern", f"unknown kind {kind!r}; known: {ATTENTION_KINDS}")
    if self.window_size < 0:
      fail("window_size", "must be >= 0")
    if "local" in self.attention_pattern and self.window_size < 1:
      fail("window_size", "a 'local' layer needs window_size >= 1")
    if self.sparse_stride < 0:
      fail("sparse_stride", "must be >= 0")
    if "strided" in self.attention_pattern and self.sparse_stride < 1:
      fail("sparse_stride", "a 'strided' layer needs sparse_stride >= 1")
    for field in ("dropout_rate", "attn_dropout_rate"):
      if not 0.0 <= getattr(self, field) < 1.0:
        fail(field, "must be in [0, 1)")
    if self.attn_dropout_rate > 0 and self.attention_impl != "dense":
      fail("attn_dropout_rate", "dropout on attention weights needs attention_impl='dense'")
    if self.fused_gate_up and not self.gated_ffn:
      fail("fused_gate_up", f"needs a gated ffn (swiglu/geglu), not {self.ffn!r}")
    if self.init_std <= 0:
      fail("init_std", "must be positive")
    if self.lora_rank < 0:
      fail("lora_rank", "must be >= 0")
    for target in self.lora_targets:
      if target not in LORA_TARGETS:
        fail("lora_targets", f"unknown projection {target!r}; known: {LORA_TARGETS}")
    if self.ffn == "none" and set(self.lora_targets) & set(MLP_LORA_TARGETS):
      fail("lora_targets", "an attention-only model (ffn='none') has no MLP projections")
    if self.lora_rank > 0 and not self.lora_targets:
      fail("lora_targets", "lora_rank > 0 needs at least one target projection")

  # ---- serialization -------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    """JSON-ready: tuples become lists, rope_scaling a dict (or None)."""
    def plain(v):
      if isinstance(v, tuple):
        return list(v)
      return v.to_dict() if isinstance(v, RopeScaling) else v
    return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def weight_differences(self, other: ModelConfig, *, ignore: tuple[str, ...] = ()
                         ) -> list[str]:
    """Fields that differ between the two configs and change the weights (their shapes,
    layout, dtype or meaning): every field but RUNTIME_FIELDS and `ignore`."""
    return [f.name for f in dataclasses.fields(self)
            if f.name not in RUNTIME_FIELDS + tuple(ignore)
            and getattr(self, f.name) != getattr(other, f.name)]


def parse_field_overrides(items: Iterable[str]) -> dict[str, Any]:
  """['n_layers=8', 'position=rope'] -> {'n_layers': 8, 'position': 'rope'} (`--set` flags).

  Values are JSON (numbers, true/false, null, lists) or else plain strings; the
  field names are checked when the ModelConfig is built.
  """
  overrides = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"expected field=value, got {item!r}")
    try:
      overrides[key] = json.loads(text)
    except json.JSONDecodeError:
      overrides[key] = text
  return overrides
