"""Image pipeline: folder scan, PIL decode + augmentation, per-item masks, collate.

Legend: S image side, M masks (clones) per sample, T = grid*grid patch tokens, B batch.

Determinism contract (exact resume, worker-independent results): `ImageFolderDataset.__getitem__`
takes a *virtual* index v = epoch * len(dataset) + i (what `ResumableBatchSampler` yields); item i
of epoch `epoch` draws ALL its randomness (crop, flip, then masks) from one `torch.Generator`
seeded with `derive_seed("item", seed, epoch, i)`, never from a global RNG. Plain indices
0..len-1 are simply epoch 0.

References: torchvision RandomResizedCrop semantics (area/log-ratio sampling, 10 tries, center-crop
fallback), MAE/data2vec 2.0 pretraining transforms (crop scale (0.2, 1.0), flip, ImageNet norm).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from d2v.data.common import (
    DecodeFailed,
    MaskFn,
    cat_masks,
    check_headers,
    check_items,
    decode_with_fallback,
    draw_mask,
    failed_paths,
    int64_column,
    scan_class_folders,
    split_virtual_index,
    warn_skipped,
)
from d2v.data.seed import derive_seed, seeded_generator
from d2v.log import get_logger
from d2v.masking import inverse_block_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "derive_seed",
    "scan_image_folder",
    "random_resized_crop_box",
    "ImageFolderDataset",
    "collate_images",
    "InverseBlockMaskFn",
    "make_inverse_block_mask_fn",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
)  # compared case-insensitively
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_TRIES = 10  # random-resized-crop attempts before the center-crop fallback
# files: show a progress bar for the start-up header check from this many. Measured roughly (this
# machine, warm page cache): PIL's lazy Image.open + size costs ~0.06-0.12 ms per PNG/JPEG, less
# than soundfile.info on audio (see audio.py, 1000 there); a cold cache or a network file system adds
# a read per file, ~1 ms. At ~1 ms per file, 2000 files take ~2 s, the most a check runs without a bar.
_PROGRESS_FROM = 2000

log = get_logger(__name__)


def is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS) and not path.name.startswith(".")


def scan_image_folder(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Scan an ImageFolder tree: returns (samples [(path, label)], classes), sorted and stable.

    If top-level subdirectories of `root` hold images (searched recursively), each such
    subdirectory is a class; loose images directly in `root` are then ignored with a warning. If
    there are no class subfolders, the images directly in `root` are returned with label -1 and
    `classes` is empty.

    `classes`: the class list to number by (label = position in it); by default the sorted names of
    the class subfolders. A test split passes the train split's list so that one class gets one label
    in both, even when the test split lacks a class; a class folder missing from the list is an error
    (its images could only be given a wrong label).

    Symlinks are followed once over the whole tree (see `walk_files`): a link from one class into
    another class or into `root` (e.g. `cats/loop -> ..`) lists nothing again."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    per_class, loose = scan_class_folders(root, is_image_file, log=log, warn_key="image-loose-files",
                                          noun="image(s)")
    if per_class:
        classes = [name for name, _ in per_class] if classes is None else list(classes)
        index = {name: k for k, name in enumerate(classes)}
        for name, _ in per_class:
            if name not in index:
                raise ValueError(
                    f"image folder {root / name}: class {name!r} is not in the train split's "
                    f"classes {classes}; a test split may only hold classes the train split has"
                )
        samples = [(p, index[name]) for name, files in per_class for p in files]
        return samples, classes
    if not loose:
        raise ValueError(
            f"no image files under {root} (accepted extensions, case-insensitive: "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    return [(p, -1) for p in loose], []


def _failure(path: Path, e: Exception) -> str:
    """Why PIL failed on `path`: "file not found" (deleted since the scan, or a broken link), else the
    exception (PIL raises UnidentifiedImageError, OSError, SyntaxError, ...)."""
    return "file not found" if not os.path.exists(path) else f"{type(e).__name__}: {e}"


def _check_header(path: Path) -> str | None:
    """Open only the header (PIL is lazy); return None if it looks like an image, else a reason."""
    try:
        with Image.open(path) as im:
            w, h = im.size
        if w <= 0 or h <= 0:
            return f"empty image size {w}x{h}"
    except Exception as e:
        return _failure(path, e)
    return None


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _decode_rgb(path: Path) -> Image.Image:
    """Fully decode `path` as RGB (raises on truncated or corrupt pixel data).

    16-bit grayscale (mode I;16, e.g. 16-bit PNG) is scaled to 8 bit (value >> 8) first: PIL's own
    conversion clips every value above 255, which turns almost the whole image white."""
    with Image.open(path) as im:
        im.load()
        if im.mode in _MODES_16BIT:
            gray = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)  # (H, W)
            return Image.fromarray(gray, mode="L").convert("RGB")
        return im.convert("RGB")


def center_square(img: Image.Image, size: int) -> Image.Image:
    """The eval view: resize the shorter side to `size`, then center-crop size x size (done as one
    bicubic resampling of the centered min(W, H) square: same geometry)."""
    W, H = img.size
    side = min(W, H)
    left, top = (W - side) / 2.0, (H - side) / 2.0
    return img.resize((size, size), resample=Image.Resampling.BICUBIC,
                      box=(left, top, left + side, top + side))


def to_normalized_tensor(img: Image.Image, mean_311: torch.Tensor, std_311: torch.Tensor) -> torch.Tensor:
    """PIL RGB (S, S) -> float32 (3, S, S), (x / 255 - mean) / std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3) in [0, 1]
    x = torch.from_numpy(arr).permute(2, 0, 1)  # (3, S, S)
    return ((x - mean_311) / std_311).contiguous()


