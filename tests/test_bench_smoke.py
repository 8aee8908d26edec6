"""Smoke tests of the kernel and ZeRO benchmarks: each script runs its tiny case once on CPU with results
redirected (D2V_BENCH_RESULTS) into tmp_path, and writes well-formed, stamped rows; nothing is written to
benchmarks/results/. Also the train-step benchmark's compile variant (tests/test_bench_end_to_end.py has the
others).

Run: .venv/bin/python -m pytest -q tests/test_bench_smoke.py
"""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import bench_train_step as bts
from benchmarks import (
    bench_zero,
    common,
)

CASES = {
    "bench_ema.py": (["--quick"], "kernels", common.FIELDS, "ema_update_"),
    "bench_masked_gather.py": (["--quick"], "kernels", common.FIELDS, "masked_gather"),
    "bench_build_targets.py": (["--quick"], "kernels", common.FIELDS, "build_targets"),
    "bench_zero.py": (["--configs", "tiny", "--worlds", "1", "--stages", "0", "--steps", "1", "--warmup", "1",
                       "--batch", "2", "--clones", "2"], "zero", bench_zero.FIELDS, None),
}


def _snapshot():
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (ROOT / "benchmarks" / "results").iterdir()}


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
        for k in ("ms_median",) + (
            ("ms_p20", "ms_p80", "gbps") if stem == "kernels" else ("ms_min", "peak_mib")
        ):
            v = float(r[k])
            assert math.isfinite(v) and v > 0, (script, k, r[k])
        if bench_name:
            assert r["bench"] == bench_name and r["case"].startswith("smoke")
        else:  # zero: per-rank threads; ms_min and ms_median both over the per-step max across ranks
            if not torch.cuda.is_available():  # on CPU the ranks split the cores
                assert int(r["threads"]) == max(1, (os.cpu_count() or 2) // int(r["world"]))
            assert float(r["ms_min"]) <= float(r["ms_median"])
    assert rows[0]["device"] in (tmp_path / f"{stem}.md").read_text()
    assert _snapshot() == before, "a smoke run wrote into benchmarks/results/"


def test_unknown_case_is_named():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ema.py"),
                          "--cases", "vit_x", "--no-write"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "vit_x" in res.stderr


def test_quick_writes_nothing_without_d2v_bench_results():
    """--quick numbers mean nothing: without D2V_BENCH_RESULTS they are printed, not written."""
    before = _snapshot()
    env = {k: v for k, v in os.environ.items() if k != "D2V_BENCH_RESULTS"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ema.py"), "--quick"],
                         capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "not writing results" in res.stdout and str(common.RESULTS) in res.stdout
    assert _snapshot() == before


def test_append_csv_rotates_a_file_with_another_header(tmp_path):
    path = tmp_path / "x.csv"
    common.append_csv(path, ["a", "b"], [{"a": 1, "b": 2}])
    common.append_csv(path, ["a", "b"], [{"a": 3, "b": 4}])
    common.append_csv(path, ["a", "b", "c"], [{"a": 5, "c": 6}])
    assert (tmp_path / "x.v1.csv").read_text().splitlines() == ["a,b", "1,2", "3,4"]
    assert path.read_text().splitlines() == ["a,b,c", "5,,6"]
    common.append_csv(path, ["a"], [{"a": 7}])
    assert (tmp_path / "x.v2.csv").exists() and path.read_text().splitlines() == ["a", "7"]


def test_git_sha_counts_untracked_files(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("ignored.txt\n")
    git("add", ".gitignore")
    git("commit", "-q", "-m", "init")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    (tmp_path / "ignored.txt").write_text("x")
    assert not common.git_sha().endswith("-dirty")  # ignored files do not count
    (tmp_path / "new_bench.py").write_text("x")
    assert common.git_sha().endswith("-dirty")  # an uncommitted, untracked script does


def test_quantiles_interpolate():
    assert common.quantiles([5.0]) == (5.0, 5.0, 5.0)
    med, p20, p80 = common.quantiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))  # numpy.percentile's default
    assert common.within_noise((1, 2), (2, 3)) and not common.within_noise((1, 2), (2.5, 3))


def test_train_step_compile_variant_is_d2v_compiled_and_opt_in_on_cpu(monkeypatch):
    """The compile row differs from d2v only by train.compile (a key --set refuses); the CPU default leaves it
    out (minutes of inductor build), the CUDA default runs it."""
    d2v, comp = bts.variant_spec("d2v", 4, 2, cuda=True), bts.variant_spec("compile", 4, 2, cuda=True)
    assert comp == dict(d2v, overrides={**d2v["overrides"], "train.compile": "true"})
    assert "train.compile" in bts.VARIANT_KEYS
    ran = []

    def spawn(spec, threads):  # a stand-in worker: records the variant, returns one 10 ms step
        ran.append(spec["variant"])
        return {"ms": [10.0], "flops": 1e9, "peak_mib": 1.0, "peak_kind": "x", "tokens": 64,
                "unit_per_sample": 1.0, "loss": 1.0, "mode": "mode", "params_m": 1.0, "precision": "fp32",
                "attention": "sdpa", "skip_masked": True, "head": "decoder", "tf32": "", "ops_impl": "x"}

    monkeypatch.setattr(bts, "_spawn", spawn)
    assert bts.main(["--quick", "--no-write", "--modalities", "image", "--device", "cpu"]) == 0
    assert "compile" not in ran and "d2v" in ran
    ran.clear()
    assert bts.main(["--quick", "--no-write", "--modalities", "image", "--device", "cpu",
                     "--variants", "compile"]) == 0
    assert ran == ["compile"]


@pytest.mark.slow
def test_train_step_compile_variant_runs(tmp_path):
    """--variants d2v compile on CPU (an inductor build: minutes cold): two stamped rows, the same loss."""
    env = dict(os.environ, D2V_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="2")
    args = ["--quick", "--modalities", "image", "--variants", "d2v", "compile"]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    with open(tmp_path / "train_step.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["d2v", "compile"]
    for r in rows:
        assert r["git_sha"] and math.isfinite(float(r["views_per_s"])) and float(r["views_per_s"]) > 0
    losses = [ln.rsplit("loss ", 1)[1] for ln in res.stdout.splitlines() if " ms/step " in ln]
    assert len(losses) == 2 and float(losses[1]) == pytest.approx(float(losses[0]), abs=1.5e-3), res.stdout
