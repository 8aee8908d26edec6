"""What an installed d2v carries and says: the recipes, the C++ sources and the typing marker inside the
package (and inside a built wheel), recipe names resolved from any folder, and the reason d2v._ext.load()
gives for each way of getting (or not getting) d2v._C: prebuilt, JIT-built at first use, not built
because no compiler / ninja missing / the build failed / D2V_JIT_EXT=0 / D2V_SKIP_EXT=1, with the
install-time reason setup.py records in d2v/_build_info.json. No real compile here: the JIT build is
faked (the real one: tests/kernels/test_extension.py, D2V_TEST_JIT=1).

- a wheel built from a copy of the sources (`pip wheel --no-deps --no-build-isolation`, D2V_SKIP_EXT=1)
  holds every recipe, every C++/CUDA source, py.typed and the build record; slow: installed into a
  scratch venv, it resolves `tiny_image` from another folder to its own packaged file and says why it
  has no d2v._C.

Run: .venv/bin/python -m pytest -q tests/test_packaging.py
"""
import json
import logging
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

import d2v
from d2v import _ext, ops
from d2v.recipes import RECIPES_DIR, list_recipes, resolve_config_path
from tests.utils import copy_sources, load_setup, scratch_venv

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["base_audio", "base_image", "base_text", "large_image", "tiny_audio", "tiny_audio_d2v1",
           "tiny_image", "tiny_image_d2v1", "tiny_text"]
CSRC = ["bindings.cpp", "ema.cpp", "ema.h", "ema_cuda.cu", "ema_cuda.h", "ema_cuda_host.cpp"]
TORCH_MISSING = ("torch was not importable in pip's isolated build env; reinstall with "
                 "pip install --no-build-isolation .")


# ------------------------------------------------------------------- the source tree


