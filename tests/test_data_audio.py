"""Tests for d2v.data.audio and d2v.data.embedded_speech: manifests, folder scan, decode/resample,
bad files, per-item determinism, length-bucketed sampler, crop + mask collate, loader, espeak-ng data.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_data_audio.py
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.data import embedded_speech
from d2v.data.audio import (
    AudioCollate,
    AudioDataset,
    AudioDecodeError,
    AudioEntry,
    LengthBucketBatchSampler,
    build_audio_loader,
    collate_audio_eval,
    load_audio,
    read_manifest,
    scan_audio_folder,
)
from d2v.data.embedded_speech import SPEECH_SAMPLE_RATE, SPEECH_WORDS, prepare_speech
from d2v.data.files import DataDecodeError
from d2v.data.seed import derive_seed
from d2v.masking import span_mask
from tests.utils import LogRecords

SR = 16000

# ---- helpers ------------------------------------------------------------------------------------


def conv_len(n: int) -> int:
    """wav2vec 2.0 / data2vec conv feature extractor output length (total stride 320)."""
    for k, s in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        n = (n - k) // s + 1
    return n


def _write(path: Path, n: int, sr: int = SR, freq: float = 440.0, channels: int = 1, seed: int = 0,
           subtype: str = "PCM_16") -> Path:
    """A sine of `freq` Hz plus a little noise, n frames at `sr`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(n) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.RandomState(seed).randn(n)
    if channels > 1:
        x = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
    sf.write(str(path), x.astype(np.float32), sr, subtype=subtype)
    return path


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


