"""Shared benchmark helpers: environment stamp (device, date, versions, git sha), measured device copy
bandwidth, a correctness check before timing, timing (median and p20/p80), and result output: rows
appended to benchmarks/results/kernels.csv, one markdown table per run appended to
benchmarks/results/kernels.md.

Achieved bandwidth = bytes of the op's byte model (printed per row: what a perfect kernel must read and
write) / median time; reported as a % of the copy bandwidth measured in the same process (a large
device-to-device copy, bytes read + bytes written), the ceiling a memory-bound op can approach. The issue's
target for every fused op is 85% of it.

Correct before fast: every provider's output is compared once with a reference before it is timed
(Recorder.check); a provider that disagrees is not timed at all, gets a row with NaN numbers and
`WRONG: ...` in its note, and the script exits with status 1 after writing its rows.

Timing on a GPU is device time: CUDA events around each call, the L2 flushed before every timed call
(a write of twice its size, outside the events, so inputs reused from call to call come from device memory,
not from L2), and the stream held busy for a moment before the timed calls are queued, so the host's
launch overhead never opens a gap between the events (small kernels take microseconds; a Python launch
can take longer). That is what the kernel costs inside a training step, where the host runs ahead.

Every output path is resolved through results_dir() when it is written, so D2V_BENCH_RESULTS=/some/dir
redirects all of a run's files (the smoke tests, tests/test_bench_smoke.py, point it at a temp folder).
A `--quick` smoke run writes nothing unless D2V_BENCH_RESULTS is set (it prints where it would have).

CSV schema changes: append_csv never appends rows under a different header; it first renames the old
file to <name>.v1.csv (.v2, ... if taken) and starts a new file with the new header.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
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


def results_dir(quick: bool = False) -> Path | None:
    """Where results are written: $D2V_BENCH_RESULTS when set (tests point it at a temp folder), else
    benchmarks/results; None for a --quick run without D2V_BENCH_RESULTS (its numbers mean nothing and
    must not overwrite the committed results or plots)."""
    env = os.environ.get("D2V_BENCH_RESULTS", "").strip()
    if quick and not env:
        print(f"--quick: not writing results (they would go to {RESULTS}; "
              "set D2V_BENCH_RESULTS=DIR to keep them)")
        return None
    out = Path(env) if env else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def _rotate_if_header_differs(path: Path, fields: list[str]) -> None:
    """An existing CSV with another header is renamed to <stem>.v1.csv (or the next free .vN.csv)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    if header == fields:
        return
    n = 1
    while (old := path.with_name(f"{path.stem}.v{n}{path.suffix}")).exists():
        n += 1
    path.rename(old)
    print(f"{path.name}: header changed; the old rows are kept in {old.name}, new rows start {path.name}")


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows (missing keys empty, extra keys dropped); the header goes into a new or empty file. A
    file with a different header is rotated to <stem>.vN.csv first, never appended to."""
    _rotate_if_header_differs(path, fields)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def md_table(cols: list[str], rows: list[dict]) -> list[str]:
    """A markdown table; a "|" inside a cell is escaped."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]


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
        # untracked (not ignored) files count: an uncommitted benchmark script makes the tree dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        # a copy of the tree without .git (the lent GPU machine): the sha its caller recorded, if any
        return os.environ.get("D2V_GIT_SHA", "").strip() or "unknown"


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


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), interpolated linearly between order statistics (statistics.quantiles
    'inclusive', = numpy.percentile's default); a single time is all three."""
    if len(times) < 2:
        return (times[0],) * 3
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles p10 .. p90
    return statistics.median(times), q[1], q[7]


def within_noise(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Do two (p20, p80) ranges overlap? Then their ratio is not told apart from 1 by this run."""
    return a[0] <= b[1] and b[0] <= a[1]


def ratio_md(ratio: str, noisy: bool) -> str:
    """A speed-up ratio for the markdown tables: "1.03~" when the two p20-p80 ranges overlap."""
    return f"{ratio}~" if ratio and noisy else ratio


def _l2_flusher(dev: torch.device) -> Callable[[], object]:
    """On CUDA: a write of 2x the L2 size (evicts the previous call's inputs); elsewhere a no-op."""
    if dev.type != "cuda":
        return lambda: None
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 << 20
    buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device=dev)
    return buf.zero_


def _hold_stream(dev: torch.device, seconds: float) -> None:
    """Keep the current CUDA stream busy for about `seconds` (a spin kernel), so the host can queue the
    timed calls behind it and the GPU never waits for a launch between a start and an end event."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or seconds <= 0:
        return
    sleep(int(min(seconds, 0.25) * 2.0e9))  # cycles at ~2 GHz (H100/H200 boost clock); slower clocks: longer


def bench(fn: Callable[[], object], dev: torch.device, repeats: int,
          warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() over `repeats` timed calls after `warmup` calls.

    On CUDA: device time between events recorded around each call. The L2 is flushed before every timed
    call (outside the events), and the stream is held busy while all calls are queued (_hold_stream), so
    neither cached inputs nor host launch gaps enter the numbers. On CPU: wall time per call."""
    flush = _l2_flusher(dev)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    if dev.type == "cuda":
        t0 = time.perf_counter()  # host time to queue one flush + call (the GPU is idle: no waiting)
        flush()
        fn()
        host = time.perf_counter() - t0
        sync(dev)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
        _hold_stream(dev, 1.5 * repeats * host + 1e-3)
        for a, b in ev:
            flush()
            a.record()
            fn()
            b.record()
        sync(dev)
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def copy_bandwidth(dev: torch.device, mib: int = 256, repeats: int = 10) -> float:
    """Measured device copy bandwidth in GB/s, (read + write bytes) / median time: the better of an
    out-of-place copy dst.copy_(src) (on a GPU a device-to-device copy) and an in-place read-modify-write
    x.mul_(1). On CPUs the out-of-place copy also pays a read-for-ownership of dst that the byte model
    does not count (~1.5x fewer GB/s), while in-place ops (the EMA's shadow) do not: the in-place figure
    is the fair ceiling there. Timed like every kernel (bench), so the ratio compares like with like."""
    n = mib * (1 << 20) // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    ms_copy, _, _ = bench(lambda: dst.copy_(src), dev, repeats, warmup=2)
    ms_rmw, _, _ = bench(lambda: dst.mul_(1.0), dev, repeats, warmup=2)
    gb = 2 * n * 4 / 1e9
    print(f"copy bandwidth: copy_ {gb / (ms_copy * 1e-3):.1f} GB/s, "
          f"in-place mul_ {gb / (ms_rmw * 1e-3):.1f} GB/s ({mib} MiB, read + write counted)", flush=True)
    return gb / (min(ms_copy, ms_rmw) * 1e-3)


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64 over a tensor or a list of tensors (summed pair by pair: no
    float64 copy of a whole parameter list); inf when got has a non-finite element that ref does not
    have (an unwritten or corrupted output) or the shapes differ."""
    gs = list(got) if isinstance(got, (list, tuple)) else [got]
    rs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    if len(gs) != len(rs):
        return float("inf")
    num = den = 0.0
    for g, r in zip(gs, rs):
        if g.shape != r.shape:
            return float("inf")
        g, r = g.detach().double(), r.detach().double()
        if bool((~torch.isfinite(g) & torch.isfinite(r)).any()):
            return float("inf")
        num += float(torch.linalg.vector_norm(g - r)) ** 2
        den += float(torch.linalg.vector_norm(r)) ** 2
    return (num ** 0.5) / (den ** 0.5) if den > 0 else num ** 0.5


class Recorder:
    """Collects rows of one benchmark run and writes them (CSV append + markdown table append)."""

    def __init__(self, bench_name: str, dev: torch.device, copy_gbps: float):
        self.bench, self.dev, self.copy = bench_name, dev, copy_gbps
        self.base = stamp(dev)
        self.rows: list[dict] = []
        self.wrong: list[str] = []  # providers whose check failed (not timed)
        self._checked: dict[tuple[str, str], float] = {}

    def check(self, case: str, shape: str, provider: str, impl: str, got, ref, budget: float = 0.0,
              bytes_model: int = 0) -> bool:
        """Compare one provider's output with the reference once, before timing it: True when
        rel_err <= budget (0: bit-exact). Otherwise the provider gets a row with NaN numbers and
        `WRONG: ...` in its note instead of a timing, and the run will exit with status 1."""
        err = rel_err(got, ref)
        if err <= budget:
            self._checked[(case, provider)] = max(err, self._checked.get((case, provider), 0.0))
            return True
        why = f"WRONG: rel err {err:.3e} > {budget:.0e} against the reference; not timed"
        self.wrong.append(f"{self.bench} {case} {provider}: {why}")
        nan = "nan"
        self.rows.append(dict(self.base, bench=self.bench, case=case, shape=shape, provider=provider,
                              impl=impl, ms_median=nan, ms_p20=nan, ms_p80=nan, repeats=0,
                              bytes_model=bytes_model, gbps=nan, pct_copy_bw=nan,
                              copy_gbps=f"{self.copy:.2f}", speedup_vs_eager="", note=why))
        print(f"{case:>10} {provider:>22} ({impl:>12}) {why}", flush=True)
        return False

    def exit_code(self) -> int:
        """1 when any provider failed its check (after its rows were written), else 0."""
        for w in self.wrong:
            print(w, file=sys.stderr)
        return 1 if self.wrong else 0

    def add(self, case: str, shape: str, provider: str, impl: str, t: tuple[float, float, float],
            repeats: int, bytes_model: int, note: str = "") -> dict:
        ms = t[0]
        gbps = bytes_model / (ms * 1e-3) / 1e9
        row = dict(self.base, bench=self.bench, case=case, shape=shape, provider=provider, impl=impl,
                   ms_median=f"{ms:.4f}", ms_p20=f"{t[1]:.4f}", ms_p80=f"{t[2]:.4f}", repeats=repeats,
                   bytes_model=bytes_model, gbps=f"{gbps:.2f}", pct_copy_bw=f"{100 * gbps / self.copy:.1f}",
                   copy_gbps=f"{self.copy:.2f}", speedup_vs_eager="", note=note)
        err = self._checked.get((case, provider))
        if err is not None:
            checked = "checked: exact" if err == 0 else f"checked: rel {err:.1e}"
            row["note"] = "; ".join(x for x in (note, checked) if x)
        self.rows.append(row)
        print(f"{case:>10} {provider:>22} ({impl:>12}) {ms:9.3f} ms  {gbps:8.2f} GB/s "
              f"{100 * gbps / self.copy:6.1f}% of copy   {note}", flush=True)
        return row

    def speedups(self, eager_provider: str) -> None:
        """speedup_vs_eager = eager median / row median, per case; the markdown marks it "~" when the
        row's p20-p80 range overlaps the eager row's (within noise)."""
        eager = {r["case"]: r for r in self.rows
                 if r["provider"] == eager_provider and r["ms_median"] != "nan"}
        for r in self.rows:
            e = eager.get(r["case"])
            if e is not None and r["ms_median"] != "nan":
                r["speedup_vs_eager"] = f"{float(e['ms_median']) / float(r['ms_median']):.2f}"
                r["_noisy"] = r is not e and within_noise((float(e["ms_p20"]), float(e["ms_p80"])),
                                                          (float(r["ms_p20"]), float(r["ms_p80"])))

    def write(self, header_note: str = "", quick: bool = False) -> None:
        out = results_dir(quick)
        if out is None:
            return
        csv_path, md_path = out / CSV_NAME, out / MD_NAME
        append_csv(csv_path, FIELDS, self.rows)
        b = self.base
        repeats = "/".join(sorted({str(r["repeats"]) for r in self.rows if r["ms_median"] != "nan"}))
        cuda_note = (" (device time, L2 flushed per call; target for fused ops: >= 85% of it)"
                     if self.dev.type == "cuda" else "")
        lines = [f"\n## {self.bench} — {b['date']} — {b['device']}\n",
                 f"git {b['git_sha']}, torch {b['torch']}, triton {b['triton']}, Python {b['python']}"
                 + (f", {b['threads']} threads" if b["threads"] != "" else "")
                 + "; 1 warmup call (2 for torch.compile), "
                 f"{repeats} timed calls per row (median, "
                 f"p20-p80; ~ = within noise of eager); measured copy bandwidth {self.copy:.1f} GB/s"
                 f"{cuda_note}; "
                 f"every provider checked against the reference before timing. {header_note}\n",
                 "| case | shape | provider | impl | ms (median) | p20-p80 | GB/s (byte model) | % copy BW "
                 "| x eager | note |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['case']} | {r['shape']} | {r['provider']} | {r['impl']} | {r['ms_median']} | "
                         f"{r['ms_p20']}-{r['ms_p80']} | {r['gbps']} | {r['pct_copy_bw']} | "
                         f"{ratio_md(r['speedup_vs_eager'], r.get('_noisy', False))} | {r['note']} |")
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
                        help="smoke run: the tiny 'smoke' case only, 1 repeat (unless --repeats), "
                             "no torch.compile, 8 MiB bandwidth probe; seconds on a CPU, "
                             "the numbers mean nothing")
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
    """--quick: an 8 MiB probe; a GPU: 1 GiB buffers (2 GiB moved per copy, far beyond any L2); CPU:
    256 MiB."""
    if args.quick:
        return copy_bandwidth(dev, mib=8, repeats=2)
    return copy_bandwidth(dev, mib=1024 if dev.type == "cuda" else 256)
