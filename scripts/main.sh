#!/usr/bin/env bash
# The main job: pretrain the tiny data2vec 2.0 ViT on the embedded digits, then the linear probe.
# Extra arguments go to `d2v pretrain` (e.g. train.max_steps=300 or data.path=/my/images).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --resume: a second run continues (or, when finished, just re-probes) runs/tiny_image instead of
# refusing to overwrite it
# (--resume goes last: it takes an optional folder, so an override after it would be read as one)
exec .venv/bin/d2v pretrain --config configs/tiny_image.yaml "$@" --resume
