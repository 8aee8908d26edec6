"""Parity of d2v's fused ops against an fp64 reference, at the call sites and shapes the model really uses.

Why this exists: the kernel tests run toy shapes on contiguous tensors. The model calls the fused ops on
CLS-stripped strided views (`x[:, E:]`), with 16 clones per sample, in bf16/fp16/fp32, on top-K layer
lists of 8-18 tensors, at sequence lengths up to 4096, and runs the EMA over the real ViT-B parameter
list (163 tensors, 86M values). Strides, the tuple-of-K pointer argument, per-clone row arithmetic, dtype
conversion and grid sizing only meet at those shapes, so a kernel can pass its tests and still be wrong
there. This script checks exactly those calls, once each, on fresh random inputs.

What is compared: each op's output (and gradient, where the model back-propagates through it) against a
reference computed in float64 from the same inputs, as rel = ||out - ref|| / ||ref||, plus a per-element
test (see budgets). Every output the op allocates is poisoned with NaN before the call
(`torch.use_deterministic_algorithms(True, warn_only=True)` with
`torch.utils.deterministic.fill_uninitialized_memory`: torch.empty/new_empty then return NaN-filled
memory), and caller-owned outputs (the EMA's low-precision copy) are NaN-filled by hand, so an element the
kernel never writes shows up as a non-finite value.

Error budgets (a row fails above its budget, on any non-finite element, or on any element outside its
per-element band):
  - gather / per-clone targets / scatter and their backward passes move values (plus one fill-dtype
    conversion, rounded to nearest even as torch rounds): budget 0, every element bit-exact, any dtype.
  - build_targets reads bf16/fp16/fp32 layers and computes in fp32 (statistics included): rel <= 1e-5
    for every input dtype, since the fp64 reference sees the same rounded inputs. torch's own fp32 path
    (`build_targets_ref`) is measured beside it (`torch_rel_err`) as a yardstick.
  - EMA (fp32 master, params fp32/bf16/fp16): rel <= 1e-6, and every element within
    2^-22 * (|ref| + |ema_old| + w |param|) of the fp64 lerp (about two fp32 roundings; an element left
    unwritten is off by w |param - ema|, far outside). torch._foreach_lerp_ is measured beside it. The
    low-precision teacher copy (`out_lowp`, bf16/fp16) must equal the kernel's own fp32 result rounded
    to nearest even, bit for bit, and sit within the dtype's unit roundoff of fp64 (rel <= 2^-8 bf16,
    2^-11 fp16).

Paths checked: every op through `d2v.ops` with D2V_OPS_IMPL=triton (the fused path; the default here,
override with --impl), plus the EMA of the C++/CUDA extension `d2v._C` when it is built (CUDA kernel on
a GPU, OpenMP twin on CPU).

Cases (B samples, M clones, T tokens, E extra tokens, D width, kept tokens, K target layers, final norm):
ViT-B and ViT-L images, audio base (T=999), text base (T=512) and a T=4096 sequence (the Triton target
builder's limit). bf16 at every case; fp16 and fp32 too at ViT-B (`--grid full`: every dtype at every
case); per-clone targets are fp32 (what build_targets returns) plus the other dtypes where the grid says.

Output: <out>/parity.csv (one row per check, the device name in every row) and <out>/parity.md; the
markdown table is printed last. Exit status 1 when any check fails or errors.

Run (GPU):  python scripts/gpu_parity.py --out DIR
     (CPU, Triton's interpreter, small shapes; a dry run of the plumbing):
            .venv/bin/python scripts/gpu_parity.py --small --out /tmp/parity
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _early_env(argv: list[str]) -> None:
    """Set what must be set before Triton defines a kernel: the forced fused path (so a missing Triton
    fails here instead of silently checking torch), and Triton's interpreter when the tensors live on the
    CPU (no GPU, or --device cpu)."""
    import torch

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--impl", default="triton")
    pre.add_argument("--device", default="")
    known, _ = pre.parse_known_args(argv)
    os.environ["D2V_OPS_IMPL"] = known.impl
    if known.device == "cpu" or (not known.device and not torch.cuda.is_available()):
        os.environ.setdefault("TRITON_INTERPRET", "1")


_early_env(sys.argv[1:])

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from d2v.kernels import build_targets as kt  # noqa: E402

from benchmarks import common as _common  # noqa: E402
from benchmarks.common import git_sha  # noqa: E402,F401
from d2v import _ext, ops  # noqa: E402

FIELDS = ["date", "git_sha", "device", "torch", "triton", "case", "site", "op", "impl", "dtype", "shape",
          "rel_err", "max_abs_err", "nonfinite", "outside_band", "budget", "torch_rel_err", "secs", "status",
          "note"]

# B samples, M clones, T tokens (extra tokens excluded), E extra (CLS) tokens, D width, keep = kept tokens
# per view, K = averaged top layers, final = the recipe's final norm (configs/*.yaml)
CASES = {
    "vit_b": dict(B=16, M=16, T=196, E=1, D=768, keep=39, K=10, final="layer"),  # base_image: mask 0.8
    "vit_l": dict(B=8, M=16, T=196, E=1, D=1024, keep=49, K=18, final="layer"),  # large_image: mask 0.75
    "audio_b": dict(B=8, M=8, T=999, E=0, D=768, keep=500, K=8, final="none"),  # ~20 s at 50 Hz, mask 0.5
    "text_b": dict(B=4, M=8, T=512, E=0, D=768, keep=267, K=12, final="none"),  # mask 0.48
    "t4096": dict(B=2, M=8, T=4096, E=0, D=768, keep=2048, K=8, final="none"),  # Triton targets' MAX_T
}
SMALL = {  # --small: the same sites at sizes Triton's CPU interpreter runs in seconds
    "vit_b": dict(B=2, M=4, T=16, E=1, D=32, keep=4, K=3, final="layer"),
    "vit_l": dict(B=2, M=3, T=9, E=1, D=40, keep=3, K=4, final="layer"),
    "audio_b": dict(B=2, M=2, T=37, E=0, D=24, keep=19, K=2, final="none"),
    "text_b": dict(B=1, M=2, T=20, E=0, D=16, keep=11, K=3, final="none"),
    "t4096": dict(B=1, M=2, T=300, E=0, D=8, keep=150, K=2, final="none"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FINALS = ("none", "layer", "instance")
BT_BUDGET, EMA_BUDGET = 1e-5, 1e-6
LOWP_BUDGET = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
EMA_DECAY = 0.9998  # configs/base_image.yaml ema_start


# ------------------------------------------------------------------------------------------- stamp
def device_name(dev: torch.device) -> str:
    """The benchmarks' device name; on CPU the Triton interpreter is what ran the kernels."""
    name = _common.device_name(dev)
    return name if dev.type == "cuda" else f"{name}, Triton interpreter"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


