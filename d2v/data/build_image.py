"""The image modality's data: the pretraining stream (random resized crops, flips, M inverse block
masks per image) and the class probe, from an image folder or the embedded digits.

Legend: B images, M masks per image, G patch grid side.
"""
from __future__ import annotations

from pathlib import Path

import torch

from d2v.data.common import EmbedSource, ProbeTask, WithMaskInfo, has_split, user_path
from d2v.data.embedded import DIGITS32_MEAN, DIGITS32_STD, prepare_digits
from d2v.data.files import walk_files
from d2v.data.images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    collate_images,
    eval_image,
    is_image_file,
    make_inverse_block_mask_fn,
)
from d2v.data.sampler import build_loader
from d2v.masking import inverse_block_mask


def pretrain_root(cfg) -> Path:
    """Images to pretrain on: the folder itself, or its train/ part when it has train/ and test/."""
    root = user_path(cfg) or prepare_digits()
    return root / "train" if has_split(root) else root


def normalization(cfg) -> tuple[tuple, tuple]:
    """(mean, std): the configured ones, else the embedded digits' or ImageNet's statistics."""
    embedded = not cfg.data.path
    mean = cfg.data.mean or (DIGITS32_MEAN if embedded else IMAGENET_MEAN)
    std = cfg.data.std or (DIGITS32_STD if embedded else IMAGENET_STD)
    return tuple(mean), tuple(std)


def _image_dataset(cfg, root: Path, train: bool, mask_fn=None, classes=None) -> ImageFolderDataset:
    d, m = cfg.data, cfg.model
    mean, std = normalization(cfg)
    return ImageFolderDataset(root, image_size=m.image_size, train=train, crop_scale=d.crop_scale,
                              crop_ratio=d.crop_ratio, hflip=d.hflip, mean=mean, std=std,
                              seed=cfg.train.seed, mask_fn=mask_fn, classes=classes)


def pretrain_data(cfg, start_step: int, rank: int, world_size: int, pin_memory: bool,
                  resumed: bool = False):
    mk = cfg.masking
    mask_fn = make_inverse_block_mask_fn(cfg.model.grid, mk.clone_batch, mk.mask_prob, mk.mask_length,
                                         mk.mask_prob_adjust)
    ds = _image_dataset(cfg, pretrain_root(cfg), train=True, mask_fn=mask_fn)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate_images), pin_memory=pin_memory)
    return ds, loader


def probe_tasks(cfg, run_dir: Path | None) -> list[ProbeTask]:
    root = user_path(cfg) or prepare_digits()
    if has_split(root):
        tr = _image_dataset(cfg, root / "train", False)
        te = _image_dataset(cfg, root / "test", False, classes=tr.classes)  # one label numbering
    else:
        tr, te = _image_dataset(cfg, root, False), None
    return [ProbeTask("class", tr, te, collate_images, "image")]


def synthetic_batch(cfg, seed: int = 0) -> tuple[dict, int, float]:
    """One random batch of the recipe's shapes (benchmarks) -> ({"x": (B, C, H, W), "mask": (B*M, G*G)},
    tokens per view, images per sample)."""
    g = torch.Generator().manual_seed(seed)
    B, M, mk, m = cfg.train.batch_size, cfg.masking.clone_batch, cfg.masking, cfg.model
    src = torch.randn(B, m.in_chans, m.image_size, m.image_size, generator=g)
    mask = inverse_block_mask(B * M, m.grid, m.grid, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                              adjust=mk.mask_prob_adjust, generator=g)
    return {"x": src, "mask": mask}, m.grid * m.grid, 1.0


def embed_source(cfg, path: Path, run_dir: Path | None = None) -> EmbedSource:
    """Every image file under `path` (or the file itself), in the probe's eval view: the center square
    at model.image_size, normalized as the run was (data.mean / data.std)."""
    files = [path] if path.is_file() else walk_files(path, is_image_file)
    if not files:
        raise ValueError(f"--data {path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    mean, std = normalization(cfg)
    S = cfg.model.image_size

    def collate(xs: list) -> tuple:
        return torch.stack(xs), None  # (B, C, S, S)

    return EmbedSource([str(f) for f in files], lambda i: eval_image(files[i], S, mean, std), collate, [])
