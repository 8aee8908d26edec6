"""In-place EMA of teacher parameters: ema = decay * ema + (1 - decay) * param.

ema tensors are float32 (the teacher's master copy); params are float32 or bf16.

References: fairseq fairseq/modules/ema_module.py (per-parameter loop); timm ModelEmaV3 (foreach lerp).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update_: {len(ema_params)} ema tensors vs {len(params)} params")
    for i, (e, p) in enumerate(zip(ema_params, params)):
        if e.shape != p.shape:
            raise ValueError(f"ema_update_: pair {i} shapes differ: {tuple(e.shape)} vs {tuple(p.shape)}")
        if e.dtype != torch.float32:
            raise ValueError(f"ema_update_: ema tensor {i} must be float32, got {e.dtype}")


@torch.no_grad()
def ema_update_ref_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """Reference: the per-parameter loop of the formula, exactly as written."""
    _check(ema_params, params)
    for e, p in zip(ema_params, params):
        e.mul_(decay).add_(p.float(), alpha=1.0 - decay)


@torch.no_grad()
def ema_update_foreach_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """Multi-tensor torch path: one foreach lerp over all pairs (ema += (1-decay) * (p - ema))."""
    _check(ema_params, params)
    if not ema_params:
        return
    src = [p if p.dtype == torch.float32 else p.float() for p in params]
    torch._foreach_lerp_(list(ema_params), src, 1.0 - decay)
