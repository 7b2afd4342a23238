"""Every analysis on one model, into figures, report.md and summary.json.

  summary = analyze(cfg, params, tokenizer, out_dir, prompt="...")

`params` are a plain model's (a LoRA run's adapters merged: model.store.load_params).

Figures: attention.png (the prompt's attention map per head), logit_lens.png,
head_scores.png (induction, previous-token and copying scores, layers x
heads), ablation.png (loss on repeated tokens with heads ablated).
"""

from __future__ import annotations

import os

import numpy as np

from experiments.interp import figures
from experiments.interp import induction as ind
from experiments.interp.ablation import ablation_study
from experiments.interp.lens import logit_lens
from experiments.interp.losses import run_with_intermediates, token_losses
from model import count_params, store
from model.config import ModelConfig


def token_label(tokenizer, token_id: int) -> str:
  """A short printable label of one token ('␣' for a space, escapes for control bytes)."""
  text = tokenizer.decode([int(token_id)])
  if not text:
    return f"<{int(token_id)}>"
  return text.replace(" ", "␣").encode("unicode_escape").decode("ascii").replace("\\u2423", "␣")


def default_token_ids(tokenizer, vocab_size: int, alphabet: str | None = None) -> np.ndarray:
  """Token ids for random sequences: the tokens of `alphabet`, or every id below the model's
  vocabulary that decodes to printable, non-blank text and is not a special token."""
  if alphabet:
    ids = np.unique(np.asarray(tokenizer.encode(alphabet)))
  else:
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    ids = np.array([i for i in range(min(vocab_size, tokenizer.vocab_size))
                    if i not in special and (text := tokenizer.decode([i])).strip()
                    and text.isprintable() and "\ufffd" not in text])
  ids = ids[ids < vocab_size]
  if len(ids) < 2:
    raise ValueError("analyze: fewer than two usable token ids for random sequences; pass an "
                     "alphabet whose characters are tokens of this tokenizer")
  return ids


def _icl_positions(length: int) -> tuple[int, int]:
  """Olsson et al. compare token 500 with token 50 of 512; the same fractions of `length`."""
  return max(1, round(length * 50 / 512)), min(length - 2, round(length * 500 / 512) - 1)


