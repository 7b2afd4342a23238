"""Interventions: edit chosen heads, MLPs or residual positions inside the same `apply`.

  iv = ablate_heads(cfg, [(1, 0), (1, 3)])                  # zero two heads of layer 1
  logits_BTV, _ = model.apply(cfg, params, tokens_BT, interventions=iv)

Every field holds per-layer arrays stacked on a leading L axis, so an
`Interventions` rides through `nn.scan` (and `jax.jit`) like the layer
params do; a field left None costs nothing. Edits, in layer l:

  resid:  x_pre[b, t]       <- resid_value[l, b, t]        where resid_mask[l, b, t]
  heads:  head_out[b, t, n] =  head_scale[l, n] * o_n W_O[n]   (o_n: head n's attention
                                                               output, [H]; W_O[n]: [H, D])
          head_out[b, t, n] <- head_value[l, b, t, n]     where head_mask[l, b, t, n]
          attn_out = sum_n head_out[b, t, n] + b_O
  mlp:    mlp_out[b, t]     <- mlp_scale[l] * mlp_out[b, t]
          mlp_out[b, t]     <- mlp_value[l, b, t]          where mlp_mask[l, b, t]

A head's output is its whole contribution to the residual stream (W_O is
linear, so scaling o_n scales exactly head n's share; the bias belongs to no
head), so ablating a head changes that head's term and nothing else in its
layer. Replacement values use the shapes of the sown intermediates
('head_out' [B, T, N, D], 'mlp_out' and 'resid_pre' [B, T, D]), so patching
activations from another run is `replace_heads(cfg, other['head_out'], ...)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


@flax.struct.dataclass
class Interventions:
  """Edits of the forward pass; every array has a leading L axis (see the module docstring).

  head_scale_LN [L, N]; head_value_LBTND [L, B, T, N, D] with head_mask_LBTN [L, B, T, N];
  mlp_scale_L [L]; mlp_value_LBTD [L, B, T, D] with mlp_mask_LBT [L, B, T];
  resid_value_LBTD [L, B, T, D] with resid_mask_LBT [L, B, T].
  """

  head_scale_LN: jax.Array | None = None
  head_value_LBTND: jax.Array | None = None
  head_mask_LBTN: jax.Array | None = None
  mlp_scale_L: jax.Array | None = None
  mlp_value_LBTD: jax.Array | None = None
  mlp_mask_LBT: jax.Array | None = None
  resid_value_LBTD: jax.Array | None = None
  resid_mask_LBT: jax.Array | None = None

  def check(self, cfg: ModelConfig, batch: int, length: int) -> None:
    """Raise a ValueError naming the field whose shape does not fit cfg and tokens [B, T]."""
    lbt = (cfg.n_layers, batch, length)
    n, d = cfg.n_heads, cfg.d_model
    want = {
        "head_scale_LN": (cfg.n_layers, n), "head_value_LBTND": lbt + (n, d),
        "head_mask_LBTN": lbt + (n,), "mlp_scale_L": (cfg.n_layers,),
        "mlp_value_LBTD": lbt + (d,), "mlp_mask_LBT": lbt,
        "resid_value_LBTD": lbt + (d,), "resid_mask_LBT": lbt,
    }
    for name, shape in want.items():
      value = getattr(self, name)
      if value is not None and tuple(value.shape) != shape:
        raise ValueError(f"Interventions.{name}: expected shape {shape} for L={cfg.n_layers}, "
                         f"B={batch}, T={length}, N={n}, D={d}; got {tuple(value.shape)}")
    for value_name, mask_name in (("head_value_LBTND", "head_mask_LBTN"),
                                  ("mlp_value_LBTD", "mlp_mask_LBT"),
                                  ("resid_value_LBTD", "resid_mask_LBT")):
      if (getattr(self, value_name) is None) != (getattr(self, mask_name) is None):
        raise ValueError(f"Interventions: {value_name} and {mask_name} go together")
    if cfg.ffn == "none" and (self.mlp_scale_L is not None or self.mlp_mask_LBT is not None):
      raise ValueError("Interventions: this model has no MLP (ffn='none') to intervene on")


def _check_layer(cfg: ModelConfig, layer: int) -> int:
  if not 0 <= layer < cfg.n_layers:
    raise ValueError(f"layer {layer} out of range: the model has {cfg.n_layers} layers")
  return layer


def _check_head(cfg: ModelConfig, head: int) -> int:
  if not 0 <= head < cfg.n_heads:
    raise ValueError(f"head {head} out of range: the model has {cfg.n_heads} heads per layer")
  return head


def scale_heads(cfg: ModelConfig, scales: Mapping[tuple[int, int], float]) -> Interventions:
  """Multiply the outputs of heads {(layer, head): factor}."""
  scale_LN = np.ones((cfg.n_layers, cfg.n_heads), np.float32)
  for (layer, head), factor in scales.items():
    scale_LN[_check_layer(cfg, layer), _check_head(cfg, head)] = factor
  return Interventions(head_scale_LN=jnp.asarray(scale_LN))


def ablate_heads(cfg: ModelConfig, heads: Iterable[tuple[int, int]]) -> Interventions:
  """Zero the outputs of the (layer, head) pairs."""
  return scale_heads(cfg, {tuple(h): 0.0 for h in heads})


def _positions_mask(length: int, positions) -> np.ndarray:
  mask_T = np.zeros(length, bool)
  if positions is None:
    mask_T[:] = True
  else:
    positions = np.atleast_1d(np.asarray(positions))
    if positions.size and (positions.min() < -length or positions.max() >= length):
      raise ValueError(f"positions {positions.tolist()} out of range for {length} tokens")
    mask_T[positions] = True
  return mask_T


def replace_heads(cfg: ModelConfig, values_LBTND, heads: Iterable[tuple[int, int]],
                  positions=None) -> Interventions:
  """Set the outputs of the (layer, head) pairs to values_LBTND at `positions` (None: all)."""
  values_LBTND = jnp.asarray(values_LBTND)
  _, b, t, _, _ = values_LBTND.shape
  mask_LN = np.zeros((cfg.n_layers, cfg.n_heads), bool)
  for layer, head in heads:
    mask_LN[_check_layer(cfg, layer), _check_head(cfg, head)] = True
  mask_T = _positions_mask(t, positions)
  mask_LBTN = np.broadcast_to(mask_LN[:, None, None, :] & mask_T[None, None, :, None],
                              (cfg.n_layers, b, t, cfg.n_heads))
  return Interventions(head_value_LBTND=values_LBTND, head_mask_LBTN=jnp.asarray(mask_LBTN))


def scale_mlps(cfg: ModelConfig, scales: Mapping[int, float]) -> Interventions:
  """Multiply the MLP outputs of layers {layer: factor}."""
  scale_L = np.ones(cfg.n_layers, np.float32)
  for layer, factor in scales.items():
    scale_L[_check_layer(cfg, layer)] = factor
  return Interventions(mlp_scale_L=jnp.asarray(scale_L))


def ablate_mlps(cfg: ModelConfig, layers: Iterable[int]) -> Interventions:
  """Zero the MLP outputs of `layers`."""
  return scale_mlps(cfg, {layer: 0.0 for layer in layers})


def _layer_position_mask(cfg: ModelConfig, layers, positions, b: int, t: int) -> np.ndarray:
  mask_L = np.zeros(cfg.n_layers, bool)
  for layer in np.atleast_1d(layers):
    mask_L[_check_layer(cfg, int(layer))] = True
  mask_T = _positions_mask(t, positions)
  return np.broadcast_to(mask_L[:, None, None] & mask_T[None, None, :], (cfg.n_layers, b, t))


def replace_mlps(cfg: ModelConfig, values_LBTD, layers: Iterable[int],
                 positions=None) -> Interventions:
  """Set the MLP outputs of `layers` to values_LBTD at `positions` (None: all)."""
  values_LBTD = jnp.asarray(values_LBTD)
  _, b, t, _ = values_LBTD.shape
  mask = _layer_position_mask(cfg, list(layers), positions, b, t)
  return Interventions(mlp_value_LBTD=values_LBTD, mlp_mask_LBT=jnp.asarray(mask))


def replace_resid(cfg: ModelConfig, values_LBTD, layer: int, positions) -> Interventions:
  """Set the residual stream entering `layer` (its 'resid_pre') to values_LBTD at `positions`.

  values_LBTD may also be [B, T, D] (the value for that one layer).
  """
  values = jnp.asarray(values_LBTD)
  if values.ndim == 3:
    values = jnp.zeros((cfg.n_layers,) + values.shape, values.dtype).at[layer].set(values)
  _, b, t, _ = values.shape
  mask = _layer_position_mask(cfg, [layer], positions, b, t)
  return Interventions(resid_value_LBTD=values, resid_mask_LBT=jnp.asarray(mask))


def combine(*interventions: Interventions) -> Interventions:
  """One Interventions doing all of them: scales multiply; a later replacement wins."""
  out = {}
  for iv in interventions:
    for name in ("head_scale_LN", "mlp_scale_L"):
      value = getattr(iv, name)
      if value is not None:
        out[name] = value if name not in out else out[name] * value
    for value_name, mask_name in (("head_value_LBTND", "head_mask_LBTN"),
                                  ("mlp_value_LBTD", "mlp_mask_LBT"),
                                  ("resid_value_LBTD", "resid_mask_LBT")):
      value, mask = getattr(iv, value_name), getattr(iv, mask_name)
      if value is None:
        continue
      if value_name in out:
        value = jnp.where(mask[..., None], value, out[value_name])
        mask = mask | out[mask_name]
      out[value_name], out[mask_name] = value, mask
  return Interventions(**out)


def layer_intermediates(cfg: ModelConfig, intermediates) -> dict:
  """Sown intermediates as {name: [L, ...] array}, whether the layers were scanned or not.

  Keys: resid_pre, resid_mid, resid_post, attn_out, mlp_out, attn_weights [L, B, N, T, S],
  head_out [L, B, T, N, D], and final_resid [B, T, D] (no L axis).
  """
  if cfg.scan_layers:
    layers = intermediates["layers"]
  else:
    layers = jax.tree.map(lambda *a: jnp.stack(a),
                          *[intermediates[f"layers_{i}"] for i in range(cfg.n_layers)])
  out = {k: v for k, v in layers.items() if k != "attn"}
  out.update(layers["attn"])
  out["final_resid"] = intermediates["final_resid"]
  return out
