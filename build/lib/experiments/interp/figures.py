"""PNG figures of the analyses (matplotlib, headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.store.files import atomic_open  # noqa: E402

MAX_LABELLED_TOKENS = 48  # beyond this, axis tick labels stop being readable


def _save(fig, path: str) -> str:
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _ticks(ax, labels, axis: str):
  if len(labels) > MAX_LABELLED_TOKENS:
    return
  positions = np.arange(len(labels))
  if axis in ("x", "both"):
    ax.set_xticks(positions, labels, rotation=90, fontsize=6)
  if axis in ("y", "both"):
    ax.set_yticks(positions, labels, fontsize=6)


def attention_maps(weights_LNTS, labels: list[str], path: str) -> str:
  """One heatmap per head (rows: layers, columns: heads): query position -> key position."""
  n_layers, n_heads = weights_LNTS.shape[:2]
  size = 2.6 if len(labels) <= 24 else 3.4
  fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers),
                           squeeze=False)
  for layer in range(n_layers):
    for head in range(n_heads):
      ax = axes[layer, head]
      ax.imshow(weights_LNTS[layer, head], cmap="Blues", vmin=0, vmax=1)
      ax.set_title(f"L{layer} H{head}", fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
      if head == 0:
        _ticks(ax, labels, "y")
      if layer == n_layers - 1:
        _ticks(ax, labels, "x")
  fig.suptitle("Attention weights (rows: query token, columns: key token)")
  return _save(fig, path)


def logit_lens_heatmap(prob_UT, top_labels_UT, readout_labels: list[str], token_labels,
                       path: str) -> str:
  """Probability of the next token at each readout (rows) and position (columns), with each
  cell's top-1 token written in it."""
  r, t = prob_UT.shape
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * t + 2), 0.5 * r + 2))
  image = ax.imshow(prob_UT, cmap="viridis", vmin=0, vmax=1, aspect="auto")
  fig.colorbar(image, ax=ax, label="p(next token)")
  ax.set_yticks(np.arange(r), readout_labels)
  _ticks(ax, token_labels, "x")
  ax.set_xlabel("input token (the target is the token after it)")
  if t <= MAX_LABELLED_TOKENS:
    for i in range(r):
      for j in range(t):
        ax.text(j, i, top_labels_UT[i][j], ha="center", va="center", fontsize=6,
                color="white" if prob_UT[i, j] < 0.6 else "black")
  ax.set_title("Logit lens: each layer's residual stream through the final norm and unembedding")
  return _save(fig, path)


def head_score_heatmaps(panels: dict[str, np.ndarray], path: str) -> str:
  """Side-by-side layers x heads heatmaps, one per score, values written in the cells."""
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
  for ax, (title, scores_LN) in zip(axes[0], panels.items(), strict=True):
    high = max(1.0, float(np.abs(scores_LN).max()))
    low = -high if scores_LN.min() < 0 else 0.0
    image = ax.imshow(scores_LN, cmap="RdBu_r" if low < 0 else "magma", vmin=low, vmax=high,
                      aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(scores_LN.shape[1]))
    ax.set_yticks(np.arange(scores_LN.shape[0]))
    if scores_LN.size <= 256:
      for (i, j), value in np.ndenumerate(scores_LN):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="gray" if low < 0 else ("black" if value > 0.6 * high else "white"))
  return _save(fig, path)


def ablation_chart(study, path: str) -> str:
  """Left: loss on the repeated half with each head ablated (bars), the intact model, the top
  heads and the control ablated (lines). Right: loss per position, intact vs top ablated."""
  n_layers, n_heads = study.head_loss_LN.shape
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=[1.3, 1])
  names = [f"L{i}H{j}" for i in range(n_layers) for j in range(n_heads)]
  top = {f"L{i}H{j}" for i, j in study.top_heads}
  colors = ["tab:red" if name in top else "tab:gray" for name in names]
  left.bar(np.arange(len(names)), study.head_loss_LN.ravel(), color=colors)
  left.axhline(study.intact_loss, color="black", ls="--", label=f"intact {study.intact_loss:.2f}")
  left.axhline(study.top_loss, color="tab:red", ls=":",
               label=f"top heads ablated {study.top_loss:.2f}")
  left.axhline(study.control_loss, color="tab:blue", ls=":",
               label=f"control ablated {study.control_loss:.2f}")
  left.set_xticks(np.arange(len(names)), names if len(names) <= 64 else [""] * len(names),
                  rotation=90, fontsize=7)
  left.set_ylabel("loss on the repeated half (nats)")
  left.set_title("Each head ablated alone (red: top induction heads)")
  left.legend(fontsize=8)
  right.plot(study.intact_curve_T, label="intact", color="black")
  right.plot(study.top_curve_T, label="top induction heads ablated", color="tab:red")
  right.set_xlabel("position t (predicting token t + 1)")
  right.set_ylabel("mean loss (nats)")
  right.set_title("Loss per position on repeated random tokens")
  right.legend(fontsize=8)
  return _save(fig, path)


def training_curves(history: dict, path: str) -> str:
  """Training loss, loss on the repeated half and each head's induction score vs. step."""
  steps = np.asarray(history["step"])
  scores_by_step = np.asarray(history["induction_scores"])
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
  left.plot(steps, history["train_loss"], label="training loss", color="black")
  left.plot(steps, history["repeated_loss"], label="loss on the repeated half", color="tab:red")
  left.set_xlabel("step")
  left.set_ylabel("nats")
  left.legend(fontsize=8)
  left.set_title("Loss")
  for layer in range(scores_by_step.shape[1]):
    for head in range(scores_by_step.shape[2]):
      right.plot(steps, scores_by_step[:, layer, head], label=f"L{layer}H{head}",
                 ls="-" if layer else ":")
  right.set_xlabel("step")
  right.set_ylabel("induction score")
  right.set_ylim(0, 1)
  right.legend(fontsize=7, ncol=2)
  right.set_title("Induction score of every head during training")
  return _save(fig, path)
