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
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("d2v: torch not importable at build time; skipping the d2v._C extension")
        return [], {}
    ext = CppExtension("d2v._C", sources, extra_compile_args=["-O3", "-g0", "-fopenmp"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


exts, cmdclass = ext_modules()
setup(
    packages=["d2v", "d2v.data", "d2v.modalities", "d2v.kernels"],
    package_dir={"d2v.kernels": "kernels"},
    ext_modules=exts,
    cmdclass=cmdclass,
)
