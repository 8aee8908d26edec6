#!/usr/bin/env bash
# One command for a freshly lent H100/H200 (the device tool's `run`): install, build the CUDA extension,
# test, check parity at the model's real call sites, and benchmark, inside one lease.
#
# Why one script: a lent machine starts bare, reaches no package registry, and the whole session has
# about 15 minutes of device time, machine start included. So everything that needs the GPU runs in one
# call with a hard cap (default 465 s, under 8 minutes); every step has its own time limit and its own
# log, a failing step does not stop the ones after it, and the summary is printed last (the reply carries
# the end of the output) and written to $OUT/summary.txt.
#
# Steps (GPU_CHECK_STEPS or --steps picks a subset, comma- or space-separated; default all):
#   env       nvidia-smi, GPU name, python/torch/triton/nvcc versions, git sha
#   install   the carried wheels in .whl/ (deepspeed, soundfile and their needs, which the image lacks:
#             scripts/gpu_wheels.sh fetches them) into /tmp/site + PYTHONPATH; d2v in editable mode
#             (always run before any later step)
#   build     d2v._C with its CUDA kernel (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), then d2v.ops.backend();
#             runs in the background while `parity` checks the Triton ops
#   parity    scripts/gpu_parity.py: fused ops vs float64 at the real shapes and strides (the EMA part runs
#             after the build, so the extension's EMA is checked too)
#   tests     pytest -m gpu tests, and the kernel tests (tests/kernels) on CUDA tensors, side by side
#   kernels   bench_masked_gather / bench_build_targets / bench_ema: GB/s and % of the copy bandwidth
#             measured in the same run, each provider checked against the reference before timing
#   train     bench_train_step.py on the base image recipe: d2v, no_fused_ops, ref_eager_2.0, d2v1
#   compile   bench_train_step.py: d2v and compile (skipped when the script has no `compile` variant)
# The timing steps (kernels, train, compile) run alone; the others overlap where they do not time.
#
# Output ($OUT, at most 8 files come back from the device): summary.txt, results.md (the parity, kernel
# and train-step tables), parity.csv, kernels.csv, train_step.csv, env.txt, logs.tar.gz (every step's log,
# the plots, everything else). They are refreshed after every step, so a run cut short still returns what
# it had.
#
# Dry run on a CPU machine (GPU_CHECK_DRY=1 or --dry-run): the same steps at tiny sizes where possible:
# the wheels installed for Python 3.12 into a scratch folder (proves the set installs), no editable
# install and no nvcc build, parity under Triton's interpreter (--small), the GPU tests (all skipped
# there) and the kernel tests collected only, the benchmarks with --quick. OUT defaults to
# /tmp/gpu_check_dry.
#
# The git sha: from D2V_GIT_SHA, else git, else .whl/git_sha.txt (the device's copy of the tree may carry
# no .git: run `scripts/gpu_check.sh --stamp` here just before the device call to write that file).
#
# Usage (device): bash scripts/gpu_check.sh          (benchmarks/README.md has the exact `run` call)
#        (here):   bash scripts/gpu_check.sh --dry-run
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY="${GPU_CHECK_DRY:-0}"
STEPS="${GPU_CHECK_STEPS:-}"
STAMP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stamp) STAMP=1 ;;
    --steps) STEPS="$2"; shift ;;
    --steps=*) STEPS="${1#--steps=}" ;;
    --budget) GPU_CHECK_BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$STAMP" = 1 ]; then  # record the sha for a tree copy without .git (run here, before the device call)
  mkdir -p .whl
  sha="$(git rev-parse --short=10 HEAD)" || exit 1
  [ -n "$(git status --porcelain --untracked-files=normal)" ] && sha="$sha-dirty"
  echo "$sha" > .whl/git_sha.txt
  echo "gpu_check: wrote $sha to .whl/git_sha.txt"
  exit 0
fi

ALL_STEPS="env install build parity tests kernels train compile"
STEPS="$(echo "${STEPS:-$ALL_STEPS}" | tr ',' ' ')"
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  OUT="${OUT:-/tmp/gpu_check_dry}"
  BUDGET="${GPU_CHECK_BUDGET:-1500}"  # 2 shared cores: the same plumbing, slower
else
  PY="${PYTHON:-python3}"
  OUT="${OUT:-/tmp/gpu_check_out}"
  BUDGET="${GPU_CHECK_BUDGET:-465}"
