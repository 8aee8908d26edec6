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
from benchmarks import bench_time_to_quality as ttq
from benchmarks import bench_train_step as bts


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
        for k in ("ms_median", "ms_p20", "ms_p80", "views_per_s", "samples_per_s", "unit_per_s",
                  "gflop_per_step", "d2v_speedup", "peak_mib"):
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
    # SDPA is counted as eager attention's matmuls (the CPU flash op had no formula: 0 FLOPs)
    assert d2v["gflop_per_step"] == eager["gflop_per_step"]
    assert (d2v["warmup"], d2v["repeats"], d2v["steps"], d2v["rounds"]) == ("0", "1", "1", "1")
    assert d2v["config"] == "configs/tiny_image.yaml" and d2v["set"] == ""
    assert "masked_gather=" in d2v["ops"] and "quick smoke run" in d2v["note"]
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
    out = _run("bench_time_to_quality.py", ["--quick", "--out-root", str(tmp_path / "runs")],
               tmp_path / "res", timeout=600)
    rows = _rows(tmp_path / "res" / "time_to_quality.csv", ttq.FIELDS)
    assert [(r["run"], r["step"]) for r in rows] == [
        ("d2v2", "0"), ("d2v2", "2"), ("d2v1", "0"), ("d2v1", "2")
    ]
    for r in rows:
        _stamped(r)
        for k in ("student_full", "student_fewshot", "random_full", "random_fewshot"):
            assert 0.0 <= float(r[k]) <= 100.0
        assert float(r["train_s"]) >= 0.0
    assert float(rows[1]["train_s"]) > 0.0
    assert rows[0]["random_full"] == rows[1]["random_full"]  # the same random init at every checkpoint
    assert (tmp_path / "res" / "time_to_quality.md").exists()
    assert len(list((tmp_path / "res").glob("time_to_quality_*.png"))) == 1
    assert "d2v1's best" in out and "reached by d2v2" in out


def test_headline_reads_the_curves():
    rows = [{"run": "a", "task": "class", "shots": 10, "n_test": 400, "train_s": t, "student_fewshot": acc}
            for t, acc in (("0", "50"), ("10", "70"), ("20", "80"))]
    rows += [{"run": "b", "task": "class", "shots": 10, "n_test": 400, "train_s": t, "student_fewshot": acc}
             for t, acc in (("0", "50"), ("30", "75"), ("60", "75"))]
    line = ttq.headline(rows, "a", "b")
    # bests 80% (a) and 75% (b); b first reached its best at 30 s (not at its last checkpoint, 60 s)
    assert "10-shot class: best 80.0% ±2.0 (a) vs 75.0% ±2.2 (b)" in line  # sqrt(.8 * .2 / 400) ...
    assert "tie (within 2 SE)" in line  # 5 pts < 2 x hypot(2.0, 2.2) = 5.9
    assert "b's best (75.0%) reached by a at 20 s, b at 30 s" in line
    assert "a's best (80.0%) reached by a at 20 s, b never (its best: 75.0%)" in line
    assert "a needs 1.5x less time to reach b's best" in line
    assert "1 SE = 2.5 pts at most, 400 held-out examples" in line
    wide = [dict(r, n_test=4000) for r in rows]  # 10x the examples: the same 5 pts are beyond 2 SE
    assert "differ by more than 2 SE" in ttq.headline(wide, "a", "b")
    assert "less time" not in ttq.headline(rows, "b", "a")  # b never reaches a's best


# ---------------------------------------------------------------------------- review fixes, in-process
# (bench_train_step's driver with a fake worker; the FLOP counter; the ref ops path; results writing)


def _fake_spawn(calls, fail=()):
    """A stand-in for bts._spawn: round r of a variant returns steps of 10 + 2r and 11 + 2r ms."""

    def spawn(spec, threads):
        calls.append(spec)
        if spec["variant"] in fail:
            raise RuntimeError(f"variant {spec['variant']} failed (exit 1):\nTraceback ...\n"
                               f"torch.OutOfMemoryError: CUDA out of memory | tried to allocate")
        r = sum(c["variant"] == spec["variant"] for c in calls) - 1
        return {"ms": [10.0 + 2 * r, 11.0 + 2 * r], "flops": 2e9, "peak_mib": 100.0 + r, "peak_kind": "x",
                "tokens": 64, "unit_per_sample": 1.0, "loss": 1.0, "mode": "mode", "params_m": 1.0,
                "precision": "fp32", "attention": "sdpa", "skip_masked": True, "head": "decoder", "tf32": "",
                "ops_impl": "masked_gather=torch/gather"}

    return spawn


def test_failed_variant_gets_a_nan_row_rounds_pool_and_exit_is_nonzero(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bts, "_spawn", _fake_spawn(calls, fail=("no_sdpa",)))
    monkeypatch.setenv("D2V_BENCH_RESULTS", str(tmp_path))
    rc = bts.main(["--quick", "--modalities", "image", "--variants", "d2v", "no_sdpa", "no_mask_skip",
                   "--rounds", "2", "--set", "optim.lr=0.001", "--device", "cpu"])
    assert rc == 1  # a failure is reported by the exit status, after the other rows are written
    # interleaved rounds; the failed variant is not retried
    assert [c["variant"] for c in calls] == ["d2v", "no_sdpa", "no_mask_skip", "d2v", "no_mask_skip"]
    assert all(c["overrides"]["optim.lr"] == "0.001" for c in calls)
    rows = _rows(tmp_path / "train_step.csv", bts.FIELDS)
    d2v, bad, nms = rows
    # pooled [10,11,12,13]
    assert float(d2v["ms_median"]) == 11.5 and float(d2v["ms_p20"]) == pytest.approx(10.6)
    assert (d2v["rounds"], d2v["warmup"], d2v["set"], d2v["config"]) == ("2", "0", "optim.lr=0.001",
                                                                        "configs/tiny_image.yaml")
    assert bad["note"].startswith("FAILED: torch.OutOfMemoryError") and math.isnan(float(bad["ms_median"]))
    assert math.isnan(float(bad["d2v_speedup"])) and float(nms["d2v_speedup"]) == 1.0
    assert "| 1.00~ |" in (tmp_path / "train_step.md").read_text()  # equal ranges: within noise


