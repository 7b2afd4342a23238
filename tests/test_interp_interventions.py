"""Looking inside: sown intermediates against a hand recomputation, and interventions.

The hand recomputation walks the residual stream layer by layer in float64
NumPy (tests/numpy_reference.py for norms, attention and FFN) from the same
params, and checks every sown value on the way: resid_pre, attention weights,
each head's output o_n W_O[n], attn_out, resid_mid, mlp_out, resid_post,
final_resid and the logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import interventions as iv_lib
from tests import numpy_reference as ref
from tests.conftest import tiny_config

# Jitted once per config: far cheaper than running the model op by op.
apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_intermediates")
init = jax.jit(model.init, static_argnums=0)
init_lora = jax.jit(model.init_lora, static_argnums=0)
TOKENS_BT = np.array([[3, 17, 5, 3, 17, 5, 9, 1, 0, 44], [60, 2, 2, 8, 31, 7, 7, 12, 50, 4]])

CONFIGS = {
    "gelu-layernorm-bias": tiny_config(),
    "attention-only-rmsnorm-gqa-unrolled": tiny_config(ffn="none", norm="rmsnorm", n_kv_heads=2,
                                                       attn_bias=False, scan_layers=False),
}


def _params(cfg, seed=0):
  shapes = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(jnp.asarray, ref.random_params(shapes, seed=seed, scale=0.3))


def _hand_forward(cfg, params, tokens_T):
  """Sown values of one row, recomputed in float64 from the params (pre-norm blocks)."""
  layer = (lambda i: jax.tree.map(lambda a: a[i], params["layers"])) if cfg.scan_layers else (
      lambda i: params[f"layers_{i}"])
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_size
  t = len(tokens_T)
  x = ref._np(params["embed"]["embedding"])[tokens_T] + ref._np(params["pos_embedding"])[:t]
  ok = ref.allowed(np.arange(t), t)
  out = {name: [] for name in ("resid_pre", "attn_weights", "head_out", "attn_out", "resid_mid",
                               "mlp_out", "resid_post")}
  for i in range(cfg.n_layers):
    lp = layer(i)
    attn = ref.convert_attention(cfg, lp["attn"])
    out["resid_pre"].append(x)
    t1 = ref.norm_fn(cfg, ref.convert_norm(lp["attn_norm"]), x)

    def proj(name, heads, t1=t1, attn=attn):
      w, b = attn[name]
      return (t1 @ w + (0.0 if b is None else b)).reshape(t, heads, h)

    heads_TNH, alpha_NTS = ref.multi_head_attention(proj("q", n), proj("k", k), proj("v", k), ok)
    w_o, b_o = attn["o"]
    head_out_TND = np.stack([heads_TNH[:, c * h:(c + 1) * h] @ w_o[c * h:(c + 1) * h]
                             for c in range(n)], axis=1)
    attn_out = heads_TNH @ w_o + (0.0 if b_o is None else b_o)
    x = x + attn_out
    resid_mid = x
    if cfg.ffn == "none":
      mlp_out = np.zeros_like(x)
    else:
      t4 = ref.norm_fn(cfg, ref.convert_norm(lp["mlp_norm"]), x)
      mlp_out = ref.ffn(t4, ref.convert_mlp(cfg, lp["mlp"]), cfg.ffn)
    x = x + mlp_out
    for name, value in (("attn_weights", alpha_NTS), ("head_out", head_out_TND),
                        ("attn_out", attn_out), ("resid_mid", resid_mid), ("mlp_out", mlp_out),
                        ("resid_post", x)):
      out[name].append(value)
  out = {name: np.stack(values) for name, values in out.items()}
  out["final_resid"] = ref.norm_fn(cfg, ref.convert_norm(params["final_norm"]), x)
  out["logits"] = out["final_resid"] @ ref._np(params["embed"]["embedding"]).T
  return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_intermediates_equal_hand_recomputation(name):
  cfg = CONFIGS[name]
  params = _params(cfg)
  logits, _, sown = apply(cfg, params, TOKENS_BT, return_intermediates=True)
  sown = iv_lib.layer_intermediates(cfg, sown)
  if cfg.ffn == "none":
    assert "mlp" not in (params["layers"] if cfg.scan_layers else params["layers_0"])
  for row in range(len(TOKENS_BT)):
    hand = _hand_forward(cfg, params, TOKENS_BT[row])
    for key, value in hand.items():
      got = logits[row] if key == "logits" else (
          sown[key] if key == "final_resid" else sown[key][:, row])
      if key == "final_resid":
        got = got[row]
      np.testing.assert_allclose(np.asarray(got), value, rtol=2e-4, atol=2e-4, err_msg=key)


@pytest.fixture(scope="module")
def base():
  cfg = tiny_config()
  params = _params(cfg, seed=1)
  run = jax.jit(lambda ivs: apply(cfg, params, TOKENS_BT, interventions=ivs,
                                        return_intermediates=True))
  logits, _, sown = run(iv_lib.scale_heads(cfg, {}))
  return cfg, params, run, logits, iv_lib.layer_intermediates(cfg, sown)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 2)])
def test_ablating_a_head_changes_exactly_that_heads_contribution(base, layer, head):
  cfg, params, run, logits, clean = base
  ablated_logits, _, sown = run(iv_lib.ablate_heads(cfg, [(layer, head)]))
  sown = iv_lib.layer_intermediates(cfg, sown)
  out_LBTND, clean_LBTND = np.asarray(sown["head_out"]), np.asarray(clean["head_out"])
  assert np.all(out_LBTND[layer, :, :, head] == 0)
  others = [c for c in range(cfg.n_heads) if c != head]
  np.testing.assert_array_equal(out_LBTND[layer][:, :, others], clean_LBTND[layer][:, :, others])
  np.testing.assert_array_equal(out_LBTND[:layer], clean_LBTND[:layer])
  # The layer's attention output lost exactly that head's share: out = clean - head_out[head].
  np.testing.assert_allclose(sown["attn_out"][layer],
                             clean["attn_out"][layer] - clean_LBTND[layer, :, :, head], atol=1e-5)
  assert not np.allclose(ablated_logits, logits, atol=1e-3)


def test_scaling_and_replacing_heads(base):
  cfg, params, run, logits, clean = base
  _, _, sown = run(iv_lib.scale_heads(cfg, {(1, 0): 2.0}))
  np.testing.assert_allclose(iv_lib.layer_intermediates(cfg, sown)["head_out"][1, :, :, 0],
                             2 * clean["head_out"][1, :, :, 0], rtol=1e-5, atol=1e-6)
  values = jax.random.normal(jax.random.PRNGKey(3), clean["head_out"].shape)
  patch = iv_lib.replace_heads(cfg, values, [(0, 3)], positions=[4, 5])
  _, _, sown = run(patch)
  got = iv_lib.layer_intermediates(cfg, sown)["head_out"]
  np.testing.assert_array_equal(got[0, :, 4:6, 3], values[0, :, 4:6, 3])
  np.testing.assert_array_equal(got[0, :, :4], clean["head_out"][0, :, :4])


def test_patching_every_head_and_mlp_with_clean_values(base):
  """Activation patching: run other tokens, but every head's and MLP's output is the clean
  run's; the residual stream is a sum, so only the embedding term still differs."""
  cfg, params, run, logits, clean = base
  corrupt_BT = (TOKENS_BT + 7) % cfg.vocab_size
  heads = [(i, c) for i in range(cfg.n_layers) for c in range(cfg.n_heads)]
  patched = iv_lib.combine(iv_lib.replace_heads(cfg, clean["head_out"], heads),
                           iv_lib.replace_mlps(cfg, clean["mlp_out"], range(cfg.n_layers)))
  _, _, sown = apply(cfg, params, corrupt_BT, interventions=patched,
                           return_intermediates=True)
  sown = iv_lib.layer_intermediates(cfg, sown)
  np.testing.assert_allclose(sown["resid_post"][-1] - sown["resid_pre"][0],
                             clean["resid_post"][-1] - clean["resid_pre"][0], atol=1e-4)
  assert not np.allclose(sown["resid_pre"][0], clean["resid_pre"][0], atol=1e-2)
  # Replacing the whole residual stream entering layer 0 gives the clean run back.
  resid = iv_lib.replace_resid(cfg, clean["resid_pre"][0], layer=0, positions=None)
  np.testing.assert_allclose(apply(cfg, params, corrupt_BT, interventions=resid)[0],
                             logits, atol=1e-4)
  assert not np.allclose(apply(cfg, params, corrupt_BT)[0], logits, atol=1e-2)