def text_icl_score(cfg, params, tokenizer, text: str, *, windows: int = 16):
  """ICL score on up to `windows` windows of max_seq_len tokens of `text`, or None if short."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  n = min(windows, len(ids) // cfg.max_seq_len)
  if n == 0:
    return None
  tokens_BT = ids[:n * cfg.max_seq_len].reshape(n, cfg.max_seq_len)
  early, late = _icl_positions(cfg.max_seq_len - 1)
  return {"score": ind.icl_score(token_losses(cfg, params, tokens_BT), early, late),
          "early": early, "late": late, "windows": n}


def _md_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def analyze(cfg: ModelConfig, params, tokenizer, out_dir: str, *, prompt: str,
            alphabet: str | None = None, half: int | None = None, batch: int = 16,
            seed: int = 0, top_k: int = 2, bos: bool = False, target: str | None = None,
            icl_text: str | None = None, command: str = "", title: str = "") -> dict:
  """Run every analysis on (cfg, params) and write the figures and reports."""
  os.makedirs(out_dir, exist_ok=True)
  bos_id = tokenizer.bos_id if bos else None
  if bos and bos_id is None:
    raise ValueError("analyze: bos=True but the tokenizer has no bos token")
  room = cfg.max_seq_len - (1 if bos else 0)
  token_ids = default_token_ids(tokenizer, cfg.vocab_size, alphabet)
  half = half or min(32, room // 2, len(token_ids))
  if 2 * half > room or half > len(token_ids) or half < 2:
    raise ValueError(f"analyze: half={half} needs 2 <= half <= {min(room // 2, len(token_ids))} "
                     f"(max_seq_len {cfg.max_seq_len}, {len(token_ids)} token ids)")

  # The prompt: attention maps and the logit lens.
  ids = ([bos_id] if bos else []) + list(tokenizer.encode(prompt))
  if len(ids) < 2:
    raise ValueError(f"analyze: the prompt {prompt!r} needs at least two tokens")
  ids = ids[:cfg.max_seq_len]
  prompt_BT = np.asarray([ids], np.int32)
  labels = [token_label(tokenizer, i) for i in ids]
  logits_BTV, sown = run_with_intermediates(cfg, params, prompt_BT)
  files = {"attention": figures.attention_maps(np.asarray(sown["attn_weights"][:, 0]), labels,
                                               os.path.join(out_dir, "attention.png"))}
  last_target = int(np.asarray(logits_BTV)[0, -1].argmax())
  if target:
    last_target = int(tokenizer.encode(target)[0])
  targets_BT = np.asarray([ids[1:] + [last_target]], np.int32)
  lens = logit_lens(cfg, params, prompt_BT, targets_BT=targets_BT)
  top1 = [[token_label(tokenizer, i) for i in row] for row in lens.top_ids_UBTZ[:, 0, :, 0]]
  files["logit_lens"] = figures.logit_lens_heatmap(
      lens.target_prob_UBT[:, 0], top1, lens.labels, labels,
      os.path.join(out_dir, "logit_lens.png"))
  lens_rows = [[label, int(lens.target_rank_UBT[r, 0, -1]),
                f"{lens.target_prob_UBT[r, 0, -1]:.3f}",
                " ".join(f"`{token_label(tokenizer, i)}` {p:.2f}" for i, p in
                         zip(lens.top_ids_UBTZ[r, 0, -1], lens.top_probs_UBTZ[r, 0, -1],
                             strict=True))]
               for r, label in enumerate(lens.labels)]

  # Repeated random tokens: head scores, ICL score, ablations.
  rep = ind.repeated_tokens(np.random.default_rng(seed), batch, half, token_ids, bos_id)
  _, rep_sown = run_with_intermediates(cfg, params, rep.tokens_BT)
  induction_LN = ind.induction_scores(rep_sown["attn_weights"], rep)
  previous_LN = ind.previous_token_scores(rep_sown["attn_weights"], rep.start)
  copying_LN = ind.copying_scores(cfg, params, token_ids)
  copying_z_LN = ind.copying_zscores(cfg, params, rep_sown["resid_pre"], rep.tokens_BT,
                                     token_ids)
  files["head_scores"] = figures.head_score_heatmaps(
      {"induction score": induction_LN, "previous-token score": previous_LN,
       "copying: OV eigenvalues (direct path)": copying_LN,
       "copying: measured z-score": copying_z_LN}, os.path.join(out_dir, "head_scores.png"))
  order = np.argsort(-induction_LN, axis=None)
  n_heads = cfg.n_layers * cfg.n_heads
  top_heads = [tuple(int(i) for i in np.unravel_index(j, induction_LN.shape))
               for j in order[:min(top_k, n_heads)]]
  study = ablation_study(cfg, params, rep, top_heads, scores_LN=induction_LN)
  files["ablation"] = figures.ablation_chart(study, os.path.join(out_dir, "ablation.png"))
  rep_early = rep.start + half // 2 - 1  # same offset in each copy; no earlier repeat in the first
  rep_icl = ind.icl_score(study.intact_curve_T[None], rep_early, rep_early + half)
  text_icl = None
  if icl_text:
    with open(icl_text) as f:
      text_icl = text_icl_score(cfg, params, tokenizer, f.read())

  summary = {
      "title": title, "command": command, "model": cfg.to_dict(),
      "parameters": count_params(cfg).total, "prompt": prompt, "prompt_tokens": labels,
      "repeated": {"batch": batch, "half": half, "bos": bos, "seed": seed,
                   "token_ids": len(token_ids)},
      "induction_scores": induction_LN.round(4).tolist(),
      "previous_token_scores": previous_LN.round(4).tolist(),
      "copying_scores": copying_LN.round(4).tolist(),
      "copying_zscores": copying_z_LN.round(4).tolist(),
      "top_induction_heads": [list(h) for h in top_heads],
      "icl_score_repeated": {"score": rep_icl, "early": rep_early, "late": rep_early + half},
      "icl_score_text": text_icl,
      "ablation": {"intact_loss": study.intact_loss,
                   "intact_first_half_loss": study.intact_first_half_loss,
                   "top_heads_ablated_loss": study.top_loss,
                   "control_heads": [list(h) for h in study.control_heads],
                   "control_ablated_loss": study.control_loss,
                   "each_head_ablated_loss": study.head_loss_LN.round(4).tolist()},
      "logit_lens_last_position": {
          "target": token_label(tokenizer, last_target),
          "rows": [{"readout": r[0], "rank": r[1], "prob": float(r[2])} for r in lens_rows]},
      "figures": {k: os.path.basename(v) for k, v in files.items()},
  }
  store.write_json(os.path.join(out_dir, "summary.json"), summary)
  with store.atomic_open(os.path.join(out_dir, "report.md")) as f:
    f.write(_report(cfg, summary, lens_rows, induction_LN, previous_LN, copying_LN,
                    copying_z_LN, study))
  return summary


def _report(cfg, s, lens_rows, induction_LN, previous_LN, copying_LN, copying_z_LN,
            study) -> str:
  head_rows = sorted(((induction_LN[i, j], i, j) for i in range(cfg.n_layers)
                      for j in range(cfg.n_heads)), reverse=True)[:8]
  a = s["ablation"]
  rise = a["top_heads_ablated_loss"] - a["intact_loss"]
  return "\n\n".join([
      f"# Interpretability report{': ' + s['title'] if s['title'] else ''}",
      (f"Model: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
       f"ffn {cfg.ffn}, positions {cfg.position}, {s['parameters']:,} parameters."
       + (f"\n\nCommand: `{s['command']}`" if s["command"] else "")),
      "## Attention maps\n\n"
      f"Prompt `{s['prompt']}`; one panel per head (rows: layers), query token down, key "
      "token across.\n\n![attention](attention.png)",
      "## Logit lens\n\nEach layer's residual stream read through the final norm and the "
      "unembedding; cells: probability of the next token, labelled with the top-1 token. "
      "The last row is the model's output.\n\n![logit lens](logit_lens.png)\n\n"
      f"At the last position (target `{s['logit_lens_last_position']['target']}`):\n\n"
      + _md_table(["readout", "rank of target", "p(target)", "top tokens"], lens_rows),
      "## Induction heads\n\n"
      f"On {s['repeated']['batch']} sequences of {s['repeated']['half']} random tokens repeated "
      "twice. Induction score: mean attention from each second-copy token to the token after "
      "its previous occurrence; previous-token score: mean attention to the previous token; "
      "copying (OV eigenvalues): sum(lambda)/sum(|lambda|) of the head's direct-path OV "
      "circuit W_E W_V W_O W_U (+1 copies the attended token); copying (measured): the "
      "z-score of the attended token's logit among all logits when the head reads the real "
      "residual stream at that position (counts copying through earlier layers' outputs)."
      "\n\n![head scores](head_scores.png)\n\n"
      + _md_table(["head", "induction", "previous-token", "copying (eigen)",
                   "copying (measured z)"],
                  [[f"L{i}H{j}", f"{v:.3f}", f"{previous_LN[i, j]:.3f}",
                    f"{copying_LN[i, j]:.3f}", f"{copying_z_LN[i, j]:+.2f}"]
                   for v, i, j in head_rows])
      + f"\n\nIn-context-learning score on the repeated tokens (loss at token "
      f"{s['icl_score_repeated']['late']} minus loss at token "
      f"{s['icl_score_repeated']['early']}): {s['icl_score_repeated']['score']:.3f} nats."
      + (f" On the given text ({s['icl_score_text']['windows']} windows, token "
         f"{s['icl_score_text']['late']} minus token {s['icl_score_text']['early']}): "
         f"{s['icl_score_text']['score']:.3f} nats." if s["icl_score_text"] else ""),
      "## Ablations\n\nMean loss on the predictable tokens of the second copy.\n\n"
      + _md_table(["model", "loss (nats)"], [
          ["intact", f"{a['intact_loss']:.3f}"],
          ["intact, first copy (nothing to copy yet)", f"{a['intact_first_half_loss']:.3f}"],
          [f"top induction heads ablated {_heads(study.top_heads)}",
           f"{a['top_heads_ablated_loss']:.3f}"],
          [f"control heads ablated {_heads(study.control_heads)}",
           f"{a['control_ablated_loss']:.3f}"]])
      + f"\n\nAblating the top induction heads raises the loss on the repeated half by "
      f"{rise:.3f} nats.\n\n![ablation](ablation.png)",
  ]) + "\n"


def _heads(heads) -> str:
  return ", ".join(f"L{i}H{j}" for i, j in heads)
