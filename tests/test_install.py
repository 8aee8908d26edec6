"""Installs everywhere a user has torch: without the optional packages, and without a working C++/CUDA
toolchain.

- Optional packages (soundfile, tokenizers, deepspeed, matplotlib) blocked from import: a tiny image
  pretrain through the CLI still succeeds (the loss-curve PNG is skipped with a warning), and asking for
  audio or text data fails with an error that names the package and the pip command.
- setup.py and the JIT loader leave the C++ standard to torch (torch 2.14's headers refuse the C++17
  that was forced before), a CUDA build that fails is retried CPU-only, and a CPU build that fails
  leaves a pure-Python install; setup.py records why in d2v/_build_info.json of the built package.
- slow: a real `pip install --no-deps --no-build-isolation` with no working compiler installs and imports,
  and the installed d2v says why it has no d2v._C (without pip -v) and does not start a JIT build.
(The packaged recipes and sources, the wheel's contents and the JIT-at-first-use reasons:
tests/test_packaging.py.)

Run: .venv/bin/python -m pytest -q tests/test_install.py
"""
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from d2v import _ext
from d2v._optional import MissingDependency, _warn_once, optional, require
from tests.utils import copy_sources, load_setup, micro_overrides, scratch_venv

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("soundfile", "tokenizers", "deepspeed", "matplotlib")

# Imported by every interpreter started with this folder on PYTHONPATH (DataLoader workers too): the
# optional packages then look uninstalled.
BLOCKER = f'''
import sys

BLOCKED = {OPTIONAL!r}


class _Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Uninstalled())
'''


@pytest.fixture
def without_optional(tmp_path):
    """Environment for a subprocess in which the optional packages cannot be imported."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(block), os.environ.get("PYTHONPATH")])))
    check = subprocess.run([sys.executable, "-c", "import soundfile"], env=env, capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
    assert check.returncode != 0 and "No module named 'soundfile'" in check.stderr  # the blocker works
    return env


def d2v(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "d2v", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# ------------------------------------------------------------------- optional packages


@pytest.mark.slow
def test_image_pretrain_without_optional_packages(tmp_path, without_optional):
    out = tmp_path / "run"
    r = d2v(without_optional, "pretrain", "--config", str(ROOT / "configs" / "tiny_image.yaml"),
            "--no-progress", *micro_overrides(out, steps=3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 3 steps" in r.stdout
    assert (out / "metrics.csv").is_file() and not (out / "loss_curve.png").exists()
    assert "matplotlib is not installed: the loss-curve PNG is skipped (pip install matplotlib)" in r.stderr


@pytest.mark.parametrize("modality,package", [("audio", "soundfile"), ("text", "tokenizers")])
def test_audio_and_text_data_name_the_missing_package(tmp_path, without_optional, modality, package):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a few words of text\n")  # text: a user folder (no fortunes needed)
    extra = ["data.path=" + str(data)] if modality == "text" else []  # audio: the embedded default
    r = d2v(without_optional, "pretrain", "--config", str(ROOT / "configs" / f"tiny_{modality}.yaml"),
            f"train.out_dir={tmp_path / 'run'}", "train.max_steps=1", *extra)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: {modality} data needs {package}: pip install {package}" in r.stderr
    assert "Traceback" not in r.stderr


def test_require_and_optional():
    with pytest.raises(MissingDependency, match="loading bees needs d2v_no_such_pkg: "
                                                "pip install d2v_no_such_pkg") as e:
        require("d2v_no_such_pkg", "loading bees")
    assert isinstance(e.value, ImportError) and e.value.name == "d2v_no_such_pkg"
    assert require("json", "anything") is sys.modules["json"]
    _warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert optional("d2v_no_such_pkg", "the bee plot") is None
        assert optional("d2v_no_such_pkg", "the bee plot") is None
    assert [str(x.message) for x in w] == [
        "d2v_no_such_pkg is not installed: the bee plot is skipped (pip install d2v_no_such_pkg)"]


def test_loss_curve_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    from d2v.metrics import MetricsLogger, plot_loss_curve

    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "loss": 1.0, "lr": 1e-3})
    log.close()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    _warn_once.cache_clear()
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_loss_curve(log.path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


# ------------------------------------------------------------------- C++ standard and build fallback


@pytest.fixture
def cuda_torch(monkeypatch, tmp_path):
    """Make this CPU torch look like a CUDA build next to a CUDA toolkit (nothing is compiled)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    for k in ("D2V_NO_CUDA", "D2V_SKIP_EXT"):
        monkeypatch.delenv(k, raising=False)


