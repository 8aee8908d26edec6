"""In-place EMA of teacher parameters: ema = decay * ema + (1 - decay) * param.

ema tensors are float32 (the teacher's master copy); params are float32 or bf16 (or fp16). The fused
paths compute the lerp form ema + w * (param - ema), w = 1 - decay, in fp32 (as torch._foreach_lerp_),
and can write a low-precision copy of the new ema (a bf16 teacher) in the same pass (`out_lowp`).

Triton path: one multi-tensor launch per param dtype. A (n_chunks, 2) table of (tensor, first element)
drives the grid; tensor addresses live in an int64 table the kernel casts to pointers, so there is no
per-tensor launch and no flat copy. Tables are cached per list of addresses (parameters do not move).

References: fairseq fairseq/modules/ema_module.py (per-parameter loop); timm ModelEmaV3 (foreach lerp);
NVIDIA/apex multi_tensor_apply (chunked multi-tensor launches).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _triton

LOWP = (torch.bfloat16, torch.float16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_ema_args(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    out_lowp: Sequence[torch.Tensor] | None = None,
) -> None:
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update_: {len(ema_params)} ema tensors vs {len(params)} params")
    for i, (e, p) in enumerate(zip(ema_params, params)):
        if e.shape != p.shape:
            raise ValueError(f"ema_update_: pair {i} shapes differ: {tuple(e.shape)} vs {tuple(p.shape)}")
        if e.dtype != torch.float32:
            raise ValueError(f"ema_update_: ema tensor {i} must be float32, got {e.dtype}")
        if e.device != p.device:
            raise ValueError(f"ema_update_: pair {i} is on {e.device} and {p.device}")
    if out_lowp is not None:
        if len(out_lowp) != len(ema_params):
            raise ValueError(f"ema_update_: {len(out_lowp)} out_lowp tensors vs {len(ema_params)} "
                             f"ema tensors")
        for i, (o, e) in enumerate(zip(out_lowp, ema_params)):
            if o.shape != e.shape or o.dtype not in LOWP or o.device != e.device:
                raise ValueError(f"ema_update_: out_lowp {i} must be bf16/fp16 of shape {tuple(e.shape)} on "
                                 f"{e.device}, got {o.dtype} {tuple(o.shape)} on {o.device}")


@torch.no_grad()
def ema_update_ref_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    out_lowp: Sequence[torch.Tensor] | None = None,
) -> None:
    """Reference: the per-parameter loop of the formula, exactly as written."""
    check_ema_args(ema_params, params, out_lowp)
    for i, (e, p) in enumerate(zip(ema_params, params)):
        e.mul_(decay).add_(p.float(), alpha=1.0 - decay)
        if out_lowp is not None:
            out_lowp[i].copy_(e)


@torch.no_grad()
def ema_update_foreach_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    out_lowp: Sequence[torch.Tensor] | None = None,
) -> None:
    """Multi-tensor torch path: one foreach lerp over all pairs (ema += (1-decay) * (p - ema))."""
    check_ema_args(ema_params, params, out_lowp)
    if not ema_params:
        return
    src = [p if p.dtype == torch.float32 else p.float() for p in params]
    torch._foreach_lerp_(list(ema_params), src, 1.0 - decay)
    if out_lowp is not None:
        torch._foreach_copy_(list(out_lowp), list(ema_params))


# ------------------------------------------------------------------------------------ Triton

CHUNK = 1 << 16  # elements per program; a program loops over its chunk in BLOCK steps
BLOCK = 2048
ALIGN = 16  # elements: the aligned launch covers numel // 16 * 16 of each 16-byte-aligned tensor


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def ema_kernel(
        chunks_ptr,  # (n_chunks, 2) int64: tensor index, first element
        ema_addr_ptr,  # (n,) int64 addresses of fp32 ema tensors
        par_addr_ptr,  # (n,) int64 addresses of params (PAR_TY)
        low_addr_ptr,  # (n,) int64 addresses of low-precision copies (LOW_TY), if HAS_LOW
        end_ptr,  # (n,) int64: where this launch stops in each tensor
        w,  # 1 - decay
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
        PAR_TY: tl.constexpr, LOW_TY: tl.constexpr, HAS_LOW: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        c = tl.program_id(0)
        i = tl.load(chunks_ptr + 2 * c)
        start = tl.load(chunks_ptr + 2 * c + 1)
        end = tl.minimum(start + CHUNK, tl.load(end_ptr + i))
        e_ptr = tl.load(ema_addr_ptr + i).to(tl.pointer_type(tl.float32), bitcast=True)
        p_ptr = tl.load(par_addr_ptr + i).to(tl.pointer_type(PAR_TY), bitcast=True)
        l_ptr = tl.load(low_addr_ptr + i).to(tl.pointer_type(LOW_TY), bitcast=True)
        if ALIGNED:  # the host put only 16-byte-aligned tensors and 16-element bounds here: 16-byte accesses
            start = tl.multiple_of(start, 16)
            end = tl.multiple_of(end, 16)
            e_ptr = tl.multiple_of(e_ptr, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
            l_ptr = tl.multiple_of(l_ptr, 16)
        for o in range(start, end, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            m = offs < end
            e = tl.load(e_ptr + offs, mask=m)
            p = tl.load(p_ptr + offs, mask=m).to(tl.float32)
            e = e + w * (p - e)
            tl.store(e_ptr + offs, e, mask=m)
            if HAS_LOW:
                if ROUND_BF16:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand
                    u = e.to(tl.uint32, bitcast=True)
                    u = tl.where(e != e, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
                    tl.store(l_ptr + offs, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=m)
                else:
                    tl.store(l_ptr + offs, e.to(LOW_TY), mask=m)

    return ema_kernel


_TABLES: dict[tuple, list[tuple]] = {}


def _launches(ema, par, low, chunk):
    """Device tables for up to two launches over the same tensors: an ALIGNED one over the first
    numel // 16 * 16 elements of every tensor whose three addresses are 16-byte aligned, and a plain one
    over the rest (those tensors' tails, and unaligned tensors whole). Cached per list of addresses
    (parameters do not move), so the host-to-device copy happens on the first step only."""
    key = (tuple(t.data_ptr() for t in ema), tuple(t.data_ptr() for t in par),
           tuple(t.data_ptr() for t in low) if low is not None else None,
           tuple(t.numel() for t in ema), chunk, ema[0].device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    dev = ema[0].device
    as_t = lambda v: torch.tensor(v, dtype=torch.int64).to(dev)  # noqa: E731
    addrs = [[t.data_ptr() for t in ts] for ts in (ema, par, low if low is not None else ema)]
    numel = [t.numel() for t in ema]
    aligned = [all(a[i] % 16 == 0 for a in addrs) for i in range(len(ema))]
    split = [n // ALIGN * ALIGN if ok else 0 for n, ok in zip(numel, aligned)]  # aligned part's end
    ea, pa, la = (as_t(a) for a in addrs)
    hit = []
    for is_aligned, first, end in ((True, [0] * len(ema), split), (False, split, numel)):
        chunks = [(i, s) for i in range(len(ema)) for s in range(first[i], end[i], chunk)]
        if chunks:
            hit.append((is_aligned, as_t(chunks).view(-1, 2), ea, pa, la, as_t(end)))
    if len(_TABLES) > 64:  # a few live parameter lists per process; do not grow without bound
        _TABLES.clear()
    _TABLES[key] = hit
    return hit


@torch.no_grad()
def ema_update_triton_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    out_lowp: Sequence[torch.Tensor] | None = None,
    *,
    chunk: int = CHUNK,
) -> None:
    """Fused multi-tensor EMA: per param dtype, one launch over the 16-byte-aligned bulk of all tensors
    (vector loads) and, only if some tensor is unaligned or not a multiple of 16 long, one over the rest."""
    check_ema_args(ema_params, params, out_lowp)
    if not ema_params:
        return
    if chunk % ALIGN:
        raise ValueError(f"ema_update_: chunk must be a multiple of {ALIGN}, got {chunk}")
    _triton.check_launchable("ema_update_", ema_params[0])
    import triton.language as tl

    tl_ty = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    groups: dict[tuple, list[int]] = {}
    for i, (e, p) in enumerate(zip(ema_params, params)):
        low_ok = out_lowp is None or out_lowp[i].is_contiguous()
        if not (e.is_contiguous() and p.is_contiguous() and low_ok):
            raise ValueError(f"ema_update_: the fused path needs contiguous tensors (pair {i} is strided)")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"ema_update_: param {i} has dtype {p.dtype}, expected one of {PARAM_DTYPES}")
        if e.numel():
            groups.setdefault((p.dtype, out_lowp[i].dtype if out_lowp is not None else None), []).append(i)
    kernel = _kernels()
    with _triton.on_device(ema_params[0]):
        for (pdt, ldt), idx in groups.items():
            ema = [ema_params[i] for i in idx]
            par = [params[i] for i in idx]
            low = [out_lowp[i] for i in idx] if out_lowp is not None else None
            for aligned, chunks, ea, pa, la, end in _launches(ema, par, low, chunk):
                kernel[(chunks.shape[0],)](
                    chunks, ea, pa, la, end, 1.0 - float(decay),
                    CHUNK=chunk, BLOCK=min(BLOCK, _triton.next_pow2(chunk)), ALIGNED=aligned,
                    PAR_TY=tl_ty[pdt], LOW_TY=tl_ty[ldt] if ldt is not None else tl.bfloat16,
                    HAS_LOW=ldt is not None, ROUND_BF16=_triton.interpreting() and ldt == torch.bfloat16,
                    num_warps=8,
                )
