"""End-to-end pretraining step throughput: full d2v side by side with each of its techniques turned
off, the reference-style eager 2.0 step, and a data2vec 1.0-style step, on the same batch and model.

Every row runs the real trainer's step (`Trainer._train_step` + the EMA update) in a fresh process,
on one synthetic batch of the recipe's shapes (random images / waveforms / token ids, masks from the
modality's own mask generator), repeated: data loading is not timed. Per row: `--warmup` steps, then
`--repeats` timings of `--steps` steps each between device syncs; the median is reported with p20/p80.

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
                 and attention; same precision as d2v
Throughput is counted in training views: a view is one masked copy of a sample that the student
encodes (d2v: M per sample, d2v1: one). `views_per_s` is what the speedups compare, because every
variant trains on the same number of views per step; `samples_per_s` and the modality's unit (images,
seconds of audio, tokens per second of source samples) are reported beside it.
`d2v_speedup` = views/s of `d2v` / views/s of the row (how many times faster full d2v is).
`gflop_per_step` is counted by torch's FlopCounterMode over one step (forward, backward, teacher);
`mfu` = those FLOPs per second / the device's dense peak for the row's precision (GPUs in PEAK_FLOPS).

Results: rows appended to benchmarks/results/train_step.csv, a markdown table per run appended to
train_step.md, and per-device PNGs train_step_throughput_<device>.png / train_step_speedup_<device>.png.

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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import (append_csv, append_markdown, device_slug, md_table, results_dir,  # noqa: E402
                               stamp)

FIELDS = ["date", "git_sha", "device", "threads", "torch", "triton", "python", "modality", "flavor", "variant",
          "precision", "ops", "attention", "skip_masked", "head", "batch", "clones", "views", "tokens",
          "params_m", "ms_median", "ms_p20", "ms_p80", "repeats", "steps", "views_per_s", "samples_per_s",
          "unit", "unit_per_s", "gflop_per_step", "mfu", "peak_mib", "peak_kind", "d2v_speedup", "note"]
VARIANTS = ["d2v", "no_fused_ops", "no_mask_skip", "no_multi_mask", "no_sdpa", "no_bf16", "ref_eager_2.0", "d2v1"]
UNITS = {"image": "images/s", "audio": "audio_s/s", "text": "tokens/s"}
# dense peak FLOP/s by device-name substring: (bf16 tensor core, fp32 without TF32); vendor datasheets
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
              "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "A10": (125e12, 31.2e12)}


def variant_spec(name: str, B: int, M: int, cuda: bool) -> dict | None:
    """-> {ops, overrides, batch, clones} for a variant, or None when it does not apply here."""
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
    elif name != "d2v":
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    o["masking.clone_batch"] = spec["clones"]
    o["train.batch_size"] = spec["batch"]
    return spec


# ------------------------------------------------------------------------------------------- worker
def synthetic_batch(cfg, seed: int = 0) -> tuple[dict, int, float]:
    """One batch of the recipe's shapes -> (batch dict, tokens per view, unit amount per sample)."""
    from d2v.masking import inverse_block_mask, random_mask, span_mask

    g = torch.Generator().manual_seed(seed)
    B, M, mk, m = cfg.train.batch_size, cfg.masking.clone_batch, cfg.masking, cfg.model
    if m.modality == "image":
        src = torch.randn(B, m.in_chans, m.image_size, m.image_size, generator=g)
        mask = inverse_block_mask(B * M, m.grid, m.grid, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                                  adjust=mk.mask_prob_adjust, generator=g)
        return {"x": src, "mask": mask}, m.grid * m.grid, 1.0
    if m.modality == "audio":
        from d2v.modalities.audio import conv_output_length

        L = cfg.data.max_sample_size
        T = conv_output_length(L)
        src = torch.randn(B, L, generator=g)
        mask = span_mask(B * M, T, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                         adjust=mk.mask_prob_adjust, generator=g)
        return {"x": src, "mask": mask}, T, L / cfg.data.sample_rate
    T = cfg.data.tokens_per_sample
    src = torch.randint(4, m.vocab_size, (B, T), generator=g)
    src[:, 0] = 0  # <s>
    return {"x": src, "mask": random_mask(B * M, T, mask_prob=mk.mask_prob, generator=g)}, T, float(T)


