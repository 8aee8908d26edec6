"""Masked-token gather (student input, per-clone targets) and its inverse (decoder input): torch
references and fused Triton kernels.

Forward gather: out[r, k] = x[r // clones, ids[r, k]] in one pass, no (B, K, D) int64 index tensor.
Backward of the gather and forward of the inverse share one kernel driven by a (B, T) int32 inverse map
(inv[r, t] = k where ids[r, k] = t, else -1): every output row is written exactly once (no atomics,
deterministic), reading the kept source row or the fill row (or writing zeros). The map costs one
(B, K) -> (B, T) int32 pass, D times smaller than the data. It assumes the positions in each row of
ids are distinct, which masks guarantee (kept and masked positions of a mask); the torch path sums
gradients of repeated positions instead.

Legend: B rows, T tokens, K kept (or masked) tokens, D width, R = B * clones rows.

References: fairseq examples/data2vec/models/modalities/base.py (gather_unmasked, decoder_input).
"""
from __future__ import annotations

import functools

import torch

from . import _triton

# ------------------------------------------------------------------------------------ references


def check_gather_args(x_BTD: torch.Tensor, ids_RK: torch.Tensor, clones: int = 1) -> None:
    if x_BTD.dim() != 3 or ids_RK.dim() != 2 or x_BTD.shape[0] * clones != ids_RK.shape[0]:
        raise ValueError(
            f"masked_gather expects x (B, T, D) and ids_keep (B * clones, K) with clones={clones}, "
            f"got {tuple(x_BTD.shape)} and {tuple(ids_RK.shape)}"
        )
    if ids_RK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"masked_gather: ids must be int64 or int32, got {ids_RK.dtype}")
    if clones < 1:
        raise ValueError(f"masked_gather: clones must be >= 1, got {clones}")


def masked_gather_ref(x_BTD: torch.Tensor, ids_keep_BK: torch.Tensor) -> torch.Tensor:
    """Kept tokens x[b, ids_keep[b, k]] -> (B, K, D); differentiable in x."""
    check_gather_args(x_BTD, ids_keep_BK)
    idx = ids_keep_BK.long().unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1])  # (B, K, D)
    return torch.gather(x_BTD, 1, idx)


def masked_targets_ref(y_BTD: torch.Tensor, ids_RN: torch.Tensor, clones: int) -> torch.Tensor:
    """Per-clone targets y[r // clones, ids[r, n]] -> (R, N, D), R = B * clones, without the
    M-times repeat of y (advanced indexing; the reference repeat_interleaves y instead)."""
    check_gather_args(y_BTD, ids_RN, clones)
    sample = torch.arange(ids_RN.shape[0], device=y_BTD.device) // clones  # (R,)
    return y_BTD[sample[:, None], ids_RN.long()]


def masked_scatter_ref(
    x_kept_BKD: torch.Tensor, ids_keep_BK: torch.Tensor, fill_BTD: torch.Tensor
) -> torch.Tensor:
    """Inverse of masked_gather: a copy of fill (B, T, D) with row ids_keep[b, k] replaced by
    x_kept[b, k]. Differentiable in x_kept and fill (fill's gradient is zero at kept slots)."""
    check_scatter_args(x_kept_BKD, ids_keep_BK, fill_BTD)
    idx = ids_keep_BK.long().unsqueeze(-1).expand(-1, -1, fill_BTD.shape[-1])  # (B, K, D)
    return fill_BTD.to(x_kept_BKD.dtype).scatter(1, idx, x_kept_BKD)


