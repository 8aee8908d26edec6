"""Shared benchmark helpers: environment stamp (device, date, versions, git sha), measured device copy
bandwidth, timing (median and p20/p80), and result output: rows appended to
benchmarks/results/kernels.csv, one markdown table per run appended to benchmarks/results/kernels.md.

Achieved bandwidth = bytes of the op's byte model (printed per row: what a perfect kernel must read and
write) / median time; reported as a % of the copy bandwidth measured in the same process.

References: ../shared/spec/anchors.md §5.4 (report GB/s and % of measured copy bandwidth); Liger-Kernel
benchmark/BENCHMARK_GUIDELINES.md (median with p20/p80, device and version in every row).

Every output path is resolved through results_dir() when it is written, so D2V_BENCH_RESULTS=/some/dir
redirects all of a run's files (the smoke tests, tests/test_bench_smoke.py, point it at a temp folder).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # the default results folder; writers use results_dir()
CSV_NAME, MD_NAME = "kernels.csv", "kernels.md"
CSV_PATH = RESULTS / CSV_NAME  # default locations only (kept importable): Recorder.write resolves
MD_PATH = RESULTS / MD_NAME  # results_dir() / CSV_NAME at write time
FIELDS = ["date", "git_sha", "device", "threads", "torch", "triton", "python", "bench", "case", "shape",
          "provider", "impl", "ms_median", "ms_p20", "ms_p80", "repeats", "bytes_model", "gbps",
          "pct_copy_bw", "copy_gbps", "speedup_vs_eager", "note"]


def results_dir() -> Path:
    """Where results are written: $D2V_BENCH_RESULTS when set (tests point it at a temp folder), else
    benchmarks/results."""
    env = os.environ.get("D2V_BENCH_RESULTS", "").strip()
    out = Path(env) if env else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows (missing keys empty, extra keys dropped); the header goes into a new or empty file."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def md_table(cols: list[str], rows: list[dict]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]


def append_markdown(path: Path, lines: list[str], title: str | None = None) -> None:
    """Append one run's markdown; `title` heads a new or empty file."""
    with path.open("a") as f:
        if title and path.stat().st_size == 0:
            f.write(title + "\n")
        f.write("\n".join(lines) + "\n")


def device_slug(device: str) -> str:
    """A device name as a file-name part: "AMD EPYC (2 cores)" -> "amd_epyc_2_cores"."""
    s = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    return s[:40] or "device"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(dev: torch.device) -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"date": _dt.date.today().isoformat(), "git_sha": git_sha(), "device": device_name(dev),
            "threads": torch.get_num_threads() if dev.type == "cpu" else "", "torch": torch.__version__,
            "triton": tv, "python": platform.python_version()}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn: Callable[[], object], dev: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() over `repeats` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def copy_bandwidth(dev: torch.device, mib: int = 256, repeats: int = 10) -> float:
    """Measured device copy bandwidth in GB/s, (read + write bytes) / median time: the better of an
    out-of-place copy dst.copy_(src) and an in-place read-modify-write x.mul_(1). On CPUs the out-of-place
    copy also pays a read-for-ownership of dst that the byte model does not count (~1.5x fewer GB/s),
    while in-place ops (the EMA's shadow) do not: the in-place figure is the fair ceiling there."""
    n = mib * (1 << 20) // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    ms_copy, _, _ = bench(lambda: dst.copy_(src), dev, repeats, warmup=2)
    ms_rmw, _, _ = bench(lambda: dst.mul_(1.0), dev, repeats, warmup=2)
    return 2 * n * 4 / (min(ms_copy, ms_rmw) * 1e-3) / 1e9


