"""The one dispatch point for d2v's fused ops (stable public API; see DESIGN.md).

Each op chooses its implementation once, on first use, and records why. Today every op runs its
pure-torch reference from `d2v.kernels`; the fused Triton / CUDA / C++ paths plug in here.
`D2V_OPS_IMPL=torch` (or `ref`) forces a path for tests and benchmarks; `backend()` and the trainer's
start-up banner report what was chosen and why, so no fallback is silent.

Legend: B rows, T tokens, K kept tokens, D width.

References: DESIGN.md "Stable public API"; ../shared/STYLE.md §8.7.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from d2v.kernels.build_targets import build_targets_ref
from d2v.kernels.ema_update import ema_update_foreach_, ema_update_ref_
from d2v.kernels.masked_gather import masked_gather_ref, masked_scatter_ref

__all__ = ["masked_gather", "masked_scatter", "build_targets", "ema_update_", "backend"]

_ENV = "D2V_OPS_IMPL"
_VALID = ("auto", "torch", "ref")


def _choose() -> dict[str, dict[str, str]]:
    forced = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if forced not in _VALID:
        raise ValueError(f"{_ENV}={forced!r} is not one of {_VALID}")
    if forced == "ref":
        why = f"forced by {_ENV}=ref (per-parameter reference loops)"
        return {op: {"impl": "torch", "variant": "ref", "reason": why} for op in _OPS}
    why = "no fused kernel for this op is built into this d2v version; torch reference in use"
    if forced == "torch":
        why = f"forced by {_ENV}=torch"
    table = {op: {"impl": "torch", "variant": "ref", "reason": why} for op in _OPS}
    table["ema_update_"] = {"impl": "torch", "variant": "foreach",
                            "reason": why + " (multi-tensor torch._foreach_lerp_)"}
    return table


_OPS = ("masked_gather", "masked_scatter", "build_targets", "ema_update_")
_TABLE: dict[str, dict[str, str]] | None = None


def backend() -> dict[str, dict[str, str]]:
    """Which implementation each op uses here ("triton" | "cuda" | "cpp" | "torch") and why."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _choose()
    return {k: dict(v) for k, v in _TABLE.items()}


def _reset_backend() -> None:
    """Forget the cached choice (tests change D2V_OPS_IMPL and re-dispatch)."""
    global _TABLE
    _TABLE = None


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), ids_keep (B, K) int64 -> (B, K, D); differentiable in x."""
    backend()
    return masked_gather_ref(x, ids_keep)


def masked_scatter(x_kept: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of masked_gather: fill (B, T, D) with kept rows put back at ids_keep (B, K)."""
    backend()
    return masked_scatter_ref(x_kept, ids_keep, fill)


def build_targets(
    layers: Sequence[torch.Tensor], *, instance_norm: bool = True, final_norm: str = "none", eps: float = 1e-5
) -> torch.Tensor:
    """K tensors (B, T, D) -> float32 (B, T, D): instance-norm over T per (sample, channel)
    without affine (if instance_norm), average, then final_norm in {"none", "layer", "instance"}."""
    backend()
    return build_targets_ref(layers, instance_norm=instance_norm, final_norm=final_norm, eps=eps)


def ema_update_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """In place, for every pair: ema = decay * ema + (1 - decay) * param (ema float32)."""
    if backend()["ema_update_"]["variant"] == "foreach":
        ema_update_foreach_(ema_params, params, decay)
    else:
        ema_update_ref_(ema_params, params, decay)
