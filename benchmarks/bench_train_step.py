"""End-to-end pretraining step throughput: full d2v side by side with each of its techniques turned
off, the reference-style eager 2.0 step, and a data2vec 1.0-style step, on the same batch and model.

Every row runs the real trainer's step (`Trainer.train_step`: the optimizer step + the EMA update) in a
fresh process, on one synthetic batch of the recipe's shapes (random images / waveforms / token ids, masks
from the modality's own mask generator), repeated: data loading is not timed. The batch and its mask indices
(make_maskinfo) are put on the device once, so the timed step is the model step (no host argsort, no
host-to-device copy). Per row: `--warmup` steps, then `--repeats` timings of `--steps` steps each
between device syncs; the median is reported with p20/p80 (interpolated quantiles). `--rounds R` runs
every variant R times, interleaved (round 1: every variant once, then round 2, ...), each in a fresh
process, and pools the timings of all rounds. A variant that fails (e.g. out of memory) gets a row with
NaN numbers and the error in its note; the others still run, and the exit status is 1.

Variants (each row changes only what its name says, relative to `d2v`):
  d2v            fused ops (D2V_OPS_IMPL=auto), masked-token skipping, M masks per sample, SDPA, bf16 on GPU
  no_fused_ops   ops on their torch implementations (D2V_OPS_IMPL=torch)
  no_mask_skip   full-length student with a learned mask embedding (model.skip_masked=false)
  no_multi_mask  one mask per sample, M times the samples (same student rows per step)
  no_sdpa        eager attention (model.attention=eager)
  no_bf16        fp32 (GPU only: the CPU rows already run fp32)
  ref_eager_2.0  the reference code's way of computing the 2.0 step: per-parameter EMA loop, unfused
                 targets repeated M times before indexing (D2V_OPS_IMPL=ref), eager attention
  d2v1           data2vec 1.0-style: full-length student with mask embedding, one mask per sample
                 (M times the samples), linear head instead of the decoder, no CLS loss, eager ops
                 and attention; same precision and the same masks (mask_prob) as d2v
  compile        d2v with train.compile=true: the step's forward + backward under torch.compile
                 (inductor); the compilation runs in the untimed first step. Not in the CPU default
                 (inductor's C++ build takes minutes there): ask for it with --variants
Throughput is counted in training views: a view is one masked copy of a sample that the student
encodes (d2v: M per sample, d2v1: one). `views_per_s` is what the speedups compare, because every
variant trains on the same number of views per step; `samples_per_s` and the modality's unit (images,
seconds of audio, tokens per second of source samples) are reported beside it.
`d2v_speedup` = views/s of `d2v` / views/s of the row (how many times faster full d2v is).
`gflop_per_step` is counted by torch's FlopCounterMode over one step (forward, backward, teacher), with
SDPA counted as the matmuls of eager attention (flop_counter()); `mfu` = those FLOPs per second / the
device's dense peak for the row's precision (GPUs in PEAK_FLOPS; fp32 rows: the TF32 peak when TF32 is on
for matmuls and convolutions, the fp32 peak when off for both, empty when mixed).
`--set KEY=VALUE` applies to every row, except keys the variants are defined by (VARIANT_KEYS): refused.

Results: rows appended to benchmarks/results/train_step.csv, a markdown table per run appended to
train_step.md, and per-device PNGs train_step_throughput_<device>.png / train_step_speedup_<device>.png.
`--quick` writes only where D2V_BENCH_RESULTS points (never into benchmarks/results).

Run (CPU, tiny shapes, ~5 min): .venv/bin/python benchmarks/bench_train_step.py
     (GPU, base recipes):     python benchmarks/bench_train_step.py --flavors base
     (one modality, quick):   .venv/bin/python benchmarks/bench_train_step.py --modalities image --quick
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    append_csv,
    append_markdown,
    device_slug,
    md_table,
    quantiles,
    ratio_md,
    results_dir,
    stamp,
    within_noise,
)
from d2v.registry import get_modality, modality_names  # noqa: E402

FIELDS = ["date", "git_sha", "device", "threads", "torch", "triton", "python", "modality", "flavor", "config",
          "variant", "precision", "ops", "attention", "skip_masked", "head", "batch", "clones", "views",
          "tokens", "params_m", "ms_median", "ms_p20", "ms_p80", "warmup", "repeats", "steps", "rounds",
          "views_per_s", "samples_per_s", "unit", "unit_per_s", "gflop_per_step", "mfu", "peak_mib",
          "peak_kind", "d2v_speedup", "set", "note"]
VARIANTS = ["d2v", "no_fused_ops", "no_mask_skip", "no_multi_mask", "no_sdpa", "no_bf16", "ref_eager_2.0",
            "d2v1", "compile"]
NUMERIC = ["params_m", "ms_median", "ms_p20", "ms_p80", "views_per_s", "samples_per_s", "unit_per_s",
           "gflop_per_step", "mfu", "peak_mib", "d2v_speedup"]  # NaN in the row of a failed variant
# dense peak FLOP/s (bf16 tensor core, TF32 tensor core, fp32 without tensor cores) by device-name pattern,
# most specific first; vendor datasheets (dense = half the "with sparsity" figure). torch names an H100
# SXM "NVIDIA H100 80GB HBM3". NVL boards are listed as unknown (None): their clocks differ from SXM and
# we could not verify their dense figures, so their MFU stays empty rather than wrong.
PEAK_FLOPS = [(r"\bH[12]00 NVL\b", None), (r"\bH100 PCIe\b", (756e12, 378e12, 51.2e12)),
              (r"\bH100\b", (989e12, 494.7e12, 66.9e12)), (r"\bH200\b", (989e12, 494.7e12, 66.9e12)),
              (r"\bA100\b", (312e12, 156e12, 19.5e12)), (r"\bL40S\b", (362e12, 183e12, 91.6e12)),
              (r"\bA10\b", (125e12, 62.5e12, 31.2e12))]


def variant_spec(name: str, B: int, M: int, cuda: bool) -> dict | None:
    """-> {ops, overrides, batch, clones} for a variant, or None when it does not apply here. d2v1 keeps
    the recipe's masking (mask_prob) on purpose: every row trains on the same masked views, and its
    full-length student costs the same at any mask_prob (benchmarks/README.md)."""
    prec = "bf16" if cuda else "fp32"
    spec = {"ops": "auto", "batch": B, "clones": M, "overrides": {"train.precision": prec}}
    o = spec["overrides"]
    if name == "no_fused_ops":
        spec["ops"] = "torch"
    elif name == "no_mask_skip":
        o["model.skip_masked"] = "false"
    elif name == "no_multi_mask":
        spec.update(batch=B * M, clones=1)
    elif name == "no_sdpa":
        o["model.attention"] = "eager"
    elif name == "no_bf16":
        if not cuda:
            return None
        o["train.precision"] = "fp32"
    elif name == "ref_eager_2.0":
        spec["ops"] = "ref"
        o["model.attention"] = "eager"
    elif name == "d2v1":
        spec.update(ops="ref", batch=B * M, clones=1)
        o.update({"model.skip_masked": "false", "model.head": "linear", "model.attention": "eager",
                  "objective.cls_loss": "0"})
    elif name == "compile":
        o["train.compile"] = "true"
    elif name != "d2v":
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    o["masking.clone_batch"] = spec["clones"]
    o["train.batch_size"] = spec["batch"]
    return spec


# the config keys the variants are defined by: a --set of one of them is refused, not silently lost
VARIANT_KEYS = sorted({k for n in VARIANTS for k in variant_spec(n, 1, 1, cuda=True)["overrides"]})


# ------------------------------------------------------------------------------------------- worker
def _peak_flops(device: str, precision: str, tf32: str) -> float | None:
    """Dense peak FLOP/s for the row, or None (unknown GPU, NVL board, fp32 with mixed TF32 settings)."""
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device):
            if peaks is None:
                return None
            bf16, tf32_peak, fp32 = peaks
            return bf16 if precision == "bf16" else {"on": tf32_peak, "off": fp32}.get(tf32)
    return None


def _sdpa_fwd_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)  # q k^T and p v: 2 matmuls of (B*H, N, N, D/H)


def _sdpa_bwd_flop(g_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs of attention's backward: the 4 matmuls of eager attention's backward (dP = dO v^T,
    dv = P^T dO, dq = dS k, dk = dS^T q). torch's own formula adds the fused kernels' recompute of q k^T."""
    from torch.utils.flop_counter import bmm_flop, sdpa_backward_flop_count

    b, h, n_q, d = q_shape  # (B, H, N_q, D/H)
    recompute = bmm_flop((b * h, n_q, d), (b * h, d, k_shape[2]))
    return sdpa_backward_flop_count(g_shape, q_shape, k_shape, v_shape) - recompute