def test_set_refuses_the_keys_the_variants_define(monkeypatch):
    monkeypatch.setattr(bts, "_spawn", _fake_spawn([]))
    with pytest.raises(SystemExit, match="train.precision is what the variants set"):
        bts.main(["--quick", "--no-write", "--set", "train.precision=bf16"])
    assert {"train.precision", "model.attention", "masking.clone_batch"} <= set(bts.VARIANT_KEYS)


def test_quick_writes_nothing_without_d2v_bench_results(monkeypatch, capsys):
    monkeypatch.setattr(bts, "_spawn", _fake_spawn([]))
    monkeypatch.delenv("D2V_BENCH_RESULTS", raising=False)
    before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()}
    assert bts.main(["--quick", "--modalities", "image", "--variants", "d2v", "--device", "cpu"]) == 0
    assert "not writing results" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()} == before


def test_peak_flops_names_and_tf32():
    assert bts._peak_flops("NVIDIA H100 80GB HBM3", "bf16", "") == 989e12
    assert bts._peak_flops("NVIDIA H100 PCIe", "bf16", "") == 756e12
    assert bts._peak_flops("NVIDIA H100 NVL", "bf16", "") is None  # not the SXM figure
    assert bts._peak_flops("NVIDIA H200 NVL", "bf16", "") is None
    assert (bts._peak_flops("NVIDIA A10G", "bf16", "") is None
            and bts._peak_flops("NVIDIA A100-SXM4-80GB", "bf16", ""))
    assert bts._peak_flops("NVIDIA H200", "fp32", "on") == 494.7e12
    assert bts._peak_flops("NVIDIA H200", "fp32", "off") == 66.9e12
    assert bts._peak_flops("NVIDIA H200", "fp32", "mixed") is None


@pytest.mark.parametrize("bias", [False, True])
def test_sdpa_flops_equal_the_eager_matmuls_on_cpu(bias):
    """FlopCounterMode has no formula for the CPU flash SDPA ops; bts.flop_counter() registers one, so an
    attention forward + backward counts what eager attention's matmuls count (softmax is not counted)."""
    import torch

    from d2v.blocks import Attention

    counts = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        att = Attention(32, 4)
        att.impl = impl
        x = torch.randn(2, 10, 32, requires_grad=True)
        b = torch.randn(1, 4, 10, 10) if bias else None
        with bts.flop_counter() as fc:
            att(x, b).sum().backward()
        counts[impl] = fc.get_total_flops()
        ops = {str(k) for k in fc.get_flop_counts()["Global"]}
        if impl == "sdpa" and not bias:
            assert any("flash_attention_for_cpu" in o for o in ops), ops  # the op the fix is about
    assert counts["sdpa"] == counts["eager"]


def test_ref_ops_path_computes_as_the_reference(monkeypatch):
    """D2V_OPS_IMPL=ref: targets by fairseq's chain (the library's one copy, also the benchmark's eager
    row), the student gather as plain torch.gather under autograd. The chain's F.instance_norm reduces in
    another order than the torch reference, so the two agree within fp32 rounding, not bit for bit:
    budget 8 ulps(1.0) * sqrt(T) on O(1) normalized outputs (measured <= 2 ulps * sqrt(T))."""
    import torch
    from d2v.kernels import build_targets as kt

    from benchmarks import bench_build_targets as bbt
    from d2v import ops

    torch.manual_seed(0)
    B, T, D = 3, 49, 32
    layers = [(torch.randn(B, T, D) * 3 + 1).to(dt) for dt in (torch.float32, torch.bfloat16, torch.float32)]
    ids = torch.stack([torch.randperm(T)[:7] for _ in range(B)])  # (B, K) distinct
    x = torch.randn(B, T, D)
    out = {}
    try:
        for impl in ("torch", "ref"):
            monkeypatch.setenv("D2V_OPS_IMPL", impl)
            ops._reset_backend()
            xg = x.clone().requires_grad_()
            g = ops.masked_gather(xg, ids)
            g.backward(torch.ones_like(g))
            out[impl] = {fn: ops.build_targets(layers, final_norm=fn) for fn in ("none", "layer", "instance")}
            out[impl]["gather"], out[impl]["grad"], out[impl]["fn"] = g, xg.grad, type(g.grad_fn).__name__
    finally:
        monkeypatch.delenv("D2V_OPS_IMPL")
        ops._reset_backend()
    tol = 8 * torch.finfo(torch.float32).eps * T**0.5
    for fn in ("none", "layer", "instance"):
        torch.testing.assert_close(out["ref"][fn], kt.build_targets_fairseq(layers, final_norm=fn),
                                   atol=0, rtol=0)
        torch.testing.assert_close(out["ref"][fn], out["torch"][fn], atol=tol, rtol=0)
    assert torch.equal(bbt.fairseq_chain(layers, "layer"), out["ref"]["layer"])  # one shared copy
    assert out["ref"]["fn"] == "GatherBackward0" and out["torch"]["fn"] != "GatherBackward0"
    assert torch.equal(out["ref"]["gather"], out["torch"]["gather"]) and torch.equal(out["ref"]["grad"],
                                                                                      out["torch"]["grad"])
