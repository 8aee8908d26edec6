"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, upscaled to 32x32 PNGs.

It needs no network (the 1797 digits ship inside scikit-learn) and is prepared once on first use
into an ImageFolder tree that `d2v.data.images.ImageFolderDataset` reads like any other folder:

    <cache>/digits32/READY                      json counts, written last
    <cache>/digits32/train/<label>/<index:04d>.png   1000 images
    <cache>/digits32/test/<label>/<index:04d>.png     797 images

`<index>` is the row of `sklearn.datasets.load_digits()`. The split is fixed:
`perm = numpy.random.RandomState(0).permutation(1797)`, perm[:1000] = train, perm[1000:] = test.
Preparation is atomic (build in a temp dir next to the target, then `os.replace`), idempotent, and
safe when several processes race: the first finished tree wins, the others discard theirs.

References: sklearn.datasets.load_digits (UCI optical recognition of handwritten digits).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from d2v.data.common import READY, build_then_rename

__all__ = [
    "DIGITS32_MEAN",
    "DIGITS32_STD",
    "DIGITS32_NUM_TRAIN",
    "DIGITS32_NUM_TEST",
    "default_cache_dir",
    "prepare_digits",
]

DIGITS32_DIRNAME = "digits32"
DIGITS32_SIZE = 32  # output side in pixels (8x8 source upscaled bilinearly)
DIGITS32_NUM_TRAIN = 1000
DIGITS32_NUM_TEST = 797  # 1797 - 1000
DIGITS32_SPLIT_SEED = 0  # numpy RandomState seed of the fixed train/test permutation

# Per-channel mean/std in [0, 1] units of the TRAIN split as the pipeline sees it: every train PNG
# decoded with PIL `.convert("RGB")`, divided by 255, then mean and population std (ddof=0) over all
# pixels of all 1000 images (the PNGs are grayscale, so the three channels are identical).
# Recomputed from the prepared files by tests/test_data.py::test_digits_stats_constant (tol 1e-3).
DIGITS32_MEAN: tuple[float, float, float] = (0.30536, 0.30536, 0.30536)
DIGITS32_STD: tuple[float, float, float] = (0.32247, 0.32247, 0.32247)


def default_cache_dir() -> Path:
    """`$D2V_CACHE` if set (and non-empty), else `~/.cache/d2v`."""
    env = os.environ.get("D2V_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "d2v"


def _write_split_tree(tmp_root: Path) -> dict[str, int]:
    """Write train/ and test/ PNG trees under `tmp_root`; return the counts written."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images  # (1797, 8, 8) float64 in 0..16
    targets = digits.target  # (1797,) int in 0..9
    n = images.shape[0]
    if n != DIGITS32_NUM_TRAIN + DIGITS32_NUM_TEST:
        raise RuntimeError(
            f"embedded.py: sklearn load_digits() returned {n} images, expected "
            f"{DIGITS32_NUM_TRAIN + DIGITS32_NUM_TEST}"
        )
    pixels_u8 = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    perm = np.random.RandomState(DIGITS32_SPLIT_SEED).permutation(n)  # (N,)
    splits = {"train": perm[:DIGITS32_NUM_TRAIN], "test": perm[DIGITS32_NUM_TRAIN:]}
    counts: dict[str, int] = {}
    for split, rows in splits.items():
        for label in range(10):
            (tmp_root / split / str(label)).mkdir(parents=True, exist_ok=True)
        for idx in rows.tolist():
            img = Image.fromarray(pixels_u8[idx], mode="L")
            img = img.resize((DIGITS32_SIZE, DIGITS32_SIZE), resample=Image.Resampling.BILINEAR)
            img.save(tmp_root / split / str(int(targets[idx])) / f"{idx:04d}.png")
        counts[split] = len(rows)
    return counts


def prepare_digits(cache_dir: Path | str | None = None) -> Path:
    """Build `<cache_dir>/digits32` once (see module docstring) and return that root.

    If the READY marker exists the call returns at once. Otherwise the tree is built in a sibling
    temp dir, the marker is written last, and the dir is renamed into place; if another process
    finished first, our copy is discarded and theirs is used."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / DIGITS32_DIRNAME
    if (final / READY).is_file():
        return final
    if final.exists():
        raise RuntimeError(
            f"embedded.py: {final} exists but has no {READY} marker (not written by "
            f"prepare_digits, or damaged); delete it and call prepare_digits again"
        )
    build_then_rename(final, lambda tmp: {**_write_split_tree(tmp), "classes": 10},
                      is_complete=lambda root: (root / READY).is_file(), indent=None)
    return final
