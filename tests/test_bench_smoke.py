"""Smoke tests of the kernel and ZeRO benchmarks: each script runs its tiny case once on CPU with results
redirected (D2V_BENCH_RESULTS) into tmp_path, and writes well-formed, stamped rows; nothing is written to
benchmarks/results/.

Run: .venv/bin/python -m pytest -q tests/test_bench_smoke.py
"""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import bench_zero  # noqa: E402
from benchmarks import common  # noqa: E402

CASES = {
    "bench_ema.py": (["--quick"], "kernels", common.FIELDS, "ema_update_"),
    "bench_masked_gather.py": (["--quick"], "kernels", common.FIELDS, "masked_gather"),
    "bench_build_targets.py": (["--quick"], "kernels", common.FIELDS, "build_targets"),
    "bench_zero.py": (["--configs", "tiny", "--worlds", "1", "--stages", "0", "--steps", "1", "--warmup", "1",
                       "--batch", "2", "--clones", "2"], "zero", bench_zero.FIELDS, None),
}


def _snapshot():
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (ROOT / "benchmarks" / "results").iterdir()}


@pytest.mark.parametrize("script", list(CASES))
def test_benchmark_writes_stamped_rows(script, tmp_path):
    args, stem, fields, bench_name = CASES[script]
    before = _snapshot()
    env = dict(os.environ, D2V_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="1", D2V_DEEPSPEED_SHM="0")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    with open(tmp_path / f"{stem}.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == fields
        rows = list(reader)
    assert rows
    for r in rows:
        for k in ("date", "git_sha", "device", "torch", "python"):
            assert r[k], f"{script}: empty {k}"
        for k in ("ms_median",) + (("ms_p20", "ms_p80", "gbps") if stem == "kernels" else ("ms_min", "peak_mib")):
            v = float(r[k])
            assert math.isfinite(v) and v > 0, (script, k, r[k])
        if bench_name:
            assert r["bench"] == bench_name and r["case"].startswith("smoke")
    assert rows[0]["device"] in (tmp_path / f"{stem}.md").read_text()
    assert _snapshot() == before, "a smoke run wrote into benchmarks/results/"


def test_unknown_case_is_named():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ema.py"), "--cases", "vit_x", "--no-write"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "vit_x" in res.stderr
