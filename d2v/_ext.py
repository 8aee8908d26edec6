"""The optional C++/CUDA extension `d2v._C`: the prebuilt module from setup.py, else a JIT build of the
C++ sources that ship inside the package (d2v/csrc/), else none.

`load()` never raises: it returns (module or None, why) and caches the answer, so `d2v.ops` can report
which path was taken and why (prebuilt / JIT-built / not built because ...).

The JIT build, `D2V_JIT_EXT`:
- unset (the default): when `d2v._C` is not importable and a C++ compiler (`$CXX`, else `c++`) and
  ninja are found, the C++ (CPU) part is JIT-built once at first use with
  torch.utils.cpp_extension.load (~30 s; torch's extension cache, `TORCH_EXTENSIONS_DIR`, makes later
  starts take about a second). Not attempted when the install skipped the extension on purpose
  (`D2V_SKIP_EXT=1` at install or in the environment);
- `D2V_JIT_EXT=0`: never JIT-build;
- `D2V_JIT_EXT=1`: always attempt it, also without a compiler/ninja found, and with the CUDA part when
  torch is a CUDA build and a toolkit is found (minutes; a failed CUDA build falls back to CPU only, as
  in setup.py).

Why the install did not build `d2v._C` (torch not importable in pip's isolated build environment, a
failed compile, D2V_SKIP_EXT=1) is read from `d2v/_build_info.json`, which setup.py writes into the
package when it skips the extension or falls back.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

import torch

from d2v.log import get_logger

log = get_logger(__name__)

PKG = Path(__file__).resolve().parent
CSRC = PKG / "csrc"
BUILD_INFO = PKG / "_build_info.json"
JIT_ENV = "D2V_JIT_EXT"
SOURCES = "the packaged C++ sources"
CXX_FLAGS = ["-O3", "-fopenmp"]
# No -std=: torch appends the C++ standard its headers need (torch 2.14's refuse C++17); nvcc takes one.
# -DD2V_WITH_CUDA goes to the C++ compiler (bindings.cpp, ema_cuda_host.cpp); ema_cuda.cu does not use it.
NVCC_FLAGS = ["-O3", "--use_fast_math"]
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def _why(e: BaseException) -> str:
    """The most telling line of a build error: the compiler's first `error:` line, else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    line = next((ln for ln in lines if "error:" in ln.lower()), lines[0])
    return f"{type(e).__name__}: {line[:200]}"


def build_info() -> dict:
    """What setup.py recorded when it skipped d2v._C or fell back ({} when it built it fully or the
    install predates the record): {"status": "skipped" | "failed" | "cpu-only", "reason": str,
    "on_purpose": bool}."""
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


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


def _toolchain_missing() -> str | None:
    """Why a JIT build cannot work here (no compiler, no ninja), or None. The compiler is the one torch
    would use: $CXX, else c++."""
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "").strip()
    try:
        exe = shlex.split(cxx)[0] if cxx else "c++"
    except ValueError:
        exe = cxx
    if shutil.which(exe) is None:
        where = f"CXX={cxx}" if cxx else "c++"
        return f"no C++ compiler found ({where} is not on PATH; install g++ or set CXX)"
    if not is_ninja_available():
        return "ninja missing (pip install ninja)"
    return None


def _jit_name(cuda: bool) -> str:
    return "d2v_C_jit_cuda" if cuda else "d2v_C_jit"


