"""Building blocks: linear maps, embeddings, norms and feed-forward networks.

Flax Linen modules whose parameters carry logical axis names (see
`model/sharding.py`). Kernels are stored [in, out] so that y = x W reads like
the textbook; biases are [out].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


class Linear(nn.Module):
  """y = x W + b, W: [in, out]; with LoRA (Hu et al. 2021) y += (alpha / r) x A B.

  The LoRA factors A [in, r] (random) and B [r, out] (zero, so training starts
  from the base model) live in their own variable collection, 'lora', apart
  from the base parameters.
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x_BTI):
    d_in = x_BTI.shape[-1]
    kernel_init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
    w_IO = self.param("kernel", kernel_init, (d_in, self.features), self.param_dtype)
    x = x_BTI.astype(self.dtype)
    y_BTO = jnp.dot(x, w_IO.astype(self.dtype))
    if self.has_variable("params", "kernel_scale"):  # int8 weights (model/quant.py)
      y_BTO = y_BTO * self.get_variable("params", "kernel_scale").astype(self.dtype)
    if self.use_bias:
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],))
      b_O = self.param("bias", bias_init, (self.features,), self.param_dtype)
      y_BTO = y_BTO + b_O.astype(self.dtype)
    if self.lora_rank:
      a_init = nn.with_logical_partitioning(
          nn.initializers.normal(1.0 / self.lora_rank), (self.axes[0], None))
      b_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1]))
      # Init functions draw their rng lazily: `apply` with given adapters has no 'params' rng.
      # The adapters are what trains: float32 masters (and so float32 moments) even on a
      # bfloat16 base, whose frozen weights need no master copy.
      a_IR = self.variable("lora", "a", lambda: a_init(
          self.make_rng("params"), (d_in, self.lora_rank), jnp.float32)).value
      b_RO = self.variable("lora", "b", lambda: b_init(
          self.make_rng("params"), (self.lora_rank, self.features), jnp.float32)).value
      scale = self.lora_alpha / self.lora_rank
      y_BTO = y_BTO + scale * jnp.dot(jnp.dot(x, a_IR.astype(self.dtype)), b_RO.astype(self.dtype))
    return y_BTO


class Embed(nn.Module):
  """Token embedding E [V, D]: x_t = E[token_t]; `attend` is the unembedding x E^T."""

  vocab_size: int
  d_model: int
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed"))
    self.embedding = self.param("embedding", init, (self.vocab_size, self.d_model),
                                self.param_dtype)

  def _scale_V1(self):
    """Per-row scales of an int8 table (model/quant.py), else None."""
    if self.has_variable("params", "embedding_scale"):
      return self.get_variable("params", "embedding_scale")
    return None

  def __call__(self, tokens_BT):
    x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)
    scale_V1 = self._scale_V1()
    if scale_V1 is not None:
      x_BTD = x_BTD * jnp.take(scale_V1, tokens_BT, axis=0).astype(self.dtype)
    return x_BTD

  def attend(self, x_BTD):
    """Logits = x E^T in float32 (eq. 8.46 with tied weights)."""
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD.astype(jnp.float32),
                            self.embedding.astype(jnp.float32))
    scale_V1 = self._scale_V1()
    return logits_BTV if scale_V1 is None else logits_BTV * scale_V1[:, 0]


class LayerNorm(nn.Module):
  """LayerNorm (eq. 8.22-8.25): gamma * (x - mu) / sqrt(sigma^2 + eps) + beta, in float32."""

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,), self.param_dtype)
    x = x_BTD.astype(jnp.float32)
    mu_BT1 = x.mean(-1, keepdims=True)
    var_BT1 = jnp.square(x - mu_BT1).mean(-1, keepdims=True)
    y = (x - mu_BT1) * jax.lax.rsqrt(var_BT1 + self.eps) * scale + bias
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019): gamma * x / sqrt(mean(x^2) + eps), in float32."""

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), self.param_dtype)
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  cls = LayerNorm if cfg.norm == "layernorm" else RMSNorm
  return cls(eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
             name=name)


def make_linear(cfg: ModelConfig, name: str, features: int, axes, *, use_bias: bool,
                residual_out: bool = False) -> Linear:
  """A Linear configured from cfg; `residual_out` scales the init by 1/sqrt(2L) (GPT-2)."""
  std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual_out else cfg.init_std
  rank = cfg.lora_rank if name in cfg.lora_targets else 0
  return Linear(features, axes, use_bias=use_bias, init_std=std, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), lora_rank=rank,
                lora_alpha=cfg.lora_alpha, name=name)


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}


class FeedForward(nn.Module):
  """Position-wise FFN.

  relu/gelu (eq. 8.21):  FFN(x) = act(x W1 + b1) W2 + b2        W1: [D, F], W2: [F, D]
  swiglu/geglu:          FFN(x) = (act(x W_gate) * (x W_up)) W_down
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    f, act = cfg.ffn_size, _ACTIVATIONS[cfg.ffn]
    if cfg.gated_ffn:
      if cfg.fused_gate_up:
        gate_up_BTF2 = make_linear(cfg, "gate_up", 2 * f, ("embed", "mlp"),
                                   use_bias=cfg.mlp_bias)(x_BTD)
        gate_BTF, up_BTF = gate_up_BTF2[..., :f], gate_up_BTF2[..., f:]
      else:
        gate_BTF = make_linear(cfg, "gate", f, ("embed", "mlp"), use_bias=cfg.mlp_bias)(x_BTD)
        up_BTF = make_linear(cfg, "up", f, ("embed", "mlp"), use_bias=cfg.mlp_bias)(x_BTD)
      h_BTF = act(gate_BTF) * up_BTF
    else:
      h_BTF = act(make_linear(cfg, "up", f, ("embed", "mlp"), use_bias=cfg.mlp_bias)(x_BTD))
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
    return make_linear(cfg, "down", cfg.d_model, ("mlp", "embed"), use_bias=cfg.mlp_bias,
                       residual_out=True)(h_BTF)
