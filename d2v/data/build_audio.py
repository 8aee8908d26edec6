"""The audio modality's data: the pretraining stream (length-bucketed batches, random crops, M span
masks per utterance) and the probes (embedded speech: the spoken word and the speaker), from a
manifest, a folder or the embedded espeak-ng words.

Legend: B utterances, M masks per utterance, L samples, T CNN frames.
"""
from __future__ import annotations

from pathlib import Path

import torch

from d2v.audio_frames import RECEPTIVE_FIELD, FeatureLength, conv_output_length
from d2v.data.audio import (
    AudioCollate,
    AudioDataset,
    LengthBucketBatchSampler,
    collate_audio_eval,
    is_audio_file,
    load_audio,
    normalize_waveform,
    read_manifest,
)
from d2v.data.common import EmbedSource, ProbeTask, WithMaskInfo, pad_right, user_path
from d2v.data.files import walk_files
from d2v.data.sampler import build_loader
from d2v.masking import span_mask


def _audio_sources(cfg) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    """(pretraining manifest/folder, {probe task: (train source, test source or None)})."""
    root = user_path(cfg)
    if root is None:
        from d2v.data.embedded_speech import prepare_speech

        root = prepare_speech()
        return root / "train.tsv", {"word": (root / "train.tsv", root / "test.tsv"),
                                    "speaker": (root / "speaker_train.tsv", root / "speaker_test.tsv")}
    if root.is_dir() and (root / "train.tsv").is_file():
        test = root / "test.tsv"
        return root / "train.tsv", {"class": (root / "train.tsv", test if test.is_file() else None)}
    return root, {"class": (root, None)}


def _min_samples(cfg) -> int:
    return cfg.data.min_sample_size or RECEPTIVE_FIELD


def _audio_dataset(cfg, source: Path, train: bool, classes=None):
    d = cfg.data
    return AudioDataset(source, sample_rate=d.sample_rate, min_samples=_min_samples(cfg),
                        max_samples=d.max_sample_size, normalize=d.normalize, train=train,
                        seed=cfg.train.seed, classes=classes)


def pretrain_data(cfg, start_step: int, rank: int, world_size: int, pin_memory: bool,
                  resumed: bool = False):
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


def probe_tasks(cfg, run_dir: Path | None) -> list[ProbeTask]:
    tasks = []
    for name, (tr_src, te_src) in _audio_sources(cfg)[1].items():
        tr = _audio_dataset(cfg, tr_src, train=False)
        te = _audio_dataset(cfg, te_src, train=False, classes=tr.classes) if te_src else None
        tasks.append(ProbeTask(name, tr, te, collate_audio_eval, "audio"))
    return tasks


def synthetic_batch(cfg, seed: int = 0) -> tuple[dict, int, float]:
    """One random batch of the recipe's shapes (benchmarks; data.max_sample_size samples each) ->
    ({"x": (B, L), "mask": (B*M, T)}, frames per view, seconds of audio per sample)."""
    g = torch.Generator().manual_seed(seed)
    B, M, mk = cfg.train.batch_size, cfg.masking.clone_batch, cfg.masking
    L = cfg.data.max_sample_size
    if L is None:
        raise ValueError("a synthetic audio batch needs data.max_sample_size (its length in samples)")
    T = conv_output_length(L)
    src = torch.randn(B, L, generator=g)
    mask = span_mask(B * M, T, mask_prob=mk.mask_prob, mask_length=mk.mask_length,
                     adjust=mk.mask_prob_adjust, generator=g)
    return {"x": src, "mask": mask}, T, L / cfg.data.sample_rate


def embed_source(cfg, path: Path, run_dir: Path | None = None) -> EmbedSource:
    """Every audio file under `path` (or the file, or the files a .tsv manifest lists), whole, at
    data.sample_rate, normalized per utterance when the run was (data.normalize); batches are
    right-padded with a padding mask."""
    if path.is_file() and path.suffix == ".tsv":
        files = [e.path for e in read_manifest(path)]
    else:
        files = [path] if path.is_file() else walk_files(path, is_audio_file)
    if not files:
        raise ValueError(f"--data {path}: no audio files")
    d = cfg.data

    def load(i: int) -> torch.Tensor:
        x = torch.from_numpy(load_audio(files[i], d.sample_rate))  # (L,)
        if x.shape[0] < RECEPTIVE_FIELD:
            raise ValueError(f"{x.shape[0]} samples, shorter than one CNN frame ({RECEPTIVE_FIELD})")
        return normalize_waveform(x) if d.normalize else x

    def collate(xs: list) -> tuple:
        return pad_right(xs, 0.0, torch.float32)  # (B, Lmax), padding mask (B, Lmax)

    return EmbedSource([str(f) for f in files], load, collate, [])