# ------------------------------------------------------------------------------------------- compare
def _flat(ts) -> torch.Tensor:
    if isinstance(ts, torch.Tensor):
        return ts.detach().reshape(-1).double()
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def measure(out, ref, band: torch.Tensor | None = None, exact: bool = False) -> dict:
    """rel = ||out - ref|| / ||ref|| in fp64 over the finite elements; nonfinite = elements non-finite in
    out but finite in ref (poisoned, never written); outside_band = elements off by more than `band`
    (exact: by anything)."""
    o, r = _flat(out), _flat(ref)
    if o.shape != r.shape:
        raise AssertionError(f"shape mismatch: {tuple(o.shape)} vs reference {tuple(r.shape)}")
    fin = torch.isfinite(o)
    nonfinite = int((~fin & torch.isfinite(r)).sum())
    diff = torch.where(fin, o - r, torch.zeros_like(o)).abs()
    rn = float(torch.linalg.vector_norm(r))
    rel = float(torch.linalg.vector_norm(diff)) / rn if rn > 0 else float(torch.linalg.vector_norm(diff))
    if exact:
        outside = int((diff > 0).sum())
    elif band is not None:
        outside = int((diff > _flat(band)).sum())
    else:
        outside = 0
    return {"rel": rel, "max_abs": float(diff.max()) if diff.numel() else 0.0, "nonfinite": nonfinite,
            "outside": outside}


