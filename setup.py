"""Install d2v: the Python package `d2v` (with its YAML recipes in d2v/configs/, its C++/CUDA sources in
d2v/csrc/ and the py.typed marker), the Triton/reference kernels as `d2v.kernels`, and the optional
C++/CUDA extension `d2v._C` built from d2v/csrc/.

The extension only speeds up the EMA update: every op has a pure-Python path. That is why a failed
extension build never fails the install:
- the CUDA part (the torch-free kernels d2v/csrc/*.cu, compiled by nvcc, and their torch-facing host
  code, the *.cpp parts under D2V_WITH_CUDA) is attempted with a CUDA build of torch and nvcc (CUDA_HOME
  or nvcc on PATH). If it does not compile or link (a partial toolkit without the cuBLAS/cuSPARSE headers
  torch includes, an nvcc whose major version differs from torch's CUDA, ...), d2v._C is rebuilt CPU-only;
- if the CPU part does not build either (no working C++ compiler), d2v installs without d2v._C.
Each fallback prints a warning that says why (pip shows it with `pip install -v`) and records it in
d2v/_build_info.json inside the installed package, so that at run time `d2v._ext.load()` and
`d2v.ops.backend()` say why without pip -v (and d2v JIT-builds the C++ part at first use when a compiler
and ninja are found, see d2v/_ext.py).

Environment: D2V_SKIP_EXT=1 skips the extension, D2V_NO_CUDA=1 builds its CPU part only,
TORCH_CUDA_ARCH_LIST picks the GPU architectures (e.g. "8.0;9.0").

Develop with: pip install --no-build-isolation -e .
(torch is not a build requirement on purpose: an isolated build would download a second torch.)
"""
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
CSRC = ROOT / "d2v" / "csrc"
BUILD_INFO = "_build_info.json"  # written into the built package (git-ignored in a checkout)
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]
# No -std= for either compiler: torch appends the C++ standard its own headers need (C++20 for current
# releases; torch 2.14's headers refuse to compile as C++17), and nvcc accepts only one -std.
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LINK_FLAGS = ["-fopenmp"]


def warn(msg: str) -> None:
    print(f"d2v: warning: {msg}", file=sys.stderr, flush=True)


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


# Why d2v._C is skipped, decided in extensions() (None: it is attempted); build_py records it
SKIP_INFO: dict | None = None


def write_build_info(pkg_dir: Path, info: dict | None) -> None:
    """Record in <pkg_dir>/_build_info.json why d2v._C is missing or CPU-only, for d2v._ext.load(); with
    None (a full build) remove a stale record."""
    path = Path(pkg_dir) / BUILD_INFO
    if info is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")


def skip(reason: str, on_purpose: bool = False) -> list:
    global SKIP_INFO
    SKIP_INFO = {"status": "skipped", "reason": reason, "on_purpose": on_purpose}
    return []


def in_isolated_build_env() -> bool:
    """pip's (and pypa/build's) isolated build environment: a temporary overlay on sys.path."""
    paths = sys.path + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return any("pip-build-env-" in p or "build-env-" in Path(p).parent.name for p in paths if p)


def torch_missing_reason(e: BaseException) -> str:
    if in_isolated_build_env():
        return ("torch was not importable in pip's isolated build env; reinstall with "
                "pip install --no-build-isolation .")
    return (f"torch was not importable at build time ({type(e).__name__}: {e}); install torch, then "
            f"reinstall with pip install --no-build-isolation .")


def cuda_skip_reason(torch, cuda_home) -> str | None:
    """Why the CUDA part is not even attempted, or None to attempt it."""
    if os.environ.get("D2V_NO_CUDA") == "1":
        return "D2V_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def extensions() -> list:
    """[d2v._C] to build, or [] when there is nothing to build. A CUDA extension carries its CPU-only
    twin as `cpu_fallback` for BuildExtWithFallback."""
    global SKIP_INFO
    SKIP_INFO = None
    if os.environ.get("D2V_SKIP_EXT") == "1":
        print("d2v: D2V_SKIP_EXT=1: not building the d2v._C extension")
        return skip("D2V_SKIP_EXT=1 skipped it", on_purpose=True)
    cpp = _sources("*.cpp")
    if not cpp:  # a source tree without d2v/csrc/
        return skip(f"no C++ sources under {CSRC.relative_to(ROOT)} in the source tree")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - no (working) torch: the package is still usable without _C
        warn(f"torch is not importable at build time ({type(e).__name__}: {e}); installing d2v without "
             f"the d2v._C extension (install torch first and use pip install --no-build-isolation)")
        return skip(torch_missing_reason(e))
    cpu = CppExtension("d2v._C", cpp, extra_compile_args=list(CXX_FLAGS), extra_link_args=list(LINK_FLAGS))
    why = cuda_skip_reason(torch, CUDA_HOME)
    if why is None:
        try:
            ext = CUDAExtension("d2v._C", cpp + _sources("*.cu"), define_macros=[("D2V_WITH_CUDA", None)],
                                extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
                                extra_link_args=list(LINK_FLAGS))
        except Exception as e:  # noqa: BLE001 - e.g. CUDA_HOME points at no toolkit
            why = f"{type(e).__name__}: {e}"
        else:
            ext.cpu_fallback = cpu
            print(f"d2v: building d2v._C (C++ + CUDA, CUDA_HOME={CUDA_HOME}) from {ext.sources}")
            return [ext]
    print(f"d2v: building d2v._C (C++ CPU only: {why}) from {cpu.sources}")
    return [cpu]


