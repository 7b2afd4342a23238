"""Position information: sinusoidal tables and rotary embeddings (RoPE).

Learned absolute positions are a plain [max_seq_len, D] table in
`model/transformer.py`; "none" adds nothing (causal attention alone carries
order).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from model.config import RopeScaling


def sinusoidal(positions_BT: jnp.ndarray, d_model: int) -> jnp.ndarray:
  """Vaswani et al. (2017) positions, [B, T] -> [B, T, D] float32.

  PE[p, 2i] = sin(p / 10000^(2i/D)),  PE[p, 2i+1] = cos(p / 10000^(2i/D)).
  """
  i_half = jnp.arange(d_model // 2, dtype=jnp.float32)
  inv_freq = 1.0 / (10000.0 ** (2.0 * i_half / d_model))
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * inv_freq
  pe_BTJ2 = jnp.stack([jnp.sin(angle_BTJ), jnp.cos(angle_BTJ)], axis=-1)
  return pe_BTJ2.reshape(*positions_BT.shape, d_model)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> jnp.ndarray:
  """omega_J [H/2] float32: the angle per position of each rotated pair j.

  Plain RoPE: omega_j = theta^(-2j/H). Llama 3 scaling (`RopeScaling`), with
  wavelength lambda_j = 2 pi / omega_j, C = original_max_position_embeddings:
    s_j = clip((C / lambda_j - low_freq_factor) / (high_freq_factor - low_freq_factor), 0, 1)
    omega_j' = omega_j ((1 - s_j) / factor + s_j)
  so wavelengths longer than C / low_freq_factor (s = 0) are stretched by `factor`,
  those shorter than C / high_freq_factor (s = 1) are kept, and the band between
  is interpolated (transformers' `_compute_llama3_parameters`, written as one clip).
  """
  omega_J = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return omega_J
  wavelength_J = 2 * math.pi / omega_J
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  s_J = jnp.clip((scaling.original_max_position_embeddings / wavelength_J - low) / (high - low),
                 0.0, 1.0)
  return omega_J * ((1.0 - s_J) / scaling.factor + s_J)


def apply_rope(x_BTNH: jnp.ndarray, positions_BT: jnp.ndarray, theta: float,
               scaling: RopeScaling | None = None) -> jnp.ndarray:
  """Rotary position embedding (Su et al. 2021), in the "rotate half" layout.

  Dimension pairs (j, j + H/2) are rotated by the angle p * omega_j
  (`rope_frequencies`: theta^(-2j/H), or Llama 3's rescaling of it):
    y[j]       = x[j] cos - x[j + H/2] sin
    y[j + H/2] = x[j + H/2] cos + x[j] sin
  so that <R_p q, R_s k> depends on p and s only through p - s. This is the
  layout of the Hugging Face GPT-NeoX/Llama/Phi-3 checkpoints.
  """
  h = x_BTNH.shape[-1]
  omega_J = rope_frequencies(h, theta, scaling)
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * omega_J
  cos_BT1J = jnp.cos(angle_BTJ)[:, :, None, :]
  sin_BT1J = jnp.sin(angle_BTJ)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  rotated = jnp.concatenate([x1 * cos_BT1J - x2 * sin_BT1J, x2 * cos_BT1J + x1 * sin_BT1J], -1)
  return rotated.astype(x_BTNH.dtype)


def positions_from_segments(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
  """Per-document positions of a packed row: restart at 0 where the segment id changes.

  [[1, 1, 1, 2, 2, 3]] -> [[0, 1, 2, 0, 1, 0]].
  """
  t = jnp.arange(segment_ids_BT.shape[1])
  is_start_BT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
      axis=1)
  start_BT = jnp.where(is_start_BT, t, 0)
  return t - lax.cummax(start_BT, axis=1)