def scatter_fill_grad_ref(g_RTD: torch.Tensor, ids_RK: torch.Tensor, fill_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of masked_scatter w.r.t. fill: g with the kept slots zeroed, in fill's dtype."""
    idx = ids_RK.long().unsqueeze(-1).expand(-1, -1, g_RTD.shape[-1])
    return g_RTD.scatter(1, idx, 0.0).to(fill_dtype)


def check_scatter_args(x_kept_BKD: torch.Tensor, ids_keep_BK: torch.Tensor, fill_BTD: torch.Tensor) -> None:
    ok = x_kept_BKD.dim() == 3 and ids_keep_BK.dim() == 2 and fill_BTD.dim() == 3
    ok = ok and x_kept_BKD.shape[:2] == ids_keep_BK.shape and fill_BTD.shape[0] == x_kept_BKD.shape[0]
    ok = ok and fill_BTD.shape[2] == x_kept_BKD.shape[2] and ids_keep_BK.shape[1] <= fill_BTD.shape[1]
    if not ok:
        raise ValueError(
            f"masked_scatter expects x_kept (B, K, D), ids_keep (B, K), fill (B, T, D) with K <= T, got "
            f"{tuple(x_kept_BKD.shape)}, {tuple(ids_keep_BK.shape)}, {tuple(fill_BTD.shape)}"
        )


def gather_backward_ref(g_RKD: torch.Tensor, ids_RK: torch.Tensor, T: int, clones: int) -> torch.Tensor:
    """Gradient of the gather w.r.t. x (B, T, D): scatter-add (repeated positions and clones sum)."""
    R, K, D = g_RKD.shape
    B = R // clones
    flat = (torch.arange(R, device=g_RKD.device)[:, None] // clones) * T + ids_RK.long()  # (R, K)
    gx = g_RKD.new_zeros(B * T, D)
    gx.index_add_(0, flat.reshape(-1), g_RKD.reshape(R * K, D))
    return gx.view(B, T, D)


# ------------------------------------------------------------------------------------ Triton


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(
        x_ptr,  # (B, T, D) any strides
        ids_ptr,  # (R, K) int32/int64
        out_ptr,  # (R, K, D) contiguous
        K, D, clones,
        sx_b, sx_t, sx_d, si_r, si_k,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        km = k < K
        t = tl.load(ids_ptr + r * si_r + k * si_k, mask=km, other=0).to(tl.int64)
        src = x_ptr + (r // clones).to(tl.int64) * sx_b + t[:, None] * sx_t  # (BLOCK_K, 1)
        dst = out_ptr + (r.to(tl.int64) * K + k[:, None]) * D  # (BLOCK_K, 1)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = km[:, None] & (d < D)[None, :]
            v = tl.load(src + d[None, :] * sx_d, mask=m)
            tl.store(dst + d[None, :], v, mask=m)

    @triton.jit
    def invert_kernel(
        ids_ptr,  # (R, K)
        inv_ptr,  # (R, T) int32, pre-filled with -1
        K, T, si_r, si_k,
        BLOCK_K: tl.constexpr,
    ):
        r = tl.program_id(0)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < K
        t = tl.load(ids_ptr + r * si_r + k * si_k, mask=km, other=0).to(tl.int64)
        tl.store(inv_ptr + r.to(tl.int64) * T + t, k.to(tl.int32), mask=km)

    @triton.jit
    def scatter_kernel(
        src_ptr,  # (R, K, D) any strides: rows written at kept slots (if HAS_SRC, else zeros)
        inv_ptr,  # (R, T) int32 inverse map
        fill_ptr,  # (R, T, D) any strides: rows written at the other slots (if HAS_FILL, else zeros)
        out_ptr,  # (R, T, D) contiguous
        T, D,
        ss_r, ss_k, ss_d, sf_r, sf_t, sf_d,
        HAS_SRC: tl.constexpr, HAS_FILL: tl.constexpr, ROUND_BF16: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < T
        kk = tl.load(inv_ptr + r * T + t, mask=tm, other=-1)  # (BLOCK_T,)
        kept = (kk >= 0)[:, None]
        src = src_ptr + r * ss_r + tl.maximum(kk, 0).to(tl.int64)[:, None] * ss_k
        fill = fill_ptr + r * sf_r + t[:, None] * sf_t
        dst = out_ptr + (r * T + t[:, None]) * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = tm[:, None] & (d < D)[None, :]
            v = tl.zeros([BLOCK_T, BLOCK_D], out_ptr.dtype.element_ty)  # no arithmetic: dtypes pass through
            if HAS_SRC:
                v = tl.load(src + d[None, :] * ss_d, mask=m & kept, other=0.0).to(out_ptr.dtype.element_ty)
            if HAS_FILL:
                f = tl.load(fill + d[None, :] * sf_d, mask=m & (~kept), other=0.0)
                if ROUND_BF16:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand
                    u = f.to(tl.float32).to(tl.uint32, bitcast=True)
                    u = tl.where(f != f, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
                    f = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                v = tl.where(kept, v, f.to(out_ptr.dtype.element_ty))
            tl.store(dst + d[None, :], v, mask=m)

    return gather_kernel, invert_kernel, scatter_kernel


# tiles: 2-D (rows x width), the row loop inside the program over D; <= 4096 elements per tile
def _tiles(n_rows: int, D: int) -> tuple[int, int]:
    block_d = min(_triton.next_pow2(D), 256)
    block_rows = max(1, min(_triton.next_pow2(n_rows), 4096 // block_d, 64))
    return block_rows, block_d


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_dtype(op: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{op}: the Triton path supports {_SUPPORTED}, got {t.dtype}")


def gather_triton(x_BTD: torch.Tensor, ids_RK: torch.Tensor, clones: int = 1) -> torch.Tensor:
    """out[r, k] = x[r // clones, ids[r, k]] -> (R, K, D) contiguous, x's dtype; one launch."""
    check_gather_args(x_BTD, ids_RK, clones)
    _triton.check_launchable("masked_gather", x_BTD, ids_RK)
    _check_dtype("masked_gather", x_BTD)
    R, K = ids_RK.shape
    D = x_BTD.shape[2]
    out = x_BTD.new_empty(R, K, D)
    if out.numel() == 0:
        return out
    gather_kernel, _, _ = _kernels()
    block_k, block_d = _tiles(K, D)
    with _triton.on_device(out):
        gather_kernel[(R, -(-K // block_k))](
            x_BTD, ids_RK, out, K, D, clones, *x_BTD.stride(), *ids_RK.stride(),
            BLOCK_K=block_k, BLOCK_D=block_d,
        )
    return out


def inverse_map_triton(ids_RK: torch.Tensor, T: int) -> torch.Tensor:
    """(R, T) int32: k where ids[r, k] = t, else -1."""
    _, invert_kernel, _ = _kernels()
    R, K = ids_RK.shape
    inv = torch.full((R, T), -1, dtype=torch.int32, device=ids_RK.device)
    if R and K:
        block_k = min(_triton.next_pow2(K), 1024)
        with _triton.on_device(inv):
            invert_kernel[(R, -(-K // block_k))](ids_RK, inv, K, T, *ids_RK.stride(), BLOCK_K=block_k)
    return inv


def _scatter_launch(src, inv, fill, out):
    _, _, scatter_kernel = _kernels()
    R, T, D = out.shape
    if out.numel() == 0:
        return out
    block_t, block_d = _tiles(T, D)
    ss = src.stride() if src is not None else (0, 0, 0)
    sf = fill.stride() if fill is not None else (0, 0, 0)
    with _triton.on_device(out):
        scatter_kernel[(R, -(-T // block_t))](
            src if src is not None else out, inv, fill if fill is not None else out, out, T, D, *ss, *sf,
            HAS_SRC=src is not None, HAS_FILL=fill is not None, BLOCK_T=block_t, BLOCK_D=block_d,
            ROUND_BF16=(_triton.interpreting() and fill is not None
                        and fill.dtype != out.dtype == torch.bfloat16),
        )
    return out


def scatter_triton(x_kept_RKD: torch.Tensor, ids_RK: torch.Tensor, fill_RTD: torch.Tensor) -> torch.Tensor:
    """Decoder input: fill with kept rows put back at ids -> (R, T, D) in x_kept's dtype; reads fill only
    at the slots it keeps."""
    check_scatter_args(x_kept_RKD, ids_RK, fill_RTD)
    _triton.check_launchable("masked_scatter", x_kept_RKD, ids_RK, fill_RTD)
    _check_dtype("masked_scatter", x_kept_RKD, fill_RTD)
    inv = inverse_map_triton(ids_RK, fill_RTD.shape[1])
    out = x_kept_RKD.new_empty(fill_RTD.shape)
    return _scatter_launch(x_kept_RKD, inv, fill_RTD, out)


def gather_backward_triton(g_RKD: torch.Tensor, ids_RK: torch.Tensor, T: int) -> torch.Tensor:
    """Gradient of the gather (clones = 1): (R, T, D) with g's rows at ids, zeros elsewhere; one write
    per element (distinct positions per row assumed, see the module docstring)."""
    _triton.check_launchable("masked_gather backward", g_RKD)
    inv = inverse_map_triton(ids_RK, T)
    out = g_RKD.new_empty(g_RKD.shape[0], T, g_RKD.shape[2])
    return _scatter_launch(g_RKD, inv, None, out)


def scatter_fill_grad_triton(
    g_RTD: torch.Tensor, ids_RK: torch.Tensor, fill_dtype: torch.dtype
) -> torch.Tensor:
    """Gradient of masked_scatter w.r.t. fill: g with the kept slots zeroed, in fill's dtype (the gradient
    w.r.t. x_kept is the gather of g)."""
    _triton.check_launchable("masked_scatter backward", g_RTD)
    inv = inverse_map_triton(ids_RK, g_RTD.shape[1])
    out = torch.empty(g_RTD.shape, dtype=fill_dtype, device=g_RTD.device)
    return _scatter_launch(None, inv, g_RTD, out)