def flop_counter():
    """FlopCounterMode that counts SDPA as the matmuls eager attention runs, so the d2v row's GFLOP equals
    the no_sdpa row's up to softmax/elementwise ops (which the counter ignores anyway). torch 2.13 has no
    formula for the CPU flash ops (aten._scaled_dot_product_flash_attention_for_cpu and its backward):
    they are registered here; the CUDA SDPA backwards are re-mapped to the same model-FLOP formula."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, _sdpa_fwd_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, _sdpa_bwd_flop)):
        if op not in flop_registry:
            register_flop_formula(op)(formula)
    cuda_bwd = (aten._scaled_dot_product_flash_attention_backward,
                aten._scaled_dot_product_efficient_attention_backward,
                aten._scaled_dot_product_cudnn_attention_backward)
    return FlopCounterMode(display=False, custom_mapping={op: _sdpa_bwd_flop for op in cuda_bwd})


def _tf32() -> str:
    """TF32 on GPU: "on" (matmuls and cuDNN convolutions), "off" (both), or "mixed" (torch's default)."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return "on" if m and c else "off" if not (m or c) else "mixed"


def run_worker(spec: dict) -> dict:
    """Build the trainer for one variant and time its step (runs in a fresh process)."""
    from d2v import ops
    from d2v.config import load_config
    from d2v.data.build import synthetic_batch
    from d2v.masking import make_maskinfo
    from d2v.trainer import Trainer, step_mode

    dev = torch.device(spec["device"])
    overrides = [f"{k}={v}" for k, v in spec["overrides"].items()]

    class SyntheticTrainer(Trainer):
        def _build_data(self):
            self.source_key, self.dataset, self.bad_files = "x", [], set()
            batch, self.tokens, self.unit_per_sample = synthetic_batch(self.cfg)
            self.loader = itertools.repeat(batch)
            # on the device once: source (B, ...) and the mask indices of (B*M, T), built on the host here
            self.device_batch = (batch["x"].to(self.device), make_maskinfo(batch["mask"]).to(self.device))


    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(spec["config"], overrides + [f"train.out_dir={tmp}/run", "train.probe_after=false",
                                                       "data.num_workers=0"])
        tr = SyntheticTrainer(cfg, progress=False, device=str(dev))
    tr.model.train()

    def step():
        return tr.train_step(tr.device_batch).out  # the optimizer step + the EMA update

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = step()  # first step: allocations, kernel selection / compilation (torch.compile: the graphs)
    if not math.isfinite(float(out["loss"])):
        raise FloatingPointError(f"{spec['variant']}: non-finite loss {float(out['loss'])}")
    with flop_counter() as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(spec["warmup"]):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            out = step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / spec["steps"])
    loss = float(out["loss"])
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
    table = ops.backend()
    return {"ms": times, "flops": flops, "peak_mib": peak, "peak_kind": kind, "tokens": tr.tokens,
            "unit_per_sample": tr.unit_per_sample, "loss": loss, "mode": step_mode(cfg),
            "params_m": sum(p.numel() for p in tr.model.parameters()) / 1e6, "precision": cfg.train.precision,
            "attention": cfg.model.attention, "skip_masked": cfg.model.skip_masked, "head": cfg.model.head,
            "tf32": _tf32() if dev.type == "cuda" else "",
            "ops_impl": ", ".join(f"{k}={v['impl']}/{v['variant']}" for k, v in table.items())}


