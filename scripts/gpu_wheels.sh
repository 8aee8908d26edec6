#!/usr/bin/env bash
# Fetch, on this machine, the Python wheels that the lent GPU machine lacks, into .whl/ (ignored by git).
#
# Why: the lent H100/H200 machine reaches no package registry. Its image (Python 3.12, torch 2.11+cu130,
# triton 3.6) has most of what d2v needs, but not deepspeed (the ZeRO engine and its tests) nor soundfile
# (the audio loader, imported by the data tests), nor their own needs that the image lacks (pydantic and
# its parts, hjson, cffi, pycparser). scripts/gpu_check.sh installs exactly these from .whl/ with
# `pip install --no-index --no-deps --target /tmp/site`, so each name appears once and every version is
# pinned here, to the versions the CPU development environment (requirements-dev.txt) runs.
#
# Binary wheels are downloaded for CPython 3.12 on manylinux x86-64 (the device machine), whatever this
# machine runs. deepspeed has no wheel on the registry (source only): it is built here as a pure-Python
# wheel with DS_BUILD_OPS=0 (its CUDA ops are JIT-built when used, never at install), with the torch of
# the project's .venv on the build path (--no-build-isolation: an isolated build would download torch).
#
# Run:  bash scripts/gpu_wheels.sh           (then carry `.whl` in the device call; see benchmarks/README.md)
# The total must stay well under the device call's 64 MiB limit on what travels (tree + carried paths).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="$ROOT/.whl"
LIMIT_MIB="${GPU_WHEELS_LIMIT_MIB:-40}"

# binary (or pure-Python) wheels the registry has for cp312 / manylinux x86-64
BINARY=(
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 hjson==3.1.0
)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
# source-only on the registry: build a pure-Python wheel (no compiled ops)
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"

# the device installs every .whl/*.whl at once: a name twice would stop the whole install
dups="$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [ -n "$dups" ]; then
  echo "gpu_wheels: more than one wheel of: $dups" >&2
  exit 1
fi
# a pure-Python deepspeed wheel must not carry a compiled op built against this machine's torch
ds="$(ls "$DEST"/deepspeed-*.whl)"
case "$(basename "$ds")" in *-py3-none-any.whl) ;; *) echo "gpu_wheels: $ds is not a pure-Python wheel" >&2; exit 1;; esac

ls -l "$DEST"
total_kib="$(du -sk "$DEST" | cut -f1)"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((total_kib / 1024)) MiB in $DEST"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "gpu_wheels: over the ${LIMIT_MIB} MiB budget (the device call carries at most 64 MiB with the tree)" >&2
  exit 1
fi