class Recorder:
    def __init__(self, out_dir: Path, dev: torch.device, append: bool = False):
        self.dev = dev
        self.base = {"date": _dt.date.today().isoformat(), "git_sha": git_sha(), "device": device_name(dev),
                     "torch": torch.__version__, "triton": triton_version()}
        self.rows: list[dict] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.md_path = out_dir / "parity.csv", out_dir / "parity.md"
        self.append = append and self.csv_path.exists()
        if not self.append:  # rows are appended as they come: a run cut short keeps them
            with self.csv_path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def add(self, case, site, op, impl, dtype, shape, m: dict | None, budget: float | str, secs: float,
            torch_rel: float | None = None, error: str = "", note: str = "") -> None:
        if m is None:
            status = "ERROR"
        else:
            ok = m["nonfinite"] == 0 and m["outside"] == 0 and math.isfinite(m["rel"])
            ok = ok and (m["rel"] == 0.0 if budget == "exact" else m["rel"] <= float(budget))
            status = "ok" if ok else "FAIL"
        row = dict(self.base, case=case, site=site, op=op, impl=impl, dtype=dtype, shape=shape,
                   rel_err=f"{m['rel']:.3e}" if m else "", max_abs_err=f"{m['max_abs']:.3e}" if m else "",
                   nonfinite=m["nonfinite"] if m else "", outside_band=m["outside"] if m else "",
                   budget=budget if isinstance(budget, str) else f"{float(budget):.1e}",
                   torch_rel_err=f"{torch_rel:.3e}" if torch_rel is not None else "", secs=f"{secs:.2f}",
                   status=status, note=(error or note).replace("\n", " ")[:300])
        self.rows.append(row)
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
        print(f"{status:>5} {case:>8} {site:<22} {op:<26} {impl:<10} {dtype:<10} rel {row['rel_err']:>10} "
              f"(budget {row['budget']}) nonfinite {row['nonfinite']} off-band {row['outside_band']} "
              f"{secs:6.2f}s {row['note'][:120]}", flush=True)

    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]

    def write_md(self, header: str) -> str:
        cols = ["case", "site", "op", "impl", "dtype", "rel_err", "budget", "torch_rel_err", "nonfinite",
                "outside_band", "status", "note"]
        b = self.base
        lines = [f"# gpu_parity — {b['date']} — {b['device']}", "",
                 f"git {b['git_sha']}, torch {b['torch']}, triton {b['triton']}. {header}", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in self.rows]
        n, bad = len(self.rows), len(self.failed())
        lines += ["", f"parity: {n} checks, {n - bad} ok, {bad} failed or errored on {b['device']}"]
        text = "\n".join(lines) + "\n"
        with self.md_path.open("a" if self.append else "w") as f:
            f.write(("\n" if self.append else "") + text)
        return text