def _is_cached(name: str) -> bool:
    """Whether torch's extension cache already holds a build of `name` (then loading takes ~1 s)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # noqa: BLE001 - a private helper of torch: only chooses a log line
        return False


def _jit_build(cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources under {CSRC} (the package was installed without them)")
    if cuda:  # the kernels (*.cu); their host sides are *.cpp that compile empty without D2V_WITH_CUDA
        sources += sorted(str(p) for p in CSRC.glob("*.cu"))
    name = _jit_name(cuda)
    if not _is_cached(name):
        if cuda:
            log.info("building d2v._C with its CUDA part from %s once (minutes); set %s=0 to skip",
                     SOURCES, JIT_ENV)
        else:
            log.info("building d2v._C from %s once (~30 s); set %s=0 to skip", SOURCES, JIT_ENV)
    return load(name=name, sources=sources,
                extra_cflags=CXX_FLAGS + (["-DD2V_WITH_CUDA"] if cuda else []), extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=NVCC_FLAGS if cuda else None,
                verbose=os.environ.get("D2V_JIT_VERBOSE") == "1")


def _jit_load(cuda: bool = True) -> tuple[ModuleType | None, str]:
    """JIT-build d2v/csrc: with CUDA when `cuda` and torch and the toolkit allow, else (or when that
    fails) CPU only. (module, "JIT-built ...") or (None, "build failed: ...")."""
    cuda_error = None
    if cuda and _cuda_skip_reason() is None:
        try:
            return _jit_build(cuda=True), f"JIT-built d2v._C from {SOURCES} (with CUDA)"
        except Exception as e:  # noqa: BLE001 - a CUDA compile error must not cost the CPU part
            cuda_error = f"the CUDA JIT build failed: {_why(e)}"
    note = f"; {cuda_error}" if cuda_error else ""
    try:
        mod = _jit_build(cuda=False)
    except Exception as e:  # noqa: BLE001 - a missing compiler must not break `import d2v`
        return None, f"build failed: {_why(e)}{note}"
    if not cuda and _cuda_skip_reason() is None:
        note += f"; {JIT_ENV}=1 builds the CUDA part too, minutes"
    return mod, f"JIT-built d2v._C from {SOURCES} (CPU only{note})"


def _jit_mode(info: dict) -> tuple[str, str]:
    """("off", why) | ("auto", "") | ("force", "")."""
    raw = os.environ.get(JIT_ENV, "").strip().lower()
    if raw in _OFF:
        return "off", f"JIT build disabled by {JIT_ENV}={os.environ[JIT_ENV].strip()}"
    if raw in _ON:
        return "force", ""
    if os.environ.get("D2V_SKIP_EXT") == "1" or info.get("on_purpose"):
        where = "in the environment" if os.environ.get("D2V_SKIP_EXT") == "1" else "at install"
        return "off", (f"not JIT-built: the extension is skipped on purpose (D2V_SKIP_EXT=1 {where}; "
                       f"{JIT_ENV}=1 forces a JIT build)")
    return "auto", ""


def _prebuilt_file() -> Path | None:
    """The extension module file setup.py put into the package, if any (hidden when a test set
    sys.modules["d2v._C"] = None)."""
    if "d2v._C" in sys.modules and sys.modules["d2v._C"] is None:
        return None
    return next((PKG / f"_C{s}" for s in EXTENSION_SUFFIXES if (PKG / f"_C{s}").is_file()), None)


def _not_prebuilt(e: ImportError, info: dict) -> str:
    """Why there is no importable prebuilt d2v._C."""
    if _prebuilt_file() is not None:  # there but does not load, e.g. built against another torch
        return f"the prebuilt d2v._C does not import ({type(e).__name__}: {e})"
    if info.get("status") in ("skipped", "failed") and info.get("reason"):
        return f"d2v._C was not built at install: {info['reason']}"
    return f"d2v._C is not built (no _C extension module in {PKG})"


def _prebuilt(mod: ModuleType, info: dict) -> str:
    kind = "with CUDA" if mod.with_cuda else "CPU only"
    if not mod.with_cuda and info.get("status") == "cpu-only" and info.get("reason"):
        kind += f"; at install {info['reason']}"
    return f"prebuilt d2v._C ({kind})"


@functools.lru_cache(maxsize=1)
def load() -> tuple[ModuleType | None, str]:
    """(module, why): the extension if importable or JIT-buildable here, and which path was taken and why:
    "prebuilt d2v._C (...)", "JIT-built d2v._C ... , because <why not prebuilt>", or
    "<why not prebuilt>; <why not JIT-built>"."""
    info = build_info()
    try:
        from d2v import _C  # built by setup.py (pip install --no-build-isolation . / scripts/setup.sh)
    except ImportError as e:
        missing = _not_prebuilt(e, info)
    else:
        return _C, _prebuilt(_C, info)
    mode, off_why = _jit_mode(info)
    if mode == "off":
        return None, f"{missing}; {off_why}"
    if mode == "auto":
        lack = _toolchain_missing()
        if lack is not None:
            return None, f"{missing}; not JIT-built: {lack}"
    mod, why = _jit_load(cuda=mode == "force")
    if mod is None:
        log.warning("d2v._C: the JIT build failed (%s); the ops use their torch paths (%s=0 skips the "
                    "attempt)", why.removeprefix("build failed: "), JIT_ENV)
        return None, f"{missing}; not JIT-built: {why}"
    return mod, f"{why}, because {missing}"
