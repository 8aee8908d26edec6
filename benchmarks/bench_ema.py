"""EMA of teacher parameters at real model sizes: d2v.ops.ema_update_ vs the reference's per-parameter
loop (fairseq EMAModule: mul_ + add_ per tensor), torch._foreach_lerp_ (timm ModelEmaV3), torch.compile of
the foreach update, and each fused path available here (C++ OpenMP twin on CPU; Triton and the CUDA
extension on a GPU), with and without writing a bf16 teacher copy in the same pass.

Byte model per parameter: read param (4 B fp32 / 2 B bf16) + read and write the fp32 shadow (8 B)
(+ 2 B for the bf16 teacher copy). Parameter lists follow the real architectures (ViT-B/16 86M,
ViT-L/16 304M, audio base 94M: 7-layer conv feature extractor + 12 blocks).

Run: .venv/bin/python benchmarks/bench_ema.py [--device cuda] [--no-compile] [--cases vit_b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Recorder, bench, common_args, probe_bandwidth, select_cases, try_compile  # noqa: E402
from d2v import _ext, ops  # noqa: E402
from d2v.kernels import ema_update as ke  # noqa: E402


def vit_shapes(depth: int, D: int, patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    shapes = [(D, 3, patch, patch), (D,), (1, 1, D), (1, tokens, D)]
    for _ in range(depth):
        shapes += [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (4 * D, D), (4 * D,), (D, 4 * D), (D,)]
    return shapes + [(D,), (D,)]


def audio_shapes() -> list[tuple[int, ...]]:
    convs = [(512, 1, 10)] + [(512, 512, 3)] * 4 + [(512, 512, 2)] * 2
    shapes = [s for c in convs for s in (c, (512,), (512,))] + [(512,), (512,), (768, 512), (768,), (768, 48, 128)]
    return shapes + vit_shapes(12, 768)[4:]


CASES = {"vit_b": vit_shapes(12, 768), "vit_l": vit_shapes(24, 1024), "audio_b": audio_shapes(),
         "smoke": vit_shapes(1, 32, patch=4, tokens=17)}  # --quick only


def main() -> None:
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

            rec.add(tag, shape, "torch eager (ref loop)", "torch", bench(ref_loop, dev, reps), reps, by)
            rec.add(tag, shape, "torch._foreach_lerp_", "torch", bench(foreach, dev, reps), reps, by)
            comp, why = try_compile(lambda: torch._foreach_lerp_(ema, [p.float() for p in par], 1 - d),
                                    not args.no_compile)
            if comp is not None:
                try:
                    rec.add(tag, shape, "torch.compile(foreach)", "inductor", bench(comp, dev, reps, warmup=2), reps, by,
                            note="first call compiles (not timed)")
                except Exception as e:
                    print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            r = ops.backend()["ema_update_"]
            rec.add(tag, shape, "d2v.ops.ema_update_", r["impl"], bench(lambda: ops.ema_update_(ema, par, d), dev, reps),
                    reps, by, note=f"auto: {r['variant']}")
            rec.add(tag, shape, "d2v.ops + bf16 teacher", r["impl"],
                    bench(lambda: ops.ema_update_(ema, par, d, out_lowp=low), dev, reps), reps, by + 2 * n,
                    note="out_lowp= in the same pass")
            if dev.type == "cpu" and mod is not None:
                rec.add(tag, shape, "d2v._C ema_update_cpu", "cpp",
                        bench(lambda: mod.ema_update_cpu(ema, par, d, None), dev, reps), reps, by)
            if dev.type == "cuda":
                rec.add(tag, shape, "d2v triton", "triton",
                        bench(lambda: ke.ema_update_triton_(ema, par, d), dev, reps), reps, by)
                if mod is not None and mod.with_cuda:
                    rec.add(tag, shape, "d2v._C ema_update_cuda", "cuda",
                            bench(lambda: mod.ema_update_cuda(ema, par, d, None), dev, reps), reps, by)
            del ema, par, low
    rec.speedups("torch eager (ref loop)")
    if not args.no_write:
        rec.write("x eager = speed-up over the reference's per-parameter loop.", quick=args.quick)


if __name__ == "__main__":
    main()
