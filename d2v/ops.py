"""The one dispatch point for d2v's fused ops (stable public API: README, Using d2v from other projects).

Each op chooses its implementation once, on first use, for CPU tensors and for CUDA tensors, and records
why: Triton on CUDA tensors (when triton imports), the CUDA/C++ extension `d2v._C` where it is built
(EMA), else the torch reference from `d2v.kernels`. On CPU tensors the ops run torch, except the EMA,
which runs the C++ OpenMP twin when it is built because it measured faster there (`_CPU_EMA_WHY`).

`D2V_OPS_IMPL` forces a path for tests and benchmarks: one of auto | torch | ref | triton | cpp | cuda for
every op, and/or `op=impl` items (`D2V_OPS_IMPL=triton,ema_update_=cpp`). A global `cpp`/`cuda` applies to
the ops that have such a kernel (the EMA) and leaves the others on torch, saying so; forcing a path that
is unavailable here (triton not importable, `d2v._C` not built, an op without that kernel) raises. Forced
`triton` on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter; tests and CI use it).
`ref` computes as the reference code (fairseq data2vec 2.0) does, the baseline of
benchmarks/bench_train_step.py: a per-parameter EMA loop; targets by fairseq's make_targets chain
(`build_targets_fairseq`: per layer F.instance_norm over T on the transposed (B, D, T) tensor, average,
final norm), which equals the torch reference within fp32 rounding, not bit for bit; per-clone targets by
repeating the (B, T, D) targets M times, then indexing; the student gather and the decoder-input scatter
as plain torch.gather / Tensor.scatter under autograd (no custom op, no custom backward).
`backend()` and the trainer's start-up banner report what was chosen and why: no fallback is silent.

Every op is a `torch.library` custom op in the `d2v` namespace with a fake (meta) implementation, so
the ops trace under `torch.compile` as single opaque nodes.

Legend: B samples, M clones, R = B*M rows, T tokens, K kept tokens, N masked tokens, D width.

The public names here are stable API (README: Using d2v from other projects).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from d2v import _ext
from d2v.kernels import _triton
from d2v.kernels import build_targets as _kt
from d2v.kernels import ema_update as _ke
from d2v.kernels import masked_gather as _kg

__all__ = ["masked_gather", "masked_scatter", "masked_targets", "build_targets", "ema_update_", "backend"]

_ENV = "D2V_OPS_IMPL"
_VALID = ("auto", "torch", "ref", "triton", "cpp", "cuda")
_OPS = ("masked_gather", "masked_scatter", "masked_targets", "build_targets", "ema_update_")
# the non-torch kernels each op has
_KERNELS = {"masked_gather": ("triton",), "masked_scatter": ("triton",), "masked_targets": ("triton",),
            "build_targets": ("triton",), "ema_update_": ("triton", "cuda", "cpp")}
_VARIANT = {"triton": "fused", "cpp": "openmp", "cuda": "multi-tensor"}
_TORCH_VARIANT = {"masked_gather": "gather", "masked_scatter": "scatter", "masked_targets": "index",
                  "build_targets": "ref", "ema_update_": "foreach"}
# benchmarks/bench_ema.py, 2-core x86 CPU, 2026-11-23 (benchmarks/results/kernels.md): the C++ twin beat
# torch._foreach_lerp_ over the parameter list in every run: 1.2-10x with fp32 params (a loaded machine
# made the spread wide), ~30x with bf16 params (foreach needs an fp32 copy of each param first)
_CPU_EMA_WHY = ("C++ OpenMP twin measured faster than torch._foreach_lerp_ on CPU "
                "(1.2-10x fp32 params, ~30x bf16 params; bench_ema.py)")


def _parse() -> tuple[str, dict[str, str]]:
    raw = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    default, per_op = "auto", {}
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        op, eq, impl = item.partition("=")
        if not eq:
            op, impl = "", op
        if impl not in _VALID:
            raise ValueError(f"{_ENV}={raw!r}: {impl!r} is not one of {_VALID}")
        if not op:
            default = impl
        elif op not in _OPS:
            raise ValueError(f"{_ENV}={raw!r}: unknown op {op!r}, expected one of {_OPS}")
        elif impl in ("cpp", "cuda", "triton") and impl not in _KERNELS[op]:
            raise ValueError(f"{_ENV}={raw!r}: {op} has no {impl} kernel (it has {_KERNELS[op]} and torch)")
        else:
            per_op[op] = impl
    return default, per_op


def _require(impl: str, what: str) -> None:
    """Raise when a forced path cannot run here."""
    if impl == "triton":
        ok, why = _triton.status()
        if not ok:
            raise RuntimeError(f"{what} forces the Triton path but {why}")
    elif impl in ("cpp", "cuda"):
        mod, why = _ext.load()
        if mod is None:
            raise RuntimeError(f"{what} forces the {impl} extension path but {why}")
        if impl == "cuda" and not mod.with_cuda:
            raise RuntimeError(f"{what} forces the CUDA extension path but {why} was built without CUDA "
                               f"(it needs a CUDA build of torch and nvcc at build time)")


def _entry(op: str, impl: str, reason: str, cpu: str, cuda: str) -> dict:
    variant = _VARIANT.get(impl) or ("ref" if impl == "ref" else _TORCH_VARIANT[op])
    return {"impl": "torch" if impl == "ref" else impl, "variant": variant, "reason": reason,
            "_cpu": cpu, "_cuda": cuda}


def _auto(op: str) -> dict:
    t_ok, t_why = _triton.status()
    if t_ok:
        cuda, cuda_why = "triton", f"CUDA tensors: Triton ({t_why})"
    else:
        cuda, cuda_why = "torch", f"CUDA tensors: torch ({t_why})"
    cpu, cpu_why = "torch", "CPU tensors: torch reference (the Triton kernels run on CUDA tensors)"
    if op == "ema_update_":
        mod, e_why = _ext.load()
        if not t_ok and mod is not None and mod.with_cuda:
            cuda, cuda_why = "cuda", f"CUDA tensors: CUDA multi-tensor kernel ({e_why}; {t_why})"
        elif t_ok:  # both kernels compile to 16-byte accesses (tools/aot_check.py); no GPU timing decides yet
            cuda_why += ", 16-byte vector loads on aligned tensors; the CUDA extension kernel is the fallback"
        if mod is not None:
            cpu, cpu_why = "cpp", f"CPU tensors: {e_why}, {_CPU_EMA_WHY}"
        else:
            cpu_why = f"CPU tensors: torch._foreach_lerp_ ({e_why})"
    here = cuda if torch.cuda.is_available() else cpu
    first, second = (cuda_why, cpu_why) if torch.cuda.is_available() else (cpu_why, cuda_why)
    return _entry(op, here, f"auto: {first}; {second}", cpu, cuda)


def _choose() -> dict[str, dict]:
    default, per_op = _parse()
    table = {}
    for op in _OPS:
        impl = per_op.get(op, default)
        forced_by = f"{_ENV}={op}={impl}" if op in per_op else f"{_ENV}={impl}"
        if impl == "auto":
            table[op] = _auto(op)
        elif impl in ("torch", "ref"):
            why = f"forced by {forced_by}" + (
                " (as the fairseq reference computes it)" if impl == "ref" else ""
            )
            table[op] = _entry(op, impl, why, impl, impl)
        elif impl not in _KERNELS[op]:  # a global cpp/cuda: only the EMA has such a kernel
            table[op] = _entry(op, "torch", f"{forced_by} has no {impl} kernel for {op}: torch reference",
                               "torch", "torch")
        else:
            _require(impl, forced_by)
            why = f"forced by {forced_by}"
            if impl == "triton":
                state = "set" if _triton.interpreting() else "unset"
                why += f" (CPU tensors need TRITON_INTERPRET=1, {state})"
            elif impl in ("cpp", "cuda"):
                why += f" ({_ext.load()[1]})"
            table[op] = _entry(op, impl, why, impl, impl)
    return table


_TABLE: dict[str, dict] | None = None


def _routes() -> dict[str, dict]:
    global _TABLE
    if _TABLE is None:
        _TABLE = _choose()
    return _TABLE


def backend() -> dict[str, dict[str, str]]:
    """Which implementation each op uses here ("triton" | "cuda" | "cpp" | "torch") and why: for CUDA
    tensors when a GPU is visible, else for CPU tensors (the reason names both)."""
    return {k: {f: v[f] for f in ("impl", "variant", "reason")} for k, v in _routes().items()}


def _reset_backend() -> None:
    """Forget the cached choice (tests change D2V_OPS_IMPL and re-dispatch)."""
    global _TABLE
    _TABLE = None


def _route(op: str, t: torch.Tensor) -> str:
    r = _routes()[op]
    return r["_cuda"] if t.is_cuda else r["_cpu"]


# ------------------------------------------------------------------------------------ custom ops
# masked_gather (clones = 1) and masked_targets (clones = M) share one op:
# out[r, k] = x[r // clones, ids[r, k]]


@torch.library.custom_op("d2v::masked_gather", mutates_args=())
def _gather_op(x: torch.Tensor, ids: torch.Tensor, clones: int) -> torch.Tensor:
    op = "masked_gather" if clones == 1 else "masked_targets"
    if _route(op, x) == "triton":
        return _kg.gather_triton(x, ids, clones)
    if clones == 1:
        return _kg.masked_gather_ref(x, ids)
    if _route(op, x) == "ref":  # as the reference code: repeat the targets M times, then index
        return _kg.masked_gather_ref(x.repeat_interleave(clones, dim=0), ids)
    return _kg.masked_targets_ref(x, ids, clones)


@_gather_op.register_fake
def _(x, ids, clones):
    return x.new_empty(ids.shape[0], ids.shape[1], x.shape[2])


@torch.library.custom_op("d2v::masked_gather_backward", mutates_args=())
def _gather_bwd_op(g: torch.Tensor, ids: torch.Tensor, T: int, clones: int) -> torch.Tensor:
    if clones == 1 and _route("masked_gather", g) == "triton":
        return _kg.gather_backward_triton(g, ids, T)
    return _kg.gather_backward_ref(g, ids, T, clones)


@_gather_bwd_op.register_fake
def _(g, ids, T, clones):
    return g.new_empty(g.shape[0] // clones, T, g.shape[2])


def _gather_setup(ctx, inputs, output):
    x, ids, clones = inputs
    ctx.save_for_backward(ids)
    ctx.T, ctx.clones = x.shape[1], clones


def _gather_bwd(ctx, g):
    (ids,) = ctx.saved_tensors
    return torch.ops.d2v.masked_gather_backward(g.contiguous(), ids, ctx.T, ctx.clones), None, None


_gather_op.register_autograd(_gather_bwd, setup_context=_gather_setup)


@torch.library.custom_op("d2v::masked_scatter", mutates_args=())
def _scatter_op(x_kept: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    if _route("masked_scatter", x_kept) == "triton":
        return _kg.scatter_triton(x_kept, ids, fill)
    return _kg.masked_scatter_ref(x_kept, ids, fill)


@_scatter_op.register_fake
def _(x_kept, ids, fill):
    return x_kept.new_empty(fill.shape)


@torch.library.custom_op("d2v::masked_scatter_fill_backward", mutates_args=())
def _scatter_fill_bwd_op(g: torch.Tensor, ids: torch.Tensor, fill_dtype: torch.dtype) -> torch.Tensor:
    """d fill: g with the kept slots zeroed, in fill's dtype."""
    if _route("masked_scatter", g) == "triton":
        return _kg.scatter_fill_grad_triton(g, ids, fill_dtype)
    return _kg.scatter_fill_grad_ref(g, ids, fill_dtype)