def test_replacing_the_residual_at_one_position(base):
  cfg, params, _, logits, clean = base
  value_BTD = jnp.zeros_like(clean["resid_pre"][1])
  got, _, sown = apply(cfg, params, TOKENS_BT, return_intermediates=True,
                             interventions=iv_lib.replace_resid(cfg, value_BTD, 1, [6]))
  sown = iv_lib.layer_intermediates(cfg, sown)
  assert np.all(np.asarray(sown["resid_pre"][1, :, 6]) == 0)
  np.testing.assert_array_equal(sown["resid_pre"][1, :, :6], clean["resid_pre"][1, :, :6])
  np.testing.assert_allclose(got[:, :6], logits[:, :6], atol=1e-5)  # causal: earlier untouched
  assert not np.allclose(got[:, 6], logits[:, 6], atol=1e-3)


def test_mlp_ablation_and_scan_equals_unrolled(base):
  cfg, params, run, logits, clean = base
  ivs = iv_lib.combine(iv_lib.ablate_mlps(cfg, [0]), iv_lib.ablate_heads(cfg, [(1, 1)]))
  got, _, sown = run(ivs)
  sown = iv_lib.layer_intermediates(cfg, sown)
  assert np.all(np.asarray(sown["mlp_out"][0]) == 0)
  np.testing.assert_array_equal(sown["resid_post"][0], sown["resid_mid"][0])
  np.testing.assert_array_equal(sown["mlp_out"][1] != 0, True)
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled, _ = apply(unrolled_cfg, model.unstack_layers(params, cfg.n_layers), TOKENS_BT,
                            interventions=ivs)
  np.testing.assert_allclose(unrolled, got, atol=1e-5)