def eval_image(path: Path, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Decode `path` and give its eval view, normalized -> float32 (3, size, size) (the probe's and
    `d2v embed`'s input); raises on an undecodable file."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return to_normalized_tensor(center_square(_decode_rgb(path), size), m, s)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, n: int) -> int:
    """Uniform int in [0, n)."""
    return int(torch.randint(0, n, (1,), generator=g))


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop box as PIL (left, top, right, bottom)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(g, height - h + 1)
            left = _randint(g, width - w + 1)
            return left, top, left + w, top + h
    # fallback: the largest center crop whose aspect ratio is clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageFolder dataset with PIL decoding, MAE-style augmentation and optional per-item masks.

    Item (see module docstring for indexing/determinism):
      {"image": float (3, S, S) normalized, "label": int (-1 if unlabeled),
       "index": int dataset index actually loaded (after any fallback),
       "bad": list[str] paths that failed to decode for this item,
       "mask": bool (M, T) from mask_fn(generator), only when mask_fn is given}

    `classes`: the class list labels number (see `scan_image_folder`); give a test split the train
    split's `classes` so both number the same class the same way.

    Start-up (`check_files`): files whose header PIL cannot read are excluded, listed in `bad_files`
    [(path, reason)] and named in one warning (once per folder per process, on the "d2v" logger). A
    file that passes the header but fails to decode is named in a warning once per process and the
    item comes from the next index; DataDecodeError after MAX_DECODE_TRIES (d2v.data.common)
    consecutive failures."""

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        train: bool = True,
        crop_scale: Sequence[float] = (0.2, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        mask_fn: MaskFn | None = None,
        check_files: bool = True,
        classes: Sequence[str] | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"ImageFolderDataset: image_size must be >= 1, got {image_size}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"ImageFolderDataset: crop_scale must be (lo, hi) with 0 < lo <= hi "
                             f"<= 1, got {tuple(crop_scale)}")
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"ImageFolderDataset: crop_ratio must be (lo, hi) with 0 < lo <= hi, "
                             f"got {tuple(crop_ratio)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"ImageFolderDataset: mean/std must have 3 entries with std > 0, got "
                             f"mean={tuple(mean)} std={tuple(std)}")
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.train = train
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.seed = int(seed)
        self.mask_fn = mask_fn
        self.bad_files: list[tuple[str, str]] = []

        samples, self._classes = scan_image_folder(self.root, classes)
        if check_files:
            checked = check_headers([p for p, _ in samples], lambda p: (None, _check_header(p)),
                                    root=self.root, progress_from=_PROGRESS_FROM)
            self.bad_files = checked.bad
            if not checked.kept:
                p, why = self.bad_files[0]
                raise ValueError(f"no readable images under {self.root}: {len(self.bad_files)} "
                                 f"files failed, e.g. {p}: {why}")
            warn_skipped(log, "image-unreadable-files", self.root, self.bad_files,
                         "unreadable image file(s)")
            samples = [samples[k] for k in checked.kept]
        self._samples = samples

    # ---- metadata -------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return list(self._samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self._samples]

    def __len__(self) -> int:
        return len(self._samples)

    # ---- items ----------------------------------------------------------------------------
    def item_generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator that drives every random draw of item `index` in `epoch`."""
        return seeded_generator("item", self.seed, epoch, index)

    def _transform(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        """PIL RGB image -> normalized float (3, S, S)."""
        S = self.image_size
        W, H = img.size
        if self.train:
            box = random_resized_crop_box(W, H, self.crop_scale, self.crop_ratio, g)
            img = img.resize((S, S), resample=Image.Resampling.BICUBIC, box=box)
            if self.hflip and _uniform(g, 0.0, 1.0) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = center_square(img, S)
        return to_normalized_tensor(img, self.mean, self.std)

    def _decode(self, j: int) -> Image.Image:
        """Entry j decoded as RGB; DecodeFailed for truncated / corrupt pixel data behind a valid header."""
        path = self._samples[j][0]
        try:
            return _decode_rgb(path)
        except Exception as e:
            reason = _failure(path, e)
            raise DecodeFailed(str(path), f"{path}: failed to decode ({reason})",
                               f"{path}: {reason}") from None

    def _all_failed(self, i: int, tries: int, reasons: str) -> str:
        return (f"ImageFolderDataset: {self.root}: {tries} consecutive images (of {len(self)}) failed to "
                f"decode, from index {i}: they pass the start-up header check but their pixel data cannot "
                f"be decoded (corrupt or truncated files?); first reasons: {reasons}")

    def __getitem__(self, v: int) -> dict[str, Any]:
        epoch, i = split_virtual_index(v, len(self._samples), "ImageFolderDataset")
        g = self.item_generator(epoch, i)
        j, img, bad = decode_with_fallback(len(self._samples), i, self._decode, log=log,
                                           warn_key="image-decode-failed",
                                           give_up=lambda tries, reasons: self._all_failed(i, tries, reasons))
        item: dict[str, Any] = {
            "image": self._transform(img, g),  # (3, S, S)
            "label": int(self._samples[j][1]),
            "index": j,
            "bad": bad,
        }
        if self.mask_fn is not None:
            item["mask"] = draw_mask(self.mask_fn, g, "ImageFolderDataset")  # (M, T), after the augmentation
        return item


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: image (B, 3, S, S), label/index int64 (B,), mask (B*M, T) bool sample-major
    (rows b*M .. b*M+M-1 belong to sample b), bad = flat list of failed paths."""
    check_items(items, "collate_images")
    out: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),  # (B, 3, S, S)
        "label": int64_column(items, "label"),  # (B,)
        "index": int64_column(items, "index"),  # (B,)
        "bad": failed_paths(items),
    }
    mask = cat_masks(items, "collate_images")  # (B*M, T) or None
    if mask is not None:
        out["mask"] = mask
    return out


class InverseBlockMaskFn:
    """Picklable per-item mask maker: generator -> bool (clone_batch, grid*grid), True = masked.
    Its settings are the config's (model.grid, masking.*), validated there: grid and clone_batch
    >= 1; inverse_block_mask checks mask_prob and mask_length when called."""

    def __init__(self, grid: int, clone_batch: int, mask_prob: float, mask_length: int,
                 adjust: float) -> None:
        self.grid = int(grid)
        self.clone_batch = int(clone_batch)
        self.mask_prob = float(mask_prob)
        self.mask_length = int(mask_length)
        self.adjust = float(adjust)

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        return inverse_block_mask(
            self.clone_batch, self.grid, self.grid, mask_prob=self.mask_prob,
            mask_length=self.mask_length, adjust=self.adjust, generator=generator,
        )  # (M, T)

    def __repr__(self) -> str:
        return (f"InverseBlockMaskFn(grid={self.grid}, clone_batch={self.clone_batch}, "
                f"mask_prob={self.mask_prob}, mask_length={self.mask_length}, "
                f"adjust={self.adjust})")


def make_inverse_block_mask_fn(grid: int, clone_batch: int, mask_prob: float, mask_length: int,
                               adjust: float) -> InverseBlockMaskFn:
    """data2vec 2.0 image masks for `ImageFolderDataset(mask_fn=...)`: M=clone_batch, T=grid**2."""
    return InverseBlockMaskFn(grid, clone_batch, mask_prob, mask_length, adjust)