def _peak_flops(device: str, precision: str) -> float | None:
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in device:
            return bf16 if precision == "bf16" else fp32
    return None


def run_worker(spec: dict) -> dict:
    """Build the trainer for one variant and time its step (runs in a fresh process)."""
    from torch.utils.flop_counter import FlopCounterMode

    from d2v import ops
    from d2v.config import load_config
    from d2v.trainer import Trainer, step_mode

    dev = torch.device(spec["device"])
    overrides = [f"{k}={v}" for k, v in spec["overrides"].items()]

    class SyntheticTrainer(Trainer):
        def _build_data(self):
            self.source_key, self.dataset, self.bad_files = "x", [], set()
            batch, self.tokens, self.unit_per_sample = synthetic_batch(self.cfg)
            self.loader = itertools.repeat(batch)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(spec["config"], overrides + [f"train.out_dir={tmp}/run", "train.probe_after=false",
                                                       "data.num_workers=0"])
        tr = SyntheticTrainer(cfg, progress=False, device=str(dev))
    it = iter(tr.loader)
    tr.model.train()

    def step():
        out, _, _, _ = tr._train_step(it)
        tr.step += 1
        tr.teacher.update(tr.step)
        return out

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = step()  # first step: allocations, kernel selection / compilation
    if not math.isfinite(float(out["loss"])):
        raise FloatingPointError(f"{spec['variant']}: non-finite loss {float(out['loss'])}")
    with FlopCounterMode(display=False) as fc:
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
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    table = ops.backend()
    return {"ms": times, "ms_median": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8),
            "flops": flops, "peak_mib": peak, "peak_kind": kind, "tokens": tr.tokens,
            "unit_per_sample": tr.unit_per_sample, "loss": loss, "mode": step_mode(cfg),
            "params_m": sum(p.numel() for p in tr.model.parameters()) / 1e6, "precision": cfg.train.precision,
            "attention": cfg.model.attention, "skip_masked": cfg.model.skip_masked, "head": cfg.model.head,
            "ops_impl": ",".join(sorted({v["impl"] + "/" + v["variant"] for v in table.values()}))}


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
        raise RuntimeError(f"variant {spec['variant']} of {spec['config']} failed (exit {res.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def write_results(rows: list[dict], st: dict) -> list[Path]:
    out = results_dir()
    csv_path, md_path = out / "train_step.csv", out / "train_step.md"
    append_csv(csv_path, FIELDS, rows)
    cols = ["modality", "flavor", "variant", "precision", "batch", "clones", "ms_median", "views_per_s", "unit",
            "unit_per_s", "gflop_per_step", "mfu", "peak_mib", "d2v_speedup", "note"]
    head = (f"\n## {st['date']} {st['device']} | torch {st['torch']} | triton {st['triton']} | "
            f"git {st['git_sha']}\n")
    append_markdown(md_path, [head, *md_table(cols, rows)],
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
            rs = [r for r in rows if r["modality"] == mod and r["flavor"] == fl]
            names, vals = [r["variant"] for r in rs], [float(r[key]) for r in rs]
            colors = ["tab:green" if n == "d2v" else "tab:red" if n in ("d2v1", "ref_eager_2.0") else "tab:gray"
                      for n in names]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modalities", nargs="+", default=["image", "audio", "text"], choices=["image", "audio", "text"])
    ap.add_argument("--flavors", nargs="+", default=["tiny"], help="recipes configs/<flavor>_<modality>.yaml")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=0, help="samples per step of the d2v row (0: the recipe's)")
    ap.add_argument("--clones", type=int, default=0, help="masks per sample M of the d2v row (0: the recipe's)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps (0: 10 on GPU, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats (0: 5 on GPU, 3 on CPU)")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed repeat (0: 10 on GPU, 3 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: unchanged)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every row")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 step, 1 repeat, no warmup")
    ap.add_argument("--no-write", action="store_true", help="print only, do not append results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(a.worker))), flush=True)
        return 0

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    warmup = 0 if a.quick else (a.warmup or (10 if cuda else 2))
    repeats = 1 if a.quick else (a.repeats or (5 if cuda else 3))
    steps = 1 if a.quick else (a.steps or (10 if cuda else 3))
    st = stamp(torch.device(a.device))
    if a.threads:
        st["threads"] = a.threads
    from d2v.config import load_config

    rows = []
    for modality, flavor in itertools.product(a.modalities, a.flavors):
        cfg_path = _config_path(modality, flavor)
        base = load_config(cfg_path, a.set)
        B = 2 if a.quick and not a.batch else (a.batch or base.train.batch_size)
        M = a.clones or base.masking.clone_batch
        group = []
        for name in a.variants:
            spec = variant_spec(name, B, M, cuda)
            if spec is None:
                print(f"{modality}/{flavor} {name}: skipped (no bf16 row on CPU: the d2v row runs fp32)")
                continue
            for kv in a.set:
                k, _, v = kv.partition("=")
                spec["overrides"].setdefault(k, v)
            spec.update(variant=name, config=str(cfg_path), device=a.device, warmup=warmup, repeats=repeats,
                        steps=steps)
            r = _spawn(spec, a.threads)
            views = spec["batch"] * spec["clones"]
            sps = spec["batch"] * 1e3 / r["ms_median"]
            peak = _peak_flops(st["device"], r["precision"]) if cuda else None
            row = {**st, "modality": modality, "flavor": flavor, "variant": name, "precision": r["precision"],
                   "ops": spec["ops"] + ": " + r["ops_impl"], "attention": r["attention"],
                   "skip_masked": r["skip_masked"], "head": r["head"], "batch": spec["batch"],
                   "clones": spec["clones"], "views": views, "tokens": r["tokens"],
                   "params_m": f"{r['params_m']:.2f}", "ms_median": f"{r['ms_median']:.2f}",
                   "ms_p20": f"{r['ms_p20']:.2f}", "ms_p80": f"{r['ms_p80']:.2f}", "repeats": repeats,
                   "steps": steps, "views_per_s": f"{views * 1e3 / r['ms_median']:.1f}",
                   "samples_per_s": f"{sps:.1f}", "unit": UNITS[modality],
                   "unit_per_s": f"{sps * r['unit_per_sample']:.1f}",
                   "gflop_per_step": f"{r['flops'] / 1e9:.2f}",
                   "mfu": f"{r['flops'] * 1e3 / r['ms_median'] / peak:.3f}" if peak else "",
                   "peak_mib": f"{r['peak_mib']:.0f}", "peak_kind": r["peak_kind"], "d2v_speedup": "",
                   "note": r["mode"] + (" | quick smoke run" if a.quick else "")}
            group.append(row)
            print(f"{modality}/{flavor} {name:14s} {row['ms_median']:>9s} ms/step  {row['views_per_s']:>9s} views/s  "
                  f"{row['unit_per_s']:>10s} {UNITS[modality]}  {row['gflop_per_step']} GFLOP  "
                  f"peak {row['peak_mib']} MiB  loss {r['loss']:.3f}", flush=True)
        ref = next((float(r["views_per_s"]) for r in group if r["variant"] == "d2v"), None)
        for row in group:
            if ref:
                row["d2v_speedup"] = f"{ref / float(row['views_per_s']):.2f}"
        rows += group
    if not a.no_write and rows:
        for p in write_results(rows, st):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
