"""Audio pipeline: tsv manifests / folder scan, soundfile decode + resample, length-bucketed sampler,
crop-to-shortest collate with per-sample span masks.

Legend: L samples per waveform (after the batch crop), B batch, M masks (clones) per sample,
T = feature_length(L) encoder frames.

Determinism contract (as images.py): `AudioDataset.__getitem__` takes a *virtual* index
v = epoch * len(dataset) + i (what `LengthBucketBatchSampler` yields); the random crop of item i in
epoch `epoch` draws from a generator seeded `derive_seed("audio-item", seed, epoch, i)`; the batch
crop and the masks of a batch draw from one generator seeded
`derive_seed("audio-batch", seed, <virtual index of the batch's first item>)`. No global RNG is
used, so results do not depend on the worker count and a resumed run sees the same data.

Manifest format (fairseq wav2vec `manifest.py` / `RawAudioDataset`): the first line is the root
directory (absolute, relative to the manifest's folder, or empty = the manifest's folder), then one
line per file `relpath[<TAB>num_samples[<TAB>label]]`. `num_samples` is in the file's own sample
rate and only a hint: the header read at start-up is authoritative. The label column is a d2v
extension (fairseq keeps labels in separate .ltr/.wrd files).

Differences from the reference, on purpose: the masks are generated on the *cropped* batch length
(reference: on the full utterance, then cropped with an independent offset, which breaks the exact
masked count per row; spec pitfall #19), so every row has exactly int(T * mask_prob) masked frames.
A file longer than WHOLE_NORM_MAX_S seconds (a recording, not an utterance) is decoded only over its
crop window (`load_audio_window`: a 10-minute 44.1 kHz file is not decoded and resampled whole for
20 s of it), so with `normalize` its statistics are those of the crop; every shorter file is
normalized whole, then cropped, as in the reference (without `normalize` any long file reads only
its window).

References: fairseq/data/audio/raw_audio_dataset.py (postprocess layer_norm, crop_to_max_size,
collater), fairseq/data/data_utils.py compute_block_mask_1d, fairseq bucket_pad_length_dataset
(length buckets).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from d2v._optional import require
from d2v.data.common import (
    DecodeFailed,
    check_headers,
    check_items,
    decode_with_fallback,
    failed_paths,
    int64_column,
    pad_right,
    scan_class_folders,
    split_virtual_index,
    warn_skipped,
)
from d2v.data.sampler import ResumableBatchSampler, build_loader
from d2v.data.seed import seeded_generator
from d2v.log import get_logger
from d2v.masking import span_mask

sf = require("soundfile", "audio data")  # importing this module is asking for audio

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioEntry",
    "AudioDecodeError",
    "read_manifest",
    "scan_audio_folder",
    "load_audio",
    "load_audio_window",
    "resampled_length",
    "AudioDataset",
    "LengthBucketBatchSampler",
    "AudioCollate",
    "collate_audio_eval",
    "build_audio_loader",
]

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg")  # compared case-insensitively
WHOLE_NORM_MAX_S = 60  # with data.normalize, longer files are normalized over their crop window only
# files: show a progress bar for the start-up header check from this many. Measured roughly (this
# machine, warm page cache): soundfile.info costs ~0.1 ms per WAV/FLAC and ~0.7 ms per OGG Vorbis
# (it seeks to the last page for the length); a cold cache or a network file system adds a read per
# file, ~1-3 ms. At ~2 ms per file, 1000 files take ~2 s, the most a check runs without a bar.
_PROGRESS_FROM = 1000
_NORM_EPS = 1e-5  # F.layer_norm eps of the reference's per-utterance normalization

log = get_logger(__name__)


class AudioEntry(NamedTuple):
    path: Path
    num_samples: int | None  # manifest hint, in the file's own sample rate (None if not given)
    label: str | None  # class name (None if unlabelled)


class AudioDecodeError(ValueError):
    """A file that cannot be decoded as audio (message names the path and the reason)."""


# ---- listing ------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[AudioEntry]:
    """Parse a fairseq-style tsv manifest (see module docstring) into entries, in file order.

    Blank lines and lines starting with '#' after the root line are ignored. Raises ValueError
    naming `manifest:line` for a non-integer or negative num_samples or more than 3 columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"audio manifest {path} does not exist or is not a file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}:1: empty manifest (the first line must be the root directory)")
    root_s = lines[0].strip()
    root = path.parent if not root_s else Path(root_s).expanduser()
    if not root.is_absolute():
        root = path.parent / root
    entries: list[AudioEntry] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) > 3:
            raise ValueError(f"{path}:{lineno}: expected 'relpath[<TAB>num_samples[<TAB>label]]', got "
                             f"{len(cols)} tab-separated columns: {line!r}")
        rel = cols[0].strip()
        if not rel:
            raise ValueError(f"{path}:{lineno}: empty file path: {line!r}")
        num: int | None = None
        if len(cols) >= 2 and cols[1].strip():
            try:
                num = int(cols[1].strip())
            except ValueError:
                raise ValueError(f"{path}:{lineno}: num_samples must be an integer, got "
                                 f"{cols[1]!r}") from None
            if num < 0:
                raise ValueError(f"{path}:{lineno}: num_samples must be >= 0, got {num}")
        label = cols[2].strip() if len(cols) == 3 and cols[2].strip() else None
        entries.append(AudioEntry(root / rel, num, label))
    return entries


