"""Teacher target builder at real shapes: d2v.ops.build_targets vs the reference's eager chain (per
layer: transpose, .float(), F.instance_norm on (B, D, T); sum; divide; F.layer_norm; the library's
d2v.kernels.build_targets.build_targets_fairseq, which is also what D2V_OPS_IMPL=ref runs) vs
torch.compile of that chain, for each path available here (torch reference on CPU; Triton on a GPU).

Byte model (the minimum: read every layer once, write the fp32 targets once): K*B*T*D*in_bytes +
B*T*D*4 (each layer's input counted once; the K layers are K distinct tensors). The Triton kernel meets
it for final_norm none/instance and adds an 8 B/element row pass for final_norm="layer". On a GPU, the L2
is flushed between timed calls (benchmarks/common.py bench()), so the K layers are read from memory.

Every provider is checked once before it is timed, against the same chain computed in float64 from the
same (rounded) inputs: rel err <= 1e-5, what fp32 statistics reach (the float64 reference is the one
in scripts/gpu_parity.py). A provider that misses it is reported as WRONG and not timed, and the script
exits with status 1.

Run: .venv/bin/python benchmarks/bench_build_targets.py [--device cuda] [--no-compile] [--cases vit_b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d2v.kernels import build_targets as kt  # noqa: E402

from benchmarks.common import Recorder, bench, common_args, probe_bandwidth, select_cases, try_compile  # noqa: E402
from d2v import ops  # noqa: E402

# the recipes' targets: vision IN per layer -> avg -> LN; audio IN per layer -> avg; K=10 top layers
CASES = {
    "vit_b": dict(B=16, T=196, D=768, K=10, final_norm="layer"),
    "vit_l": dict(B=16, T=196, D=1024, K=10, final_norm="layer"),
    "audio_b": dict(B=4, T=749, D=768, K=8, final_norm="none"),
    "smoke": dict(B=2, T=13, D=24, K=3, final_norm="layer"),  # --quick only
}


def fairseq_chain(layers, final_norm):
    """The reference's make_targets, op for op (fairseq data2vec2.py): the library's one copy."""
    return kt.build_targets_fairseq(layers, final_norm=final_norm)


BUDGET = 1e-5  # rel err against float64 for fp32 statistics on the same inputs


def targets_ref64(layers, final_norm: str, eps: float = 1e-5) -> torch.Tensor:
    """make_targets in float64: per layer instance norm over T (biased variance, no affine), average, then
    layer norm over D or instance norm over T."""
    def inorm(y):
        mu = y.mean(1, keepdim=True)
        return (y - mu) / torch.sqrt(((y - mu) ** 2).mean(1, keepdim=True) + eps)

    acc = sum(inorm(y.double()) for y in layers) / len(layers)
    if final_norm == "layer":
        mu = acc.mean(-1, keepdim=True)
        acc = (acc - mu) / torch.sqrt(((acc - mu) ** 2).mean(-1, keepdim=True) + eps)
    elif final_norm == "instance":
        acc = inorm(acc)
    return acc


def main() -> int:
    args = common_args(argparse.ArgumentParser(description=__doc__)).parse_args()
    dev = torch.device(args.device)
    cases = select_cases(CASES, args)
    reps = args.repeats or (20 if dev.type == "cuda" else 5)
    copy = probe_bandwidth(dev, args)
    r = ops.backend()["build_targets"]
    print(f"copy bandwidth {copy:.1f} GB/s on {dev}; d2v backend: {r}")
    rec = Recorder("build_targets", dev, copy)
    for case in cases:
        c = CASES[case]
        B, T, D, K, fn = c["B"], c["T"], c["D"], c["K"], c["final_norm"]
        for dt in (torch.bfloat16, torch.float32):
            tag = f"{case}/{str(dt).split('.')[-1]}"
            # the model passes CLS-stripped views of (B, 1 + T, D) FFN outputs
            layers = [torch.randn(B, T + 1, D, device=dev, dtype=dt)[:, 1:] for _ in range(K)]
            shape = f"B={B} T={T} D={D} K={K} {str(dt).split('.')[-1]} final={fn}"
            by = K * B * T * D * layers[0].element_size() + B * T * D * 4
            ref = targets_ref64(layers, fn)

            def timed(provider, impl, f, warmup=1, note=""):
                if rec.check(tag, shape, provider, impl, f(), ref, BUDGET, bytes_model=by):
                    rec.add(tag, shape, provider, impl, bench(f, dev, reps, warmup=warmup), reps, by,
                            note=note)

            timed("torch eager (fairseq chain)", "torch", lambda: fairseq_chain(layers, fn))
            timed("torch eager (d2v ref)", "torch", lambda: kt.build_targets_ref(layers, final_norm=fn))
            comp, why = try_compile(fairseq_chain, not args.no_compile)
            if comp is not None:
                try:
                    timed("torch.compile", "inductor", lambda: comp(layers, fn), warmup=2)
                except Exception as e:
                    print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            timed("d2v.ops.build_targets", r["impl"], lambda: ops.build_targets(layers, final_norm=fn),
                  note=f"auto: {r['variant']}")
            if dev.type == "cuda":
                timed("d2v triton", "triton", lambda: kt.build_targets_triton(layers, final_norm=fn))
            layers = ref = None  # free the case's tensors (rebound, not del: the lambdas close over them)
    rec.speedups("torch eager (fairseq chain)")
    if not args.no_write:
        rec.write("x eager = speed-up over the reference's eager chain.", quick=args.quick)
    return rec.exit_code()


if __name__ == "__main__":
    sys.exit(main())