# ------------------------------------------------------------------------------------------- driver
def _config_path(modality: str, flavor: str) -> Path:
    p = ROOT / "configs" / f"{flavor}_{modality}.yaml"
    if not p.exists():
        have = sorted(q.stem for q in (ROOT / "configs").glob(f"*_{modality}.yaml"))
        raise SystemExit(f"no recipe {p.name} for {modality}/{flavor}; have {have}")
    return p


def _spawn(spec: dict, threads: int) -> dict:
    env = dict(os.environ, D2V_OPS_IMPL=spec["ops"])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        tail = (res.stdout + res.stderr)[-3000:]
        raise RuntimeError(f"variant {spec['variant']} of {spec['config']} failed "
                           f"(exit {res.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def _error_line(e: Exception) -> str:
    """The last non-empty line of a worker's failure (the exception), fit for a CSV/markdown cell."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__).replace("|", "/")[:300]


def make_row(st: dict, spec: dict, results: list[dict], cuda: bool) -> dict:
    """One CSV row from a variant's results (one dict per round), pooling the rounds' timed steps."""
    r = results[0]
    med, p20, p80 = quantiles([t for res in results for t in res["ms"]])
    views = spec["batch"] * spec["clones"]
    sps = spec["batch"] * 1e3 / med
    peak = _peak_flops(st["device"], r["precision"], r["tf32"]) if cuda else None
    note = r["mode"]
    if cuda and r["precision"] == "fp32":
        note += f"; TF32 {r['tf32']}"
    return {"precision": r["precision"], "ops": spec["ops"] + ": " + r["ops_impl"],
            "attention": r["attention"], "skip_masked": r["skip_masked"], "head": r["head"],
            "tokens": r["tokens"],
            "params_m": f"{r['params_m']:.2f}", "ms_median": f"{med:.2f}", "ms_p20": f"{p20:.2f}",
            "ms_p80": f"{p80:.2f}", "views_per_s": f"{views * 1e3 / med:.1f}", "samples_per_s": f"{sps:.1f}",
            "unit_per_s": f"{sps * r['unit_per_sample']:.1f}", "gflop_per_step": f"{r['flops'] / 1e9:.2f}",
            "mfu": f"{r['flops'] * 1e3 / med / peak:.3f}" if peak else "",
            "peak_mib": f"{max(res['peak_mib'] for res in results):.0f}", "peak_kind": r["peak_kind"],
            "note": note, "_loss": r["loss"]}


def add_speedups(group: list[dict]) -> None:
    """d2v_speedup = views/s of d2v / views/s of the row; `_noisy` when their p20-p80 ranges overlap."""
    ref = next((r for r in group if r["variant"] == "d2v" and math.isfinite(float(r["views_per_s"]))), None)
    for row in group:
        if ref is None or not math.isfinite(float(row["views_per_s"])):
            continue
        row["d2v_speedup"] = f"{float(ref['views_per_s']) / float(row['views_per_s']):.2f}"
        # every variant trains the same views per step, so ms/step ranges compare like views/s ranges
        row["_noisy"] = row is not ref and within_noise((float(ref["ms_p20"]), float(ref["ms_p80"])),
                                                        (float(row["ms_p20"]), float(row["ms_p80"])))


def write_results(rows: list[dict], st: dict, out: Path, run: str) -> list[Path]:
    csv_path, md_path = out / "train_step.csv", out / "train_step.md"
    append_csv(csv_path, FIELDS, rows)
    cols = ["modality", "flavor", "variant", "precision", "batch", "clones", "ms_median", "views_per_s",
            "unit", "unit_per_s", "gflop_per_step", "mfu", "peak_mib", "d2v_speedup", "note"]
    threads = f"{st['threads']} threads | " if st["threads"] != "" else ""
    head = (f"\n## {st['date']} {st['device']} | torch {st['torch']} | triton {st['triton']} | "
            f"Python {st['python']} | {threads}git {st['git_sha']}\n\n{run}; d2v_speedup marked ~ when the "
            f"row's p20-p80 ms range overlaps d2v's (within noise).\n")
    shown = [dict(r, d2v_speedup=ratio_md(r["d2v_speedup"], r.get("_noisy", False))) for r in rows]
    append_markdown(md_path, [head, *md_table(cols, shown)],
                    "# End-to-end step throughput (append-only; rows also in train_step.csv; "
                    "benchmarks/README.md explains the columns)")
    return [csv_path, md_path, *plot(rows, out / f"train_step_throughput_{device_slug(st['device'])}.png",
                                     out / f"train_step_speedup_{device_slug(st['device'])}.png", st)]


def plot(rows: list[dict], thr_png: Path, spd_png: Path, st: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["modality"], r["flavor"]) for r in rows}, key=lambda g: (g[0], g[1]))
    written = []
    for png, key, label in ((thr_png, "views_per_s", "training views / s"),
                            (spd_png, "d2v_speedup", "full d2v is N x faster than this row")):
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
        for ax, (mod, fl) in zip(axes[0], groups):
            rs = [r for r in rows if r["modality"] == mod and r["flavor"] == fl
                  and r[key] != "" and math.isfinite(float(r[key]))]  # failed variants: no bar
            names, vals = [r["variant"] for r in rs], [float(r[key]) for r in rs]
            colors = ["tab:green" if n == "d2v" else "tab:red" if n in ("d2v1", "ref_eager_2.0")
                      else "tab:gray" for n in names]
            ax.barh(names[::-1], vals[::-1], color=colors[::-1])
            for y, v in enumerate(vals[::-1]):
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
            if key == "d2v_speedup":
                ax.axvline(1.0, color="k", lw=0.8)
            ax.set_title(f"{mod}/{fl}", fontsize=10)
            ax.set_xlabel(label, fontsize=9)
            ax.margins(x=0.25)
        fig.suptitle(f"d2v train step, {st['device']} ({st['date']}, git {st['git_sha']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written


def _user_overrides(items: list[str]) -> dict[str, str]:
    """--set KEY=VALUE items -> {KEY: VALUE}; keys the variants are defined by are refused."""
    out = {}
    for kv in items:
        k, eq, v = kv.partition("=")
        if not eq:
            raise SystemExit(f"--set {kv!r}: expected KEY=VALUE")
        if k.strip() in VARIANT_KEYS:
            raise SystemExit(f"--set {kv}: {k.strip()} is what the variants set ({', '.join(VARIANT_KEYS)}); "
                             f"choose rows with --variants, the d2v row's shape with --batch/--clones")
        out[k.strip()] = v.strip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modalities", nargs="+", default=list(modality_names()), choices=modality_names())
    ap.add_argument("--flavors", nargs="+", default=["tiny"], help="recipes configs/<flavor>_<modality>.yaml")
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                    help="rows to run (default: all; on CPU all but compile, a minutes-long build)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=0, help="samples per step of the d2v row (0: the recipe's)")
    ap.add_argument("--clones", type=int, default=0,
                    help="masks per sample M of the d2v row (0: the recipe's)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps (0: 10 on GPU, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats (0: 5 on GPU, 3 on CPU)")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed repeat (0: 10 on GPU, 3 on CPU)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved, each in a fresh process; "
                    "pool the timings")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: unchanged)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"extra config overrides for every row (not {', '.join(VARIANT_KEYS)}: refused)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 step, 1 repeat, no warmup; "
                    "writes only where D2V_BENCH_RESULTS points")
    ap.add_argument("--no-write", action="store_true", help="print only, do not append results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(a.worker))), flush=True)
        return 0

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    a.variants = a.variants or [v for v in VARIANTS if cuda or v != "compile"]
    user = _user_overrides(a.set)
    warmup = 0 if a.quick else (a.warmup or (10 if cuda else 2))
    repeats = 1 if a.quick else (a.repeats or (5 if cuda else 3))
    steps = 1 if a.quick else (a.steps or (10 if cuda else 3))
    rounds = max(1, a.rounds)
    st = stamp(torch.device(a.device))
    if a.threads:
        st["threads"] = a.threads
    from d2v.config import load_config

    rows, failed = [], []
    for modality, flavor in itertools.product(a.modalities, a.flavors):
        cfg_path = _config_path(modality, flavor)
        base = load_config(cfg_path, a.set)
        B = 2 if a.quick and not a.batch else (a.batch or base.train.batch_size)
        M = a.clones or base.masking.clone_batch
        specs = {}
        for name in a.variants:
            spec = variant_spec(name, B, M, cuda)
            if spec is None:
                print(f"{modality}/{flavor} {name}: skipped (no bf16 row on CPU: the d2v row runs fp32)")
                continue
            spec["overrides"].update(user)  # no conflict: _user_overrides refused the variants' keys
            spec.update(variant=name, config=str(cfg_path), device=a.device, warmup=warmup, repeats=repeats,
                        steps=steps)
            specs[name] = spec
        results, errors = {n: [] for n in specs}, {}
        for rnd in range(rounds):  # interleaved: every variant once per round
            for name, spec in specs.items():
                if name in errors:
                    continue
                try:
                    results[name].append(_spawn(spec, a.threads))
                except Exception as e:  # noqa: BLE001 - an OOM or crash of one variant must not lose the run
                    errors[name] = _error_line(e)
                    print(f"{modality}/{flavor} {name}: FAILED in round {rnd + 1}: {e}",
                          file=sys.stderr, flush=True)
        group, unit = [], get_modality(modality).bench_unit
        for name, spec in specs.items():
            row = {**st, "modality": modality, "flavor": flavor, "config": str(cfg_path.relative_to(ROOT)),
                   "variant": name, "precision": spec["overrides"]["train.precision"], "batch": spec["batch"],
                   "clones": spec["clones"], "views": spec["batch"] * spec["clones"], "warmup": warmup,
                   "repeats": repeats, "steps": steps, "rounds": rounds, "unit": unit,
                   "d2v_speedup": "", "set": " ".join(a.set)}
            if name in errors:
                failed.append(f"{modality}/{flavor} {name}")
                row.update({k: "nan" for k in NUMERIC}, note=f"FAILED: {errors[name]}")
            else:
                row.update(make_row(st, spec, results[name], cuda))
                print(f"{modality}/{flavor} {name:14s} {row['ms_median']:>9s} ms/step  "
                      f"{row['views_per_s']:>9s} views/s  {row['unit_per_s']:>10s} {unit}  "
                      f"{row['gflop_per_step']} GFLOP  peak {row['peak_mib']} MiB  "
                      f"loss {row.pop('_loss'):.3f}", flush=True)
            if a.quick:
                row["note"] += "; quick smoke run"
            group.append(row)
        add_speedups(group)
        rows += group
    out = None if a.no_write or not rows else results_dir(quick=a.quick)
    if out is not None:
        run = (f"{warmup} warmup steps, {repeats} x {steps} timed steps per round, {rounds} round(s); "
               f"--set {' '.join(a.set) or 'none'}")
        for p in write_results(rows, st, out, run):
            print(f"wrote {p}")
    if failed:
        print(f"{len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
