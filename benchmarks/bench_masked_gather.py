"""Masked-token gather (student input), its inverse (decoder input: kept tokens + noise at masked
slots), and the per-clone target gather, at real shapes: d2v.ops vs torch eager (the reference's
torch.gather with an expanded (R, K, D) int64 index / repeat_interleave of the targets) vs torch.compile.

Byte model (what a perfect kernel moves): gather reads the R*K kept rows and the ids, writes R*K rows;
gather fwd+bwd adds the backward's R*T*D write (zeros at masked slots) and R*K*D read; scatter reads kept
rows + fill rows at masked slots + ids, writes R*T rows; per-clone targets read each distinct source row
of the (B, T, D) fp32 targets once (the M clones of a sample share rows: at most B*T of them, not R*N)
and the ids, and write R*N fp32 rows. On a GPU the L2 is flushed between timed calls (common.bench), so
reused inputs are read from memory, as the byte model assumes.

Every provider is checked once before it is timed: its output (and, for gather+bwd, the gradient) must
equal the float64 reference bit for bit, since these ops only move values. A provider that does not is
reported as WRONG and not timed, and the script exits with status 1.

Run: .venv/bin/python benchmarks/bench_masked_gather.py [--device cuda] [--no-compile] [--cases vit_b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d2v.kernels import masked_gather as kg  # noqa: E402

from benchmarks.common import Recorder, bench, common_args, probe_bandwidth, select_cases, try_compile  # noqa: E402
from d2v import ops  # noqa: E402

# B samples x M clones = R rows, T tokens, K kept, D width (the recipes' clone_batch and mask ratio)
CASES = {
    "vit_b": dict(B=16, M=16, T=197, K=40, D=768),  # mask 0.8 of 196 patches (+CLS)
    "vit_l": dict(B=16, M=16, T=197, K=50, D=1024),  # mask 0.75
    "audio_b": dict(B=4, M=8, T=749, K=375, D=768),  # 15 s at 50 Hz, span mask 0.5
    "smoke": dict(B=2, M=3, T=17, K=5, D=24),  # --quick only
}


def _eager_gather(x, ids):
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _eager_scatter(kept, ids, fill):
    return fill.scatter(1, ids.unsqueeze(-1).expand(-1, -1, fill.shape[-1]), kept)


def _eager_targets(y, ids, M):  # the reference: y.repeat_interleave(M) then index
    return torch.gather(y.repeat_interleave(M, 0), 1, ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


def _ref_gather(x, ids, M=1):  # float64, out[r, k] = x[r // M, ids[r, k]]
    return x.double()[(torch.arange(ids.shape[0], device=ids.device) // M)[:, None], ids]


def main() -> int:
    args = common_args(argparse.ArgumentParser(description=__doc__)).parse_args()
    dev = torch.device(args.device)
    cases = select_cases(CASES, args)
    reps = args.repeats or (20 if dev.type == "cuda" else 5)
    copy = probe_bandwidth(dev, args)
    print(f"copy bandwidth {copy:.1f} GB/s on {dev}; d2v backend: "
          f"{ {k: v['impl'] for k, v in ops.backend().items()} }")
    rec = Recorder("masked_gather", dev, copy)
    dt = torch.bfloat16
    for case in cases:
        c = CASES[case]
        B, M, T, K, D = c["B"], c["M"], c["T"], c["K"], c["D"]
        R, N, es = B * M, T - K, 2
        g = torch.Generator(device=dev).manual_seed(0)
        ids = torch.rand(R, T, device=dev, generator=g).argsort(1)
        ids_keep, ids_masked = ids[:, :K].sort(1).values, ids[:, K:].sort(1).values
        x = torch.randn(R, T, D, device=dev, dtype=dt)
        shape = f"R={R} T={T} K={K} D={D} bf16"

        # forward gather
        by = 2 * R * K * D * es + R * K * 8
        ref = _ref_gather(x, ids_keep)
        tag = f"{case}/gather"
        if rec.check(tag, shape, "torch eager", "torch", _eager_gather(x, ids_keep), ref, bytes_model=by):
            rec.add(tag, shape, "torch eager", "torch",
                    bench(lambda: _eager_gather(x, ids_keep), dev, reps), reps, by)
        comp, why = try_compile(_eager_gather, not args.no_compile)
        if comp is not None and rec.check(tag, shape, "torch.compile", "inductor", comp(x, ids_keep), ref,
                                          bytes_model=by):
            rec.add(tag, shape, "torch.compile", "inductor",
                    bench(lambda: comp(x, ids_keep), dev, reps, warmup=2), reps, by)
        r = ops.backend()["masked_gather"]
        if rec.check(tag, shape, "d2v.ops.masked_gather", r["impl"], ops.masked_gather(x, ids_keep), ref,
                     bytes_model=by):
            rec.add(tag, shape, "d2v.ops.masked_gather", r["impl"],
                    bench(lambda: ops.masked_gather(x, ids_keep), dev, reps), reps, by)
        ref = None
        # forward + backward of the gather
        xg = x.detach().requires_grad_()
        gout = torch.randn(R, K, D, device=dev, dtype=dt)
        by_fb = by + R * K * D * es + R * T * D * es + R * K * 8

        def fb(fn):
            def run():
                xg.grad = None
                fn(xg, ids_keep).backward(gout)
            return run

        gref = torch.zeros(R, T, D, dtype=torch.float64, device=dev).scatter_(
            1, ids_keep.unsqueeze(-1).expand(-1, -1, D), gout.double())  # distinct ids: no sums
        tag = f"{case}/gather+bwd"
        for prov, impl, fn in (("torch eager", "torch", _eager_gather),
                               ("d2v.ops.masked_gather", r["impl"], ops.masked_gather)):
            fb(fn)()
            if rec.check(tag, shape, prov, impl, xg.grad, gref, bytes_model=by_fb):
                rec.add(tag, shape, prov, impl, bench(fb(fn), dev, reps), reps, by_fb)
        xg = gout = gref = None  # freed by rebinding, not del: the closures above use the names
        # decoder input: kept tokens + fill (noise) at masked slots
        kept = x[:, :K].contiguous()
        fill = torch.randn(R, T, D, device=dev, dtype=dt)
        by_s = R * K * D * es + R * N * D * es + R * T * D * es + R * K * 8
        ref = fill.double().scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), kept.double())
        tag = f"{case}/scatter"
        if rec.check(tag, shape, "torch eager", "torch", _eager_scatter(kept, ids_keep, fill), ref,
                     bytes_model=by_s):
            rec.add(tag, shape, "torch eager", "torch",
                    bench(lambda: _eager_scatter(kept, ids_keep, fill), dev, reps), reps, by_s)
        comp, why = try_compile(_eager_scatter, not args.no_compile)
        if comp is not None and rec.check(tag, shape, "torch.compile", "inductor", comp(kept, ids_keep, fill),
                                          ref, bytes_model=by_s):
            rec.add(tag, shape, "torch.compile", "inductor",
                    bench(lambda: comp(kept, ids_keep, fill), dev, reps, warmup=2), reps, by_s)
        r = ops.backend()["masked_scatter"]
        if rec.check(tag, shape, "d2v.ops.masked_scatter", r["impl"],
                     ops.masked_scatter(kept, ids_keep, fill), ref, bytes_model=by_s):
            rec.add(tag, shape, "d2v.ops.masked_scatter", r["impl"],
                    bench(lambda: ops.masked_scatter(kept, ids_keep, fill), dev, reps), reps, by_s)
        kept = fill = x = ref = None
        # per-clone targets from the (B, T, D) fp32 targets
        y = torch.randn(B, T, D, device=dev)
        rows_read = torch.unique(ids_masked.view(B, M * N) + T * torch.arange(B, device=dev)[:, None]).numel()
        by_t = rows_read * D * 4 + R * N * D * 4 + R * N * 8  # distinct source rows read, R*N rows written
        shape_t = f"B={B} M={M} T={T} N={N} D={D} fp32"
        ref = _ref_gather(y, ids_masked, M)
        tag = f"{case}/targets"
        if rec.check(tag, shape_t, "torch eager", "torch", _eager_targets(y, ids_masked, M), ref,
                     bytes_model=by_t):
            rec.add(tag, shape_t, "torch eager", "torch",
                    bench(lambda: _eager_targets(y, ids_masked, M), dev, reps), reps, by_t,
                    note="repeat_interleave + gather")
        if rec.check(tag, shape_t, "torch advanced index", "torch", kg.masked_targets_ref(y, ids_masked, M),
                     ref, bytes_model=by_t):
            rec.add(tag, shape_t, "torch advanced index", "torch",
                    bench(lambda: kg.masked_targets_ref(y, ids_masked, M), dev, reps), reps, by_t,
                    note="y[r // M, ids]")
        comp, why = try_compile(_eager_targets, not args.no_compile)
        if comp is not None and rec.check(tag, shape_t, "torch.compile", "inductor", comp(y, ids_masked, M),
                                          ref, bytes_model=by_t):
            rec.add(tag, shape_t, "torch.compile", "inductor",
                    bench(lambda: comp(y, ids_masked, M), dev, reps, warmup=2), reps, by_t)
        r = ops.backend()["masked_targets"]
        if rec.check(tag, shape_t, "d2v.ops.masked_targets", r["impl"], ops.masked_targets(y, ids_masked, M),
                     ref, bytes_model=by_t):
            rec.add(tag, shape_t, "d2v.ops.masked_targets", r["impl"],
                    bench(lambda: ops.masked_targets(y, ids_masked, M), dev, reps), reps, by_t)
        y = ref = None
    rec.speedups("torch eager")
    if not args.no_write:
        rec.write("bf16 activations; x eager = speed-up over the eager torch row of the same case.",
                  quick=args.quick)
    return rec.exit_code()


if __name__ == "__main__":
    sys.exit(main())