def test_recipes_and_sources_live_in_the_package():
    assert RECIPES_DIR == ROOT / "d2v" / "configs"
    assert list_recipes() == RECIPES
    assert sorted(p.name for p in _ext.CSRC.iterdir() if p.suffix in (".cpp", ".h", ".cu")) == CSRC
    assert _ext.CSRC == ROOT / "d2v" / "csrc"
    assert (ROOT / "d2v" / "py.typed").is_file()
    # the checkout's configs/ is a link to them, so `--config configs/tiny_image.yaml` keeps working
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == RECIPES_DIR
    tracked = subprocess.run(["git", "ls-files", "-s", "configs"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout.strip():  # a git checkout: committed as a link
        assert tracked.stdout.split()[0] == "120000", tracked.stdout


def test_resolve_config_path(tmp_path, monkeypatch):
    tiny = RECIPES_DIR / "tiny_image.yaml"
    monkeypatch.chdir(tmp_path)  # a folder without configs/
    for arg in ("tiny_image", "tiny_image.yaml", "configs/tiny_image.yaml", Path("tiny_image")):
        assert resolve_config_path(arg) == tiny, arg
    mine = tmp_path / "tiny_image.yaml"  # an existing file wins over the packaged recipe
    mine.write_text("train:\n  max_steps: 1\n")
    assert resolve_config_path("tiny_image.yaml") == Path("tiny_image.yaml")
    assert resolve_config_path(str(mine)) == mine
    assert resolve_config_path("tiny_image") == tiny  # a bare name without a file here
    own = tmp_path / "configs"
    own.mkdir()
    (own / "tiny_image.yaml").write_text("x: 1\n")
    assert resolve_config_path("configs/tiny_image.yaml") == Path("configs/tiny_image.yaml")
    for bad in ("tiny_imag", "nope.yaml", "other/tiny_image.yaml", "tiny_image.json", "configs"):
        with pytest.raises(FileNotFoundError) as e:
            resolve_config_path(bad)
        assert repr(bad) in str(e.value) and "packaged recipes: " + ", ".join(RECIPES) in str(e.value)
    monkeypatch.chdir(ROOT)  # a checkout: the link
    assert resolve_config_path("configs/tiny_image.yaml").resolve() == tiny


# ------------------------------------------------------------------- setup.py's build record


def test_setup_records_why_the_extension_is_skipped(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("D2V_SKIP_EXT", "1")
    assert setup.extensions() == [] and setup.SKIP_INFO == {
        "status": "skipped", "reason": "D2V_SKIP_EXT=1 skipped it", "on_purpose": True}
    monkeypatch.delenv("D2V_SKIP_EXT")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as in pip's isolated build
    monkeypatch.setattr(sys, "path", [*sys.path, "/tmp/pip-build-env-abc123/overlay/lib/site-packages"])
    assert setup.extensions() == [] and setup.SKIP_INFO == {
        "status": "skipped", "reason": TORCH_MISSING, "on_purpose": False}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "pip-build-env" not in p])
    setup.extensions()
    assert setup.SKIP_INFO["reason"].startswith("torch was not importable at build time (")


# ------------------------------------------------------------------- d2v._ext.load(): every path


@pytest.fixture
def no_prebuilt(monkeypatch, tmp_path):
    """d2v._C hidden, no build record, a fresh load(); a faked JIT build (`calls`, `fail`)."""
    monkeypatch.setitem(sys.modules, "d2v._C", None)
    monkeypatch.delattr(d2v, "_C", raising=False)
    monkeypatch.setattr(_ext, "BUILD_INFO", tmp_path / "_build_info.json")
    for k in ("D2V_JIT_EXT", "D2V_SKIP_EXT", "D2V_NO_CUDA", "CXX", "D2V_OPS_IMPL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(_ext, "_is_cached", lambda name: False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    state = types.SimpleNamespace(calls=[], fail=None,
                                  info=lambda d: _ext.BUILD_INFO.write_text(json.dumps(d)))

    def fake_load(name, sources, **kw):
        state.calls.append(name)
        assert sources and all(Path(s).parent == _ext.CSRC for s in sources)
        if state.fail:
            raise RuntimeError(state.fail)
        return types.SimpleNamespace(with_cuda=False)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    _ext.log.addHandler(handler)
    level = _ext.log.level
    _ext.log.setLevel(logging.DEBUG)  # info reaches the handler without the CLI's setup_logging
    state.logged = lambda: [(r.levelname, r.getMessage()) for r in records]
    _ext.load.cache_clear()
    ops._reset_backend()
    yield state
    _ext.log.removeHandler(handler)
    _ext.log.setLevel(level)
    _ext.load.cache_clear()
    ops._reset_backend()


def test_jit_at_first_use_by_default(no_prebuilt):
    no_prebuilt.info({"status": "skipped", "reason": TORCH_MISSING, "on_purpose": False})
    mod, why = _ext.load()
    assert mod is not None and no_prebuilt.calls == ["d2v_C_jit"]
    assert why == ("JIT-built d2v._C from the packaged C++ sources (CPU only), because d2v._C was not "
                   f"built at install: {TORCH_MISSING}")
    assert no_prebuilt.logged() == [("INFO", "building d2v._C from the packaged C++ sources once (~30 s); "
                                              "set D2V_JIT_EXT=0 to skip")]
    assert _ext.load()[0] is mod and no_prebuilt.calls == ["d2v_C_jit"]  # once per process
    reason = ops.backend()["ema_update_"]["reason"]
    assert f"CPU tensors: {why}, C++ OpenMP twin measured faster" in reason


def test_jit_cached_build_logs_nothing(no_prebuilt, monkeypatch):
    monkeypatch.setattr(_ext, "_is_cached", lambda name: True)
    assert _ext.load()[0] is not None and no_prebuilt.logged() == []


@pytest.mark.parametrize("case", ["no compiler", "ninja missing", "build failed", "disabled", "skip env",
                                  "skipped at install"])
def test_not_built_reasons(no_prebuilt, monkeypatch, case):
    no_prebuilt.info({"status": "failed", "reason": "the C++ build failed (OSError: x)", "on_purpose": False})
    at_install = "d2v._C was not built at install: the C++ build failed (OSError: x); "
    if case == "no compiler":
        monkeypatch.setenv("CXX", "/nonexistent/g++ -O2")
        tail = ("not JIT-built: no C++ compiler found (CXX=/nonexistent/g++ -O2 is not on PATH; "
                "install g++ or set CXX)")
    elif case == "ninja missing":
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
        tail = "not JIT-built: ninja missing (pip install ninja)"
    elif case == "build failed":
        no_prebuilt.fail = ("Error building extension 'd2v_C_jit': [1/3] c++ ...\n"
                            "ema.cpp:3:1: error: boom\nmore")
        tail = "not JIT-built: build failed: RuntimeError: ema.cpp:3:1: error: boom"
    elif case == "disabled":
        monkeypatch.setenv("D2V_JIT_EXT", "0")
        tail = "JIT build disabled by D2V_JIT_EXT=0"
    elif case == "skip env":
        monkeypatch.setenv("D2V_SKIP_EXT", "1")
        tail = ("not JIT-built: the extension is skipped on purpose (D2V_SKIP_EXT=1 in the environment; "
                "D2V_JIT_EXT=1 forces a JIT build)")
    else:
        no_prebuilt.info({"status": "skipped", "reason": "D2V_SKIP_EXT=1 skipped it", "on_purpose": True})
        at_install = "d2v._C was not built at install: D2V_SKIP_EXT=1 skipped it; "
        tail = ("not JIT-built: the extension is skipped on purpose (D2V_SKIP_EXT=1 at install; "
                "D2V_JIT_EXT=1 forces a JIT build)")
    mod, why = _ext.load()
    assert mod is None and why == at_install + tail
    assert no_prebuilt.calls == (["d2v_C_jit"] if case == "build failed" else [])
    warned = [m for level, m in no_prebuilt.logged() if level == "WARNING"]
    assert len(warned) == (case == "build failed")
    entry = ops.backend()["ema_update_"]
    assert entry["impl"] == "torch" and f"CPU tensors: torch._foreach_lerp_ ({why})" in entry["reason"]
    monkeypatch.setenv("D2V_OPS_IMPL", "ema_update_=cpp")
    ops._reset_backend()
    with pytest.raises(RuntimeError, match="forces the cpp extension path but d2v._C was not built at"):
        ops.backend()


def test_forced_jit_attempts_without_a_compiler_found(no_prebuilt, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("D2V_JIT_EXT", "1")
    mod, why = _ext.load()
    assert mod is not None and no_prebuilt.calls == ["d2v_C_jit"]
    assert why.startswith("JIT-built d2v._C from the packaged C++ sources (CPU only), because d2v._C is not "
                          "built (")


def test_unrecorded_and_broken_prebuilt(no_prebuilt, monkeypatch):
    monkeypatch.setenv("D2V_JIT_EXT", "0")
    assert _ext.load()[1] == (f"d2v._C is not built (no _C extension module in {_ext.PKG}); "
                              "JIT build disabled by D2V_JIT_EXT=0")

    # a .so that is there but does not load (built against another torch)
    e = ImportError("d2v/_C.so: undefined symbol: _ZN3c10")
    monkeypatch.setattr(_ext, "_prebuilt_file", lambda: _ext.PKG / "_C.so")
    assert _ext._not_prebuilt(e, {"status": "failed", "reason": "x"}) == (
        "the prebuilt d2v._C does not import (ImportError: d2v/_C.so: undefined symbol: _ZN3c10)")


def test_prebuilt_reason_carries_the_cuda_fallback(no_prebuilt, monkeypatch):
    fake = types.SimpleNamespace(with_cuda=False)
    monkeypatch.setitem(sys.modules, "d2v._C", fake)
    monkeypatch.setattr(d2v, "_C", fake, raising=False)
    assert _ext.load() == (fake, "prebuilt d2v._C (CPU only)")
    no_prebuilt.info({"status": "cpu-only", "on_purpose": False,
                      "reason": "the CUDA part did not build (RuntimeError: nvcc failed)"})
    _ext.load.cache_clear()
    assert _ext.load()[1] == ("prebuilt d2v._C (CPU only; at install the CUDA part did not build "
                              "(RuntimeError: nvcc failed))")
    assert no_prebuilt.calls == []


# ------------------------------------------------------------------- a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the checkout's build/ stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_sources(tmp / "src")
    env = dict(os.environ, D2V_SKIP_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    [whl] = (tmp / "dist").glob("d2v-*.whl")
    return whl


def test_wheel_carries_recipes_sources_and_marker(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = json.loads(z.read("d2v/_build_info.json"))
    for r in RECIPES:
        assert f"d2v/configs/{r}.yaml" in names, r
    for s in CSRC:
        assert f"d2v/csrc/{s}" in names, s
    assert {"d2v/py.typed", "d2v/recipes.py", "d2v/_ext.py", "d2v/kernels/__init__.py"} <= names
    # every module of the source tree (a subpackage missing from setup.py's list would be left out)
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "d2v").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert not any(n.endswith(".so") or n.startswith(("tests/", "configs/", "csrc/")) for n in names)
    assert info == {"status": "skipped", "reason": "D2V_SKIP_EXT=1 skipped it", "on_purpose": True}


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    """The wheel in a scratch venv that sees this environment's packages (torch) but not its editable d2v:
    `tiny_image` resolves to the installed recipe from an unrelated folder, and the reason for the
    missing d2v._C is the one recorded at build time."""
    py, site = scratch_venv(tmp_path / "venv")  # sees this environment's torch, not its editable d2v
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "D2V_SKIP_EXT", "D2V_JIT_EXT")}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-index", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = ("import d2v._ext as e; from d2v.recipes import resolve_config_path as r; "
             "print(r('tiny_image')); print(r('configs/base_text.yaml')); print(e.CSRC); print(e.load()[1])")
    r = subprocess.run([py, "-c", check], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tiny, base_text, csrc, why = r.stdout.splitlines()
    assert tiny == f"{site}/d2v/configs/tiny_image.yaml" and base_text == f"{site}/d2v/configs/base_text.yaml"
    assert Path(csrc) == Path(site, "d2v", "csrc") and Path(csrc, "ema.cpp").is_file()
    assert why == ("d2v._C was not built at install: D2V_SKIP_EXT=1 skipped it; not JIT-built: the extension "
                   "is skipped on purpose (D2V_SKIP_EXT=1 at install; D2V_JIT_EXT=1 forces a JIT build)")
