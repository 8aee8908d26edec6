"""Build datasets and loaders from the config: the pretraining stream and the labelled probe splits.

`data.path: null` selects the embedded default (sklearn's real handwritten digits, prepared as PNG
files on first use); any other path is an image folder (class subfolders optional).
"""
from __future__ import annotations

from pathlib import Path

from d2v.config import Config
from d2v.data.embedded import DIGITS32_MEAN, DIGITS32_STD, prepare_digits
from d2v.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, make_inverse_block_mask_fn
from d2v.data.sampler import build_image_loader


def _has_split(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def pretrain_root(cfg: Config) -> Path:
    """Images to pretrain on: the folder itself, or its train/ part when it has train/ and test/."""
    root = Path(cfg.data.path).expanduser() if cfg.data.path else prepare_digits()
    return root / "train" if _has_split(root) else root


def normalization(cfg: Config) -> tuple[tuple, tuple]:
    """(mean, std): the configured ones, else the embedded digits' or ImageNet's statistics."""
    embedded = not cfg.data.path
    mean = cfg.data.mean or (DIGITS32_MEAN if embedded else IMAGENET_MEAN)
    std = cfg.data.std or (DIGITS32_STD if embedded else IMAGENET_STD)
    return tuple(mean), tuple(std)


def _dataset(cfg: Config, root: Path, train: bool, mask_fn=None) -> ImageFolderDataset:
    d, m = cfg.data, cfg.model
    mean, std = normalization(cfg)
    return ImageFolderDataset(root, image_size=m.image_size, train=train, crop_scale=d.crop_scale,
                              crop_ratio=d.crop_ratio, hflip=d.hflip, mean=mean, std=std,
                              seed=cfg.train.seed, mask_fn=mask_fn)


def build_pretrain_data(cfg: Config, start_step: int = 0, rank: int = 0, world_size: int = 1):
    """-> (dataset, loader): an endless, resumable stream of batches with M masks per sample."""
    mk = cfg.masking
    mask_fn = make_inverse_block_mask_fn(cfg.model.grid, mk.clone_batch, mk.mask_prob, mk.mask_length,
                                         mk.mask_prob_adjust)
    ds = _dataset(cfg, pretrain_root(cfg), train=True, mask_fn=mask_fn)
    loader = build_image_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                start_step=start_step, num_workers=cfg.data.num_workers,
                                rank=rank, world_size=world_size)
    return ds, loader


def build_probe_splits(cfg: Config) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
    """Labelled eval-mode datasets for the linear probe: (train, test).

    Embedded data: its fixed train/test split. A folder with train/ and test/ subfolders: those.
    Any other labelled folder: (all, None) and the probe splits it."""
    root = Path(cfg.data.path).expanduser() if cfg.data.path else prepare_digits()
    if _has_split(root):
        return _dataset(cfg, root / "train", False), _dataset(cfg, root / "test", False)
    return _dataset(cfg, root, False), None