def normalize_waveform(x_L: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the utterance (F.layer_norm, eps 1e-5: the reference's
    `postprocess` with normalize)."""
    return F.layer_norm(x_L, x_L.shape, eps=_NORM_EPS)


def is_audio_file(path: Path) -> bool:
    return path.name.lower().endswith(AUDIO_EXTENSIONS) and not path.name.startswith(".")


def scan_audio_folder(root: str | Path) -> list[AudioEntry]:
    """Audio files under `root`, sorted and stable (extensions AUDIO_EXTENSIONS, any case).

    If top-level subdirectories of `root` hold audio (searched recursively), each is a class:
    label = subfolder name, and loose files directly in `root` are ignored with a warning.
    Otherwise the files directly in `root` are returned unlabelled."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist or is not a directory")
    per_class, loose = scan_class_folders(root, is_audio_file, log=log, warn_key="audio-loose-files",
                                          noun="audio file(s)")
    if per_class:
        return [AudioEntry(p, None, name) for name, files in per_class for p in files]
    if not loose:
        raise ValueError(f"no audio files under {root} (accepted extensions, case-insensitive: "
                         f"{', '.join(AUDIO_EXTENSIONS)})")
    return [AudioEntry(p, None, None) for p in loose]


# ---- decoding -----------------------------------------------------------------------------------


def _ratio(file_rate: int, sample_rate: int) -> tuple[int, int]:
    g = math.gcd(int(sample_rate), int(file_rate))
    return int(sample_rate) // g, int(file_rate) // g


