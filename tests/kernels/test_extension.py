"""The C++/CUDA extension d2v._C: built by setup.py, its CPU EMA called directly and through d2v.ops,
its JIT build from the packaged sources (d2v/csrc/), the reason given when it is missing, and its CUDA EMA
on a GPU. (Every reason load() can give, with the builds faked: tests/test_packaging.py.)

Error budget: `tests.utils.check_ema` (fp32 formula; bit-exact low-precision copy).

Run: .venv/bin/python -m pytest -q tests/kernels/test_extension.py
"""
import os
import subprocess
import sys

import pytest
import torch

from d2v import _ext, ops
from tests.utils import EXT_REQUIRED, check_ema


def test_cpp_extension_is_built():
    """setup.py (scripts/setup.sh) builds d2v._C whenever a compiler is found; CI must not lose it."""
    mod, why = _ext.load()
    if not EXT_REQUIRED:
        pytest.skip(f"D2V_SKIP_EXT=1 ({why})")
    assert mod is not None, why
    assert mod.with_cuda is False or torch.version.cuda is not None


def test_cpp_ema_direct_and_errors():
    """The C++ CPU EMA over a tensor past the OpenMP threshold (with a ragged tail) and a tiny one is
    within budget with a bit-exact bf16 copy; mismatched shapes, a non-fp32 ema and a strided ema raise
    errors that say so."""
    mod, why = _ext.load()
    if mod is None:
        pytest.skip(why) if not EXT_REQUIRED else pytest.fail(why)
    n = (1 << 18) + 17  # above the parallel threshold: several OpenMP work items and a ragged tail
    ema, par = [torch.randn(n), torch.randn(3)], [torch.randn(n).bfloat16(), torch.randn(3)]
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(n, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16)]
    mod.ema_update_cpu(ema, par, 0.999, low)
    check_ema(ema, ema0, par, 0.999, low, what="cpp direct")
    with pytest.raises(RuntimeError, match="pair 0 shapes differ"):
        mod.ema_update_cpu([torch.zeros(3)], [torch.zeros(4)], 0.5)
    with pytest.raises(RuntimeError, match="must be float32"):
        mod.ema_update_cpu([torch.zeros(3).double()], [torch.zeros(3)], 0.5)
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.ema_update_cpu([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], 0.5)


def test_cpp_ema_strided_param_through_ops(impl):
    """Forced to the C++ path, d2v.ops updates the ema from a transposed (strided) param within budget."""
    if _ext.load()[0] is None and not EXT_REQUIRED:
        pytest.skip("D2V_SKIP_EXT=1")
    impl("ema_update_=cpp")
    ema, par = [torch.randn(4, 6)], [torch.randn(6, 4).t()]  # a transposed (strided) param
    ema0 = [e.clone() for e in ema]
    ops.ema_update_(ema, par, 0.9)
    check_ema(ema, ema0, par, 0.9, what="strided")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("D2V_TEST_JIT") != "1",
                    reason="JIT build takes 40-75 s on 2 cores: D2V_TEST_JIT=1 runs it")
def test_jit_build_of_the_extension(tmp_path):
    """Without the prebuilt module and by default (D2V_JIT_EXT unset), d2v/csrc/ is JIT-built with ninja
    at first use, after an info line, and works; D2V_JIT_EXT=1 takes the same path here (a CPU torch)."""
    code = (
        "import sys, torch; sys.modules['d2v._C'] = None\n"  # hide the prebuilt module
        "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from d2v import _ext; mod, why = _ext.load(); assert mod is not None, why; print(why)\n"
        "e, p = [torch.zeros(5)], [torch.ones(5)]; mod.ema_update_cpu(e, p, 0.75)\n"
        "assert torch.equal(e[0], torch.full((5,), 0.25))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("D2V_JIT_EXT", "D2V_SKIP_EXT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), MAX_JOBS="2")
    if _ext.build_info().get("on_purpose"):  # this checkout was installed with D2V_SKIP_EXT=1: no default JIT
        env["D2V_JIT_EXT"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "JIT-built d2v._C from the packaged C++ sources (CPU only" in r.stdout
    assert "building d2v._C from the packaged C++ sources once (~30 s); set D2V_JIT_EXT=0 to skip" in r.stderr
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, D2V_JIT_EXT="1"), capture_output=True,
                       text=True, timeout=600)  # from torch's extension cache now: no second build
    assert r.returncode == 0, r.stderr[-2000:]
    assert "JIT-built d2v._C" in r.stdout and "building d2v._C" not in r.stderr


def test_with_jit_disabled_the_reason_says_so():
    """Without the prebuilt module and with D2V_JIT_EXT=0, nothing is built, the load reason says why, and
    the EMA falls back to torch's foreach path, saying so."""
    code = ("import sys; sys.modules['d2v._C'] = None\n"
            "from d2v import _ext, ops; print(_ext.load()[1]); print(ops.backend()['ema_update_'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("D2V_OPS_IMPL",)}
    env["D2V_JIT_EXT"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    why = r.stdout.splitlines()[0]
    assert why.startswith(("d2v._C is not built (", "d2v._C was not built at install: ")), why
    assert why.endswith("; JIT build disabled by D2V_JIT_EXT=0"), why
    entry = r.stdout.splitlines()[1]
    assert "'impl': 'torch'" in entry and "foreach" in entry and "D2V_JIT_EXT=0" in entry


@pytest.mark.gpu
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_extension_ema(impl, pdtype):
    """The CUDA multi-tensor EMA over more than one launch's worth of tensors (60 small ones), a
    768x768 and an odd-sized tensor, with a misaligned param (the scalar tail path): within budget,
    bf16 copy bit-exact."""
    mod, why = _ext.load()
    if mod is None or not mod.with_cuda:
        pytest.skip(f"d2v._C has no CUDA kernels here ({why})")
    impl("ema_update_=cuda")
    shapes = [(1,), (3,), (768, 768), (70001,)] + [(5,)] * 60  # > 48 tensors: several launches
    ema = [torch.randn(s, device="cuda") for s in shapes]
    par = [torch.randn(s, device="cuda").to(pdtype) for s in shapes]
    par[1] = torch.randn(4, device="cuda").to(pdtype)[1:]  # misaligned: the scalar tail path
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    ops.ema_update_(ema, par, 0.999, out_lowp=low)
    check_ema(ema, ema0, par, 0.999, low, what="cuda ext")
