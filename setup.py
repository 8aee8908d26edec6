"""Install d2v: the Python package `d2v`, the Triton/reference kernels as `d2v.kernels`, and the
optional C++/CUDA extension `d2v._C` from csrc/ (built only when sources exist and a compiler is
usable; D2V_SKIP_EXT=1 turns it off). A pure-Python install always works.

Develop with: pip install --no-build-isolation -e .
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def ext_modules():
    if os.environ.get("D2V_SKIP_EXT") == "1":
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:  # csrc/ holds no sources yet: nothing to build
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("d2v: torch not importable at build time; skipping the d2v._C extension")
        return [], {}
    cxx = ["-O3", "-g0", "-fopenmp"]
    # the CUDA kernels need a CUDA build of torch (its headers and libs) and nvcc; a CPU torch builds the
    # CPU part only (../shared/ENV.md: a CUDA extension cannot build against the CPU torch)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("D2V_NO_CUDA") != "1"
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        ext = CUDAExtension("d2v._C", sources, define_macros=[("D2V_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("d2v._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    print(f"d2v: building d2v._C ({'C++ + CUDA' if with_cuda else 'C++ CPU only'}) from {sources}")
    return [ext], {"build_ext": BuildExtension}


exts, cmdclass = ext_modules()
setup(
    packages=["d2v", "d2v.data", "d2v.modalities", "d2v.kernels"],
    package_dir={"d2v.kernels": "kernels"},
    ext_modules=exts,
    cmdclass=cmdclass,
)