def resampled_length(frames: int, file_rate: int, sample_rate: int) -> int:
    """Length in samples of `frames` at `file_rate` after `load_audio` resamples it to
    `sample_rate` (scipy resample_poly: ceil(frames * up / down))."""
    if file_rate == sample_rate:
        return int(frames)
    up, down = _ratio(file_rate, sample_rate)
    return -(-int(frames) * up // down)


@functools.lru_cache(maxsize=16)
def _resample_filter(up: int, down: int) -> np.ndarray:
    """scipy.signal.resample_poly's default anti-aliasing FIR for (up, down), built here so that its
    length is known: firwin(2 * half + 1, 1 / max(up, down), window=("kaiser", 5.0)) with
    half = 10 * max(up, down) taps at the up-sampled rate, in float32 (resample_poly casts its
    default filter to the input's dtype, so passing this one gives its default output bit for bit).
    Output sample m depends on input frames k with |k * up - m * down| <= half only."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    h = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0)).astype(np.float32)
    h.setflags(write=False)  # shared by the cache; resample_poly copies it
    return h


def _resample(wav: np.ndarray, file_rate: int, sample_rate: int) -> np.ndarray:
    """(n,) float32 at file_rate -> (ceil(n * up / down),) float32 at sample_rate."""
    from scipy.signal import resample_poly

    up, down = _ratio(file_rate, sample_rate)
    return resample_poly(wav, up, down, window=_resample_filter(up, down))


def _not_a_file(path: Any) -> str | None:
    """Why `path` is no file to open, or None: checked after a failed open, because libsndfile says
    only "System error." for a missing file."""
    if isinstance(path, (str, os.PathLike)):
        if not os.path.lexists(path):
            return "file not found"
        if not os.path.exists(path):
            return "file not found (broken symbolic link)"
        if os.path.isdir(path):
            return "is a directory, not a file"
    return None


def _open(path: Any) -> "sf.SoundFile":
    """soundfile.SoundFile of `path` for reading; AudioDecodeError naming the path if it fails."""
    try:
        return sf.SoundFile(str(path) if isinstance(path, (str, os.PathLike)) else path)
    except Exception as e:  # LibsndfileError (RuntimeError), OSError, TypeError on odd headers
        why = _not_a_file(path) or f"{type(e).__name__}: {e}"
        raise AudioDecodeError(f"{path}: cannot decode audio ({why})") from None


def _read_mono(f: "sf.SoundFile", path: Any, frames: int = -1) -> np.ndarray:
    """`frames` frames (-1: to the end) from the open file's position, channels averaged: float32
    (n,), n < frames when the file ends early. AudioDecodeError for unreadable or non-finite data
    (checked on the frames read only)."""
    try:
        data = f.read(frames, dtype="float32", always_2d=True)  # (n, C)
    except Exception as e:
        raise AudioDecodeError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]  # (n,)
    if not np.isfinite(wav).all():
        raise AudioDecodeError(f"{path}: audio contains NaN or inf samples")
    return wav


def _decode_whole(f: "sf.SoundFile", path: Any, sample_rate: int) -> np.ndarray:
    wav = _read_mono(f, path)
    if wav.shape[0] == 0:
        raise AudioDecodeError(f"{path}: empty audio (0 frames)")
    if f.samplerate != sample_rate:
        wav = _resample(wav, f.samplerate, sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _window_frames(start: int, length: int, up: int, down: int, half: int) -> tuple[int, int, int]:
    """Input frames [lo, hi) that outputs [start, start + length) of resample_poly(x, up, down) with
    a filter of half length `half` depend on, and `skip`: resample_poly(x[lo:hi])[skip + t] is
    output start + t. lo is a multiple of `down` (a whole number of output periods, so the window's
    outputs fall on the whole file's output grid: its output r is output r + lo * up / down), moved
    down to 0 near the file start, where both paths see the same zeros; hi may exceed the file."""
    first = (start * down - half) // up  # first input frame output `start` reads (floor)
    q = max(0, first // down)
    last = ((start + length - 1) * down + half) // up  # last input frame the last output reads
    return q * down, last + 1, start - q * up


def _decode_window(f: "sf.SoundFile", path: Any, sample_rate: int, start: int,
                   length: int) -> np.ndarray | None:
    """Samples [start, start + length) at sample_rate of the open file, decoding only the frames
    they need (see `load_audio_window`); None when the file holds fewer frames than its header says
    or cannot seek (the caller then decodes it whole, from a fresh open)."""
    rate, frames = f.samplerate, f.frames
    if rate == sample_rate:
        lo, hi, skip = start, start + length, 0
    else:
        up, down = _ratio(rate, sample_rate)
        lo, hi, skip = _window_frames(start, length, up, down, (_resample_filter(up, down).size - 1) // 2)
        hi = min(hi, frames)
    try:
        f.seek(lo)
    except Exception:  # libsndfile refuses to seek past the frames it really has
        return None
    wav = _read_mono(f, path, hi - lo)
    if wav.shape[0] < hi - lo:
        return None
    if rate == sample_rate:
        return np.ascontiguousarray(wav)
    y = _resample(wav, rate, sample_rate)[skip : skip + length]
    return np.ascontiguousarray(y, dtype=np.float32) if y.shape[0] == length else None


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode `path` to float32 mono (L,) at `sample_rate`: channels are averaged, other rates are
    resampled with scipy.signal.resample_poly(up, down) (polyphase, Kaiser-windowed FIR).

    Raises AudioDecodeError (a ValueError) naming the path for missing, undecodable, empty (0 frames)
    or non-finite audio."""
    with _open(path) as f:
        return _decode_whole(f, path, sample_rate)


def load_audio_window(path: str | Path, sample_rate: int, start: int, length: int) -> np.ndarray:
    """`load_audio(path, sample_rate)[start : start + length]`, decoding only what that needs.

    At the file's own rate it reads exactly `length` frames and the result is bit-identical. When
    resampling it reads the window's frames plus the filter's support on each side (half =
    10 * max(up, down) taps at the up-sampled rate, i.e. half / up input frames: 28 at 44.1 kHz ->
    16 kHz), the first one aligned down to a multiple of `down` input frames (< 441 more), so every
    output sample is computed from the same input samples with the same taps as in the whole-file
    path: equal up to float32 rounding order (0 in practice), at the file edges too. Channels are
    averaged and the NaN/inf check applies to the frames read. Raises ValueError if the window is
    not inside the decoded length, AudioDecodeError as load_audio."""
    if start < 0 or length < 1:
        raise ValueError(f"load_audio_window: need start >= 0 and length >= 1, got {start}, {length}")
    with _open(path) as f:
        total = resampled_length(f.frames, f.samplerate, sample_rate)
        if start + length > total:
            raise ValueError(f"{path}: window [{start}, {start + length}) is outside the file's "
                             f"{total} samples at {sample_rate} Hz")
        wav = _decode_window(f, path, sample_rate, start, length)
    if wav is None:  # fewer frames than the header said: decode what there is
        wav = load_audio(path, sample_rate)[start : start + length]
    return wav


def _check_header(path: Path, sample_rate: int, min_samples: int) -> tuple[int, str | None]:
    """(length at sample_rate, None) if the header looks usable, else (0, reason)."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        return 0, _not_a_file(path) or f"cannot open ({type(e).__name__}: {e})"
    if info.frames <= 0 or info.samplerate <= 0:
        return 0, f"empty audio ({info.frames} frames)"
    n = resampled_length(info.frames, info.samplerate, sample_rate)
    if n < min_samples:
        return 0, (f"too short: {n} samples at {sample_rate} Hz ({info.frames} at "
                   f"{info.samplerate} Hz) < min_samples {min_samples}")
    return n, None


# ---- dataset ------------------------------------------------------------------------------------


class AudioDataset(torch.utils.data.Dataset):
    """Waveform dataset over a tsv manifest or a folder (see module docstring).

    Start-up: every file's header is read (soundfile.info); missing, unopenable, empty and
    too-short files (< min_samples at sample_rate) are excluded, listed in `bad_files`
    [(path, reason)] and reported in one warning (once per source per process, on the "d2v" logger).

    Item (virtual index v = epoch * len + i):
      {"audio": float32 (L,), "label": int (-1 if unlabelled), "index": v,
       "file_index": i' the entry actually loaded (i, or a later one after a decode failure),
       "bad": list[str] paths that failed to decode for this item}
    A file longer than max_samples is cropped to max_samples: a random window in train mode (start
    drawn from the item's generator on the length in the header), the first max_samples in eval
    mode; only that window is decoded (`load_audio_window`). The waveform returned is then
    normalized (F.layer_norm over it, eps 1e-5, as the reference's `postprocess`): the whole
    utterance when it fits in max_samples, else the crop (see the module docstring).

    A file that fails to decode is named in a warning (once per file per process) and the item
    comes from the next index; DataDecodeError after MAX_DECODE_TRIES (d2v.data.common) consecutive
    failures.

    `classes` (optional) fixes the class list (e.g. to share one label mapping between a train
    and a test manifest); by default it is the sorted set of labels in `source`."""

    def __init__(
        self,
        source: str | Path,
        *,
        sample_rate: int = 16000,
        min_samples: int = 400,
        max_samples: int | None = None,
        normalize: bool = True,
        train: bool = True,
        seed: int = 0,
        classes: Sequence[str] | None = None,
    ) -> None:
        if sample_rate < 1:
            raise ValueError(f"AudioDataset: sample_rate must be >= 1, got {sample_rate}")
        if min_samples < 0:
            raise ValueError(f"AudioDataset: min_samples must be >= 0, got {min_samples}")
        if max_samples is not None and max_samples < max(1, min_samples):
            raise ValueError(f"AudioDataset: max_samples must be >= max(1, min_samples={min_samples}), "
                             f"got {max_samples}")
        self.root = Path(source).expanduser()
        self.sample_rate = int(sample_rate)
        self.min_samples = int(min_samples)
        self.max_samples = None if max_samples is None else int(max_samples)
        self.normalize = normalize
        self.train = train
        self.seed = int(seed)
        self.bad_files: list[tuple[str, str]] = []

        if self.root.is_dir():
            entries = scan_audio_folder(self.root)
        elif self.root.is_file():
            if is_audio_file(self.root):
                raise ValueError(f"AudioDataset: source {self.root} is an audio file; pass a manifest "
                                 f"(.tsv) or a folder")
            entries = read_manifest(self.root)
            if not entries:
                raise ValueError(f"AudioDataset: manifest {self.root} lists no files")
        else:
            raise FileNotFoundError(f"AudioDataset: source {self.root} does not exist (expected a "
                                    f"manifest .tsv or a folder of audio files)")

        labelled = [e.label is not None for e in entries]
        if any(labelled) and not all(labelled):
            first = entries[labelled.index(False)].path
            raise ValueError(f"AudioDataset: {self.root} mixes labelled and unlabelled files, e.g. "
                             f"{first} has no label")
        if classes is not None:
            self.classes = list(classes)
        else:
            self.classes = sorted({e.label for e in entries if e.label is not None})
        class_index = {c: k for k, c in enumerate(self.classes)}
        unknown = [e for e in entries if e.label is not None and e.label not in class_index]
        if unknown:
            raise ValueError(f"AudioDataset: {unknown[0].path} has label {unknown[0].label!r}, not in "
                             f"classes {self.classes}")

        checked = check_headers([e.path for e in entries],
                                lambda p: _check_header(p, self.sample_rate, self.min_samples),
                                root=self.root, progress_from=_PROGRESS_FROM)
        self.bad_files = checked.bad
        if not checked.kept:
            p, why = self.bad_files[0]
            raise ValueError(f"AudioDataset: no usable audio in {self.root}: all {len(self.bad_files)} "
                             f"file(s) failed, e.g. {p}: {why}")
        warn_skipped(log, "audio-unusable-files", self.root, self.bad_files, "unusable audio file(s)")
        cap = self.max_samples
        self.entries: list[AudioEntry] = [entries[k] for k in checked.kept]
        # at sample_rate, capped at max_samples
        self.lengths: list[int] = [n if cap is None else min(n, cap) for n in checked.info]
        self.labels: list[int] = [class_index[e.label] if e.label is not None else -1
                                  for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def item_generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator that drives the random crop of item `index` in `epoch`."""
        return seeded_generator("audio-item", self.seed, epoch, index)

    def _crop_start(self, epoch: int, i: int, length: int) -> int:
        """Start of the max_samples crop of a `length`-sample waveform: random in train mode (the
        item's generator, one draw), 0 in eval mode."""
        if not self.train:
            return 0
        g = self.item_generator(epoch, i)
        return int(torch.randint(0, length - self.max_samples + 1, (1,), generator=g))

    def _load(self, path: Path, epoch: int, i: int) -> tuple[np.ndarray, bool]:
        """(waveform of item i of `epoch` from `path`, float32 (<= max_samples,), normalized already).

        The whole file if it fits. A longer one is cropped; with `normalize` the reference normalizes
        the whole utterance before cropping, which d2v keeps for utterances up to
        WHOLE_NORM_MAX_S seconds (every utterance of a speech corpus: LibriSpeech's longest is 35 s).
        Only longer files (a 10-minute recording) decode just the crop window, normalized by itself."""
        cap, wav = self.max_samples, None
        with _open(path) as f:
            if cap is None:
                return _decode_whole(f, path, self.sample_rate), False
            n = resampled_length(f.frames, f.samplerate, self.sample_rate)
            if n > cap and not (self.normalize and n <= WHOLE_NORM_MAX_S * self.sample_rate):
                wav = _decode_window(f, path, self.sample_rate, self._crop_start(epoch, i, n), cap)
                if wav is not None:
                    return wav, False
            else:
                wav = _decode_whole(f, path, self.sample_rate)
        if wav is None:  # fewer frames than the header says: decode what there is, crop that
            wav = load_audio(path, self.sample_rate)
        normed = False
        if wav.shape[0] > cap:
            if self.normalize:  # the reference's order: normalize the utterance, then crop
                x = torch.from_numpy(wav)
                wav, normed = normalize_waveform(x).numpy(), True
            start = self._crop_start(epoch, i, wav.shape[0])
            wav = np.ascontiguousarray(wav[start : start + cap])
        return wav, normed

    def _all_failed(self, i: int, tries: int, reasons: str) -> str:
        return (f"AudioDataset: {self.root}: {tries} consecutive audio files (of {len(self)}) failed to "
                f"decode, from index {i}: they pass the start-up header check but their audio cannot be "
                f"decoded (corrupt, truncated or non-finite data?); first reasons: {reasons}")

    def __getitem__(self, v: int) -> dict[str, Any]:
        n = len(self.entries)
        epoch, i = split_virtual_index(v, n, "AudioDataset")

        def decode(j: int) -> tuple[np.ndarray, bool]:
            path = self.entries[j].path
            try:
                return self._load(path, epoch, i)  # (L,), L <= max_samples; the crop is item i's
            except AudioDecodeError as e:
                raise DecodeFailed(str(path), str(e), str(e)) from None

        j, (wav, normed), bad = decode_with_fallback(
            n, i, decode, log=log, warn_key="audio-decode-failed",
            give_up=lambda tries, reasons: self._all_failed(i, tries, reasons))
        x = torch.from_numpy(wav)  # (L,)
        if self.normalize and not normed:
            x = normalize_waveform(x)
        return {"audio": x.contiguous(), "label": self.labels[j], "index": epoch * n + i, "file_index": j,
                "bad": bad}


# ---- sampler ------------------------------------------------------------------------------------


class LengthBucketBatchSampler(ResumableBatchSampler):
    """Infinite, resumable, rank-sharded stream of batches of *virtual* indices whose items have
    similar lengths (less waste when the collate crops a batch to its shortest item).

    Epoch e, from one generator seeded derive_seed("audio-sampler", seed, e): a permutation of the
    N items, truncated to steps_per_epoch * G items (G = batch_size * world_size; the random tail is
    dropped), cut into chunks of bucket_batches * G, each chunk sorted by length (stable) and cut
    into global batches of G consecutive items; then the order of all global batches is shuffled.
    Rank r takes items [r::world_size] of each global batch, so every rank has the same number of
    steps, ranks get disjoint items, and batch k of every rank holds similar lengths. Global step
    s -> (epoch, batch) = divmod(s, steps_per_epoch); `start_step` resumes exactly."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 32,
    ) -> None:
        if bucket_batches < 1:
            raise ValueError(f"LengthBucketBatchSampler: bucket_batches must be >= 1, got {bucket_batches}")
        if batch_size >= 1 and world_size >= 1 and len(lengths) < batch_size * world_size:
            raise ValueError(
                f"LengthBucketBatchSampler: dataset has {len(lengths)} usable samples, fewer than one "
                f"global batch of {batch_size * world_size} (batch_size {batch_size} x world_size "
                f"{world_size}); lower the batch size or add data"
            )
        super().__init__(len(lengths), batch_size, seed=seed, start_step=start_step, drop_last=True,
                         rank=rank, world_size=world_size)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)  # (N,)
        self.bucket_batches = int(bucket_batches)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch `epoch`, as dataset indices in [0, num_samples)."""
        g = seeded_generator("audio-sampler", self.seed, epoch)
        G = self.batch_size * self.world_size
        nb = self.steps_per_epoch
        perm = torch.randperm(self.num_samples, generator=g)[: nb * G]  # (nb*G,)
        chunk = self.bucket_batches * G
        parts = []
        for c in range(0, perm.numel(), chunk):
            idx = perm[c : c + chunk]
            order = torch.sort(self.lengths[idx], stable=True).indices
            parts.append(idx[order])
        glob = torch.cat(parts).view(nb, G)  # (nb, G), rows = global batches, sorted by length
        glob = glob[torch.randperm(nb, generator=g)]
        return glob[:, self.rank :: self.world_size].tolist()  # (nb, batch_size)


# ---- collate ------------------------------------------------------------------------------------


class AudioCollate:
    """Pretraining collate (picklable, for DataLoader workers).

    Every waveform is cropped to the batch's shortest length L (capped at max_samples) at a random
    offset per item (no padding, as the reference); then masks for M = clone_batch clones are drawn
    on the cropped length: T = feature_length(L), span_mask(B*M, T) with rows b*M .. b*M+M-1
    belonging to sample b, exactly int(T * mask_prob) masked per row. All draws use one generator
    seeded derive_seed("audio-batch", seed, items[0]["index"]).

    Returns {"audio": float32 (B, L), "mask": bool (B*M, T), "label": int64 (B,),
             "index": int64 (B,) virtual indices, "bad": list[str]}.

    The settings are the config's (masking.*, data.max_sample_size), validated there: clone_batch
    and mask_length >= 1, 0 < mask_prob < 1, max_samples >= 1 or None; span_mask checks mask_prob and
    mask_length again when called."""

    def __init__(
        self,
        *,
        clone_batch: int,
        mask_prob: float,
        mask_length: int,
        mask_adjust: float,
        feature_length: Callable[[int], int],
        seed: int,
        max_samples: int | None = None,
    ) -> None:
        self.clone_batch = int(clone_batch)
        self.mask_prob = float(mask_prob)
        self.mask_length = int(mask_length)
        self.mask_adjust = float(mask_adjust)
        self.feature_length = feature_length
        self.seed = int(seed)
        self.max_samples = None if max_samples is None else int(max_samples)

    def batch_generator(self, first_index: int) -> torch.Generator:
        return seeded_generator("audio-batch", self.seed, int(first_index))

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        check_items(items, "AudioCollate")
        g = self.batch_generator(items[0]["index"])
        L = min(int(it["audio"].shape[0]) for it in items)
        if self.max_samples is not None:
            L = min(L, self.max_samples)
        crops = []
        for it in items:
            x = it["audio"]  # (L_b,)
            extra = int(x.shape[0]) - L
            start = int(torch.randint(0, extra + 1, (1,), generator=g)) if extra > 0 else 0
            crops.append(x[start : start + L])
        T = int(self.feature_length(L))
        if T < 1:
            raise ValueError(f"AudioCollate: the batch's shortest waveform has {L} samples, which gives "
                             f"{T} encoder frames (need >= 1); raise the dataset's min_samples")
        B, M = len(items), self.clone_batch
        mask = span_mask(B * M, T, mask_prob=self.mask_prob, mask_length=self.mask_length,
                         adjust=self.mask_adjust, generator=g)  # (B*M, T)
        return {
            "audio": torch.stack(crops).to(torch.float32),  # (B, L)
            "mask": mask,
            "label": int64_column(items, "label"),  # (B,)
            "index": int64_column(items, "index"),  # (B,)
            "bad": failed_paths(items),
        }

    def __repr__(self) -> str:
        return (f"AudioCollate(clone_batch={self.clone_batch}, mask_prob={self.mask_prob}, "
                f"mask_length={self.mask_length}, mask_adjust={self.mask_adjust}, "
                f"feature_length={self.feature_length!r}, seed={self.seed}, "
                f"max_samples={self.max_samples})")


def collate_audio_eval(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation / probe collate: zero-pad to the longest item.

    Returns {"audio": float32 (B, Lmax), "padding_mask": bool (B, Lmax) True = padding,
             "label": int64 (B,), "index": int64 (B,)}."""
    check_items(items, "collate_audio_eval")
    audio, padding_mask = pad_right([it["audio"] for it in items], 0.0, torch.float32)  # (B, Lmax) x 2
    return {
        "audio": audio,
        "padding_mask": padding_mask,
        "label": int64_column(items, "label"),
        "index": int64_column(items, "index"),
    }


def build_audio_loader(
    dataset: AudioDataset,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable,
    bucket_batches: int = 32,
) -> DataLoader:
    """Infinite DataLoader of length-bucketed batches (LengthBucketBatchSampler over
    `dataset.lengths`); batch k of its iterator is global step start_step + k."""
    sampler = LengthBucketBatchSampler(
        dataset.lengths, batch_size, seed=seed, start_step=start_step, rank=rank,
        world_size=world_size, bucket_batches=bucket_batches,
    )
    return build_loader(dataset, batch_size=batch_size, seed=seed, start_step=start_step,
                        num_workers=num_workers, rank=rank, world_size=world_size,
                        collate_fn=collate_fn, batch_sampler=sampler)