def _quiet_dataset(source, **kw) -> AudioDataset:
    """A clean dataset must not warn: neither a Python warning nor a warning on the "d2v" logger."""
    cap, lg = LogRecords(), logging.getLogger("d2v")
    lg.addHandler(cap.handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = AudioDataset(source, **kw)
    finally:
        lg.removeHandler(cap.handler)
    assert [r.getMessage() for r in cap if r.levelno >= logging.WARNING] == []
    return ds


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 8 files, lengths 0.05..0.5 s at 16 kHz (a few at 8 kHz / 22.05 kHz)."""
    root = tmp_path_factory.mktemp("audio_folder")
    rs = np.random.RandomState(0)
    k = 0
    for c in ("cat", "dog", "emu"):
        for j in range(8):
            sr = (SR, 8000, 22050)[k % 3]
            n = int(rs.randint(800, 8000) * sr / SR)
            _write(root / c / f"{j:02d}.wav", n, sr=sr, freq=200 + 50 * k, seed=k)
            k += 1
    return root


# ---- manifests and scanning ---------------------------------------------------------------------


def test_read_manifest_root_variants_and_columns(tmp_path):
    """Absolute, relative and empty root lines; optional num_samples/label; '#' and blank lines."""
    audio_dir = tmp_path / "data"
    body = "a/x.wav\t1600\tyes\n\n# comment\nb/y.flac\t\tno\nc.wav\n"
    (tmp_path / "abs.tsv").write_text(f"{audio_dir}\n{body}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rel.tsv").write_text(f"../data\n{body}")
    (audio_dir).mkdir()
    (audio_dir / "empty.tsv").write_text(f"\n{body}")
    for m in (tmp_path / "abs.tsv", tmp_path / "sub" / "rel.tsv", audio_dir / "empty.tsv"):
        got = read_manifest(m)
        assert [(e.path.resolve(), e.num_samples, e.label) for e in got] == [
            ((audio_dir / "a/x.wav").resolve(), 1600, "yes"),
            ((audio_dir / "b/y.flac").resolve(), None, "no"),
            ((audio_dir / "c.wav").resolve(), None, None),
        ]
        assert all(isinstance(e, AudioEntry) for e in got)


@pytest.mark.parametrize("line,problem", [
    ("x.wav\tabc", "integer"),
    ("x.wav\t100\tyes\textra", "columns"),
    ("x.wav\t-5", ">= 0"),
])
def test_read_manifest_malformed_names_file_and_line(tmp_path, line, problem):
    m = tmp_path / "bad.tsv"
    m.write_text(f"/data\nok.wav\t10\n{line}\n")
    with pytest.raises(ValueError, match=rf"bad\.tsv:3: .*{problem}"):
        read_manifest(m)


def test_scan_audio_folder_with_and_without_classes(tmp_path, d2v_log):
    """Class subfolders (recursive, sorted, case-insensitive extensions, hidden and non-audio files
    skipped) get the folder name as label; loose root files are then ignored with a warning."""
    _write(tmp_path / "zebra" / "z.WAV", 400)
    _write(tmp_path / "apple" / "deep" / "b.flac", 400)
    _write(tmp_path / "apple" / "a.ogg", 400, subtype="VORBIS")
    _write(tmp_path / "apple" / ".hidden" / "h.wav", 400)
    (tmp_path / "apple" / "notes.txt").write_text("no")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "loose.wav", 400)
    got = scan_audio_folder(tmp_path)
    assert [m for m in d2v_log.messages() if "ignoring 1 audio" in m]
    rel = [(str(e.path.relative_to(tmp_path)), e.label) for e in got]
    assert rel == [("apple/a.ogg", "apple"), ("apple/deep/b.flac", "apple"), ("zebra/z.WAV", "zebra")]

    flat = tmp_path / "flat"
    for name in ("b.wav", "a.flac"):
        _write(flat / name, 400)
    assert [(e.path.name, e.label) for e in scan_audio_folder(flat)] == [("a.flac", None), ("b.wav", None)]
    with pytest.raises(ValueError, match="no audio files"):
        scan_audio_folder(tmp_path / "empty")


# ---- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sr,freq", [(22050, 440.0), (8000, 1000.0), (48000, 3000.0)])
def test_load_audio_resamples_keeping_frequency(tmp_path, sr, freq):
    """0.5 s at sr -> exactly 8000 samples at 16 kHz, dominant frequency preserved (FFT)."""
    p = _write(tmp_path / "s.wav", sr // 2, sr=sr, freq=freq)
    x = load_audio(p, SR)
    assert x.dtype == np.float32 and x.shape == (8000,)
    assert abs(_dominant_hz(x, SR) - freq) <= 3.0
    assert abs(float(np.sqrt((x[500:-500] ** 2).mean())) - 0.5 / math.sqrt(2)) < 0.03  # gain kept
    assert _dominant_hz(load_audio(p, 24000), 24000) == pytest.approx(freq, abs=3.0)


def test_load_audio_stereo_mixdown(tmp_path):
    """Channels are averaged: a (n, 2) file with right = 2 * left decodes to 1.5 * left."""
    p = _write(tmp_path / "st.wav", 3000, channels=2, subtype="FLOAT")
    both, _ = sf.read(str(p), dtype="float32")  # (n, 2)
    x = load_audio(p, SR)
    assert x.shape == (3000,)
    np.testing.assert_allclose(both[:, 1], 2 * both[:, 0], rtol=1e-5)
    np.testing.assert_allclose(x, both.mean(1), rtol=1e-6, atol=1e-7)


def test_load_audio_errors_name_the_path(tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + os.urandom(64))
    with pytest.raises(AudioDecodeError, match=r"corrupt\.wav: cannot decode"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), SR)
    with pytest.raises(AudioDecodeError, match=r"empty\.wav: empty audio"):
        load_audio(empty)
    assert issubclass(AudioDecodeError, ValueError)


# ---- dataset ------------------------------------------------------------------------------------


def test_dataset_metadata(folder):
    """Classes/labels from folders; lengths = decoded length at 16 kHz, capped at max_samples."""
    ds = _quiet_dataset(folder)
    assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 24
    assert ds.labels == [k // 8 for k in range(24)]
    assert ds.root == folder and ds.bad_files == []
    for k in (0, 1, 2, 13):
        assert ds.lengths[k] == load_audio(ds.entries[k].path).shape[0]
    capped = _quiet_dataset(folder, max_samples=2000)
    assert capped.lengths == [min(n, 2000) for n in ds.lengths] and max(ds.lengths) > 2000


def test_dataset_manifest_labels_and_shared_classes(folder, tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text(f"{folder}\ncat/00.wav\t999\tb\ndog/00.wav\t\ta\n")
    ds = _quiet_dataset(m)
    assert ds.classes == ["a", "b"] and ds.labels == [1, 0]
    assert _quiet_dataset(m, classes=["z", "b", "a"]).labels == [1, 2]
    with pytest.raises(ValueError, match="not in classes"):
        AudioDataset(m, classes=["a"])
    m.write_text(f"{folder}\ncat/00.wav\ndog/00.wav\n")
    ds = _quiet_dataset(m)
    assert ds.classes == [] and ds.labels == [-1, -1]
    m.write_text(f"{folder}\ncat/00.wav\t\tx\ndog/00.wav\n")
    with pytest.raises(ValueError, match="mixes labelled and unlabelled"):
        AudioDataset(m)


def test_dataset_skips_bad_files_with_one_warning(tmp_path, d2v_log):
    """Corrupt, empty, too-short and missing files are excluded, named by path and reason."""
    d = tmp_path / "d"
    good = [_write(d / f"good{k}.wav", 1000 + 100 * k, seed=k) for k in range(3)]
    corrupt = d / "corrupt.wav"
    corrupt.write_bytes(b"not audio at all" * 10)
    empty = d / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), SR)
    short = _write(d / "short.wav", 399)
    short8k = _write(d / "short8k.wav", 250, sr=8000)  # 500 samples at 16 kHz: long enough
    m = tmp_path / "m.tsv"
    names = [p.name for p in [*good, corrupt, empty, short, short8k]] + ["missing.wav"]
    m.write_text("d\n" + "\n".join(names) + "\n")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = AudioDataset(m, min_samples=400)
    assert rec == []  # logged, not a Python warning with a source line
    msgs = d2v_log.messages()
    assert len(msgs) == 1 and "skipping 4 unusable" in msgs[0]
    for name in ("corrupt.wav", "empty.wav", "short.wav", "missing.wav"):
        assert name in msgs[0]
    reasons = dict(ds.bad_files)
    assert set(reasons) == {str(d / n) for n in ("corrupt.wav", "empty.wav", "short.wav", "missing.wav")}
    assert "cannot open" in reasons[str(corrupt)] and "empty" in reasons[str(empty)]
    assert reasons[str(d / "missing.wav")] == "file not found"
    assert "too short: 399" in reasons[str(short)]
    assert [e.path.name for e in ds.entries] == ["good0.wav", "good1.wav", "good2.wav", "short8k.wav"]
    assert ds.lengths == [1000, 1100, 1200, 500]


def test_dataset_nothing_usable_raises(tmp_path):
    m = tmp_path / "all_bad.tsv"
    m.write_text(f"{tmp_path}\nnope1.wav\nnope2.wav\n")
    with pytest.raises(ValueError, match=r"all_bad\.tsv.*2 file\(s\) failed.*nope1\.wav: file not found"):
        AudioDataset(m)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AudioDataset(tmp_path / "no_such.tsv")


def test_getitem_decode_failure_falls_back_and_reports(tmp_path, d2v_log):
    """A file that vanished after the header check: the item comes from the next index and the
    failed path is reported in the warning and the item's 'bad' list."""
    for k in range(3):
        _write(tmp_path / f"{k}.wav", 1000 * (k + 1), seed=k)
    ds = _quiet_dataset(tmp_path)
    (tmp_path / "1.wav").unlink()
    item = ds[1 + 3 * 5]  # epoch 5, index 1
    (msg,) = d2v_log.messages()
    assert re.search(r"1\.wav: cannot decode audio \(file not found\); falling back to index 2", msg)
    assert item["bad"] == [str(tmp_path / "1.wav")] and item["file_index"] == 2
    assert item["index"] == 16 and item["audio"].shape == (3000,)
    assert ds[0]["bad"] == []
    for k in (0, 2):
        (tmp_path / f"{k}.wav").unlink()
    with pytest.raises(DataDecodeError, match="3 consecutive audio files .* failed to decode"):
        ds[0]


def test_items_deterministic_per_seed_epoch_index(folder):
    """Train crops depend only on (seed, epoch, i): equal on repeat, different across epochs and
    seeds; eval mode takes the first max_samples of the normalized utterance (the reference's order:
    normalize the utterance, then crop)."""
    ds = _quiet_dataset(folder, max_samples=600, seed=3)
    N = len(ds)
    lengths_full = _quiet_dataset(folder).lengths
    i = int(np.argmax(lengths_full))  # the longest file: many possible crops
    a, b = ds[i], ds[i]
    assert a["audio"].shape == (600,) and a["index"] == i
    assert torch.equal(a["audio"], b["audio"])
    crops = [ds[i + e * N]["audio"] for e in range(4)]
    assert sum(torch.equal(crops[0], c) for c in crops[1:]) == 0
    other = _quiet_dataset(folder, max_samples=600, seed=4)[i]["audio"]
    assert not torch.equal(other, a["audio"])
    full = _quiet_dataset(folder)[i]["audio"]
    # the crop is a window of the normalized full utterance (files up to WHOLE_NORM_MAX_S)
    windows = full.unfold(0, 600, 1)  # (L-599, 600)
    assert bool((windows - a["audio"]).abs().amax(1).min() < 1e-6)
    ev = _quiet_dataset(folder, max_samples=600, train=False)
    assert torch.equal(ev[i]["audio"], full[:600]) and torch.equal(ev[i + N]["audio"], full[:600])


def test_normalization(folder):
    ds = _quiet_dataset(folder)
    x = ds[5]["audio"]
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    raw = _quiet_dataset(folder, normalize=False)[5]["audio"]
    np.testing.assert_array_equal(raw.numpy(), load_audio(ds.entries[5].path))
    assert float(raw.std()) < 0.6


# ---- sampler ------------------------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed).randint(1_000, 100_000, size=n).tolist()


def test_sampler_resume_and_batch_at():
    lens = _lengths(100)
    s = LengthBucketBatchSampler(lens, 8, seed=1, bucket_batches=4)
    assert s.steps_per_epoch == 12
    it = iter(s)
    first = [next(it) for _ in range(30)]
    assert first == [s.batch_at(k) for k in range(30)]
    resumed = iter(LengthBucketBatchSampler(lens, 8, seed=1, start_step=17, bucket_batches=4))
    assert [next(resumed) for _ in range(13)] == first[17:]
    # virtual indices: epoch e covers e*N .. e*N+N-1, no repeats within an epoch
    for e in range(2):
        flat = [v for b in first[e * 12 : (e + 1) * 12] for v in b]
        assert len(set(flat)) == 96 and all(e * 100 <= v < (e + 1) * 100 for v in flat)
    assert first[:12] != [[v - 100 for v in b] for b in first[12:24]]  # reshuffled per epoch
    other_seed = LengthBucketBatchSampler(lens, 8, seed=2, bucket_batches=4)
    assert [other_seed.batch_at(k) for k in range(12)] != first[:12]


def test_sampler_ranks_disjoint_equal_steps():
    lens = _lengths(203)
    samplers = [LengthBucketBatchSampler(lens, 5, seed=0, rank=r, world_size=2) for r in range(2)]
    assert samplers[0].steps_per_epoch == samplers[1].steps_per_epoch == 20
    per_rank = [[s.batch_at(k) for k in range(20)] for s in samplers]
    assert all(len(b) == 5 for batches in per_rank for b in batches)
    sets = [{v for b in batches for v in b} for batches in per_rank]
    assert not sets[0] & sets[1] and len(sets[0]) == len(sets[1]) == 100
    # step k of both ranks comes from the same length bucket
    for k in range(20):
        both = [lens[v] for r in range(2) for v in per_rank[r][k]]
        assert max(both) - min(both) < 0.1 * (max(lens) - min(lens))


def test_sampler_groups_lengths():
    """Within-batch max/min length ratio is far smaller than for random batches."""
    lens = _lengths(2000)
    s = LengthBucketBatchSampler(lens, 8, seed=0, bucket_batches=32)
    ratios = [max(lens[v] for v in b) / min(lens[v] for v in b) for b in s.epoch_batches(0)]
    perm = np.random.RandomState(1).permutation(2000)[:2000 // 8 * 8].reshape(-1, 8)
    random_ratios = [max(lens[v] for v in b) / min(lens[v] for v in b) for b in perm]
    assert np.median(ratios) < 1.1 and np.median(random_ratios) > 3
    # but the order of the batches is shuffled: not monotone in length
    firsts = [lens[b[0]] for b in s.epoch_batches(0)]
    assert firsts != sorted(firsts)


def test_sampler_too_small_errors():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        LengthBucketBatchSampler([100] * 7, 4, world_size=2)


# ---- collate ------------------------------------------------------------------------------------


def _items(lengths, start_index=0):
    g = torch.Generator().manual_seed(0)
    return [{"audio": torch.randn(n, generator=g), "label": k % 3, "index": start_index + k,
             "bad": ["x.wav"] if k == 1 else []} for k, n in enumerate(lengths)]


def _collate(**kw) -> AudioCollate:
    args = dict(clone_batch=3, mask_prob=0.5, mask_length=5, mask_adjust=0.05, feature_length=conv_len,
                seed=7)
    args.update(kw)
    return AudioCollate(**args)


def test_collate_crops_to_shortest_and_masks():
    items = _items([16000, 20000, 17234, 30000], start_index=40)
    out = _collate()(items)
    L, T, B, M = 16000, conv_len(16000), 4, 3
    assert T == 49
    assert out["audio"].shape == (B, L) and out["audio"].dtype == torch.float32
    assert out["mask"].shape == (B * M, T) and out["mask"].dtype == torch.bool
    assert (out["mask"].sum(1) == int(T * 0.5)).all()
    assert out["label"].tolist() == [0, 1, 2, 0] and out["label"].dtype == torch.int64
    assert out["index"].tolist() == [40, 41, 42, 43] and out["bad"] == ["x.wav"]
    for b, it in enumerate(items):  # every row is a contiguous window of its own waveform
        starts = torch.nonzero(it["audio"] == out["audio"][b, 0]).flatten().tolist()
        assert any(torch.equal(it["audio"][o : o + L], out["audio"][b]) for o in starts)
    # the documented construction: crop offsets then span_mask(B*M, T) from one generator
    g = torch.Generator().manual_seed(derive_seed("audio-batch", 7, 40))
    offsets = [int(torch.randint(0, len(it["audio"]) - L + 1, (1,), generator=g))
               for it in items if len(it["audio"]) > L]
    assert torch.equal(out["audio"][3], items[3]["audio"][offsets[-1] : offsets[-1] + L])
    ref = span_mask(B * M, T, mask_prob=0.5, mask_length=5, adjust=0.05, generator=g)
    assert torch.equal(out["mask"], ref)
    # rows b*M .. b*M+M-1 are sample b's M independent clones: they differ from each other
    for b in range(B):
        rows = out["mask"][b * M : (b + 1) * M]
        assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])