fi
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
rm -rf "$WORK"
mkdir -p "$WORK/bench" "$WORK/parity" "$OUT"
export D2V_BENCH_RESULTS="$WORK/bench"
RESERVE=12   # seconds kept for the summary and the last copy into $OUT
START=$SECONDS
STATUS="$WORK/steps.tsv"
: > "$STATUS"

# git sha for every stamped row (benchmarks/common.py and gpu_parity.py read D2V_GIT_SHA without .git)
if [ -z "${D2V_GIT_SHA:-}" ]; then
  if sha="$(git rev-parse --short=10 HEAD 2>/dev/null)"; then
    [ -n "$(git status --porcelain --untracked-files=normal 2>/dev/null)" ] && sha="$sha-dirty"
    D2V_GIT_SHA="$sha"
  elif [ -f .whl/git_sha.txt ]; then
    D2V_GIT_SHA="$(head -n1 .whl/git_sha.txt)"
  else
    D2V_GIT_SHA="unknown"
  fi
fi
export D2V_GIT_SHA

if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DRY" != 1 ]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    # the toolkit root behind the nvcc on PATH (torch's own guess can stop at a symlink's folder)
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME
  fi
fi
export ROOT PY DRY WORK OUT

# ------------------------------------------------------------------------------------------ plumbing
left() { echo $(( BUDGET - (SECONDS - START) - RESERVE )); }

publish() {
  # keep $OUT at most 8 files, each refreshed from the scratch folder (a run cut short keeps them)
  [ -f "$WORK/env.log" ] && cp -f "$WORK/env.log" "$OUT/env.txt"
  [ -f "$WORK/parity/parity.csv" ] && cp -f "$WORK/parity/parity.csv" "$OUT/parity.csv"
  [ -f "$WORK/bench/kernels.csv" ] && cp -f "$WORK/bench/kernels.csv" "$OUT/kernels.csv"
  [ -f "$WORK/bench/train_step.csv" ] && cp -f "$WORK/bench/train_step.csv" "$OUT/train_step.csv"
  cat "$WORK/parity/parity.md" "$WORK/bench/kernels.md" "$WORK/bench/train_step.md" 2>/dev/null > "$OUT/results.md"
  [ -f "$WORK/summary.txt" ] && cp -f "$WORK/summary.txt" "$OUT/summary.txt"
  # steps running in the background may be writing their logs: tar's "file changed" (status 1) is fine
  tar czf "$OUT/logs.tar.gz.tmp" --warning=no-file-changed --exclude=./site -C "$WORK" . 2>/dev/null
  [ $? -le 1 ] && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  rm -f "$OUT/logs.tar.gz.tmp"
}

declare -A PIDS
start_step() {  # start_step NAME CAP_SECONDS FUNCTION: run FUNCTION in the background under its limit
  local name="$1" cap="$2" fn="$3" t
  [ "$DRY" = 1 ] && cap=$(( cap * 3 ))  # a dry run: the interpreter on 2 shared cores, not 16 free ones
  t="$(left)"
  [ "$cap" -lt "$t" ] && t="$cap"
  if [ "$t" -lt 5 ]; then
    echo "skip 0 0" > "$WORK/$name.rc"
    echo "no time left in the ${BUDGET} s budget" > "$WORK/$name.log"
    PIDS[$name]=""
    return
  fi
  echo "=== [$name] start, limit ${t} s, $(( SECONDS - START )) s into the run"
  (
    s=$SECONDS
    timeout -k 5 "$t" bash -c "$fn" > "$WORK/$name.log" 2>&1
    echo "$? $(( SECONDS - s )) $t" > "$WORK/$name.rc"
  ) &
  PIDS[$name]=$!
}

finish_step() {  # finish_step NAME: wait for it, record its status line, show the end of its log
  local name="$1" rc secs t st
  [ -n "${PIDS[$name]:-}" ] && wait "${PIDS[$name]}"
  read -r rc secs t < "$WORK/$name.rc" || { rc=1; secs=0; t=0; }
  case "$rc" in
    0) st=ok ;;
    skip) st=SKIPPED ;;
    124|137) st=TIMEOUT ;;
    *) st="FAIL(rc=$rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$secs" "$t" >> "$STATUS"
  echo "=== [$name] $st in ${secs} s (limit ${t} s); last lines of $name.log:"
  tail -n 8 "$WORK/$name.log" | cut -c1-240
  publish
}