def test_no_forced_cxx_standard():
    """torch appends the -std its headers need; a forced -std=c++17 broke the CUDA build on torch 2.14."""
    setup = load_setup()
    for flags in (setup.CXX_FLAGS, setup.NVCC_FLAGS, _ext.CXX_FLAGS, _ext.NVCC_FLAGS):
        assert not any(f.startswith("-std") for f in flags), flags


def test_setup_extension_with_cuda_carries_its_cpu_twin(cuda_torch, monkeypatch):
    setup = load_setup()
    [ext] = setup.extensions()
    assert any(s.endswith(".cu") for s in ext.sources) and ("D2V_WITH_CUDA", None) in ext.define_macros
    flags = ext.extra_compile_args
    assert not any(f.startswith("-std") for f in flags["nvcc"] + flags["cxx"])
    cpu = ext.cpu_fallback
    assert cpu.sources and not any(s.endswith(".cu") for s in cpu.sources)
    assert not cpu.define_macros and not any("cuda" in lib for lib in cpu.libraries)

    monkeypatch.setenv("D2V_NO_CUDA", "1")
    [ext] = setup.extensions()
    assert not any(s.endswith(".cu") for s in ext.sources) and not hasattr(ext, "cpu_fallback")
    monkeypatch.setenv("D2V_SKIP_EXT", "1")
    assert setup.extensions() == []


@pytest.mark.parametrize("cpu_compiles", [True, False])
def test_setup_build_falls_back_to_cpu_then_to_no_extension(cuda_torch, monkeypatch, capsys, tmp_path,
                                                            cpu_compiles):
    """torch's build is faked: CUDA sources fail (as nvcc did on torch 2.14), the CPU part works or not."""
    setup = load_setup()
    built = []

    def fake_torch_build(self):
        assert "_compile" not in vars(self.compiler), "a retry must start with an unpatched compiler"
        self.compiler._compile = "patched by torch"
        for ext in self.extensions:
            if any(s.endswith(".cu") for s in ext.sources):
                raise RuntimeError("Error compiling objects for extension")
            if not cpu_compiles:
                raise OSError("c++: error: no working compiler")
            built.append(ext)

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", fake_torch_build)
    from setuptools import Distribution

    [ext] = setup.extensions()
    ext._needs_stub = False  # what setuptools attaches while finalizing must survive the swap
    cmd = setup.build_ext_class()(Distribution({"name": "d2v"}))
    cmd.extensions, cmd.compiler, cmd.build_lib = [ext], types.SimpleNamespace(), str(tmp_path)
    cmd.build_extensions()
    err = capsys.readouterr().err
    assert "the CUDA part of d2v._C did not build (RuntimeError: Error compiling objects" in err
    info = json.loads((tmp_path / "d2v" / "_build_info.json").read_text())  # what d2v._ext.load() reads
    cuda_why = "RuntimeError: Error compiling objects for extension"
    if cpu_compiles:
        assert built == [ext] and cmd.extensions == [ext]
        assert not any(s.endswith(".cu") for s in ext.sources) and ext._needs_stub is False
        assert not ext.define_macros and "installing d2v without it" not in err
        assert info == {"status": "cpu-only", "reason": f"the CUDA part did not build ({cuda_why})",
                        "on_purpose": False}
    else:
        assert built == [] and cmd.extensions == []
        assert ("d2v._C did not build (OSError: c++: error: no working compiler); installing d2v "
                "without it") in err
        assert info == {"status": "failed", "on_purpose": False,
                        "reason": f"the C++ build failed (OSError: c++: error: no working compiler; "
                                  f"the CUDA part first: {cuda_why})"}


