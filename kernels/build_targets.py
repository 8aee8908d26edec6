"""Teacher target builder: instance-norm each of the top-K layer outputs over time, average,
then an optional final norm. All statistics in fp32; output fp32.

Legend: B samples, T tokens (CLS already stripped), D width, K layers.

References: fairseq examples/data2vec/models/data2vec2.py make_targets
(../shared/spec/data2vec2.md §2).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FINAL_NORMS = ("none", "layer", "instance")


def _instance_norm_T(y_BTD: torch.Tensor, eps: float) -> torch.Tensor:
    # per (sample, channel) statistics over T; biased variance, no affine (F.instance_norm semantics)
    mean = y_BTD.mean(dim=1, keepdim=True)  # (B, 1, D)
    var = y_BTD.var(dim=1, unbiased=False, keepdim=True)  # (B, 1, D)
    return (y_BTD - mean) * torch.rsqrt(var + eps)


def build_targets_ref(
    layers: Sequence[torch.Tensor],
    *,
    instance_norm: bool = True,
    final_norm: str = "none",
    eps: float = 1e-5,
) -> torch.Tensor:
    """layers: K tensors (B, T, D) of any float dtype -> float32 (B, T, D)."""
    if len(layers) == 0:
        raise ValueError("build_targets needs at least one layer")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
    shape = layers[0].shape
    acc = None
    for i, y in enumerate(layers):
        if y.dim() != 3 or y.shape != shape:
            raise ValueError(f"layer {i} has shape {tuple(y.shape)}, expected (B, T, D) = {tuple(shape)}")
        y = y.float()
        if instance_norm:
            y = _instance_norm_T(y, eps)
        acc = y if acc is None else acc + y
    y = acc / len(layers)  # (B, T, D)
    if final_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], eps=eps)
    elif final_norm == "instance":
        y = _instance_norm_T(y, eps)
    return y
