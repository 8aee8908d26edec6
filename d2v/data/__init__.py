"""Data pipeline per modality: image folders + augmentation, audio manifests/folders + length
buckets, text files + a trained BPE tokenizer; masks built in the loader; embedded defaults (digits,
espeak-ng speech, fortunes); the resumable sampler; `build.py` wires them from the config.
`common.py` holds what the three pipelines share (class-folder scan, header check, decode with
fallback, collate helpers, prepare-once caches, atomic writes).

Audio and text modules import lazily (`d2v.data.audio`, `d2v.data.text`): soundfile and tokenizers
are only loaded when those modalities are used.
"""
from d2v.data.embedded import (
    DIGITS32_MEAN,
    DIGITS32_NUM_TEST,
    DIGITS32_NUM_TRAIN,
    DIGITS32_STD,
    default_cache_dir,
    prepare_digits,
)
from d2v.data.images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    InverseBlockMaskFn,
    collate_images,
    make_inverse_block_mask_fn,
    scan_image_folder,
)
from d2v.data.sampler import ResumableBatchSampler, build_loader
from d2v.data.seed import derive_seed, seeded_generator

__all__ = [
    "DIGITS32_MEAN",
    "DIGITS32_NUM_TEST",
    "DIGITS32_NUM_TRAIN",
    "DIGITS32_STD",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "InverseBlockMaskFn",
    "ResumableBatchSampler",
    "build_loader",
    "collate_images",
    "default_cache_dir",
    "derive_seed",
    "make_inverse_block_mask_fn",
    "prepare_digits",
    "scan_image_folder",
    "seeded_generator",
]
