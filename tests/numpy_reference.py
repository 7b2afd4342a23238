"""The transformer in plain NumPy, written from the textbook equations.

Independent of model/ (jax only walks the params pytree): loops over rows
and heads where the book does, a rotation matrix for RoPE, an explicit mask.
Equation numbers are those of Jurafsky & Martin, "Speech and Language
Processing" (3rd ed.), chapter 8. Everything runs in float64 so that the
reference is the exact side of a comparison. Shape letters follow
model/README.md.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from scipy.special import erf


def softmax(z, axis=-1):
  z = z - np.max(z, axis=axis, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=axis, keepdims=True)


# ---- norms -----------------------------------------------------------------
def layer_norm(x, gamma, beta, eps):
  """Eq. 8.22-8.25: mu = mean(x), sigma = sqrt(mean((x - mu)^2)), gamma (x - mu) / sigma + beta.

  eps sits inside the square root, as in every framework.
  """
  mu = x.mean(-1, keepdims=True)
  sigma = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
  return gamma * (x - mu) / sigma + beta


def rms_norm(x, gamma, eps):
  """Zhang & Sennrich (2019): gamma x / sqrt(mean(x^2) + eps)."""
  return gamma * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


# ---- feed-forward ----------------------------------------------------------
def relu(x):
  return np.maximum(x, 0.0)


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def silu(x):
  return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"relu": relu, "gelu": gelu_tanh, "gelu_exact": gelu_exact, "swiglu": silu,
               "geglu": gelu_tanh}


def ffn(x, p, kind):
  """Eq. 8.21 FFN(x) = act(x W1 + b1) W2 + b2; gated: (act(x W_gate) * x W_up) W_down.

  p: {'up': (W, b|None), 'down': (W, b|None)[, 'gate': (W, b|None)]}.
  """
  def lin(name, h):
    w, b = p[name]
    return h @ w + (0.0 if b is None else b)

  act = ACTIVATIONS[kind]
  if kind in ("swiglu", "geglu"):
    hidden = act(lin("gate", x)) * lin("up", x)
  else:
    hidden = act(lin("up", x))
  return lin("down", hidden)


# ---- positions -------------------------------------------------------------
def sinusoidal(positions, d):
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
  pe = np.zeros(positions.shape + (d,))
  for idx in np.ndindex(positions.shape):
    p = positions[idx]
    for i in range(d // 2):
      pe[idx + (2 * i,)] = math.sin(p / 10000 ** (2 * i / d))
      pe[idx + (2 * i + 1,)] = math.cos(p / 10000 ** (2 * i / d))
  return pe


def rope_frequency(j, h, theta, scaling=None):
  """omega_j = theta^(-2j/H); with Llama 3 scaling, Meta's three cases by wavelength."""
  omega = theta ** (-2.0 * j / h)
  if scaling is None:
    return omega
  wavelength = 2 * math.pi / omega
  context = scaling.original_max_position_embeddings
  if wavelength < context / scaling.high_freq_factor:  # high frequency: kept
    return omega
  if wavelength > context / scaling.low_freq_factor:  # low frequency: stretched
    return omega / scaling.factor
  smooth = ((context / wavelength - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  return (1 - smooth) * omega / scaling.factor + smooth * omega


def rope_matrix(p, h, theta, scaling=None):
  """R_p [H, H]: rotates each pair of dimensions (j, j + H/2) by p * omega_j."""
  r = np.zeros((h, h))
  for j in range(h // 2):
    a = p * rope_frequency(j, h, theta, scaling)
    c, s = math.cos(a), math.sin(a)
    r[j, j], r[j, j + h // 2] = c, -s
    r[j + h // 2, j], r[j + h // 2, j + h // 2] = s, c
  return r


def rope(x_TH, positions_T, theta, scaling=None):
  """Row t of x rotated by R_{positions[t]}: x'_t = R_p x_t."""
  h = x_TH.shape[-1]
  return np.stack([rope_matrix(p, h, theta, scaling) @ x
                   for x, p in zip(x_TH, positions_T, strict=True)])


# ---- masks -----------------------------------------------------------------
def causal_mask(t):
  """Eq. 8.33: M[i, j] = -inf for j > i (the future), 0 otherwise; added to the scores."""
  m = np.zeros((t, t))
  m[np.triu_indices(t, k=1)] = -np.inf
  return m


def allowed(q_slots, kv_len, *, kind="global", causal=True, window=0, stride=0,
            segments=None, kv_valid_len=None):
  """[T, S] bool: may the query at slot q_slots[i] attend to key slot j? One query at a time.

  local: the `window` most recent keys (itself included); bidirectional: |i - j| < window.
  strided (Child et al. 2019, "strided" pattern): A1 = {i - stride, ..., i} and
  A2 = {j : (i - j) mod stride == 0}.
  """
  ok = np.zeros((len(q_slots), kv_len), bool)
  for row, i in enumerate(q_slots):
    for j in range(kv_len):
      if causal and j > i:
        continue
      if kv_valid_len is not None and j >= kv_valid_len:
        continue
      if segments is not None and segments[i] != segments[j]:
        continue
      dist = abs(i - j)
      if kind == "local" and dist >= window:
        continue
      if kind == "strided" and not (dist <= stride or dist % stride == 0):
        continue
      ok[row, j] = True
  return ok


# ---- attention -------------------------------------------------------------
def single_head_attention(x_q, x_kv, wq, wk, wv, ok):
  """Eq. 8.10-8.14 for one head: q_i = x_i W^Q, k_j = x_j W^K, v_j = x_j W^V,
  score(x_i, x_j) = q_i . k_j / sqrt(d_k), alpha_ij = softmax_j(score), a_i = sum_j alpha_ij v_j.

  Returns (a [T, d_v], alpha [T, S]); a query that may see nothing gets a_i = 0.
  """
  q, k, v = x_q @ wq, x_kv @ wk, x_kv @ wv
  return attend(q, k, v, ok)


def attend(q, k, v, ok):
  """The score/softmax/sum steps of eq. 8.11-8.14 on given q [T, H], k, v [S, H]."""
  d_k = q.shape[-1]
  a = np.zeros((q.shape[0], v.shape[-1]))
  alpha = np.zeros((q.shape[0], k.shape[0]))
  for i in range(q.shape[0]):
    js = np.flatnonzero(ok[i])
    if len(js) == 0:
      continue
    scores = np.array([q[i] @ k[j] / math.sqrt(d_k) for j in js])
    alpha[i, js] = softmax(scores)
    a[i] = sum(alpha[i, j] * v[j] for j in js)
  return a, alpha


def multi_head_attention(q_TNH, k_SKH, v_SKH, ok):
  """Eq. 8.15-8.19 after the projections: head c attends with its own q and the k/v of
  kv head c // G (G = N / K; grouped-query and multi-query attention repeat each kv head
  for G query heads). Returns (heads concatenated [T, N H], alpha [N, T, S])."""
  n, kv = q_TNH.shape[1], k_SKH.shape[1]
  g = n // kv
  heads, alphas = [], []
  for c in range(n):
    a, alpha = attend(q_TNH[:, c], k_SKH[:, c // g], v_SKH[:, c // g], ok)
    heads.append(a)
    alphas.append(alpha)
  return np.concatenate(heads, axis=-1), np.stack(alphas)


# ---- parameters ------------------------------------------------------------
def _np(a):
  return np.asarray(a, np.float64)


def random_params(shapes, seed=0, scale=0.3):
  """Random float32 values in the pytree of `shapes` (e.g. `jax.eval_shape` of `model.init`):
  norm gains near 1, every other leaf N(0, scale^2), so no bias or gain keeps a trivial value."""
  rng = np.random.RandomState(seed)

  def one(path, leaf):
    noise = scale * rng.standard_normal(leaf.shape)
    last = getattr(path[-1], "key", None)
    return (noise + (1.0 if last == "scale" else 0.0)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def _wb(node):
  return _np(node["kernel"]), None if "bias" not in node else _np(node["bias"])


def convert_attention(cfg, attn) -> dict:
  """One layer's attention params -> {'q', 'k', 'v', 'o': (W [in, out], b | None)}."""
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size
  if "qkv" in attn:
    w, b = _wb(attn["qkv"])
    cuts = [n * h, (n + k) * h]
    bs = np.split(b, cuts) if b is not None else [None] * 3
    q, kk, v = zip(np.split(w, cuts, axis=1), bs, strict=True)
  else:
    q, kk, v = _wb(attn["q"]), _wb(attn["k"]), _wb(attn["v"])
  return {"q": q, "k": kk, "v": v, "o": _wb(attn["o"])}


def convert_mlp(cfg, mlp) -> dict:
  """One layer's FFN params -> {'up', 'down'[, 'gate']: (W, b | None)}."""
  f = cfg.ffn_size
  out = {"down": _wb(mlp["down"])}
  if "gate_up" in mlp:
    w, b = _wb(mlp["gate_up"])
    out["gate"] = (w[:, :f], None if b is None else b[:f])
    out["up"] = (w[:, f:], None if b is None else b[f:])
  else:
    out["up"] = _wb(mlp["up"])
    if "gate" in mlp:
      out["gate"] = _wb(mlp["gate"])
  return out


def convert_norm(node):
  return _np(node["scale"]), None if "bias" not in node else _np(node["bias"])


def convert_layer(cfg, lp) -> dict:
  return {**convert_attention(cfg, lp["attn"]), "mlp": convert_mlp(cfg, lp["mlp"]),
          "attn_norm": convert_norm(lp["attn_norm"]), "mlp_norm": convert_norm(lp["mlp_norm"])}


def convert_params(cfg, params) -> dict:
  """Model params (scanned or unrolled) -> {'embedding', 'pos_embedding', 'layers': [...],
  'final_norm', 'lm_head'} of float64 arrays with every fused projection split apart."""
  def layer(i):
    if "layers" in params:
      return jax.tree.map(lambda a: a[i], params["layers"])
    return params[f"layers_{i}"]

  out = {"embedding": _np(params["embed"]["embedding"]),
         "layers": [convert_layer(cfg, layer(i)) for i in range(cfg.n_layers)]}
  if "pos_embedding" in params:
    out["pos_embedding"] = _np(params["pos_embedding"])
  if "final_norm" in params:
    out["final_norm"] = convert_norm(params["final_norm"])
  if "lm_head" in params:
    out["lm_head"] = _np(params["lm_head"]["kernel"])
  return out


# ---- the model -------------------------------------------------------------
def norm_fn(cfg, gamma_beta, x):
  gamma, beta = gamma_beta
  if cfg.norm == "layernorm":
    return layer_norm(x, gamma, beta, cfg.norm_eps)
  return rms_norm(x, gamma, cfg.norm_eps)


def self_attention(cfg, lp, x_TD, positions_T, ok_TS):
  """MultiHeadAttention(x) = (head_1 (+) ... (+) head_N) W^O (eq. 8.35-8.37), RoPE on q and k."""
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size

  def proj(wb_pair, heads):
    w, b = wb_pair
    y = x_TD @ w + (0.0 if b is None else b)
    return y.reshape(len(x_TD), heads, h)

  q, kk, v = proj(lp["q"], n), proj(lp["k"], k), proj(lp["v"], k)
  if cfg.position == "rope":
    q = np.stack([rope(q[:, c], positions_T, cfg.rope_theta, cfg.rope_scaling)
                  for c in range(n)], axis=1)
    kk = np.stack([rope(kk[:, c], positions_T, cfg.rope_theta, cfg.rope_scaling)
                   for c in range(k)], axis=1)
  heads, alpha = multi_head_attention(q, kk, v, ok_TS)
  w_o, b_o = lp["o"]
  return heads @ w_o + (0.0 if b_o is None else b_o), alpha


def block(cfg, lp, x_TD, positions_T, ok_TS):
  """Pre-norm (eq. 8.26-8.31 with the norms inside the branches) or post-norm block."""
  if cfg.norm_placement == "pre":
    t1 = norm_fn(cfg, lp["attn_norm"], x_TD)
    t2, alpha = self_attention(cfg, lp, t1, positions_T, ok_TS)
    t3 = t2 + x_TD
    t4 = norm_fn(cfg, lp["mlp_norm"], t3)
    t5 = ffn(t4, lp["mlp"], cfg.ffn)
    return t5 + t3, alpha
  t2, alpha = self_attention(cfg, lp, x_TD, positions_T, ok_TS)
  t3 = norm_fn(cfg, lp["attn_norm"], x_TD + t2)
  return norm_fn(cfg, lp["mlp_norm"], t3 + ffn(t3, lp["mlp"], cfg.ffn)), alpha


def forward(cfg, p, tokens_BT, positions_BT=None, segment_ids_BT=None, return_alphas=False):
  """Logits [B, T, V]: embed (+ positions), L blocks, final norm (pre-norm), LM head.

  The LM head (eq. 8.46-8.47) is u = h E^T with tied weights, h W_head otherwise.
  Packed rows (segment ids) restart positions at each document unless positions are given.
  """
  tokens_BT = np.asarray(tokens_BT)
  b, t = tokens_BT.shape
  logits, alphas = [], []
  kinds = [cfg.attention_pattern[i % len(cfg.attention_pattern)] for i in range(cfg.n_layers)]
  for row in range(b):
    seg = None if segment_ids_BT is None else np.asarray(segment_ids_BT)[row]
    if positions_BT is not None:
      pos = np.asarray(positions_BT)[row]
    elif seg is not None:
      pos = np.array([sum(seg[s] == seg[i] for s in range(i)) for i in range(t)])
    else:
      pos = np.arange(t)
    x = p["embedding"][tokens_BT[row]]  # x_t = E[token_t]
    if cfg.position == "learned":
      x = x + p["pos_embedding"][pos]
    elif cfg.position == "sinusoidal":
      x = x + sinusoidal(pos, cfg.d_model)
    row_alphas = []
    for lp, kind in zip(p["layers"], kinds, strict=True):
      ok = allowed(np.arange(t), t, kind=kind, causal=cfg.causal, window=cfg.window_size,
                   stride=cfg.sparse_stride, segments=seg)
      x, alpha = block(cfg, lp, x, pos, ok)
      row_alphas.append(alpha)
    if cfg.norm_placement == "pre":
      x = norm_fn(cfg, p["final_norm"], x)
    logits.append(x @ p["embedding"].T if cfg.tie_embeddings else x @ p["lm_head"])
    alphas.append(np.stack(row_alphas))
  if return_alphas:
    return np.stack(logits), np.stack(alphas, axis=1)  # alphas [L, B, N, T, S]
  return np.stack(logits)