def test_setup_build_with_working_cuda_is_untouched(cuda_torch, monkeypatch, capsys, tmp_path):
    """A full build changes nothing and removes a stale _build_info.json from an earlier fallback."""
    setup = load_setup()
    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", lambda self: None)
    from setuptools import Distribution

    stale = tmp_path / "d2v" / "_build_info.json"
    stale.parent.mkdir()
    stale.write_text('{"status": "failed", "reason": "old"}')
    [ext] = setup.extensions()
    cmd = setup.build_ext_class()(Distribution({"name": "d2v"}))
    cmd.extensions, cmd.compiler, cmd.build_lib = [ext], types.SimpleNamespace(), str(tmp_path)
    cmd.build_extensions()
    assert cmd.extensions == [ext] and any(s.endswith(".cu") for s in ext.sources)
    assert "warning" not in capsys.readouterr().err
    assert not stale.exists()


@pytest.mark.parametrize("cpu_compiles", [True, False])
def test_jit_build_falls_back_to_cpu(cuda_torch, monkeypatch, cpu_compiles):
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, extra_cuda_cflags, verbose):
        calls.append((name, extra_cflags, extra_cuda_cflags))
        if any(s.endswith(".cu") for s in sources):
            raise RuntimeError(f"Error building extension '{name}': [1/4] nvcc ...\n"
                               "FAILED: ema_cuda.cuda.o\n"
                               "all.h:5:2: error: #error C++20 or later compatible compiler is required")
        if not cpu_compiles:
            raise RuntimeError(f"Error building extension '{name}'")
        return types.SimpleNamespace(with_cuda=False)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_ext, "_is_cached", lambda name: True)  # no "building ..." line
    mod, why = _ext._jit_load()
    (cuda_name, cuda_cflags, nvcc_flags), (cpu_name, cpu_cflags, no_nvcc) = calls
    assert not any(f.startswith("-std") for f in nvcc_flags) and "-DD2V_WITH_CUDA" in cuda_cflags
    assert cpu_name != cuda_name and no_nvcc is None and "-DD2V_WITH_CUDA" not in cpu_cflags
    cuda_error = ("the CUDA JIT build failed: RuntimeError: all.h:5:2: error: #error C++20 or later "
                  "compatible compiler is required")
    if cpu_compiles:
        assert mod is not None
        assert why == f"JIT-built d2v._C from the packaged C++ sources (CPU only; {cuda_error})"
    else:
        assert mod is None
        assert why == f"build failed: RuntimeError: Error building extension '{cpu_name}'; {cuda_error}"


# ------------------------------------------------------------------- a real install without a compiler


@pytest.mark.slow
def test_pip_install_without_a_compiler_gives_a_pure_python_install(tmp_path):
    """pip install --no-deps --no-build-isolation of a copy of the repo into a new venv that sees this
    environment's packages (torch) but has no working C++ compiler: the install succeeds with a
    warning, and d2v imports and reports no extension, with the reason recorded at install (no pip -v
    needed) and no JIT build started: D2V_JIT_EXT=0, then the default with no compiler found."""
    src = copy_sources(tmp_path / "src")
    py, site = scratch_venv(tmp_path / "venv")  # sees this environment's torch, not its editable d2v
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for k in ("D2V_SKIP_EXT", "D2V_NO_CUDA", "PYTHONPATH"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-v", "--no-deps",
                        "--no-build-isolation", "--no-index", "--force-reinstall", str(src)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "installing d2v without it" in r.stdout + r.stderr
    check = ("import os, d2v, d2v._ext as e, d2v.ops as ops; print(d2v.__file__); print(e.load()[1]); "
             "print(ops.backend()['ema_update_']['impl']); e.load.cache_clear(); "
             "del os.environ['D2V_JIT_EXT']; os.environ['CXX'] = '/nonexistent/c++'; print(e.load()[1])")
    r = subprocess.run([py, "-c", check], capture_output=True, text=True, env=dict(env, D2V_JIT_EXT="0"),
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    path, why, impl, why_default = r.stdout.splitlines()
    at_install = "d2v._C was not built at install: the C++ build failed ("
    assert path.startswith(site) and impl == "torch"
    assert why.startswith(at_install) and why.endswith("; JIT build disabled by D2V_JIT_EXT=0"), why
    assert why_default.startswith(at_install), why_default
    assert why_default.endswith("; not JIT-built: no C++ compiler found (CXX=/nonexistent/c++ is not on "
                                "PATH; install g++ or set CXX)"), why_default