run_step() { start_step "$1" "$2" "$3"; finish_step "$1"; }

# ------------------------------------------------------------------------------------------ steps
step_env() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)  dry run: $DRY"
  echo "git sha: $D2V_GIT_SHA"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
      --format=csv
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  "$PY" - <<'EOF'
import platform, sys, sysconfig, os
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:
    print(f"triton: not importable ({type(e).__name__}: {e})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name(0)}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("GPU: none visible to torch")
inc = sysconfig.get_paths()["include"]
print(f"Python.h: {'present' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING'} in {inc}")
EOF
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  echo "CUDA_HOME=${CUDA_HOME:-unset}  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
  gcc --version 2>/dev/null | head -n 1
  free -g 2>/dev/null | head -n 2
  df -h /tmp 2>/dev/null | tail -n 1
}

step_install() {
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
  done
  if ls .whl/*.whl >/dev/null 2>&1; then
    ls -l .whl/
    if [ "$DRY" = 1 ]; then
      # the device's exact wheel set, installed for CPython 3.12 on manylinux into a scratch folder
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        --python-version 3.12 --implementation cp --only-binary=:all: "${plat[@]}" .whl/*.whl || return 1
      echo "dry run: the $(ls .whl/*.whl | wc -l) wheels install for CPython 3.12 (into $WORK/site, not used)"
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || return 1
    fi
  else
    echo "no .whl/*.whl: nothing carried (scripts/gpu_wheels.sh fetches them; carry .whl in the device call)"
  fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: not installing d2v (would run: D2V_SKIP_EXT=1 $PY -m pip install --no-index --no-deps" \
         "--no-build-isolation -e .)"
  else
    # the package first, without the extension: parity can start while `build` compiles d2v._C in place
    D2V_SKIP_EXT=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  "$PY" - <<'EOF'
import importlib
bad = []
for name in ("d2v", "d2v.kernels", "d2v.ops", "deepspeed", "soundfile", "pydantic", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"import {name}: ok {getattr(m, '__version__', '')}")
    except Exception as e:
        bad.append(name)
        print(f"import {name}: FAILED {type(e).__name__}: {e}")
raise SystemExit(1 if bad else 0)
EOF
}

step_build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: no nvcc build (would run: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace)"
  else
    # torch includes cuBLAS/cuSPARSE headers; a toolkit without them can borrow the pip nvidia packages'
    local inc
    inc="$("$PY" -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(h) for p in nvidia.__path__ for h in glob.glob(os.path.join(p, '*', 'include', 'cusparse.h')) + glob.glob(os.path.join(p, '*', 'include', 'cublas_v2.h'))})))" 2>/dev/null)"
    [ -n "$inc" ] && export CPATH="${CPATH:+$CPATH:}$inc"
    echo "CUDA_HOME=${CUDA_HOME:-unset} CPATH=${CPATH:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" - <<'EOF'
import json, os
import torch
from d2v import _ext, ops
mod, why = _ext.load()
print(f"d2v._C: {why}")
print("d2v.ops.backend():")
print(json.dumps(ops.backend(), indent=1))
if torch.cuda.is_available() and not (mod is not None and mod.with_cuda):
    raise SystemExit("d2v._C has no CUDA kernel on a GPU machine: the CUDA build failed (see above)")
EOF
}

step_parity() {
  if [ "$DRY" = 1 ]; then
    "$PY" scripts/gpu_parity.py --small --skip ema --out "$WORK/parity"
  else
    "$PY" scripts/gpu_parity.py --skip ema --out "$WORK/parity"
  fi
}

step_parity_ema() {
  local small=""
  [ "$DRY" = 1 ] && small="--small"
  "$PY" scripts/gpu_parity.py $small --skip gather,targets,build --append --out "$WORK/parity"
}

step_tests_gpu() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
  "$PY" -m pytest -q -p no:cacheprovider -ra -m gpu "${extra[@]}" tests
}

step_tests_kernels() {
  local kt=tests/kernels extra=()
  [ -d "$kt" ] || kt=tests/test_kernels.py
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider --collect-only -m "not gpu" "$kt" | tail -n 3
    return "${PIPESTATUS[0]}"
  fi
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 6)
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  "$PY" -m pytest -q -p no:cacheprovider -ra -m "not gpu" "${extra[@]}" "$kt"
}

bench_args() { if [ "$DRY" = 1 ]; then echo "--quick"; else echo "--no-compile"; fi; }
step_bench_gather() { "$PY" benchmarks/bench_masked_gather.py $(bench_args); }
step_bench_targets() { "$PY" benchmarks/bench_build_targets.py $(bench_args); }
step_bench_ema() { "$PY" benchmarks/bench_ema.py $(bench_args); }

train_args() {
  if [ "$DRY" = 1 ]; then
    echo "--quick --modalities image"
  else  # shortened burn-in and repeats: the lease is short (defaults 10 warmup, 5 x 10 steps)
    echo "--flavors base --modalities image --warmup 3 --repeats 3 --steps 5"
  fi
}
step_train() {
  "$PY" benchmarks/bench_train_step.py $(train_args) --variants d2v no_fused_ops ref_eager_2.0 d2v1
}
step_train_compile() {
  # its own invocation: bench_train_step writes its rows at the end, and a compile that outlives the
  # budget must not take the other variants' rows with it; d2v again as the speed-up reference
  if ! "$PY" -c "import sys; sys.path.insert(0, '.'); from benchmarks.bench_train_step import VARIANTS; sys.exit('compile' not in VARIANTS)"; then
    echo "bench_train_step.py has no 'compile' variant yet: not run"
    return 0
  fi
  "$PY" benchmarks/bench_train_step.py $(train_args) --variants d2v compile
}
export -f step_env step_install step_build step_parity step_parity_ema step_tests_gpu step_tests_kernels \
  bench_args step_bench_gather step_bench_targets step_bench_ema train_args step_train step_train_compile

# ------------------------------------------------------------------------------------------ run
echo "gpu_check: steps [$STEPS], budget ${BUDGET} s, dry run $DRY, OUT=$OUT, scratch $WORK, sha $D2V_GIT_SHA"
run_step env 40 step_env  # always: cheap, and the summary names the GPU and versions from it
if [ -n "$(echo " $STEPS " | sed 's/ env / /g' | tr -d ' ')" ]; then  # every later step needs the wheels and the package
  run_step install 120 step_install
  if [ "$DRY" != 1 ] && ! "$PY" -c "import d2v.kernels" >/dev/null 2>&1; then
    # no editable install (an old setuptools, say): d2v.kernels is the folder kernels/ (setup.py's
    # package_dir), so link it into the package and import from the tree
    echo "gpu_check: d2v.kernels not importable after the install; linking kernels/ into d2v/ and using the tree"
    ln -sfn ../kernels d2v/kernels
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
want build && start_step build 300 step_build
want parity && run_step parity 200 step_parity
want build && finish_step build
if want tests; then
  start_step tests_gpu 150 step_tests_gpu
  start_step tests_kernels 150 step_tests_kernels
fi
want parity && run_step parity_ema 90 step_parity_ema
if want tests; then
  finish_step tests_gpu
  finish_step tests_kernels
fi
# timing from here on: one step at a time, nothing else running
if want kernels; then
  run_step bench_gather 90 step_bench_gather
  run_step bench_targets 90 step_bench_targets
  run_step bench_ema 90 step_bench_ema
fi
want train && run_step train 220 step_train
want compile && run_step train_compile 600 step_train_compile

# ------------------------------------------------------------------------------------------ summary
"$PY" - "$WORK" "$BUDGET" "$(( SECONDS - START ))" > "$WORK/summary.txt" 2>&1 <<'EOF'
import csv, re, sys
from pathlib import Path

work, budget, used = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = []
say = out.append


def log(name):
    p = work / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def rows(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


env = log("env")
gpu = re.search(r"^GPU: (.*)$", env, re.M)
ver = [m.group(0) for m in re.finditer(r"^(python|torch|triton) .*$", env, re.M)]
nvcc = re.search(r"release [0-9.]+", env)
sha = re.search(r"^git sha: (.*)$", env, re.M)
say(f"gpu_check summary: {used} s of a {budget} s budget")
say(f"GPU: {gpu.group(1) if gpu else '?'}; " + "; ".join(v.split(' at ')[0] for v in ver)
    + f"; nvcc {nvcc.group(0) if nvcc else 'not found'}; git {sha.group(1) if sha else '?'}")
say("")
say("steps:")
for line in (work / "steps.tsv").read_text().splitlines():
    name, st, secs, lim = line.split("\t")
    detail = ""
    text = log(name)
    if name.startswith("tests"):
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$", text, re.M)
        m = m or re.findall(r"^(\d+(?:/\d+)? tests? collected.*|no tests ran.*)$", text, re.M)
        detail = m[-1] if m else ""
    elif name.startswith("parity"):
        m = re.findall(r"^parity: .*$", text, re.M)
        detail = m[-1] if m else ""
    elif name == "build":
        m = re.search(r"^d2v\._C: (.*)$", text, re.M)
        detail = m.group(1) if m else ""
    elif name == "install":
        bad = re.findall(r"^import (\S+): FAILED", text, re.M)
        detail = f"imports failed: {', '.join(bad)}" if bad else ""
    elif name == "train_compile" and "no 'compile' variant" in text:
        st, detail = "SKIPPED", "bench_train_step.py has no 'compile' variant"
    if st.startswith(("FAIL", "TIMEOUT")) and not detail:
        tail = [l for l in text.splitlines() if l.strip()]
        detail = tail[-1][:160] if tail else ""
    say(f"  {name:<14} {st:<12} {secs:>4} s / {lim:>3} s  {detail}")

bt = log("build")
m = re.search(r"d2v\.ops\.backend\(\):\s*(\{.*?\n\})", bt, re.S)
if m:
    import json
    try:
        be = json.loads(m.group(1))
        say("")
        say("d2v.ops.backend(): " + ", ".join(f"{k}={v['impl']}/{v['variant']}" for k, v in be.items()))
    except ValueError:
        pass

par = rows(work / "parity" / "parity.csv")
if par:
    bad = [r for r in par if r["status"] != "ok"]
    say("")
    say(f"parity: {len(par)} checks, {len(bad)} failed or errored")
    for r in bad[:12]:
        say(f"  {r['status']} {r['case']} {r['site']} {r['op']} {r['impl']} {r['dtype']}: rel {r['rel_err']} "
            f"(budget {r['budget']}) nonfinite {r['nonfinite']} off-band {r['outside_band']} {r['note'][:100]}")

kr = rows(work / "bench" / "kernels.csv")
if kr:
    say("")
    copy = sorted({r["copy_gbps"] for r in kr})
    say(f"fused ops, % of the copy bandwidth measured in the same run ({', '.join(copy)} GB/s); target >= 85%:")
    for r in kr:
        if not r["provider"].startswith("d2v"):
            continue
        pct = r["pct_copy_bw"]
        mark = "WRONG" if r["ms_median"] == "nan" else ("ok" if float(pct) >= 85 else "below")
        say(f"  {r['bench']:<14} {r['case']:<18} {r['provider']:<24} {r['impl']:<8} {r['gbps']:>9} GB/s "
            f"{pct:>6}%  {mark}  x{r['speedup_vs_eager'] or '-'} vs eager")
    wrong = [r for r in kr if r["ms_median"] == "nan"]
    if wrong:
        say(f"  {len(wrong)} provider(s) failed the pre-timing check (not timed)")

tr = rows(work / "bench" / "train_step.csv")
if tr:
    say("")
    say("train step (views/s; d2v_speedup = d2v views/s / row's, per invocation); targets on the base image: "
        ">= 2x ref_eager_2.0, >= 8x d2v1, MFU reported (aim >= 40% bf16 with compile):")
    for r in tr:
        target = {"ref_eager_2.0": 2.0, "d2v1": 8.0}.get(r["variant"])
        mark = ""
        if target is not None:
            try:
                mark = "ok" if float(r["d2v_speedup"]) >= target else f"below {target:g}x"
            except ValueError:
                mark = "?"
        mfu = r.get("mfu", "")
        say(f"  {r['modality']}/{r['flavor']} {r['variant']:<14} {r['views_per_s']:>10} views/s  {r['ms_median']:>9} ms/step  "
            f"x{r['d2v_speedup']:<6} mfu {mfu or '-':<6} {r['precision']:<5} {mark}  {r['note'][:80]}")

say("")
say("files: summary.txt, results.md (tables), parity.csv, kernels.csv, train_step.csv, env.txt, "
    "logs.tar.gz (all logs and plots)")
print("\n".join(out))
EOF
publish
echo
echo "=================================================================================================="
cat "$WORK/summary.txt"
# non-zero when a step failed or timed out (skipped steps do not count)
if grep -qE $'\t(FAIL|TIMEOUT)' "$STATUS"; then exit 1; fi
exit 0