@_scatter_fill_bwd_op.register_fake
def _(g, ids, fill_dtype):
    return torch.empty(g.shape, dtype=fill_dtype, device=g.device)


def _scatter_setup(ctx, inputs, output):
    x_kept, ids, fill = inputs
    ctx.save_for_backward(ids)
    ctx.fill_dtype = fill.dtype


def _scatter_bwd(ctx, g):
    (ids,) = ctx.saved_tensors
    g = g.contiguous()
    g_kept = torch.ops.d2v.masked_gather(g, ids, 1) if ctx.needs_input_grad[0] else None
    g_fill = None
    if ctx.needs_input_grad[2]:
        g_fill = torch.ops.d2v.masked_scatter_fill_backward(g, ids, ctx.fill_dtype)
    return g_kept, None, g_fill


_scatter_op.register_autograd(_scatter_bwd, setup_context=_scatter_setup)


@torch.library.custom_op("d2v::build_targets", mutates_args=())
def _targets_op(layers: list[torch.Tensor], instance_norm: bool, final_norm: str, eps: float) -> torch.Tensor:
    route = _route("build_targets", layers[0])
    if route == "triton":
        return _kt.build_targets_triton(layers, instance_norm=instance_norm, final_norm=final_norm, eps=eps)
    if route == "ref":  # fairseq's make_targets chain, op for op
        return _kt.build_targets_fairseq(layers, instance_norm=instance_norm, final_norm=final_norm, eps=eps)
    return _kt.build_targets_ref(layers, instance_norm=instance_norm, final_norm=final_norm, eps=eps)


