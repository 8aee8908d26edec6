"""Smoke tests of the end-to-end benchmarks: bench_train_step.py and bench_time_to_quality.py each run
one tiny step on CPU (results redirected by D2V_BENCH_RESULTS into tmp_path) and write well-formed rows.

Run: .venv/bin/python -m pytest -q tests/test_bench_end_to_end.py
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
from benchmarks import bench_time_to_quality as ttq  # noqa: E402
from benchmarks import bench_train_step as bts  # noqa: E402


def _run(script, args, out, timeout=300):
    env = dict(os.environ, D2V_BENCH_RESULTS=str(out), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def _rows(path, fields):
    with open(path) as f:
        r = csv.DictReader(f)
        assert r.fieldnames == fields
        return list(r)


def _stamped(row):
    for k in ("date", "git_sha", "device", "torch", "python"):
        assert row[k], f"empty {k}"


@pytest.mark.slow
def test_train_step_rows(tmp_path):
    _run("bench_train_step.py", ["--quick", "--modalities", "image", "--variants", "d2v", "no_sdpa", "d2v1"],
         tmp_path)
    rows = _rows(tmp_path / "train_step.csv", bts.FIELDS)
    assert [r["variant"] for r in rows] == ["d2v", "no_sdpa", "d2v1"]
    for r in rows:
        _stamped(r)
        for k in ("ms_median", "ms_p20", "ms_p80", "views_per_s", "samples_per_s", "unit_per_s", "gflop_per_step",
                  "d2v_speedup", "peak_mib"):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0, (k, r[k])
        assert r["unit"] == "images/s" and r["mfu"] == ""  # no MFU without a GPU peak
        assert int(r["views"]) == int(r["batch"]) * int(r["clones"])
    d2v, eager, v1 = rows
    assert float(d2v["d2v_speedup"]) == 1.0
    assert eager["attention"] == "eager" and d2v["attention"] == "sdpa"
    assert v1["clones"] == "1" and int(v1["batch"]) == int(d2v["batch"]) * int(d2v["clones"])
    assert v1["head"] == "linear" and v1["skip_masked"] == "False"
    # the full-length student of data2vec 1.0 does more work per view than the skipping student
    assert float(v1["gflop_per_step"]) > float(d2v["gflop_per_step"])
    md = (tmp_path / "train_step.md").read_text()
    assert d2v["device"] in md and "| d2v1 |" not in md.split("\n")[0]
    assert len(list(tmp_path.glob("train_step_*.png"))) == 2


def test_train_step_variant_specs():
    assert bts.variant_spec("no_bf16", 4, 2, cuda=False) is None
    v1 = bts.variant_spec("d2v1", 4, 2, cuda=True)
    assert (v1["batch"], v1["clones"], v1["ops"]) == (8, 1, "ref")
    assert v1["overrides"]["train.precision"] == "bf16" and v1["overrides"]["model.head"] == "linear"
    with pytest.raises(ValueError, match="unknown variant"):
        bts.variant_spec("nope", 4, 2, cuda=False)


@pytest.mark.slow
def test_time_to_quality_rows(tmp_path):
    out = _run("bench_time_to_quality.py", ["--quick", "--out-root", str(tmp_path / "runs")], tmp_path / "res",
               timeout=600)
    rows = _rows(tmp_path / "res" / "time_to_quality.csv", ttq.FIELDS)
    assert [(r["run"], r["step"]) for r in rows] == [("d2v2", "0"), ("d2v2", "2"), ("d2v1", "0"), ("d2v1", "2")]
    for r in rows:
        _stamped(r)
        for k in ("student_full", "student_fewshot", "random_full", "random_fewshot"):
            assert 0.0 <= float(r[k]) <= 100.0
        assert float(r["train_s"]) >= 0.0
    assert float(rows[1]["train_s"]) > 0.0
    assert rows[0]["random_full"] == rows[1]["random_full"]  # the same random init at every checkpoint
    assert (tmp_path / "res" / "time_to_quality.md").exists()
    assert len(list((tmp_path / "res").glob("time_to_quality_*.png"))) == 1
    assert "d2v1's final" in out


def test_headline_reads_the_curves():
    rows = [{"run": "a", "task": "class", "shots": 10, "train_s": t, "student_fewshot": acc}
            for t, acc in (("0", "50"), ("10", "70"), ("20", "80"))]
    rows += [{"run": "b", "task": "class", "shots": 10, "train_s": t, "student_fewshot": acc}
             for t, acc in (("0", "50"), ("30", "60"), ("60", "75"))]
    assert "after 20 s of training: 3.0x less time" in ttq.headline(rows, "a", "b")
    assert "did not reach" in ttq.headline(rows, "b", "a")
