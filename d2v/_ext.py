"""The optional C++/CUDA extension `d2v._C`: the prebuilt module from setup.py, else (when allowed by
`D2V_JIT_EXT=1`) a JIT build of csrc/ with ninja via torch.utils.cpp_extension.load, else none.

`load()` never raises: it returns (module or None, why) and caches the answer, so `d2v.ops` can report
the reason. The JIT build needs the source tree (csrc/ beside the package, i.e. an editable install or a
checkout), a C++ compiler and ninja; it takes ~15-30 s once, then reuses torch's extension cache.

References: ../shared/ENV.md "C++/CUDA extensions"; csrc/README.md.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_ENV = "D2V_JIT_EXT"


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources under {CSRC} (the JIT build needs the source tree)")
    cflags, cuda = ["-O3", "-fopenmp"], False
    if torch.version.cuda is not None and CUDA_HOME is not None:
        sources += sorted(str(p) for p in CSRC.glob("*.cu"))
        cflags.append("-DD2V_WITH_CUDA")
        cuda = True
    return load(name="d2v_C_jit", sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-DD2V_WITH_CUDA"] if cuda
                else None,
                verbose=os.environ.get("D2V_JIT_VERBOSE") == "1")


@functools.lru_cache(maxsize=1)
def load() -> tuple[ModuleType | None, str]:
    """(module, why): the extension if importable or JIT-buildable here, and how it was obtained."""
    try:
        from d2v import _C  # built by setup.py (pip install -e . / scripts/setup.sh)

        return _C, "prebuilt d2v._C" + (" (with CUDA)" if _C.with_cuda else " (CPU only)")
    except ImportError as e:
        prebuilt_err = f"d2v._C is not built ({e})"
    if os.environ.get(JIT_ENV) != "1":
        return None, f"{prebuilt_err}; set {JIT_ENV}=1 to JIT-build csrc/ with ninja"
    try:
        mod = _jit_build()
    except Exception as e:  # a missing compiler must not break `import d2v`; the reason is reported
        return None, f"{prebuilt_err}; JIT build failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return mod, "JIT-built from csrc/" + (" (with CUDA)" if mod.with_cuda else " (CPU only)")
