"""The optional C++/CUDA extension `d2v._C`: the prebuilt module from setup.py, else (when allowed by
`D2V_JIT_EXT=1`) a JIT build of csrc/ with ninja via torch.utils.cpp_extension.load, else none.

`load()` never raises: it returns (module or None, why) and caches the answer, so `d2v.ops` can report
the reason. The JIT build needs the source tree (csrc/ beside the package, i.e. an editable install or a
checkout), a C++ compiler and ninja; it takes ~15-30 s once (CPU part), then reuses torch's extension
cache. As in setup.py, a CUDA JIT build that fails falls back to a CPU-only build and the reason is kept.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_ENV = "D2V_JIT_EXT"
CXX_FLAGS = ["-O3", "-fopenmp"]
# No -std=: torch appends the C++ standard its headers need (torch 2.14's refuse C++17); nvcc takes one.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-DD2V_WITH_CUDA"]


def _why(e: BaseException) -> str:
    """The most telling line of a build error: the compiler's first `error:` line, else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    line = next((ln for ln in lines if "error:" in ln.lower()), lines[0])
    return f"{type(e).__name__}: {line[:200]}"


def _cuda_skip_reason() -> str | None:
    """Why the CUDA part is not attempted, or None to attempt it."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("D2V_NO_CUDA") == "1":
        return "D2V_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _jit_build(cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources under {CSRC} (the JIT build needs the source tree)")
    if cuda:
        sources += sorted(str(p) for p in CSRC.glob("*.cu"))
    return load(name="d2v_C_jit_cuda" if cuda else "d2v_C_jit", sources=sources,
                extra_cflags=CXX_FLAGS + (["-DD2V_WITH_CUDA"] if cuda else []), extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=NVCC_FLAGS if cuda else None,
                verbose=os.environ.get("D2V_JIT_VERBOSE") == "1")


def _jit_load() -> tuple[ModuleType | None, str]:
    """JIT-build csrc/: with CUDA when torch and the toolkit allow, else (or when that fails) CPU only."""
    cuda_error = None
    if _cuda_skip_reason() is None:
        try:
            return _jit_build(cuda=True), "JIT-built from csrc/ (with CUDA)"
        except Exception as e:  # noqa: BLE001 - a CUDA compile error must not cost the CPU part
            cuda_error = f"the CUDA JIT build failed: {_why(e)}"
    note = f"; {cuda_error}" if cuda_error else ""
    try:
        mod = _jit_build(cuda=False)
    except Exception as e:  # noqa: BLE001 - a missing compiler must not break `import d2v`
        return None, f"JIT build failed: {_why(e)}{note}"
    return mod, f"JIT-built from csrc/ (CPU only){note}"


@functools.lru_cache(maxsize=1)
def load() -> tuple[ModuleType | None, str]:
    """(module, why): the extension if importable or JIT-buildable here, and how it was obtained."""
    try:
        from d2v import _C  # built by setup.py (pip install -e . / scripts/setup.sh)
    except ImportError as e:
        prebuilt_err = f"d2v._C is not built ({e})"
    else:
        return _C, "prebuilt d2v._C" + (" (with CUDA)" if _C.with_cuda else " (CPU only)")
    if os.environ.get(JIT_ENV) != "1":
        return None, f"{prebuilt_err}; set {JIT_ENV}=1 to JIT-build csrc/ with ninja"
    mod, why = _jit_load()
    return mod, why if mod is not None else f"{prebuilt_err}; {why}"
