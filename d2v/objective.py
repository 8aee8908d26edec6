"""The data2vec 2.0 objective: the regression loss at masked positions, the CLS loss (images), and the
statistics every run logs. Pure tensor math on what the model computed (no modules, no teacher).

Legend: B samples, M clones, R = B*M rows, T tokens, N masked tokens per row, D width.

loss = s * mean over masked tokens of sum_d l(pred, y) + cls_loss * s * sum over rows of
sum_d (cls - mean_T y)^2, with s = objective.loss_scale or 1/sqrt(D): the reference's (R + C) / N.

References: fairseq examples/data2vec/models/data2vec2.py (d2v_loss, the cls_loss term, compute_var).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# what one step reports, in this order: every scalar the loss returns (logged in metrics.csv, averaged
# over ranks, checked by the collapse guard)
STAT_KEYS = ("loss", "loss_reg", "loss_cls", "target_var", "pred_var")


VAR_EPS = 1e-6  # the reference's compute_var: sqrt(var + 1e-6)


def std_over_tokens(y_ND: torch.Tensor) -> torch.Tensor:
    """The reference's target_var / pred_var (fairseq data2vec2.py compute_var, single process): per dim
    sqrt(unbiased variance across the N tokens + 1e-6), averaged over the D dims -> a scalar. The
    distributed backends average this per-rank value over the ranks at log steps; the reference pools
    the ranks' tokens first (an all-reduce of counts and sums each step), which d2v does not pay for."""
    return torch.sqrt(y_ND.float().var(dim=0) + VAR_EPS).mean()


def data2vec_loss(p_RND: torch.Tensor, y_RND: torch.Tensor, y_BTD: torch.Tensor, cls_RD: torch.Tensor | None,
                  clones: int, objective) -> dict[str, torch.Tensor]:
    """Predictions and targets at the masked positions (R, N, D) fp32, the full targets (B, T, D) (for the
    CLS target: their mean over tokens), the student's CLS outputs (R, D) or None -> the STAT_KEYS as
    scalar tensors (no host sync)."""
    D = y_BTD.shape[-1]
    scale = objective.loss_scale if objective.loss_scale is not None else 1.0 / math.sqrt(D)
    if objective.loss_beta == 0:
        elem = (p_RND - y_RND).pow(2)
    else:
        elem = F.smooth_l1_loss(p_RND, y_RND, reduction="none", beta=objective.loss_beta)
    n_masked = p_RND.shape[0] * p_RND.shape[1]
    loss_reg = elem.sum() * scale / max(n_masked, 1)
    out = {"loss_reg": loss_reg}
    if objective.cls_loss > 0 and cls_RD is not None:
        sample = torch.arange(cls_RD.shape[0], device=y_BTD.device) // clones  # (R,) sample of each row
        cls_target = y_BTD.mean(dim=1)[sample]  # (R, D): mean over tokens of the final targets
        loss_cls = objective.cls_loss * scale * (cls_RD.float() - cls_target).pow(2).sum()
    else:
        loss_cls = loss_reg.new_zeros(())
    out["loss_cls"] = loss_cls
    out["loss"] = loss_reg + loss_cls
    with torch.no_grad():
        out["target_var"] = std_over_tokens(y_RND.reshape(-1, D))
        out["pred_var"] = std_over_tokens(p_RND.reshape(-1, D))
    return {k: out[k] for k in STAT_KEYS}
