"""d2v.ops dispatch: the automatic choice and its reasons, forced paths (D2V_OPS_IMPL) and their errors,
a missing triton, and the Triton path on CPU tensors without the interpreter. These tests launch no
Triton kernel, so they run everywhere (with or without a GPU, with TRITON_INTERPRET=0).

Run: .venv/bin/python -m pytest -q tests/kernels/test_dispatch.py
"""
import os
import subprocess
import sys

import pytest
import torch
from d2v.kernels import _triton

from d2v import _ext, ops


def test_auto_on_cpu_reports_paths_and_reasons(impl):
    """Without a GPU, auto picks torch for the data ops and the C++ twin (or foreach) for the EMA, and
    each reason names the CPU and the CUDA choice."""
    if torch.cuda.is_available():
        pytest.skip("reports the CUDA choice on a GPU machine")
    table = impl("auto")
    for op in ("masked_gather", "masked_scatter", "masked_targets", "build_targets"):
        assert table[op]["impl"] == "torch" and "CPU tensors: torch" in table[op]["reason"]
        assert "CUDA tensors: Triton" in table[op]["reason"]  # triton is a dev dependency
    mod, _ = _ext.load()
    want = "cpp" if mod is not None else "torch"
    assert table["ema_update_"]["impl"] == want and "foreach" in table["ema_update_"]["reason"]


def test_forced_paths_and_clear_errors(impl, monkeypatch):
    """D2V_OPS_IMPL forces global and per-op paths; a global cpp leaves the data ops on torch and says
    why; unavailable or unknown paths and ops raise errors that name them."""
    t = impl("triton,ema_update_=torch")
    impls = [t[o]["impl"] for o in ("masked_gather", "build_targets", "ema_update_")]
    assert impls == ["triton", "triton", "torch"]
    if _ext.load()[0] is not None:
        t = impl("cpp")
        assert t["ema_update_"]["impl"] == "cpp" and t["masked_gather"]["impl"] == "torch"
        assert "no cpp kernel for masked_gather" in t["masked_gather"]["reason"]
    if _ext.load()[0] is None or not _ext.load()[0].with_cuda:
        with pytest.raises(RuntimeError, match="CUDA extension path"):
            impl("cuda")
    with pytest.raises(ValueError, match="masked_gather has no cpp kernel"):
        impl("masked_gather=cpp")
    with pytest.raises(ValueError, match="unknown op 'gather'"):
        impl("gather=triton")
    with pytest.raises(ValueError, match="'fast' is not one of"):
        impl("fast")


def test_triton_missing_is_reported_not_fatal(impl, monkeypatch):
    """Without triton, auto reports torch for CUDA tensors with the reason, and forcing triton raises."""
    monkeypatch.setattr(_triton, "status", lambda: (False, "triton is not installed (pip install triton)"))
    t = impl("auto")
    assert "CUDA tensors: torch (triton is not installed" in t["build_targets"]["reason"]
    with pytest.raises(RuntimeError, match="forces the Triton path but triton is not installed"):
        impl("triton")


def test_triton_on_cpu_without_interpreter_says_how(impl, monkeypatch):
    """The forced Triton path on CPU tensors without the interpreter raises an error naming
    TRITON_INTERPRET=1 (it never launches a compiled kernel on CPU memory)."""
    impl("triton")
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.masked_gather(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.long))


def test_package_imports_and_works_without_triton():
    """With triton unimportable, d2v imports, reports torch for build_targets with the reason, and runs."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from d2v import ops\n"
            "r = ops.backend()['build_targets']; assert r['impl'] == 'torch', r; print(r['reason'])\n"
            "print(ops.build_targets([torch.randn(2, 3, 4)]).shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "D2V_OPS_IMPL"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "triton is not installed" in r.stdout and "torch.Size([2, 3, 4])" in r.stdout
