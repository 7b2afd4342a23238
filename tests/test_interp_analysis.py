"""The analysis library on models whose answers are known.

`handmade_induction_model` (experiments/induction_task.py) is a 2-layer
attention-only model with a hand-built induction circuit: L0H0 is a
previous-token head, L1H0 an induction head that copies into the logits,
L1H1 a decoy previous-token head, every other head zero. The scores must
find exactly those heads and the ablations must break exactly that circuit.
"""

import json
import os

import jax
import numpy as np
import pytest

import model
from experiments import interpret
from experiments.induction_task import handmade_induction_model, sample_batch
from experiments.interp import ablation, induction, lens
from experiments.interp.losses import run_with_intermediates, token_losses
from model import store
from tests.conftest import tiny_config

VOCAB = 16
BOS = VOCAB - 1


@pytest.fixture(scope="module")
def copier():
  cfg, params = handmade_induction_model(vocab=VOCAB, max_len=32)
  rep = induction.repeated_tokens(np.random.default_rng(0), 8, 10, np.arange(VOCAB - 1), BOS)
  _, sown = run_with_intermediates(cfg, params, rep.tokens_BT)
  return cfg, params, rep, sown


def test_induction_score_separates_the_induction_head(copier):
  cfg, params, rep, sown = copier
  scores_LN = induction.induction_scores(sown["attn_weights"], rep)
  assert scores_LN[1, 0] > 0.95
  others = np.delete(scores_LN.ravel(), cfg.n_heads)  # every head but L1H0
  assert others.max() < 0.15, scores_LN
  prev_LN = induction.previous_token_scores(sown["attn_weights"], rep.start)
  assert prev_LN[0, 0] > 0.95 and prev_LN[1, 1] > 0.9  # the circuit's first half, the decoy
  assert scores_LN[1, 1] < 0.05  # attending to the previous token is not induction


def test_copying_scores_find_the_copying_ov_circuit(copier):
  cfg, params, rep, sown = copier
  scores_LN = induction.copying_scores(cfg, params, np.arange(VOCAB - 1))
  assert scores_LN[1, 0] > 0.99  # its OV circuit maps token v to the logit of v
  assert np.abs(np.delete(scores_LN.ravel(), cfg.n_heads)).max() < 1e-6  # writes nothing read
  z_LN = induction.copying_zscores(cfg, params, sown["resid_pre"], rep.tokens_BT,
                                   np.arange(VOCAB - 1))
  assert z_LN[1, 0] > 3.0  # the attended token's logit stands 3+ std above the others
  assert np.abs(np.delete(z_LN.ravel(), cfg.n_heads)).max() < 1e-6


def test_ablating_the_circuit_breaks_copying_and_a_control_does_not(copier):
  cfg, params, rep, sown = copier
  scores_LN = induction.induction_scores(sown["attn_weights"], rep)
  study = ablation.ablation_study(cfg, params, rep, [(1, 0)], scores_LN=scores_LN)
  assert study.intact_loss < 0.05
  assert study.top_loss > np.log(VOCAB) - 0.1  # no better than a uniform guess
  assert study.control_heads == [(1, 1)] and abs(study.control_loss - study.intact_loss) < 1e-4
  head_loss_LN = study.head_loss_LN
  assert head_loss_LN[0, 0] > 1.0 and head_loss_LN[1, 0] > 1.0  # both halves of the circuit
  rest = [head_loss_LN[i, j] for i in range(2) for j in range(4) if (i, j) not in
          ((0, 0), (1, 0))]
  np.testing.assert_allclose(rest, study.intact_loss, atol=1e-3)
  # The in-context-learning score: the second copy is predicted, the first is not.
  losses_BT = token_losses(cfg, params, rep.tokens_BT)
  early = rep.start + 4
  assert induction.icl_score(losses_BT, early, early + rep.half) < -1.0
  with pytest.raises(ValueError, match="early < late"):
    induction.icl_score(losses_BT, 5, 5)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, norm="rmsnorm",
                                                norm_placement="post")])
def test_final_logit_lens_readout_is_the_models_logits(overrides):
  cfg = tiny_config(**overrides)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  tokens_BT = np.array([[5, 9, 2, 44, 7, 7, 30]])
  logits_BTV, _ = jax.jit(model.apply, static_argnums=0)(cfg, params, tokens_BT)
  result = lens.logit_lens(cfg, params, tokens_BT, top_k=3)
  assert result.labels == ["embed", "layer 0", "layer 1"]
  np.testing.assert_allclose(result.logits_UBTV[-1], logits_BTV, atol=1e-5)
  assert not np.allclose(result.logits_UBTV[0], logits_BTV, atol=1e-3)
  # Ranks and probabilities read the same readouts: rank 0 <=> the target is the top token.
  targets = np.concatenate([tokens_BT[:, 1:], logits_BTV[:, -1:].argmax(-1)], 1)
  probs = jax.nn.softmax(result.logits_UBTV, -1)
  np.testing.assert_allclose(result.target_prob_UBT,
                             np.take_along_axis(probs, targets[None, ..., None], -1)[..., 0],
                             rtol=1e-5)
  np.testing.assert_array_equal(result.target_rank_UBT == 0,
                                result.top_ids_UBTZ[..., 0] == targets[None])
  assert result.target_rank_UBT[-1, 0, -1] == 0


def test_training_data_repeats_a_random_prefix():
  tokens = sample_batch(np.random.default_rng(0), 4, 40, np.arange(20, 60), 5, 12)
  assert tokens.shape == (4, 40) and tokens.min() >= 20 and tokens.max() < 60
  for row in tokens:  # the first h tokens, h in [5, 12], come again right after
    assert any(np.array_equal(row[h:2 * h], row[:h]) for h in range(5, 13))
  with pytest.raises(ValueError, match="exceeds seq_len"):
    sample_batch(np.random.default_rng(0), 1, 10, np.arange(5), 2, 6)


@pytest.mark.slow
def test_interpret_cli_writes_figures_and_report(tmp_path):
  """The whole pipeline on a tiny random byte-level model with LoRA adapters in its workdir."""
  cfg = tiny_config(vocab_size=259, lora_rank=2, lora_targets=("q", "o"))
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  lora = jax.tree.map(lambda a: a + 0.1, jax.jit(model.init_lora, static_argnums=0)(
      cfg, jax.random.PRNGKey(1)))
  workdir = str(tmp_path / "run")
  store.save_params(workdir, params, step=7, lora=lora)
  store.write_config(workdir, cfg, store.ByteTokenizer())
  summary = interpret.analyze_workdir(workdir, prompt="abcabc", alphabet="abcdefghij",
                                      half=6, batch=2, top_k=2)
  out = os.path.join(workdir, "interpret")
  for name in ("attention.png", "logit_lens.png", "head_scores.png", "ablation.png",
               "report.md", "summary.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  report = open(os.path.join(out, "report.md")).read()
  assert "![ablation](ablation.png)" in report and "step 7" in report
  assert json.load(open(os.path.join(out, "summary.json")))["prompt_tokens"] == list("abcabc")
  assert np.asarray(summary["induction_scores"]).shape == (2, 4)
  assert len(summary["top_induction_heads"]) == 2
  with pytest.raises(ValueError, match="half=40"):
    interpret.analyze_workdir(workdir, prompt="abc", alphabet="abcdefghij", half=40)