def test_collate_deterministic_and_seeded_by_first_index():
    items = _items([9000, 12000, 15000], start_index=5)
    c = _collate()
    a, b = c(items), c(items)
    assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["mask"], b["mask"])
    shifted = c([{**it, "index": it["index"] + 100} for it in items])
    assert not torch.equal(a["mask"], shifted["mask"])
    other_seed = _collate(seed=8)(items)
    assert not torch.equal(a["mask"], other_seed["mask"])
    restored = pickle.loads(pickle.dumps(c))
    assert torch.equal(restored(items)["mask"], a["mask"])


def test_collate_max_samples_and_too_short():
    out = _collate(max_samples=4000, clone_batch=1, mask_prob=0.65)(_items([9000, 12000]))
    assert out["audio"].shape == (2, 4000) and out["mask"].shape == (2, conv_len(4000))
    assert (out["mask"].sum(1) == int(conv_len(4000) * 0.65)).all()
    with pytest.raises(ValueError, match="300 samples.*0 encoder frames"):
        _collate()(_items([300, 5000]))


def test_collate_audio_eval_pads():
    items = _items([5, 3, 4])
    out = collate_audio_eval(items)
    assert out["audio"].shape == (3, 5) and out["padding_mask"].dtype == torch.bool
    assert out["padding_mask"].tolist() == [[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]]
    assert torch.equal(out["audio"][1, :3], items[1]["audio"]) and (out["audio"][1, 3:] == 0).all()
    assert out["label"].tolist() == [0, 1, 2]