class Recorder:
    """Collects rows of one benchmark run and writes them (CSV append + markdown table append)."""

    def __init__(self, bench_name: str, dev: torch.device, copy_gbps: float):
        self.bench, self.dev, self.copy = bench_name, dev, copy_gbps
        self.base = stamp(dev)
        self.rows: list[dict] = []

    def add(self, case: str, shape: str, provider: str, impl: str, t: tuple[float, float, float],
            repeats: int, bytes_model: int, note: str = "") -> dict:
        ms = t[0]
        gbps = bytes_model / (ms * 1e-3) / 1e9
        row = dict(self.base, bench=self.bench, case=case, shape=shape, provider=provider, impl=impl,
                   ms_median=f"{ms:.4f}", ms_p20=f"{t[1]:.4f}", ms_p80=f"{t[2]:.4f}", repeats=repeats,
                   bytes_model=bytes_model, gbps=f"{gbps:.2f}", pct_copy_bw=f"{100 * gbps / self.copy:.1f}",
                   copy_gbps=f"{self.copy:.2f}", speedup_vs_eager="", note=note)
        self.rows.append(row)
        print(f"{case:>10} {provider:>22} ({impl:>12}) {ms:9.3f} ms  {gbps:8.2f} GB/s "
              f"{100 * gbps / self.copy:6.1f}% of copy   {note}", flush=True)
        return row

    def speedups(self, eager_provider: str) -> None:
        """speedup_vs_eager = eager median / row median, per case."""
        eager = {r["case"]: float(r["ms_median"]) for r in self.rows if r["provider"] == eager_provider}
        for r in self.rows:
            if r["case"] in eager:
                r["speedup_vs_eager"] = f"{eager[r['case']] / float(r['ms_median']):.2f}"

    def write(self, header_note: str = "") -> None:
        out = results_dir()
        csv_path, md_path = out / CSV_NAME, out / MD_NAME
        append_csv(csv_path, FIELDS, self.rows)
        b = self.base
        lines = [f"\n## {self.bench} — {b['date']} — {b['device']}\n",
                 f"git {b['git_sha']}, torch {b['torch']}, triton {b['triton']}, Python {b['python']}"
                 + (f", {b['threads']} threads" if b["threads"] != "" else "")
                 + f"; measured copy bandwidth {self.copy:.1f} GB/s. {header_note}\n",
                 "| case | shape | provider | impl | ms (median) | p20-p80 | GB/s (byte model) | % copy BW | x eager | note |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['case']} | {r['shape']} | {r['provider']} | {r['impl']} | {r['ms_median']} | "
                         f"{r['ms_p20']}-{r['ms_p80']} | {r['gbps']} | {r['pct_copy_bw']} | "
                         f"{r['speedup_vs_eager']} | {r['note']} |")
        append_markdown(md_path, lines, "# Kernel benchmarks (append-only; rows also in kernels.csv)")
        print(f"wrote {csv_path} and {md_path}")


def try_compile(fn: Callable, enabled: bool) -> tuple[Callable | None, str]:
    """torch.compile(fn) (inductor), or (None, why) when disabled or unavailable."""
    if not enabled:
        return None, "torch.compile skipped (--no-compile)"
    try:
        return torch.compile(fn), ""
    except Exception as e:  # compile itself is lazy; errors surface at the first call
        return None, f"torch.compile failed: {type(e).__name__}: {e}"


def common_args(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per row (0: 20 on GPU, 5 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the tiny 'smoke' case only, 1 repeat (unless --repeats), no torch.compile, "
                             "8 MiB bandwidth probe; seconds on a CPU, the numbers mean nothing")
    return parser


def select_cases(cases: dict, args) -> list[str]:
    """--quick: the 'smoke' case alone; else the requested --cases (default: all real ones)."""
    if args.quick:
        args.no_compile, args.repeats = True, args.repeats or 1
        return ["smoke"]
    wanted = [c for c in args.cases.split(",") if c] if args.cases else [c for c in cases if c != "smoke"]
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; choose from {sorted(cases)}")
    return wanted


def probe_bandwidth(dev: torch.device, args) -> float:
    return copy_bandwidth(dev, mib=8, repeats=2) if args.quick else copy_bandwidth(dev)
