"""Teacher target builder: instance-norm each of the top-K layer outputs over time, average,
then an optional final norm. All statistics in fp32; output fp32.

Legend: B samples, T tokens (CLS already stripped), D width, K layers.

References: fairseq examples/data2vec/models/data2vec2.py make_targets
(../shared/spec/data2vec2.md §2).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _triton

FINAL_NORMS = ("none", "layer", "instance")


def _instance_norm_T(y_BTD: torch.Tensor, eps: float) -> torch.Tensor:
    # per (sample, channel) statistics over T; biased variance, no affine (F.instance_norm semantics)
    mean = y_BTD.mean(dim=1, keepdim=True)  # (B, 1, D)
    var = y_BTD.var(dim=1, unbiased=False, keepdim=True)  # (B, 1, D)
    return (y_BTD - mean) * torch.rsqrt(var + eps)


def _average_of_normed(layers, norm, instance_norm: bool, final_norm: str, eps: float) -> torch.Tensor:
    """The shared recipe of both references: each layer .float() and `norm`ed over T, summed in order,
    divided by K, then the final norm (`norm` again for "instance")."""
    _check(layers, final_norm)
    acc = None
    for y in layers:
        y = y.float()
        if instance_norm:
            y = norm(y, eps)
        acc = y if acc is None else acc + y
    y = acc / len(layers)  # (B, T, D)
    if final_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], eps=eps)
    elif final_norm == "instance":
        y = norm(y, eps)
    return y


def build_targets_ref(
    layers: Sequence[torch.Tensor],
    *,
    instance_norm: bool = True,
    final_norm: str = "none",
    eps: float = 1e-5,
) -> torch.Tensor:
    """layers: K tensors (B, T, D) of any float dtype -> float32 (B, T, D)."""
    return _average_of_normed(layers, _instance_norm_T, instance_norm, final_norm, eps)


def _fairseq_instance_norm_T(y_BTD: torch.Tensor, eps: float) -> torch.Tensor:
    if y_BTD.shape[1] == 1:  # F.instance_norm refuses T = 1; the reference's statistics give 0
        return torch.zeros_like(y_BTD)
    return F.instance_norm(y_BTD.transpose(1, 2), eps=eps).transpose(1, 2)  # over T per (b, d)


def build_targets_fairseq(
    layers: Sequence[torch.Tensor],
    *,
    instance_norm: bool = True,
    final_norm: str = "none",
    eps: float = 1e-5,
) -> torch.Tensor:
    """The reference's make_targets op for op (fairseq data2vec2.py), the `ref` path of d2v.ops and the
    eager baseline of benchmarks/bench_build_targets.py: per layer transpose to (B, D, T), .float(),
    F.instance_norm, transpose back; sum; divide; F.layer_norm or F.instance_norm of the average.
    Same contract as build_targets_ref; equal to it within fp32 rounding (F.instance_norm reduces in
    another order). A single time step (F.instance_norm refuses T = 1) normalizes to 0, as the ref does."""
    return _average_of_normed(layers, _fairseq_instance_norm_T, instance_norm, final_norm, eps)


# ------------------------------------------------------------------------------------ Triton
# One program per (sample b, channel tile): it holds the whole (T, BLOCK_D) strip of every layer in
# registers, so each input element is read once: mean over T, centred variance (two passes over
# registers, not memory), normalize, accumulate in fp32, optional instance norm of the average, one fp32
# write. final_norm="layer" needs whole rows (all D), so a second kernel normalizes the output rows in
# place: traffic K*in + 4 (+8 for "layer") bytes per element instead of the reference's ~K*(in+16).

MAX_T = 4096  # the strip holds next_pow2(T) x BLOCK_D fp32 values; longer sequences use the torch path
_TILE = 8192  # elements per strip (fp32 accumulator + the current layer)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def targets_kernel(
        layers,  # tuple of K pointers, each (B, T, D) with the shared strides s_b, s_t, s_d
        out_ptr,  # (B, T, D) fp32 contiguous
        T, D, s_b, s_t, s_d, eps,
        K: tl.constexpr, INSTANCE: tl.constexpr, FINAL_INSTANCE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = (t < T)[:, None] & (d < D)[None, :]
        offs = b * s_b + t[:, None].to(tl.int64) * s_t + d[None, :] * s_d  # (BLOCK_T, BLOCK_D)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for i in tl.static_range(K):
            y = tl.load(layers[i] + offs, mask=m, other=0.0).to(tl.float32)
            if INSTANCE:
                mean = tl.sum(y, axis=0) / T  # (BLOCK_D,)
                yc = tl.where(m, y - mean[None, :], 0.0)
                var = tl.sum(yc * yc, axis=0) / T  # biased, as F.instance_norm
                y = yc * tl.rsqrt(var + eps)[None, :]
            acc += y
        acc = acc / K
        if FINAL_INSTANCE:
            mean = tl.sum(acc, axis=0) / T
            yc = tl.where(m, acc - mean[None, :], 0.0)
            var = tl.sum(yc * yc, axis=0) / T
            acc = yc * tl.rsqrt(var + eps)[None, :]
        dst = out_ptr + (b * T + t[:, None]) * D + d[None, :]
        tl.store(dst, acc, mask=m)

    @triton.jit
    def layer_norm_rows_kernel(
        y_ptr,  # (n_rows, D) fp32 contiguous, normalized in place
        n_rows, D, eps,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        m = (r < n_rows)[:, None] & (d < D)[None, :]
        p = y_ptr + r[:, None].to(tl.int64) * D + d[None, :]
        y = tl.load(p, mask=m, other=0.0)
        mean = tl.sum(y, axis=1) / D
        yc = tl.where(m, y - mean[:, None], 0.0)
        var = tl.sum(yc * yc, axis=1) / D
        tl.store(p, yc * tl.rsqrt(var + eps)[:, None], mask=m)

    return targets_kernel, layer_norm_rows_kernel


def _check(layers: Sequence[torch.Tensor], final_norm: str) -> None:
    if len(layers) == 0:
        raise ValueError("build_targets needs at least one layer")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
    shape = layers[0].shape
    for i, y in enumerate(layers):
        if y.dim() != 3 or y.shape != shape:
            raise ValueError(f"layer {i} has shape {tuple(y.shape)}, expected (B, T, D) = {tuple(shape)}")


def build_targets_triton(
    layers: Sequence[torch.Tensor],
    *,
    instance_norm: bool = True,
    final_norm: str = "none",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused target builder: one kernel (two with final_norm="layer"); same contract as the reference.
    Layers may be strided views (e.g. CLS stripped); views with differing strides are copied once."""
    _check(layers, final_norm)
    _triton.check_launchable("build_targets", *layers)
    for y in layers:
        if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"build_targets: the Triton path reads fp32/bf16/fp16 layers, got {y.dtype}")
    B, T, D = layers[0].shape
    if T > MAX_T:
        raise ValueError(f"build_targets: the Triton path holds T <= {MAX_T} tokens per program, got T={T}; "
                         f"set D2V_OPS_IMPL=torch for longer sequences")
    out = torch.empty(B, T, D, dtype=torch.float32, device=layers[0].device)
    if out.numel() == 0:
        return out
    if any(y.stride() != layers[0].stride() for y in layers):
        layers = [y.contiguous() for y in layers]
    targets_kernel, layer_norm_rows_kernel = _kernels()
    block_t = _triton.next_pow2(T)
    block_d = max(1, min(_triton.next_pow2(D), _TILE // block_t, 64))
    warps = 8 if block_t * block_d >= 4096 else 4
    targets_kernel[(B, -(-D // block_d))](
        tuple(layers), out, T, D, *layers[0].stride(), eps,
        K=len(layers), INSTANCE=instance_norm, FINAL_INSTANCE=final_norm == "instance",
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    if final_norm == "layer":
        block_dd = _triton.next_pow2(D)
        block_r = max(1, min(4096 // block_dd, _triton.next_pow2(B * T), 64))
        layer_norm_rows_kernel[(-(-(B * T) // block_r),)](
            out, B * T, D, eps, BLOCK_R=block_r, BLOCK_D=block_dd, num_warps=8 if block_dd >= 2048 else 4
        )
    return out