@_targets_op.register_fake
def _(layers, instance_norm, final_norm, eps):
    return layers[0].new_empty(layers[0].shape, dtype=torch.float32)


@torch.library.custom_op("d2v::ema_update_", mutates_args=("ema", "out_lowp"))
def _ema_op(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float,
            out_lowp: list[torch.Tensor]) -> None:
    """out_lowp: [] for none (the schema has no optional tensor lists)."""
    if not ema:
        return
    out_lowp = out_lowp or None
    r = _routes()["ema_update_"]
    impl = r["_cuda"] if ema[0].is_cuda else r["_cpu"]
    if impl == "ref":
        _ke.ema_update_ref_(ema, params, decay, out_lowp)
    elif impl == "torch":
        _ke.ema_update_foreach_(ema, params, decay, out_lowp)
    elif impl == "triton":
        _ke.ema_update_triton_(ema, params, decay, out_lowp)
    else:
        mod, why = _ext.load()
        if impl == "cpp":
            if ema[0].is_cuda:
                raise RuntimeError("ema_update_: the cpp path (forced) runs on CPU tensors, got CUDA tensors")
            mod.ema_update_cpu(ema, [p.contiguous() for p in params], float(decay), out_lowp)
        else:
            if not ema[0].is_cuda:
                raise RuntimeError("ema_update_: the cuda path (forced) runs on CUDA tensors, got CPU ones")
            mod.ema_update_cuda(ema, [p.contiguous() for p in params], float(decay), out_lowp)


