"""The decoder-only transformer: attention, blocks, the layer stack, the LM head.

Shape legend: B batch, T new tokens, S key slots, D d_model, N query heads,
K kv heads, H head dim, F ffn width, V vocab, L layers.

Pre-norm block (GPT-2 and later; eq. 8.26-8.31 with the norms moved inside):
  t1 = LN(x);  t2 = MultiHeadAttention(t1);  t3 = t2 + x
  t4 = LN(t3); t5 = FFN(t4);                 h  = t5 + t3
Post-norm block (Vaswani et al. 2017):
  t3 = LN(x + MultiHeadAttention(x));        h  = LN(t3 + FFN(t3))

Intermediates are sown into the 'intermediates' collection when the caller
makes it mutable (`apply(..., return_intermediates=True)`); otherwise sowing
is a no-op and costs nothing. Interventions (model/interventions.py) ride
through the layer stack with the per-layer inputs and scale or replace head
outputs, MLP outputs and residual positions. ffn='none' drops the MLP
sublayer (an attention-only model).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from model import positions as pos_lib
from model.attention import attention, dense_attention
from model.config import ModelConfig
from model.layers import Embed, FeedForward, dtype_of, make_linear, make_norm
from model.masks import Mask

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SelfAttention(nn.Module):
  """Multi-head / grouped-query causal self-attention (eq. 8.15-8.19, 8.35-8.37).

  q = x W_Q [B,T,N,H], k = x W_K, v = x W_V [B,T,K,H] (optionally one fused
  W_QKV), RoPE on q and k, then attention over the cached and new keys, and
  the output projection W_O [N H, D].
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask: Mask, kv=None, cache_start_B=None, iv=None):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size
    if cfg.fused_qkv:
      qkv = make_linear(cfg, "qkv", (n + 2 * k) * h, ("embed", "qkv"),
                        use_bias=cfg.attn_bias)(x_BTD)
      q, key, value = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
    else:
      q = make_linear(cfg, "q", n * h, ("embed", "heads"), use_bias=cfg.attn_bias)(x_BTD)
      key = make_linear(cfg, "k", k * h, ("embed", "kv_heads"), use_bias=cfg.attn_bias)(x_BTD)
      value = make_linear(cfg, "v", k * h, ("embed", "kv_heads"), use_bias=cfg.attn_bias)(x_BTD)
    q_BTNH = q.reshape(b, t, n, h)
    k_BTKH = key.reshape(b, t, k, h)
    v_BTKH = value.reshape(b, t, k, h)
    if cfg.position == "rope":
      q_BTNH = pos_lib.apply_rope(q_BTNH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
      k_BTKH = pos_lib.apply_rope(k_BTKH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))

    if kv is None:
      k_BSKH, v_BSKH, new_kv = k_BTKH, v_BTKH, None
    elif len(kv) == 2:  # scanned layers: this layer's [B, S, K, H] slice of the cache
      def write(cache_SKH, new_TKH, start):
        return lax.dynamic_update_slice_in_dim(cache_SKH, new_TKH.astype(cache_SKH.dtype),
                                               start, axis=0)
      k_BSKH = jax.vmap(write)(kv[0], k_BTKH, cache_start_B)
      v_BSKH = jax.vmap(write)(kv[1], v_BTKH, cache_start_B)
      new_kv = (k_BSKH, v_BSKH)
    else:
      # Unrolled layers: the whole [L, B, S, K, H] cache threads through the blocks and each
      # writes its rows in place, instead of slicing a layer out and stacking them back
      # (two copies of the cache per decoded token).
      k_LBSKH, v_LBSKH, layer = kv
      # One scatter of the B x T new rows (in place), not a per-row update vmapped over B.
      row_B1 = jnp.arange(b)[:, None]
      slot_BT = cache_start_B[:, None] + jnp.arange(t)[None, :]
      k_LBSKH = k_LBSKH.at[layer, row_B1, slot_BT].set(k_BTKH.astype(k_LBSKH.dtype),
                                                        unique_indices=True)
      v_LBSKH = v_LBSKH.at[layer, row_B1, slot_BT].set(v_BTKH.astype(v_LBSKH.dtype),
                                                        unique_indices=True)
      k_BSKH, v_BSKH = k_LBSKH[layer], v_LBSKH[layer]
      new_kv = (k_LBSKH, v_LBSKH, layer)

    dropout_fn = None
    if cfg.attn_dropout_rate > 0 and not self.deterministic:
      dropout_fn = nn.Dropout(cfg.attn_dropout_rate, deterministic=False)
    if self.is_mutable_collection("intermediates"):
      # Looking inside: the dense path also returns the weights it used.
      o_BTNH, w_BNTS = dense_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype),
                                       v_BSKH.astype(q_BTNH.dtype), mask,
                                       dropout_fn=dropout_fn, return_weights=True)
      self.sow("intermediates", "attn_weights", w_BNTS)
    else:
      o_BTNH = attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), mask,
                         impl=cfg.attention_impl, chunk_size=cfg.attn_chunk_size,
                         dropout_fn=dropout_fn)
    # Interventions on heads (model/interventions.py): W_O is linear, so scaling or zeroing
    # o_n before it scales or removes exactly head n's share; replaced heads add their value.
    keep_BTN = None
    if iv is not None and iv.head_scale_LN is not None:
      keep_BTN = jnp.broadcast_to(iv.head_scale_LN, (b, t, n))
    if iv is not None and iv.head_mask_LBTN is not None:
      keep_BTN = jnp.where(iv.head_mask_LBTN, 0.0, 1.0 if keep_BTN is None else keep_BTN)
    if keep_BTN is not None:
      o_BTNH = o_BTNH * keep_BTN[..., None].astype(o_BTNH.dtype)
    o_proj = make_linear(cfg, "o", cfg.d_model, ("heads", "embed"),
                         use_bias=cfg.attn_bias and cfg.o_bias, residual_out=True)
    out_BTD = o_proj(o_BTNH.reshape(b, t, n * h))
    replaced_BTND = None
    if iv is not None and iv.head_mask_LBTN is not None:
      replaced_BTND = jnp.where(iv.head_mask_LBTN[..., None], iv.head_value_LBTND, 0.0)
      out_BTD = out_BTD + replaced_BTND.sum(2).astype(out_BTD.dtype)
    if self.is_mutable_collection("intermediates"):
      # Head n's share of the output: o_n W_O[n] (the bias is nobody's head), with the
      # LoRA update of W_O when it has one.
      w_ID = o_proj.variables["params"]["kernel"].astype(jnp.float32)
      if "lora" in o_proj.variables:
        a_IR, b_RD = o_proj.variables["lora"]["a"], o_proj.variables["lora"]["b"]
        w_ID = w_ID + (o_proj.lora_alpha / o_proj.lora_rank) * (
            a_IR.astype(jnp.float32) @ b_RD.astype(jnp.float32))
      head_out_BTND = jnp.einsum("BTNH,NHD->BTND", o_BTNH.astype(jnp.float32),
                                 w_ID.reshape(n, h, cfg.d_model))
      if replaced_BTND is not None:
        head_out_BTND = head_out_BTND + replaced_BTND.astype(jnp.float32)
      self.sow("intermediates", "head_out", head_out_BTND)
    return out_BTD, new_kv