def test_build_audio_loader_matches_sampler(folder):
    ds = _quiet_dataset(folder, max_samples=4000, seed=2)
    collate = _collate(seed=2, clone_batch=2)
    loader = build_audio_loader(ds, batch_size=4, seed=2, start_step=3, num_workers=0, collate_fn=collate)
    sampler = LengthBucketBatchSampler(ds.lengths, 4, seed=2)
    it = iter(loader)
    for step in range(3, 3 + 8):  # crosses the epoch boundary (6 steps per epoch)
        got = next(it)
        want = collate([ds[v] for v in sampler.batch_at(step)])
        assert got["index"].tolist() == sampler.batch_at(step)
        assert torch.equal(got["audio"], want["audio"]) and torch.equal(got["mask"], want["mask"])


# ---- embedded espeak-ng speech ------------------------------------------------------------------


def test_prepare_speech_without_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_speech.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="espeak-ng not found.*apt-get install espeak-ng.*data.path"):
        prepare_speech(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prepare_speech_rebuilds_stale_refuses_foreign(tmp_path, monkeypatch):
    """A tree with another recipe fingerprint is replaced; a dir without READY is refused."""
    monkeypatch.setattr(embedded_speech.shutil, "which", lambda name: "/bin/true")

    def fake_tree(tmp_root: Path, espeak: str) -> dict:
        (tmp_root / "new").write_text("new")
        return {"utterances": 0}

    monkeypatch.setattr(embedded_speech, "_write_speech_tree", fake_tree)
    final = tmp_path / "speech16k"
    final.mkdir()
    (final / "old").write_text("old")
    (final / "READY").write_text(json.dumps({"fingerprint": "stale"}))
    assert prepare_speech(tmp_path) == final
    assert (final / "new").exists() and not (final / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech16k"]
    assert json.loads((final / "READY").read_text())["fingerprint"] == embedded_speech._fingerprint()
    shutil.rmtree(final)
    final.mkdir()
    (final / "junk").write_text("x")
    with pytest.raises(RuntimeError, match="READY"):
        prepare_speech(tmp_path)


def test_prepare_speech_never_deletes_a_foreign_dir_that_appears_meanwhile(tmp_path, monkeypatch):
    """A speech16k dir without READY created while we build (not a cache of ours) is left alone: the
    rename fails and says so; only a complete tree of another recipe is ever replaced."""
    monkeypatch.setattr(embedded_speech.shutil, "which", lambda name: "/bin/true")
    final = tmp_path / "speech16k"

    def fake_tree(tmp_root: Path, espeak: str) -> dict:
        final.mkdir()
        (final / "theirs").write_text("theirs")
        return {"utterances": 0}

    monkeypatch.setattr(embedded_speech, "_write_speech_tree", fake_tree)
    with pytest.raises(OSError):
        prepare_speech(tmp_path)
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech16k"]  # our temp dir removed


def test_prepare_speech_shows_progress_and_says_where(tmp_path, monkeypatch, capsys, d2v_log):
    """First use synthesizes 1600 utterances (~25 s): an info line names the work and the cache
    folder, and a progress bar over the utterances goes to stderr."""
    monkeypatch.setattr(embedded_speech.shutil, "which", lambda name: "/bin/true")
    monkeypatch.setattr(embedded_speech, "_synthesize", lambda *a: 8000)  # no espeak-ng run
    root = prepare_speech(tmp_path)
    assert json.loads((root / "READY").read_text())["utterances"] == 1600
    infos = [r.getMessage() for r in d2v_log.records
             if r.name.startswith("d2v") and r.levelno == logging.INFO]
    assert any("espeak-ng" in m and "1600" in m and str(root) in m for m in infos), infos
    err = capsys.readouterr().err
    assert "synthesizing speech" in err and "/1600" in err


def test_header_check_shows_progress_from_1000_files(tmp_path, capsys):
    """The start-up header check shows a bar once it may take a couple of seconds (1000 audio files:
    ~0.1 ms each warm, ~1-3 ms on a cold cache); not for a handful of files."""
    one = _write(tmp_path / "one.wav", 800).read_bytes()
    many = tmp_path / "many"
    many.mkdir()
    for k in range(1000):
        (many / f"{k:04d}.wav").write_bytes(one)
    capsys.readouterr()
    assert len(AudioDataset(many)) == 1000
    assert "checking many" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for k in range(3):
        (few / f"{k}.wav").write_bytes(one)
    AudioDataset(few)
    assert "checking" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_prepare_speech_builds_real_dataset(tmp_path):
    t0 = time.perf_counter()
    root = prepare_speech(tmp_path)
    build_s = time.perf_counter() - t0
    assert root == tmp_path / "speech16k" and sorted(p.name for p in tmp_path.iterdir()) == ["speech16k"]
    ready = json.loads((root / "READY").read_text())
    assert ready["utterances"] == 1600 and ready["speakers"] == 80 and build_s < 60

    train = _quiet_dataset(root / "train.tsv", min_samples=SPEECH_SAMPLE_RATE // 10)
    test = _quiet_dataset(root / "test.tsv", min_samples=SPEECH_SAMPLE_RATE // 10)
    assert train.classes == test.classes == sorted(SPEECH_WORDS) and len(train.classes) == 20
    assert (len(train), len(test)) == (1280, 320)
    spk = [{e.path.parent.name for e in d.entries} for d in (train, test)]
    assert (len(spk[0]), len(spk[1])) == (64, 16) and not spk[0] & spk[1]
    secs = np.asarray(train.lengths + test.lengths) / SPEECH_SAMPLE_RATE
    assert 0.15 < secs.min() and secs.max() < 1.5 and 0.3 < np.median(secs) < 0.8
    info = sf.info(str(train.entries[0].path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    # manifest num_samples hints equal the real lengths; labels are the file names' words
    assert [e.num_samples for e in read_manifest(root / "train.tsv")] == train.lengths
    assert all(e.path.stem == train.classes[y] for e, y in zip(train.entries, train.labels))
    # real speech, trimmed: loud in the middle, not silence-padded
    x = load_audio(train.entries[7].path)
    frames = np.sqrt((x[: len(x) // 160 * 160].reshape(-1, 160) ** 2).mean(1))
    assert frames.max() > 0.05 and frames[0] < frames.max() / 3

    # speaker probe: all 80 speakers in both, 16 train / 4 test words each, disjoint files
    sp_tr = _quiet_dataset(root / "speaker_train.tsv", min_samples=1)
    sp_te = _quiet_dataset(root / "speaker_test.tsv", min_samples=1)
    assert sp_tr.classes == sp_te.classes and len(sp_tr.classes) == 80
    assert np.bincount(sp_tr.labels).tolist() == [16] * 80 and np.bincount(sp_te.labels).tolist() == [4] * 80
    assert not {e.path for e in sp_tr.entries} & {e.path for e in sp_te.entries}
    tr_spk = read_manifest(root / "train_speaker.tsv")
    assert [e.path for e in tr_spk] == [e.path for e in train.entries]
    assert all(e.label == e.path.parent.name for e in tr_spk)

    mtime = train.entries[0].path.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert prepare_speech(tmp_path) == root
    assert time.perf_counter() - t0 < 0.5 and train.entries[0].path.stat().st_mtime_ns == mtime


def test_scan_symlink_loop_and_cross_class_link_list_each_file_once(tmp_path):
    """A link loop (cats/loop -> ..) and a link into another class's folder list no file twice: links
    are followed once, by real path, across the whole scan (before: dogs.wav also appeared under cats)."""
    import os

    import numpy as np
    import soundfile as sf

    from d2v.data.audio import scan_audio_folder

    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        sf.write(tmp_path / c / f"{c}.wav", np.zeros(1600, dtype=np.float32), 16000)
    os.symlink("..", tmp_path / "cats" / "loop")
    os.symlink(tmp_path / "dogs", tmp_path / "cats" / "dogs_link")
    entries = scan_audio_folder(tmp_path)
    assert sorted((e.path.name, e.label) for e in entries) == [("cats.wav", "cats"), ("dogs.wav", "dogs")]
