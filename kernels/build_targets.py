"""Teacher target builder: instance-norm each of the top-K layer outputs over time, average,
then an optional final norm. All statistics in fp32; output fp32.

Legend: B samples, T tokens (CLS already stripped), D width, K layers.

References: fairseq examples/data2vec/models/data2vec2.py make_targets.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

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
# Two paths, chosen by sequence length (both: fp32 statistics, centred variance, one fp32 write):
# - strip (T <= STRIP_MAX_T): one program per (sample b, channel tile) holds the whole (T, BLOCK_D) strip of
#   each layer in registers, so every input element is read once (traffic K*in + 4 bytes per element).
#   The K layers are unrolled (a tuple of pointers), so the tile is sized for 8 elements per thread
#   (2048 per 8-warp program): larger tiles spill registers once the unrolled loads are hoisted (ptxas,
#   sm_90: T=512 or K=18 with 16 elements per thread spilled 0.1-3 kB per thread; 8 per thread: none).
# - split (longer T): a stats kernel writes per-(layer, sample, T-chunk, channel) partial sums and
#   centred sums of squares, a combine kernel merges them (exact parallel-variance merge) into a mean and
#   1/std per (layer, sample, channel), and an apply kernel normalizes, averages and writes (T-chunk,
#   channel) tiles. Each input element is read twice (K*2*in + 4 bytes per element, plus 1/16 of that for
#   the partials), but every program keeps a 64 x 32 tile, at any T: 16-byte loads, no spills.
# final_norm="layer" needs whole rows (all D): a last kernel normalizes the output rows in place;
# final_norm="instance" folds into the strip kernel, and on the split path takes partials of the average
# from the apply kernel, one more combine and an in-place normalize.

STRIP_MAX_T = 256  # next_pow2(T) rows per strip; 256 x 8 channels = 2048 elements, 8 per thread
_STRIP_TILE = 2048
# layers between barriers in the unrolled loop: without them ptxas hoists every layer's loads (ViT-B bf16
# 250 registers); every 8 layers left ViT-L fp32 spilling 4 B under triton 3.7 (sm_80/90), every 4
# spilled 8 B there too, every 6 spilled nowhere under triton 3.7 and 3.8 (tools/aot_check.py)
_STRIP_LOADS_IN_FLIGHT = 6
# layers per strip launch: more are split over launches that continue the fp32 running sum in `out`
# (+8 bytes per element per extra launch). ViT-L's 18 layers in one launch sat at 255 registers and
# spilled under triton 3.8 (sm_80, sm_90); 9 per launch do not.
_STRIP_MAX_LAYERS = 10
_SPLIT_T, _SPLIT_D = 64, 32  # split-path tile: 64 time steps x 32 channels (64-128 contiguous bytes/row)


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
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, LOADS_IN_FLIGHT: tl.constexpr,
        ADD_TO_OUT: tl.constexpr, K_TOTAL: tl.constexpr, LAST: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = (t < T)[:, None] & (d < D)[None, :]
        offs = b * s_b + t[:, None].to(tl.int64) * s_t + d[None, :] * s_d  # (BLOCK_T, BLOCK_D)
        dst = out_ptr + (b * T + t[:, None]) * D + d[None, :]
        if ADD_TO_OUT:  # a later group of layers: continue the running sum an earlier launch stored
            acc = tl.load(dst, mask=m, other=0.0)
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for i in tl.static_range(K):
            if i > 0 and i % LOADS_IN_FLIGHT == 0:  # the compiler hoists the unrolled loads: a barrier
                tl.debug_barrier()  # every few layers bounds how many are live in registers at once
            y = tl.load(layers[i] + offs, mask=m, other=0.0).to(tl.float32)
            if INSTANCE:  # over T per channel; biased variance, as F.instance_norm
                mean = tl.sum(y, axis=0) / T  # (BLOCK_D,)
                yc = tl.where(m, y - mean[None, :], 0.0)
                y = yc * tl.rsqrt(tl.sum(yc * yc, axis=0) / T + eps)[None, :]
            acc += y
        if LAST:
            acc = acc / K_TOTAL
            if FINAL_INSTANCE:
                mean = tl.sum(acc, axis=0) / T
                yc = tl.where(m, acc - mean[None, :], 0.0)
                acc = yc * tl.rsqrt(tl.sum(yc * yc, axis=0) / T + eps)[None, :]
        tl.store(dst, acc, mask=m)

    @triton.jit
    def stats_kernel(
        layers,  # tuple of K pointers, each (B, T, D), shared strides
        part_ptr,  # (2, K, B, S, D) fp32: per T-chunk sum, centred sum of squares
        T, D, S, s_b, s_t, s_d,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(2)
        B = tl.num_programs(0)
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        m = (t < T)[:, None] & dm[None, :]
        n = tl.minimum(T - c * BLOCK_T, BLOCK_T).to(tl.float32)
        offs = b * s_b + t[:, None].to(tl.int64) * s_t + d[None, :] * s_d
        plane = K * B * S * D  # elements per statistic
        for i in tl.static_range(K):
            y = tl.load(layers[i] + offs, mask=m, other=0.0).to(tl.float32)
            s = tl.sum(y, axis=0)  # (BLOCK_D,) chunk sum, then the sum of squares about the chunk mean
            yc = tl.where(m, y - (s / n)[None, :], 0.0)
            m2 = tl.sum(yc * yc, axis=0)
            p = part_ptr + ((i * B + b) * S + c) * D + d
            tl.store(p, s, mask=dm)
            tl.store(p + plane, m2, mask=dm)

    @triton.jit
    def combine_kernel(
        part_ptr,  # (2, L, S, D) fp32 partials (L = layers x samples)
        stat_ptr,  # (2, L, D) fp32 out: mean, 1/sqrt(var + eps)
        T, D, S, L, eps,
        CHUNK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        l_ = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        total = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):  # pass 1: the mean
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < S)[:, None] & dm[None, :]
            total += tl.sum(tl.load(part_ptr + (l_ * S + s[:, None]) * D + d[None, :], mask=m, other=0.0), 0)
        mean = total / T
        m2 = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):  # pass 2: sum of (chunk M2 + n_c (chunk mean - mean)^2)
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < S)[:, None] & dm[None, :]
            p = part_ptr + (l_ * S + s[:, None]) * D + d[None, :]
            cs = tl.load(p, mask=m, other=0.0)
            cm2 = tl.load(p + L * S * D, mask=m, other=0.0)
            n = tl.maximum(tl.minimum(T - s * CHUNK_T, CHUNK_T), 1).to(tl.float32)[:, None]
            dev = tl.where(m, cs / n - mean[None, :], 0.0)
            m2 += tl.sum(cm2 + n * dev * dev, 0)
        q = stat_ptr + l_ * D + d
        tl.store(q, mean, mask=dm)
        tl.store(q + L * D, tl.rsqrt(m2 / T + eps), mask=dm)

    @triton.jit
    def apply_kernel(
        layers,  # tuple of K pointers, each (B, T, D), shared strides
        stat_ptr,  # (2, K, B, D) fp32: mean, 1/std per layer (if INSTANCE)
        out_ptr,  # (B, T, D) fp32 contiguous
        part_ptr,  # (2, 1, B, S, D) fp32: partials of the average (if FINAL_INSTANCE)
        T, D, S, s_b, s_t, s_d,
        K: tl.constexpr, INSTANCE: tl.constexpr, FINAL_INSTANCE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(2)
        B = tl.num_programs(0)
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        m = (t < T)[:, None] & dm[None, :]
        offs = b * s_b + t[:, None].to(tl.int64) * s_t + d[None, :] * s_d
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for i in tl.static_range(K):
            y = tl.load(layers[i] + offs, mask=m, other=0.0).to(tl.float32)
            if INSTANCE:
                q = stat_ptr + (i * B + b) * D + d
                mean = tl.load(q, mask=dm, other=0.0)
                rstd = tl.load(q + K * B * D, mask=dm, other=0.0)
                y = tl.where(m, (y - mean[None, :]) * rstd[None, :], 0.0)
            acc += y
        acc = acc / K
        tl.store(out_ptr + (b * T + t[:, None]) * D + d[None, :], acc, mask=m)
        if FINAL_INSTANCE:
            n = tl.minimum(T - c * BLOCK_T, BLOCK_T).to(tl.float32)
            s = tl.sum(acc, axis=0)
            yc = tl.where(m, acc - (s / n)[None, :], 0.0)
            m2 = tl.sum(yc * yc, axis=0)
            p = part_ptr + (b * S + c) * D + d
            tl.store(p, s, mask=dm)
            tl.store(p + B * S * D, m2, mask=dm)

    @triton.jit
    def normalize_kernel(
        y_ptr,  # (B, T, D) fp32 contiguous, instance-normed over T in place
        stat_ptr,  # (2, B, D) fp32: mean, 1/std
        T, D,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        B = tl.num_programs(0)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        m = (t < T)[:, None] & dm[None, :]
        mean = tl.load(stat_ptr + b * D + d, mask=dm, other=0.0)
        rstd = tl.load(stat_ptr + (B + b) * D + d, mask=dm, other=0.0)
        p = y_ptr + (b * T + t[:, None]) * D + d[None, :]
        y = tl.load(p, mask=m, other=0.0)
        tl.store(p, (y - mean[None, :]) * rstd[None, :], mask=m)

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

    return SimpleNamespace(targets=targets_kernel, stats=stats_kernel, combine=combine_kernel,
                           apply=apply_kernel, normalize=normalize_kernel,
                           layer_norm_rows=layer_norm_rows_kernel)


def _check(layers: Sequence[torch.Tensor], final_norm: str) -> None:
    if len(layers) == 0:
        raise ValueError("build_targets needs at least one layer")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
    shape = layers[0].shape
    for i, y in enumerate(layers):
        if y.dim() != 3 or y.shape != shape:
            raise ValueError(f"layer {i} has shape {tuple(y.shape)}, expected (B, T, D) = {tuple(shape)}")


def _combine(k, part: torch.Tensor, T: int, D: int, S: int, L: int, eps: float) -> torch.Tensor:
    """(2, L, S, D) partials -> (2, L, D) mean and 1/std."""
    stats = part.new_empty(2, L, D)
    block_s = min(_triton.next_pow2(S), 64)
    block_d = min(_triton.next_pow2(D), 64)
    k.combine[(L, -(-D // block_d))](part, stats, T, D, S, L, eps, CHUNK_T=_SPLIT_T, BLOCK_S=block_s,
                                     BLOCK_D=block_d, num_warps=4)
    return stats


def build_targets_triton(
    layers: Sequence[torch.Tensor],
    *,
    instance_norm: bool = True,
    final_norm: str = "none",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused target builder: same contract as the reference. Layers may be strided views (e.g. CLS
    stripped); views with differing strides or dtypes are made alike once (a copy)."""
    _check(layers, final_norm)
    _triton.check_launchable("build_targets", *layers)
    for y in layers:
        if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"build_targets: the Triton path reads fp32/bf16/fp16 layers, got {y.dtype}")
    B, T, D = layers[0].shape
    out = torch.empty(B, T, D, dtype=torch.float32, device=layers[0].device)
    if out.numel() == 0:
        return out
    if any(y.dtype != layers[0].dtype for y in layers):
        layers = [y.float() for y in layers]
    if any(y.stride() != layers[0].stride() for y in layers):
        layers = [y.contiguous() for y in layers]
    k, K, strides = _kernels(), len(layers), layers[0].stride()
    with _triton.on_device(out):
        if T <= STRIP_MAX_T:
            block_t = _triton.next_pow2(T)
            block_d = max(1, min(_triton.next_pow2(D), _STRIP_TILE // block_t, 64))
            groups = -(-K // _STRIP_MAX_LAYERS)  # launches; each adds its layers to the running sum in out
            for g in range(groups):
                part = layers[g * K // groups:(g + 1) * K // groups]
                k.targets[(B, -(-D // block_d))](
                    tuple(part), out, T, D, *strides, eps,
                    K=len(part), INSTANCE=instance_norm, FINAL_INSTANCE=final_norm == "instance",
                    BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if block_t * block_d >= 2048 else 4,
                    LOADS_IN_FLIGHT=_STRIP_LOADS_IN_FLIGHT, ADD_TO_OUT=g > 0, K_TOTAL=K, LAST=g == groups - 1,
                )
        else:
            S = -(-T // _SPLIT_T)
            grid = (B, -(-D // _SPLIT_D), S)
            stats = out  # unused placeholder when there is no instance norm
            if instance_norm:
                part = out.new_empty(2, K, B, S, D)
                k.stats[grid](tuple(layers), part, T, D, S, *strides, K=K, BLOCK_T=_SPLIT_T, BLOCK_D=_SPLIT_D,
                              num_warps=8)
                stats = _combine(k, part, T, D, S, K * B, eps)
            final_instance = final_norm == "instance"
            part_avg = out.new_empty(2, 1, B, S, D) if final_instance else out
            k.apply[grid](tuple(layers), stats, out, part_avg, T, D, S, *strides, K=K, INSTANCE=instance_norm,
                          FINAL_INSTANCE=final_instance, BLOCK_T=_SPLIT_T, BLOCK_D=_SPLIT_D, num_warps=8)
            if final_instance:
                stats_avg = _combine(k, part_avg, T, D, S, B, eps)
                k.normalize[grid](out, stats_avg, T, D, BLOCK_T=_SPLIT_T, BLOCK_D=_SPLIT_D, num_warps=8)
        if final_norm == "layer":
            block_dd = _triton.next_pow2(D)
            block_r = max(1, min(4096 // block_dd, _triton.next_pow2(B * T), 64))
            k.layer_norm_rows[(-(-(B * T) // block_r),)](
                out, B * T, D, eps, BLOCK_R=block_r, BLOCK_D=block_dd, num_warps=8 if block_dd >= 2048 else 4
            )
    return out
