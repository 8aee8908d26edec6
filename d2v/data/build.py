"""Build datasets and loaders from the config, per modality: the pretraining stream and the
labelled probe tasks.

`data.path: null` selects the modality's embedded default (image: sklearn's real handwritten
digits; audio: words spoken by espeak-ng voices; text: the Debian fortunes collection), prepared
into a cache on first use. Otherwise `data.path` is an image folder, an audio manifest (.tsv) or
folder, or a text file or folder. A folder holding train/ and test/ parts (audio: train.tsv and
test.tsv) pretrains on train and probes train -> test; anything else pretrains on everything and
the probe splits its labelled examples 80/20.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from d2v.audio_frames import RECEPTIVE_FIELD, FeatureLength
from d2v.config import Config
from d2v.data.embedded import DIGITS32_MEAN, DIGITS32_STD, prepare_digits
from d2v.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, make_inverse_block_mask_fn
from d2v.data.sampler import build_loader
from d2v.masking import make_maskinfo

# the batch key holding each modality's model input
SOURCE_KEY = {"image": "image", "audio": "audio", "text": "tokens"}


class WithMaskInfo:
    """Pretraining collate: the modality's collate, then the gather/restore indices of its masks,
    batch["maskinfo"] = make_maskinfo(batch["mask"]) (a MaskInfo of (B*M, ...) CPU tensors).

    Built here, in the DataLoader worker, because make_maskinfo is a host argsort plus host reads:
    in the trainer's process they would stall the step (and, on a GPU, wait for the queued work).
    The indices are a pure function of the mask, so training is bitwise the same as computing them in
    the step. Picklable (DataLoader workers)."""

    def __init__(self, collate: Callable[[list], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> dict[str, Any]:
        batch = self.collate(items)
        batch["maskinfo"] = make_maskinfo(batch["mask"])
        return batch

    def __repr__(self) -> str:
        return f"WithMaskInfo({self.collate!r})"


@dataclass
class ProbeTask:
    """A labelled probe: train split, test split (None = split train 80/20), eval collate."""

    name: str
    train: Dataset
    test: Dataset | None
    collate: Callable[[list], dict[str, Any]]
    source_key: str


def _has_split(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _user_path(cfg: Config) -> Path | None:
    return Path(cfg.data.path).expanduser() if cfg.data.path else None


# ------------------------------------------------------------------------------------------ images
def pretrain_root(cfg: Config) -> Path:
    """Images to pretrain on: the folder itself, or its train/ part when it has train/ and test/."""
    root = _user_path(cfg) or prepare_digits()
    return root / "train" if _has_split(root) else root


def normalization(cfg: Config) -> tuple[tuple, tuple]:
    """(mean, std): the configured ones, else the embedded digits' or ImageNet's statistics."""
    embedded = not cfg.data.path
    mean = cfg.data.mean or (DIGITS32_MEAN if embedded else IMAGENET_MEAN)
    std = cfg.data.std or (DIGITS32_STD if embedded else IMAGENET_STD)
    return tuple(mean), tuple(std)


def _image_dataset(cfg: Config, root: Path, train: bool, mask_fn=None, classes=None) -> ImageFolderDataset:
    d, m = cfg.data, cfg.model
    mean, std = normalization(cfg)
    return ImageFolderDataset(root, image_size=m.image_size, train=train, crop_scale=d.crop_scale,
                              crop_ratio=d.crop_ratio, hflip=d.hflip, mean=mean, std=std,
                              seed=cfg.train.seed, mask_fn=mask_fn, classes=classes)


def _image_pretrain(cfg: Config, start_step: int, rank: int, world_size: int, pin_memory: bool):
    from d2v.data.images import collate_images

    mk = cfg.masking
    mask_fn = make_inverse_block_mask_fn(cfg.model.grid, mk.clone_batch, mk.mask_prob, mk.mask_length,
                                         mk.mask_prob_adjust)
    ds = _image_dataset(cfg, pretrain_root(cfg), train=True, mask_fn=mask_fn)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate_images), pin_memory=pin_memory)
    return ds, loader


def _image_probe(cfg: Config, run_dir: Path | None) -> list[ProbeTask]:
    from d2v.data.images import collate_images

    root = _user_path(cfg) or prepare_digits()
    if _has_split(root):
        tr = _image_dataset(cfg, root / "train", False)
        te = _image_dataset(cfg, root / "test", False, classes=tr.classes)  # one label numbering
    else:
        tr, te = _image_dataset(cfg, root, False), None
    return [ProbeTask("class", tr, te, collate_images, "image")]


# ------------------------------------------------------------------------------------------ audio
def _audio_sources(cfg: Config) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    """(pretraining manifest/folder, {probe task: (train source, test source or None)})."""
    root = _user_path(cfg)
    if root is None:
        from d2v.data.embedded_speech import prepare_speech

        root = prepare_speech()
        return root / "train.tsv", {"word": (root / "train.tsv", root / "test.tsv"),
                                    "speaker": (root / "speaker_train.tsv", root / "speaker_test.tsv")}
    if root.is_dir() and (root / "train.tsv").is_file():
        test = root / "test.tsv"
        return root / "train.tsv", {"class": (root / "train.tsv", test if test.is_file() else None)}
    return root, {"class": (root, None)}


def _min_samples(cfg: Config) -> int:
    return cfg.data.min_sample_size or RECEPTIVE_FIELD


def _audio_dataset(cfg: Config, source: Path, train: bool, classes=None):
    from d2v.data.audio import AudioDataset

    d = cfg.data
    return AudioDataset(source, sample_rate=d.sample_rate, min_samples=_min_samples(cfg),
                        max_samples=d.max_sample_size, normalize=d.normalize, train=train,
                        seed=cfg.train.seed, classes=classes)


def _audio_pretrain(cfg: Config, start_step: int, rank: int, world_size: int, pin_memory: bool):
    from d2v.data.audio import AudioCollate, LengthBucketBatchSampler

    source, _ = _audio_sources(cfg)
    ds = _audio_dataset(cfg, source, train=True)
    mk = cfg.masking
    collate = AudioCollate(clone_batch=mk.clone_batch, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                           mask_adjust=mk.mask_prob_adjust, feature_length=FeatureLength(),
                           seed=cfg.train.seed, max_samples=cfg.data.max_sample_size)
    # build_audio_loader's length-bucketed sampler, on build_loader directly to pass pin_memory
    sampler = LengthBucketBatchSampler(ds.lengths, cfg.train.batch_size, seed=cfg.train.seed,
                                       start_step=start_step, rank=rank, world_size=world_size)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate), batch_sampler=sampler, pin_memory=pin_memory)
    return ds, loader


def _audio_probe(cfg: Config, run_dir: Path | None) -> list[ProbeTask]:
    from d2v.data.audio import collate_audio_eval

    tasks = []
    for name, (tr_src, te_src) in _audio_sources(cfg)[1].items():
        tr = _audio_dataset(cfg, tr_src, train=False)
        te = _audio_dataset(cfg, te_src, train=False, classes=tr.classes) if te_src else None
        tasks.append(ProbeTask(name, tr, te, collate_audio_eval, "audio"))
    return tasks


# ------------------------------------------------------------------------------------------ text
def _text_root(cfg: Config) -> Path:
    root = _user_path(cfg)
    if root is None:
        from d2v.data.embedded_text import prepare_fortunes

        root = prepare_fortunes()
    return root


def _text_files(root: Path):
    from d2v.data.text import scan_text_source

    return scan_text_source(root / "train" if _has_split(root) else root)


def text_tokenizer(cfg: Config, run_dir: Path, *, resumed: bool = False, probe: bool = False):
    """The run's tokenizer (d2v.data.text.resolve_tokenizer): data.tokenizer if set, loaded as is;
    else run_dir/tokenizer.json, which belongs to the run's corpus and model.vocab_size.

    `resumed` (a run continued from its checkpoint): the file is reused after checking the record of
    what it was trained from against the corpus and model.vocab_size (a mismatch is a ValueError
    saying what to do). Not resumed (a fresh run): an existing file is debris of an attempt that
    never checkpointed; a new tokenizer is trained on the pretraining files and replaces it (unless
    its record shows it was trained on exactly this corpus and settings). `probe`: the probe reads
    an existing run, so the file is always reused, a mismatch with the data being a warning."""
    from d2v.data.text import resolve_tokenizer

    files = [p for p, _ in _text_files(_text_root(cfg))]
    return resolve_tokenizer(cfg.data.tokenizer, Path(run_dir), files, cfg.model.vocab_size,
                             resumed=resumed or probe, strict=not probe, data_path=cfg.data.path)[0]


def _tokens_per_sample(cfg: Config) -> int:
    return cfg.data.tokens_per_sample or cfg.model.max_positions


def _text_pretrain(cfg: Config, start_step: int, rank: int, world_size: int, pin_memory: bool,
                   resumed: bool = False):
    from d2v.data.text import TextBlockDataset, TextMaskFn, collate_text

    T = _tokens_per_sample(cfg)
    tok = text_tokenizer(cfg, Path(cfg.train.out_dir), resumed=resumed)
    mask_fn = TextMaskFn(T, cfg.masking.clone_batch, cfg.masking.mask_prob)
    files = [p for p, _ in _text_files(_text_root(cfg))]
    ds = TextBlockDataset(files, tok, block_size=T, seed=cfg.train.seed, mask_fn=mask_fn)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate_text), pin_memory=pin_memory)
    return ds, loader


def _text_probe(cfg: Config, run_dir: Path | None) -> list[ProbeTask]:
    """Two tasks: word order (every line as written or token-shuffled; needs no labels) and, when the
    files are in class subfolders, the class (embedded fortunes: the topic)."""
    from d2v.data.text import TextLineDataset, WordOrderDataset, collate_text_eval, scan_text_source

    root = _text_root(cfg)
    tok = text_tokenizer(cfg, Path(run_dir or cfg.train.out_dir), probe=True)
    T = _tokens_per_sample(cfg)
    if _has_split(root):
        tr_files, te_files = scan_text_source(root / "train"), scan_text_source(root / "test")
    else:
        tr_files, te_files = scan_text_source(root), None
    classes = sorted({lab for _, lab in tr_files if lab is not None})
    tr = TextLineDataset(tr_files, tok, max_len=T, classes=classes)
    te = TextLineDataset(te_files, tok, max_len=T, classes=classes) if te_files else None
    seed = cfg.probe.seed
    tasks = [ProbeTask("word_order", WordOrderDataset(tr, seed=seed),
                       WordOrderDataset(te, seed=seed + 1) if te is not None else None,
                       collate_text_eval, "tokens")]
    if classes:
        name = "topic" if cfg.data.path is None else "class"
        tasks.append(ProbeTask(name, tr, te, collate_text_eval, "tokens"))
    return tasks


# ------------------------------------------------------------------------------------------ dispatch
_PRETRAIN = {"image": _image_pretrain, "audio": _audio_pretrain, "text": _text_pretrain}
_PROBE = {"image": _image_probe, "audio": _audio_probe, "text": _text_probe}


def build_pretrain_data(cfg: Config, start_step: int = 0, rank: int = 0, world_size: int = 1,
                        pin_memory: bool = False, resumed: bool = False):
    """-> (dataset, loader): an endless, resumable stream of batches with M masks per sample and their
    gather/restore indices (batch["maskinfo"], computed in the loader workers). `pin_memory` (set it when
    training on CUDA): batches arrive in page-locked memory, so `.to(device, non_blocking=True)` is an
    asynchronous copy instead of a staged one that may wait for the device. `resumed`: the run continues
    from a checkpoint (text: reuse the run's tokenizer.json after checking it against the corpus; a fresh
    run retrains a leftover one)."""
    modality = cfg.model.modality
    extra = {"resumed": resumed} if modality == "text" else {}
    return _PRETRAIN[modality](cfg, start_step, rank, world_size, pin_memory, **extra)


def build_probe_tasks(cfg: Config, run_dir: Path | None = None) -> list[ProbeTask]:
    """Labelled eval-mode datasets for the linear probe, one task per label kind (speech: the spoken
    word and the speaker)."""
    return _PROBE[cfg.model.modality](cfg, run_dir)
