#!/usr/bin/env bash
# The test suite (CPU, no GPU needed). Extra arguments go to pytest (e.g. -k masking, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