@_ema_op.register_fake
def _(ema, params, decay, out_lowp):
    return None


# ------------------------------------------------------------------------------------ public API


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), ids_keep (B, K) int64 -> (B, K, D); differentiable in x. The rows of ids_keep hold
    distinct positions (as masks do): the fused backward writes, not adds, each position's gradient."""
    _kg.check_gather_args(x, ids_keep)
    if _route("masked_gather", x) == "ref":  # the reference's torch.gather, autograd's own backward
        return _kg.masked_gather_ref(x, ids_keep)
    return torch.ops.d2v.masked_gather(x, ids_keep, 1)


def masked_targets(y: torch.Tensor, ids_masked: torch.Tensor, clones: int) -> torch.Tensor:
    """Per-clone targets without the M-times copy: y (B, T, D), ids_masked (B * clones, N) -> (R, N, D)
    with out[r, n] = y[r // clones, ids_masked[r, n]] (clone rows sample-major, as repeat_interleave)."""
    _kg.check_gather_args(y, ids_masked, clones)
    return torch.ops.d2v.masked_gather(y, ids_masked, clones)


def masked_scatter(x_kept: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of masked_gather: fill (B, T, D) with kept rows put back at ids_keep (B, K); the decoder
    input (kept tokens, noise at masked slots, original order) in one pass. Output in x_kept's dtype."""
    _kg.check_scatter_args(x_kept, ids_keep, fill)
    if _route("masked_scatter", x_kept) == "ref":  # plain torch scatter, autograd's own backward
        return _kg.masked_scatter_ref(x_kept, ids_keep, fill)
    return torch.ops.d2v.masked_scatter(x_kept, ids_keep, fill)


def build_targets(
    layers: Sequence[torch.Tensor], *, instance_norm: bool = True, final_norm: str = "none", eps: float = 1e-5
) -> torch.Tensor:
    """K tensors (B, T, D) -> float32 (B, T, D): instance-norm over T per (sample, channel)
    without affine (if instance_norm), average, then final_norm in {"none", "layer", "instance"}."""
    _kt._check(layers, final_norm)
    return torch.ops.d2v.build_targets(list(layers), bool(instance_norm), final_norm, float(eps))


def ema_update_(
    ema_params: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    *,
    out_lowp: Sequence[torch.Tensor] | None = None,
) -> None:
    """In place, for every pair: ema = decay * ema + (1 - decay) * param (ema float32; params fp32 or
    bf16). `out_lowp`: bf16/fp16 tensors that receive the new ema in the same pass (a low-precision
    teacher)."""
    _ke.check_ema_args(ema_params, params, out_lowp)
    with torch.no_grad():
        torch.ops.d2v.ema_update_(list(ema_params), list(params), float(decay),
                                  list(out_lowp) if out_lowp is not None else [])
