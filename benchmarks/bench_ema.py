"""EMA of teacher parameters at real model sizes: d2v.ops.ema_update_ vs the reference's per-parameter
loop (fairseq EMAModule: mul_ + add_ per tensor), torch._foreach_lerp_ (timm ModelEmaV3), torch.compile of
the foreach update, and each fused path available here (C++ OpenMP twin on CPU; Triton and the CUDA
extension on a GPU), with and without writing a bf16 teacher copy in the same pass.

Byte model per parameter: read param (4 B fp32 / 2 B bf16) + read and write the fp32 shadow (8 B)
(+ 2 B for the bf16 teacher copy). Parameter lists follow the real architectures (ViT-B/16 86M,
ViT-L/16 304M, audio base 94M: 7-layer conv feature extractor + 12 blocks).

Every provider is checked once before it is timed: run from the same starting shadow, its result must
match the float64 lerp within rel err 1e-6 (fp32 arithmetic), and the bf16 teacher copy within bf16's
unit roundoff (2^-8). A provider that misses is reported as WRONG and not timed; the script then exits
with status 1.

Run: .venv/bin/python benchmarks/bench_ema.py [--device cuda] [--no-compile] [--cases vit_b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d2v.kernels import ema_update as ke  # noqa: E402

from benchmarks.common import Recorder, bench, common_args, probe_bandwidth, select_cases, try_compile  # noqa: E402
from d2v import _ext, ops  # noqa: E402


def vit_shapes(depth: int, D: int, patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    shapes = [(D, 3, patch, patch), (D,), (1, 1, D), (1, tokens, D)]
    for _ in range(depth):
        shapes += [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,),
                   (4 * D, D), (4 * D,), (D, 4 * D), (D,)]
    return shapes + [(D,), (D,)]


def audio_shapes() -> list[tuple[int, ...]]:
    convs = [(512, 1, 10)] + [(512, 512, 3)] * 4 + [(512, 512, 2)] * 2
    shapes = [s for c in convs for s in (c, (512,), (512,))]
    shapes += [(512,), (512,), (768, 512), (768,), (768, 48, 128)]
    return shapes + vit_shapes(12, 768)[4:]


CASES = {"vit_b": vit_shapes(12, 768), "vit_l": vit_shapes(24, 1024), "audio_b": audio_shapes(),
         "smoke": vit_shapes(1, 32, patch=4, tokens=17)}  # --quick only


BUDGET, BUDGET_BF16 = 1e-6, 2.0 ** -8  # rel err against float64: fp32 lerp; its bf16 rounding


def main() -> int:
    args = common_args(argparse.ArgumentParser(description=__doc__)).parse_args()
    dev = torch.device(args.device)
    cases = select_cases(CASES, args)
    reps = args.repeats or (20 if dev.type == "cuda" else 5)
    copy = probe_bandwidth(dev, args)
    print(f"copy bandwidth {copy:.1f} GB/s on {dev}; d2v backend: {ops.backend()['ema_update_']}")
    rec = Recorder("ema_update_", dev, copy)
    mod, _ = _ext.load()
    for case in cases:
        shapes = CASES[case]
        n = sum(torch.Size(s).numel() for s in shapes)
        for pdt in (torch.float32, torch.bfloat16):
            tag = f"{case}/{str(pdt).split('.')[-1]}"
            shape = f"{n / 1e6:.1f}M params, {len(shapes)} tensors, params {str(pdt).split('.')[-1]}"
            ema = [torch.randn(s, device=dev) for s in shapes]
            par = [torch.randn(s, device=dev).to(pdt) for s in shapes]
            low = [torch.empty(s, device=dev, dtype=torch.bfloat16) for s in shapes]
            by = n * (8 + par[0].element_size())
            d = 0.9998

            def ref_loop():
                for e, p in zip(ema, par):
                    e.mul_(d).add_(p.float(), alpha=1 - d)

            def foreach():
                ke.ema_update_foreach_(ema, par, d)

            # the check's starting point and its float64 answer (one lerp from ema0)
            ema0 = [e.clone() for e in ema]
            ref = [e.double() + (1 - d) * (p.double() - e.double()) for e, p in zip(ema0, par)]

            def timed(provider, impl, f, bytes_model=by, warmup=1, note="", lowp=False):
                torch._foreach_copy_(ema, ema0)  # every check starts from the same shadow
                if lowp:
                    for t in low:
                        t.fill_(float("nan"))  # an element the kernel does not write stays NaN
                f()
                ok = rec.check(tag, shape, provider, impl, ema, ref, BUDGET, bytes_model=bytes_model)
                ok = ok and (not lowp or rec.check(tag, shape, provider, impl, low, ref, BUDGET_BF16,
                                                   bytes_model=bytes_model))
                if ok:
                    rec.add(tag, shape, provider, impl, bench(f, dev, reps, warmup=warmup), reps, bytes_model,
                            note=note)

            timed("torch eager (ref loop)", "torch", ref_loop)
            timed("torch._foreach_lerp_", "torch", foreach)
            comp, why = try_compile(lambda: torch._foreach_lerp_(ema, [p.float() for p in par], 1 - d),
                                    not args.no_compile)
            if comp is not None:
                try:
                    timed("torch.compile(foreach)", "inductor", comp, warmup=2,
                          note="first call compiles (not timed)")
                except Exception as e:
                    print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            r = ops.backend()["ema_update_"]
            timed("d2v.ops.ema_update_", r["impl"], lambda: ops.ema_update_(ema, par, d),
                  note=f"auto: {r['variant']}")
            timed("d2v.ops + bf16 teacher", r["impl"], lambda: ops.ema_update_(ema, par, d, out_lowp=low),
                  bytes_model=by + 2 * n, note="out_lowp= in the same pass", lowp=True)
            if dev.type == "cpu" and mod is not None:
                timed("d2v._C ema_update_cpu", "cpp", lambda: mod.ema_update_cpu(ema, par, d, None))
            if dev.type == "cuda":
                timed("d2v triton", "triton", lambda: ke.ema_update_triton_(ema, par, d))
                if mod is not None and mod.with_cuda:
                    timed("d2v._C ema_update_cuda", "cuda", lambda: mod.ema_update_cuda(ema, par, d, None))
            ema = par = low = ema0 = ref = None  # free the case (rebound, not del: closures use the names)
    rec.speedups("torch eager (ref loop)")
    if not args.no_write:
        rec.write("x eager = speed-up over the reference's per-parameter loop.", quick=args.quick)
    return rec.exit_code()


if __name__ == "__main__":
    sys.exit(main())