class Block(nn.Module):
  """One transformer block; a scan body: (x, per-layer inputs) -> (x, per-layer outputs)."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, layer_in, positions_BT, mask: Mask, cache_start_B):
    cfg = self.cfg
    mask = mask.with_kind(layer_in["kind"])
    iv = layer_in.get("iv")  # this layer's slice of an Interventions (model/interventions.py)
    attn = SelfAttention(cfg, self.deterministic, name="attn")
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    if iv is not None and iv.resid_mask_LBT is not None:
      x_BTD = jnp.where(iv.resid_mask_LBT[..., None], iv.resid_value_LBTD.astype(x_BTD.dtype),
                        x_BTD)
    self.sow("intermediates", "resid_pre", x_BTD)

    def mlp(x_BTD):
      if cfg.ffn == "none":  # attention-only model
        return jnp.zeros_like(x_BTD)
      mlp_out = FeedForward(cfg, name="mlp")(
          make_norm(cfg, "mlp_norm")(x_BTD) if cfg.norm_placement == "pre" else x_BTD)
      if iv is not None and iv.mlp_scale_L is not None:
        mlp_out = mlp_out * iv.mlp_scale_L.astype(mlp_out.dtype)
      if iv is not None and iv.mlp_mask_LBT is not None:
        mlp_out = jnp.where(iv.mlp_mask_LBT[..., None], iv.mlp_value_LBTD.astype(mlp_out.dtype),
                            mlp_out)
      return mlp_out

    if cfg.norm_placement == "pre":
      attn_out, new_kv = attn(make_norm(cfg, "attn_norm")(x_BTD), positions_BT, mask,
                              layer_in.get("kv"), cache_start_B, iv)
      x_BTD = x_BTD + drop(attn_out)
      self.sow("intermediates", "resid_mid", x_BTD)
      mlp_out = mlp(x_BTD)
      x_BTD = x_BTD + drop(mlp_out)
    else:
      attn_out, new_kv = attn(x_BTD, positions_BT, mask, layer_in.get("kv"), cache_start_B, iv)
      x_BTD = make_norm(cfg, "attn_norm")(x_BTD + drop(attn_out))
      self.sow("intermediates", "resid_mid", x_BTD)
      mlp_out = mlp(x_BTD)
      if cfg.ffn != "none":
        x_BTD = make_norm(cfg, "mlp_norm")(x_BTD + drop(mlp_out))
    self.sow("intermediates", "attn_out", attn_out)
    self.sow("intermediates", "mlp_out", mlp_out)
    self.sow("intermediates", "resid_post", x_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed_act"))
    return x_BTD, new_kv


def _block_class(cfg: ModelConfig):
  if cfg.remat == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (float32), and the updated K/V of every layer."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, mask: Mask, layer_kinds_L, kv_LBSKH=None,
               cache_start_B=None, interventions=None):
    """`interventions`: an Interventions (model/interventions.py), sliced per layer like kv."""
    cfg = self.cfg
    embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype_of(cfg.dtype),
                  dtype_of(cfg.param_dtype), name="embed")
    x_BTD = embed(tokens_BT)
    if cfg.position == "learned":
      init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                          ("length", "embed"))
      table_MD = self.param("pos_embedding", init, (cfg.max_seq_len, cfg.d_model),
                            dtype_of(cfg.param_dtype))
      x_BTD = x_BTD + jnp.take(table_MD, positions_BT, axis=0).astype(x_BTD.dtype)
    elif cfg.position == "sinusoidal":
      x_BTD = x_BTD + pos_lib.sinusoidal(positions_BT, cfg.d_model).astype(x_BTD.dtype)
    x_BTD = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed_act"))

    layer_in = {"kind": layer_kinds_L}
    if interventions is not None:
      layer_in["iv"] = interventions
    if kv_LBSKH is not None:
      layer_in["kv"] = kv_LBSKH
    block_cls = _block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(
          block_cls,
          variable_axes={"params": 0, "lora": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.deterministic, name="layers")
      x_BTD, new_kv = stack(x_BTD, layer_in, positions_BT, mask, cache_start_B)
    else:
      per_layer = {key: value for key, value in layer_in.items() if key != "kv"}
      new_kv = kv_LBSKH
      for i in range(cfg.n_layers):
        layer_in_i = jax.tree.map(lambda a, i=i: a[i], per_layer)
        if new_kv is not None:
          layer_in_i["kv"] = (*new_kv, i)
        x_BTD, kv_i = block_cls(cfg, self.deterministic, name=f"layers_{i}")(
            x_BTD, layer_in_i, positions_BT, mask, cache_start_B)
        new_kv = None if kv_i is None else kv_i[:2]

    if cfg.norm_placement == "pre":
      x_BTD = make_norm(cfg, "final_norm")(x_BTD)
    self.sow("intermediates", "final_resid", x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = make_linear(cfg.replace(dtype="float32"), "lm_head", cfg.vocab_size,
                               ("embed", "vocab"), use_bias=False)(x_BTD.astype(jnp.float32))
    logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
    return logits_BTV, new_kv
