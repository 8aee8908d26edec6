#!/usr/bin/env bash
# Create or refresh .venv with the pinned CPU environment and d2v installed in editable mode.
# Idempotent: re-installs only when requirements-dev.txt, pyproject.toml, setup.py or d2v/csrc/ changed
# (the editable install builds the C++ extension d2v._C from d2v/csrc/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# System packages behind the embedded speech and text defaults: espeak-ng (speech synthesis) and the
# Debian fortunes collection (English text). Installed with apt when missing and we may (root/sudo).
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ -f /usr/share/games/fortunes/computers ] || missing+=(fortunes)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "[setup] apt-get install ${missing[*]}"
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
      $SUDO apt-get update -q >/dev/null 2>&1 && \
      $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    echo "[setup] warning: cannot install ${missing[*]} (no apt-get or no root/sudo): the embedded" \
         "speech/text defaults need them; image runs and your own data work without" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.d2v-installed
want=$(cat requirements-dev.txt pyproject.toml setup.py d2v/csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (CPU torch) and d2v (editable)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
# a CUDA torch wheel on a machine without a GPU works (on CPU) but is a multi-GB download: say so
.venv/bin/python -c "
import torch, d2v
if torch.version.cuda is not None and not torch.cuda.is_available():
    print(f'[setup] note: torch {torch.__version__} is a CUDA build and this machine has no GPU; it runs on '
          'CPU. For the small CPU wheel: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and '
          'delete .venv')
"