def test_head_outputs_sum_to_the_attention_output_with_lora_on_w_o():
  cfg = tiny_config(lora_rank=2, lora_targets=("o", "q"))
  params = _params(cfg.replace(lora_rank=0, lora_targets=()), seed=2)
  lora = init_lora(cfg, jax.random.PRNGKey(1))
  lora = jax.tree.map(lambda a: a + 0.3, lora)  # B != 0: the adapters change W_O
  _, _, sown = apply(cfg, params, TOKENS_BT, lora=lora, return_intermediates=True)
  sown = iv_lib.layer_intermediates(cfg, sown)
  bias_LD = params["layers"]["attn"]["o"]["bias"]
  np.testing.assert_allclose(sown["head_out"].sum(3) + bias_LD[:, None, None],
                             sown["attn_out"], atol=1e-4)


def test_bad_interventions_are_rejected(base):
  cfg, params, *_ = base
  with pytest.raises(ValueError, match="head 9 out of range"):
    iv_lib.ablate_heads(cfg, [(0, 9)])
  with pytest.raises(ValueError, match="layer 5 out of range"):
    iv_lib.ablate_mlps(cfg, [5])
  with pytest.raises(ValueError, match="head_scale_LN: expected shape"):
    apply(cfg, params, TOKENS_BT, interventions=iv_lib.Interventions(
        head_scale_LN=jnp.ones((3, cfg.n_heads))))
  with pytest.raises(ValueError, match="no MLP"):
    attn_only = tiny_config(ffn="none")
    apply(attn_only, init(attn_only, jax.random.PRNGKey(0)), TOKENS_BT,
                interventions=iv_lib.ablate_mlps(attn_only, [0]))
  with pytest.raises(ValueError, match="no MLP projections"):
    tiny_config(ffn="none", lora_rank=2, lora_targets=("up",))
