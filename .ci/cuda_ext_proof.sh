#!/usr/bin/env bash
# Proof, without a GPU, that the CUDA part of d2v._C compiles and links for sm_80 and sm_90 against a
# CUDA build of torch (default torch==2.14.1, CUDA 13.0), through `pip install --no-build-isolation .`.
#
#   bash .ci/cuda_ext_proof.sh        # exit 0: d2v._C imports, with_cuda, sm_80 and sm_90 cubins in the .so
#
# Needs nvcc (CUDA_HOME, else nvcc on PATH) whose major version matches torch's CUDA. Creates its own
# venv (D2V_CUDA_VENV, default .venv-cuda, ~5.5 GB: the CUDA torch) once; later runs reuse it and skip
# the compile (~3.5 min on 2 busy cores, nearly all of it the .cpp files that include torch; nvcc takes
# ~4 s, as no .cu includes a torch header) while setup.py, pyproject.toml, the d2v/csrc/ sources, nvcc
# and the arch list are unchanged (the installed build is still checked). D2V_CUDA_PROOF_REBUILD=1
# forces the compile.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
VENV=${D2V_CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${D2V_CUDA_TORCH:-torch==2.14.1}
# pyyaml: `import d2v` needs it (with torch and numpy; every other dependency is imported where used)
PKGS="$TORCH_SPEC numpy pyyaml ninja setuptools wheel"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
WANT_SM=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed 's/+PTX//; s/\.//' | sed 's/^/sm_/')

say() { echo "[cuda-proof +$((SECONDS - START))s] $*"; }
fail() { echo "[cuda-proof +$((SECONDS - START))s] FAIL: $*" >&2; exit 1; }

command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] || fail "no nvcc (set CUDA_HOME)"

# 1. the venv with a CUDA torch (torch is a multi-GB wheel: installed once)
if [ "$(cat "$VENV/.cuda-proof-venv" 2>/dev/null)" != "$PKGS" ]; then
  say "creating $VENV: pip install $PKGS"
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $PKGS
  echo "$PKGS" > "$VENV/.cuda-proof-venv"
  say "venv ready"
fi
PY=$ROOT/$VENV
case "$VENV" in /*) PY=$VENV ;; esac
PY=$PY/bin/python
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
[ -n "$TORCH_CUDA" ] || fail "$VENV has a CPU build of torch; the proof needs a CUDA build ($TORCH_SPEC)"

# 2. CUDA_HOME: the toolkit root. torch guesses the parent of the folder holding the first `nvcc` on
# PATH, which is wrong for /usr/local/bin/nvcc (a symlink or a wrapper script): resolve it, and ask
# nvcc itself where it lives when that is still not a toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd -P)
  if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    top=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
    [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd -P)
  fi
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] \
  || fail "CUDA_HOME=$CUDA_HOME is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
say "torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $TORCH_CUDA), nvcc $NVCC_VERSION at $CUDA_HOME, arch list $TORCH_CUDA_ARCH_LIST"

# torch's headers include cuBLAS/cuSPARSE headers; a partial toolkit (nvcc + cudart only) lacks them,
# but the CUDA torch wheel's nvidia-* dependencies ship them
if [ ! -f "$CUDA_HOME/include/cusparse.h" ]; then
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  for inc in "$SITE"/nvidia/*/include; do
    if [ -f "$inc/cusparse.h" ] || [ -f "$inc/cublas_v2.h" ]; then CPATH="$inc${CPATH:+:$CPATH}"; fi
  done
  export CPATH=${CPATH:-}
  say "toolkit lacks cusparse.h: CPATH=$CPATH"
fi

# 3. pip install . (non-editable, from a clean copy: the checkout's build/ and in-place .so stay untouched)
STAMP=$VENV/.cuda-proof-build
want=$(cat setup.py pyproject.toml d2v/csrc/*.h d2v/csrc/*.cpp d2v/csrc/*.cu | sha256sum | cut -d' ' -f1)-$NVCC_VERSION-$TORCH_CUDA_ARCH_LIST
if [ "${D2V_CUDA_PROOF_REBUILD:-0}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  cp -r setup.py pyproject.toml README.md d2v kernels "$SRC"/
  find "$SRC" \( -name '*.so' -o -name __pycache__ -o -name _build_info.json \) -prune -exec rm -rf {} +
  say "pip install --no-build-isolation --no-deps . (compiles d2v/csrc/*.cpp and d2v/csrc/*.cu; minutes on 2 cores)"
  rm -f "$STAMP"
  log=$VENV/cuda-proof-build.log
  if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation \
       --no-deps --force-reinstall "$SRC" > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    fail "pip install failed (full log: $log)"
  fi
  # setup.py falls back to a CPU-only build instead of failing: that must not pass as a proof
  if grep -q "d2v: warning:" "$log"; then
    grep -B 30 "d2v: warning:" "$log" | tail -n 40 >&2
    fail "the CUDA part did not build (full log: $log)"
  fi
  grep -q "building d2v._C (C++ + CUDA" "$log" || fail "setup.py did not attempt the CUDA build (see $log)"
  echo "$want" > "$STAMP"
  say "built and installed"
else
  say "sources unchanged since the last proof: reusing the installed build (D2V_CUDA_PROOF_REBUILD=1 rebuilds)"
fi

# 4. the installed extension: imports (no GPU needed), has its CUDA entry point, holds a cubin per arch
SO=$(cd / && "$PY" - <<'EOF'
import torch  # loads libtorch/libc10 before the extension
from d2v import _C
assert _C.with_cuda, "d2v._C was built without CUDA"
assert hasattr(_C, "ema_update_cuda") and hasattr(_C, "ema_update_cpu"), dir(_C)
import d2v.ops  # the package itself imports beside this torch
print(_C.__file__)
EOF
) || fail "the installed d2v._C does not import with CUDA"
case "$SO" in "$ROOT"/d2v/*) fail "imported the checkout's d2v._C ($SO), not the installed one" ;; esac
CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || [ ! -x "$CUDA_HOME/bin/cuobjdump" ] || CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
if [ -z "$CUOBJDUMP" ]; then  # triton (a dependency of the CUDA torch) bundles one
  CUOBJDUMP=$("$PY" -c "import triton, pathlib; print(pathlib.Path(triton.__file__).parent / 'backends/nvidia/bin/cuobjdump')")
fi
[ -x "$CUOBJDUMP" ] || fail "no cuobjdump (not on PATH, not in CUDA_HOME, not in triton)"
ELFS=$("$CUOBJDUMP" --list-elf "$SO") || fail "cuobjdump --list-elf $SO failed"
echo "$ELFS"
for sm in $WANT_SM; do
  echo "$ELFS" | grep -q "\.$sm\.cubin" || fail "no $sm cubin in $SO"
done
say "OK: $SO imports with with_cuda=True and holds $(echo $WANT_SM) cubins"
