"""Interpretability: logit lens, induction/copying/ICL scores, head ablations, figures.

  lens.py       logit_lens, unembed (every layer's residual -> final norm -> unembedding)
  induction.py  repeated_tokens, induction/previous-token/copying scores, icl_score
  ablation.py   ablation_study (each head, the top induction heads, a control)
  losses.py     jitted forwards with intermediates and per-token losses
  figures.py    the PNG figures; analyze.py all of it into report.md + summary.json

Interventions themselves (ablate/scale/replace heads, MLPs, residual positions)
are part of the model: model/interventions.py, `model.apply(..., interventions=)`.
"""