def run_check(rec: Recorder, case: str, site: str, op: str, impl: str, dtype: str, shape: str, fn) -> None:
    """fn() -> list of (op label, out, ref, budget, band|None, torch_rel|None, note); one row each. An
    exception becomes an ERROR row and the run goes on."""
    t0 = time.perf_counter()
    try:
        results = fn()
        if rec.dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # a crash of one check must not hide the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        rec.add(case, site, op, impl, dtype, shape, None, "-", time.perf_counter() - t0,
                error=f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})")
        return
    secs = time.perf_counter() - t0
    for label, out, ref, budget, band, torch_rel, note in results:
        try:
            m = measure(out, ref, band=band, exact=budget == "exact")
            rec.add(case, site, label, impl, dtype, shape, m, budget, secs, torch_rel, note=note)
        except Exception as e:
            rec.add(case, site, label, impl, dtype, shape, None, budget, secs,
                    error=f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------- inputs
def masks(R: int, T: int, keep: int, dev: torch.device,
          g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_keep (R, keep), ids_masked (R, T - keep)), each row's positions distinct and increasing, as
    d2v.masking.make_maskinfo returns them."""
    perm = torch.rand(R, T, device=dev, generator=g).argsort(1)
    return perm[:, :keep].sort(1).values.contiguous(), perm[:, keep:].sort(1).values.contiguous()


def randn(shape, dtype, dev, g, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=dev, generator=g) * scale).to(dtype)


def _idx(ids: torch.Tensor, D: int) -> torch.Tensor:
    return ids.unsqueeze(-1).expand(-1, -1, D)


def _rows(ids: torch.Tensor, clones: int) -> torch.Tensor:
    return (torch.arange(ids.shape[0], device=ids.device) // clones)[:, None]


# ------------------------------------------------------------------------------------------- sites
def check_gather_sites(rec, case, c, dname, dt, dev, g, impl):
    """The model's gathers and scatter (d2v/model.py, d2v/modalities/base.py), forward and backward."""
    B, M, T, E, D, keep = c["B"], c["M"], c["T"], c["E"], c["D"], c["keep"]
    R, N = B * M, T - keep
    shape = f"B={B} M={M} T={T} E={E} D={D} keep={keep}"

    # student input: keep_tokens = masked_gather(clone_rows(x), ids_keep) on (R, T, D) contiguous rows
    def student_input():
        ids_keep, _ = masks(R, T, keep, dev, g)
        x = randn((B, T, D), dt, dev, g).repeat_interleave(M, 0).requires_grad_()
        out = ops.masked_gather(x, ids_keep)
        ref = x.detach().double().gather(1, _idx(ids_keep, D))
        gout = randn((R, keep, D), dt, dev, g)
        out.backward(gout)
        gref = torch.zeros(R, T, D, dtype=torch.float64, device=dev)
        gref.scatter_(1, _idx(ids_keep, D), gout.double())
        return [("masked_gather", out, ref, "exact", None, None, ""),
                ("masked_gather backward", x.grad, gref, "exact", None, None, "zeros at masked slots")]

    run_check(rec, case, "student input (clones)", "masked_gather", impl, dname, shape, student_input)

    # decoder input: masked_scatter(x[:, E:] strided, ids_keep, noise), fill in the same dtype (the model)
    # and, at ViT-B, an fp32 source with a bf16 fill (the conversion path of the kernel)
    fills = [dt] + ([torch.bfloat16] if dt == torch.float32 and case == "vit_b" else [])
    for fdt in fills:
        def decoder_input(fdt=fdt):
            ids_keep, _ = masks(R, T, keep, dev, g)
            xf = randn((R, E + keep, D), dt, dev, g).requires_grad_()
            fill = randn((R, T, D), fdt, dev, g, scale=0.01).requires_grad_()
            out = ops.masked_scatter(xf[:, E:], ids_keep, fill)
            ref = fill.detach().to(dt).double().scatter(1, _idx(ids_keep, D), xf.detach()[:, E:].double())
            gout = randn((R, T, D), dt, dev, g)
            out.backward(gout)
            gx = torch.zeros(R, E + keep, D, dtype=torch.float64, device=dev)
            gx[:, E:] = gout.double().gather(1, _idx(ids_keep, D))
            gfill = gout.scatter(1, _idx(ids_keep, D), 0.0).to(fdt).double()
            return [("masked_scatter", out, ref, "exact", None, None, "x_kept = x[:, E:] (strided)"),
                    ("masked_scatter backward x", xf.grad, gx, "exact", None, None, "zeros at the CLS rows"),
                    ("masked_scatter backward fill", fill.grad, gfill, "exact", None, None,
                     f"fill {str(fdt).split('.')[-1]}")]

        tag = dname if fdt == dt else f"{dname}, bf16 fill"
        run_check(rec, case, "decoder input", "masked_scatter", impl, tag, shape, decoder_input)

    # predictions at masked slots: masked_gather(pred (R, T, D), ids_masked)
    def predictions():
        _, ids_m = masks(R, T, keep, dev, g)
        pred = randn((R, T, D), dt, dev, g).requires_grad_()
        out = ops.masked_gather(pred, ids_m)
        ref = pred.detach().double().gather(1, _idx(ids_m, D))
        gout = randn((R, N, D), dt, dev, g)
        out.backward(gout)
        gref = torch.zeros(R, T, D, dtype=torch.float64, device=dev)
        gref.scatter_(1, _idx(ids_m, D), gout.double())
        return [("masked_gather", out, ref, "exact", None, None, ""),
                ("masked_gather backward", pred.grad, gref, "exact", None, None, "")]

    run_check(rec, case, "predictions (masked)", "masked_gather", impl, dname, shape, predictions)

    if E > 0:  # data2vec 1.0 head: masked_gather(x[:, E:] strided, ids_masked)
        def d2v1_head():
            _, ids_m = masks(R, T, keep, dev, g)
            x = randn((R, E + T, D), dt, dev, g).requires_grad_()
            out = ops.masked_gather(x[:, E:], ids_m)
            ref = x.detach()[:, E:].double().gather(1, _idx(ids_m, D))
            gout = randn((R, N, D), dt, dev, g)
            out.backward(gout)
            gref = torch.zeros(R, E + T, D, dtype=torch.float64, device=dev)
            gref[:, E:].scatter_(1, _idx(ids_m, D), gout.double())
            return [("masked_gather", out, ref, "exact", None, None, "x[:, E:] (strided)"),
                    ("masked_gather backward", x.grad, gref, "exact", None, None, "")]

        run_check(rec, case, "d2v1 head (strided)", "masked_gather", impl, dname, shape, d2v1_head)


def check_targets_gather(rec, case, c, dname, dt, dev, g, impl):
    """Per-clone targets: masked_targets(y (B, T, D), ids_masked (R, N), M): y[r // M, ids[r, n]]."""
    B, M, T, D, keep = c["B"], c["M"], c["T"], c["D"], c["keep"]
    shape = f"B={B} M={M} T={T} N={T - keep} D={D}"

    def fn():
        _, ids_m = masks(B * M, T, keep, dev, g)
        y = randn((B, T, D), dt, dev, g)
        out = ops.masked_targets(y, ids_m, M)
        ref = y.double()[_rows(ids_m, M), ids_m]
        return [("masked_targets", out, ref, "exact", None, None, f"{M} clones")]

    run_check(rec, case, "per-clone targets", "masked_targets", impl, dname, shape, fn)


def targets_ref64(layers, final: str, eps: float = 1e-5) -> torch.Tensor:
    """make_targets in fp64: per layer instance norm over T (biased variance, no affine), average, then
    the final norm (layer norm over D, or instance norm over T)."""
    def inorm(y):
        mu = y.mean(1, keepdim=True)
        return (y - mu) / torch.sqrt(((y - mu) ** 2).mean(1, keepdim=True) + eps)

    acc = sum(inorm(y.double()) for y in layers) / len(layers)
    if final == "layer":
        mu = acc.mean(-1, keepdim=True)
        acc = (acc - mu) / torch.sqrt(((acc - mu) ** 2).mean(-1, keepdim=True) + eps)
    elif final == "instance":
        acc = inorm(acc)
    return acc


def check_build_targets(rec, case, c, dname, dt, finals, dev, g, impl):
    """build_targets on K CLS-stripped views [:, E:] of (B, E + T, D) layer outputs; layers get a per-layer
    scale (0.5-4) and a per-channel offset (8 x randn: real FFN outputs are far from zero-mean), which a
    one-pass variance (E[y^2] - E[y]^2) would not survive within the budget."""
    B, T, E, D, K = c["B"], c["T"], c["E"], c["D"], c["K"]
    shape = f"B={B} T={T} E={E} D={D} K={K}"
    for final in finals:
        def fn(final=final):
            layers = []
            for _ in range(K):
                scale = 0.5 + 3.5 * float(torch.rand((), generator=g, device=dev))
                off = torch.randn(D, device=dev, generator=g) * 8.0  # |mean| up to ~50x the std
                full = (torch.randn(B, E + T, D, device=dev, generator=g) * scale + off).to(dt)
                layers.append(full[:, E:])
            out = ops.build_targets(layers, instance_norm=True, final_norm=final)
            ref = targets_ref64(layers, final)
            torch_out = kt.build_targets_ref(layers, instance_norm=True, final_norm=final)
            torch_rel = measure(torch_out, ref)["rel"]
            return [("build_targets", out, ref, BT_BUDGET, None, torch_rel,
                     f"final={final}, layers [:, {E}:] (strided)" if E else f"final={final}")]

        run_check(rec, case, "teacher targets", "build_targets", impl, dname, shape + f" final={final}", fn)


def ema_shapes(small: bool) -> tuple[list[torch.Size], str]:
    """The averaged (trainable) teacher parameters of the real model: configs/base_image.yaml through
    d2v's builder and EMATeacher (--small: configs/tiny_image.yaml)."""
    from d2v import build_model, load_config
    from d2v.ema import EMATeacher

    recipe = "configs/tiny_image.yaml" if small else "configs/base_image.yaml"
    cfg = load_config(ROOT / recipe)
    for where in ("meta", "cpu"):  # meta: shapes without 86M random draws; cpu if an init refuses meta
        try:
            torch.manual_seed(0)
            with torch.device(where):
                student = build_model(cfg)
                t = EMATeacher(student, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step)
            shapes = [t._ema[i].shape for i in t._avg]
            break
        except Exception:
            if where == "cpu":
                raise
    return shapes, recipe


def check_ema(rec, shapes, recipe, dev, g, impl, pdtypes):
    """EMA over the real parameter list: d2v.ops (and the d2v._C kernel when built) against fp64, with
    torch._foreach_lerp_ in fp32 measured beside it; then the low-precision teacher copy."""
    n = sum(s.numel() for s in shapes)
    shape = f"{recipe}: {len(shapes)} tensors, {n / 1e6:.1f}M values"
    mod, why = _ext.load()
    ext = None
    if mod is not None and dev.type == "cuda" and getattr(mod, "with_cuda", False):
        ext = ("cuda-ext", mod.ema_update_cuda)
    elif mod is not None and dev.type == "cpu":
        ext = ("cpp-ext", mod.ema_update_cpu)
    w = 1.0 - EMA_DECAY
    for pname, pdt in pdtypes:
        def inputs():
            ema0 = [torch.randn(s, device=dev, generator=g) for s in shapes]
            par = [torch.randn(s, device=dev, generator=g).to(pdt) for s in shapes]
            ref = [e.double() + w * (p.double() - e.double()) for e, p in zip(ema0, par)]
            band = [2.0 ** -22 * (r.abs() + e.double().abs() + w * p.double().abs())
                    for r, e, p in zip(ref, ema0, par)]
            return ema0, par, ref, band

        def foreach_rel(ema0, par, ref):
            fe = [e.clone() for e in ema0]
            torch._foreach_lerp_(fe, [p.float() for p in par], w)
            return measure(fe, ref)["rel"]

        def via_ops(lowp=None):
            ema0, par, ref, band = inputs()
            ema = [e.clone() for e in ema0]
            low = [torch.full(s, float("nan"), device=dev, dtype=lowp) for s in shapes] if lowp else None
            ops.ema_update_(ema, par, EMA_DECAY, out_lowp=low)
            res = [("ema_update_", ema, ref, EMA_BUDGET, band, foreach_rel(ema0, par, ref),
                    f"decay {EMA_DECAY}")]
            if lowp is not None:
                lname = str(lowp).split(".")[-1]
                res.append((f"ema_update_ out_lowp {lname}", low, [e.to(lowp) for e in ema], "exact", None,
                            None, "= the kernel's fp32 result rounded to nearest even"))
                res.append((f"ema_update_ out_lowp {lname} vs fp64", low, ref, LOWP_BUDGET[lowp], None, None,
                            "within the dtype's unit roundoff"))
            return res

        run_check(rec, "ema", "teacher EMA", "ema_update_", impl, f"params {pname}", shape, via_ops)
        if pdt == torch.float32:
            for lowp in (torch.bfloat16, torch.float16):
                run_check(rec, "ema", "teacher EMA + low copy", "ema_update_", impl, f"params {pname}", shape,
                          lambda lowp=lowp: via_ops(lowp))
        if ext is not None:
            name, fn_ext = ext

            def via_ext(fn_ext=fn_ext):
                ema0, par, ref, band = inputs()
                ema = [e.clone() for e in ema0]
                fn_ext(ema, [p.contiguous() for p in par], EMA_DECAY, None)
                return [("ema_update_", ema, ref, EMA_BUDGET, band, foreach_rel(ema0, par, ref), why)]

            run_check(rec, "ema", "teacher EMA", "ema_update_", name, f"params {pname}", shape, via_ext)
    if ext is None:
        print(f"d2v._C EMA kernel not checked: {why}", flush=True)


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="small shapes (CPU dry run under TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.environ.get("D2V_PARITY_OUT", "/tmp/d2v_parity"),
                    help="output folder")
    ap.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--grid", choices=["real", "full"], default="real",
                    help="real: bf16 everywhere, every dtype at vit_b; full: every dtype at every case")
    ap.add_argument("--skip", default="", help="comma-separated groups to skip: gather,targets,build,ema")
    ap.add_argument("--impl", default="triton", help="D2V_OPS_IMPL for the checked path (default: triton)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true",
                    help="add to an existing <out>/parity.csv and parity.md "
                         "(a second run, e.g. the EMA after a build)")
    a = ap.parse_args()

    dev = torch.device(a.device)
    table = SMALL if a.small else CASES
    cases = [c for c in a.cases.split(",") if c] or list(table)
    unknown = [c for c in cases if c not in table]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; choose from {list(table)}")
    skip = {s for s in a.skip.split(",") if s}
    # NaN in every tensor torch.empty/new_empty hands out (the ops' outputs), ints at their max value
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    g = torch.Generator(device=dev).manual_seed(a.seed)
    rec = Recorder(Path(a.out), dev, append=a.append)
    routes = {k: f"{v['impl']}/{v['variant']}" for k, v in ops.backend().items()}
    print(f"gpu_parity on {rec.base['device']}: D2V_OPS_IMPL={os.environ['D2V_OPS_IMPL']}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, routes {routes}", flush=True)
    t_start = time.perf_counter()

    for case in cases:
        c = table[case]
        dts = list(DTYPES) if (case == "vit_b" or a.grid == "full") else ["bf16"]
        for dname in dts:
            dt = DTYPES[dname]
            if "gather" not in skip:
                check_gather_sites(rec, case, c, dname, dt, dev, g, a.impl)
            if "targets" not in skip:
                check_targets_gather(rec, case, c, dname, dt, dev, g, a.impl)
            if "build" not in skip:
                finals = FINALS if (dname == "bf16" or case == "vit_b") else (c["final"],)
                check_build_targets(rec, case, c, dname, dt, finals, dev, g, a.impl)
        if "targets" not in skip and "fp32" not in dts:  # the model's targets are fp32
            check_targets_gather(rec, case, c, "fp32", torch.float32, dev, g, a.impl)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "ema" not in skip:
        try:
            shapes, recipe = ema_shapes(a.small)
        except Exception as e:
            rec.add("ema", "teacher EMA", "ema_update_", a.impl, "", "", None, EMA_BUDGET, 0.0,
                    error=f"building the parameter list failed: {type(e).__name__}: {e}")
        else:
            check_ema(rec, shapes, recipe, dev, g, a.impl,
                      [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])

    header = (f"{'small (--small) shapes' if a.small else 'real shapes'}, "
              f"D2V_OPS_IMPL={os.environ['D2V_OPS_IMPL']}, "
              f"routes {routes}; rel = ||out - ref|| / ||ref|| against float64; budgets: copies exact, "
              f"build_targets {BT_BUDGET:.0e}, EMA {EMA_BUDGET:.0e} (+ per-element band), low-precision EMA "
              f"copy exact vs its own fp32 rounded; outputs poisoned with NaN; "
              f"{time.perf_counter() - t_start:.0f} s.")
    text = rec.write_md(header)
    print(text)
    print(f"wrote {rec.csv_path} and {rec.md_path}")
    return 1 if rec.failed() or not rec.rows else 0


if __name__ == "__main__":
    sys.exit(main())