def first_error_line(e: BaseException) -> str:
    """The most telling line of a build error: the compiler's first `error:` line, else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    line = next((ln for ln in lines if "error:" in ln.lower()), lines[0])
    return f"{type(e).__name__}: {line[:300]}"


class BuildPyWithInfo(build_py):
    """build_py that records why d2v._C is skipped (SKIP_INFO) in the built package: in build_lib for a
    wheel, in the source tree for an editable install (where the package is imported from)."""

    def run(self) -> None:
        super().run()
        pkg = ROOT / "d2v" if self.editable_mode else Path(self.build_lib) / "d2v"
        write_build_info(pkg, SKIP_INFO)


def build_ext_class():
    """torch's BuildExtension, made unable to fail the install (see the module docstring)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtWithFallback(BuildExtension):
        """Builds d2v._C with CUDA; on any failure rebuilds it CPU-only; on another failure drops it.

        torch raises from several places (the nvcc version check, ninja, the compiler, the linker), so
        the whole `build_extensions` is retried rather than one compile step. The outcome is recorded
        in d2v/_build_info.json of the built package (removed after a full build)."""

        def run(self) -> None:
            # setuptools builds an in-place/editable extension with inplace=False, then copies it back
            self._into_source = bool(self.inplace or self.editable_mode)
            super().run()

        def build_extensions(self) -> None:
            info = self._build_with_fallback()
            if getattr(self, "_into_source", False) or self.inplace or self.editable_mode:
                write_build_info(ROOT / "d2v", info)
            elif self.build_lib:
                write_build_info(Path(self.build_lib) / "d2v", info)

        def _build_with_fallback(self) -> dict | None:
            why = self._try_build()
            if why is None:
                return None
            cuda_why = None
            if any(hasattr(ext, "cpu_fallback") for ext in self.extensions):
                warn(f"the CUDA part of d2v._C did not build ({why}; see the build output above); "
                     f"building d2v._C for the CPU only")
                for ext in self.extensions:
                    if hasattr(ext, "cpu_fallback"):
                        # become the CPU twin in place: its sources, macros, libraries and flags replace
                        # the CUDA ones; what setuptools attached to this object while finalizing stays
                        cpu = ext.cpu_fallback
                        del ext.cpu_fallback
                        vars(ext).update(vars(cpu))
                cuda_why = why
                why = self._try_build()
                if why is None:
                    return {"status": "cpu-only", "reason": f"the CUDA part did not build ({cuda_why})",
                            "on_purpose": False}
            warn(f"d2v._C did not build ({why}); installing d2v without it: every op has a pure-Python "
                 f"path (d2v.ops.backend() reports which one runs)")
            self.extensions = []  # nothing to copy or install
            note = f"; the CUDA part first: {cuda_why}" if cuda_why else ""
            return {"status": "failed", "reason": f"the C++ build failed ({why}{note})", "on_purpose": False}

        def _try_build(self) -> str | None:
            """Build every extension: None on success, else why not. torch patches the compiler object
            while building; that is undone on failure so a retry starts clean."""
            saved = dict(vars(self.compiler))
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - CompileError, LinkError, RuntimeError from ninja, ...
                vars(self.compiler).clear()
                vars(self.compiler).update(saved)
                return first_error_line(e)
            return None

    return BuildExtWithFallback


if __name__ == "__main__":  # importable by tests without building anything
    exts = extensions()
    setup(
        packages=["d2v", "d2v.backends", "d2v.backends.deepspeed", "d2v.data", "d2v.interop",
                  "d2v.modalities", "d2v.kernels"],
        package_dir={"d2v.kernels": "kernels"},
        # package data (recipes, C++/CUDA sources, py.typed): [tool.setuptools.package-data] in pyproject.toml
        ext_modules=exts,
        cmdclass={"build_py": BuildPyWithInfo, **({"build_ext": build_ext_class()} if exts else {})},
    )
