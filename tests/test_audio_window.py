"""AudioDataset decodes only the crop window of a long file (d2v.data.audio.load_audio_window).

A train item of a file longer than max_samples reads the frames its crop needs (plus the resampling
filter's support) instead of decoding and resampling the whole file. Checked here on generated
60 s files: the frames actually read are bounded (soundfile's reads are counted, no wall clock), the
crop start is the one the per-item generator always drew, and the samples equal the whole-file path:
bit for bit at the file's own rate, within a float32 rounding bound derived from the filter's length
when resampling (the arithmetic is the same, so the measured error is 0 in practice).

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_audio_window.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from d2v.data import audio
from d2v.data.audio import AudioDataset, load_audio, resampled_length

SR = 16000
CAP = 32000  # 2 s crops


def _write(path, seconds: float, sr: int, channels: int = 1, subtype: str | None = None, seed: int = 0):
    """A chirp plus noise (a spectrum that exercises the resampling filter), written in blocks."""
    n = int(seconds * sr)
    rs = np.random.RandomState(seed)
    with sf.SoundFile(str(path), "w", sr, channels, subtype=subtype) as f:
        for k in range(0, n, 1 << 16):
            t = np.arange(k, min(n, k + (1 << 16))) / sr
            x = 0.4 * np.sin(2 * np.pi * (100 + 40 * t) * t) + 0.05 * rs.randn(t.size)
            if channels > 1:
                x = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
            f.write(x.astype(np.float32))
    return path


@pytest.fixture
def frames_read(monkeypatch):
    """Counts the frames every soundfile read returns (sf.read goes through SoundFile.read too)."""
    count = {"frames": 0, "calls": 0}
    orig = sf.SoundFile.read

    def read(self, *a, **kw):
        out = orig(self, *a, **kw)
        count["frames"] += len(out)
        count["calls"] += 1
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return count


def _expected_start(ds: AudioDataset, epoch: int, i: int, L: int) -> int:
    """The crop start the dataset has always drawn: randint(0, L - cap + 1) from the item generator."""
    return int(torch.randint(0, L - ds.max_samples + 1, (1,), generator=ds.item_generator(epoch, i)))


def _tolerance(file_rate: int, peak: float) -> float:
    """Bound on |window path - whole-file path| from float32 rounding, derived from the filter.

    Each output sample is a dot product of at most T = ceil(len(h) / up) taps of one polyphase
    branch h[p::up] (scaled by up) with input samples |x| <= peak; a float32 dot product of T terms
    is off by at most T * eps * sum|h_k x_k| <= T * eps * peak * max_p sum|up * h[p::up]|. Both paths
    are within that of the exact value, so they differ by at most twice it. (They do the same
    arithmetic on the same samples, so the measured difference is 0; the bound only allows a scipy
    that sums in another order.)"""
    up, down = audio._ratio(file_rate, SR)
    h = audio._resample_filter(up, down).astype(np.float64) * up  # what resample_poly applies
    taps = math.ceil(h.size / up)
    branch = max(float(np.abs(h[p::up]).sum()) for p in range(up))
    return 2 * taps * float(np.finfo(np.float32).eps) * peak * branch


@pytest.mark.parametrize("fmt,subtype", [("flac", None), ("wav", "PCM_16"), ("wav", "FLOAT")])
def test_same_rate_window_is_bounded_and_bit_identical(tmp_path, frames_read, fmt, subtype):
    """60 s at 16 kHz: a train item reads exactly CAP frames and equals the whole-file crop bit for
    bit (normalize=False), and the layer norm of that crop with normalize=True (past WHOLE_NORM_MAX_S:
    a shorter file is normalized whole before the crop, as the reference does)."""
    p = _write(tmp_path / f"long.{fmt}", 61, SR, subtype=subtype)
    whole = load_audio(p, SR)  # (960000,)
    L = whole.shape[0]
    assert L == 61 * SR
    raw = AudioDataset(tmp_path, max_samples=CAP, normalize=False, seed=5)
    norm = AudioDataset(tmp_path, max_samples=CAP, normalize=True, seed=5)
    for epoch in range(4):
        start = _expected_start(raw, epoch, 0, L)
        frames_read["frames"] = 0
        item = raw[epoch * len(raw)]
        assert frames_read["frames"] == CAP  # not the 960000 of the whole file
        assert item["audio"].dtype == torch.float32 and item["audio"].shape == (CAP,)
        np.testing.assert_array_equal(item["audio"].numpy(), whole[start : start + CAP])
        want = F.layer_norm(torch.from_numpy(whole[start : start + CAP]), (CAP,), eps=1e-5)
        assert torch.equal(norm[epoch * len(norm)]["audio"], want)


@pytest.mark.parametrize("file_rate", [44100, 22050, 48000, 8000])
def test_resampled_window_matches_whole_file(tmp_path, frames_read, file_rate):
    """60 s at file_rate -> 16 kHz: the item reads about CAP * file_rate / 16000 frames plus the
    filter's support, and matches the whole-file resampling within the rounding bound."""
    p = _write(tmp_path / "long.flac", 60, file_rate)
    whole = load_audio(p, SR)
    L = whole.shape[0]
    assert L == resampled_length(60 * file_rate, file_rate, SR) == 60 * SR
    up, down = audio._ratio(file_rate, SR)
    half = (audio._resample_filter(up, down).size - 1) // 2
    # input frames a window of CAP outputs can need: its span, the filter's support on both sides,
    # and the alignment of the first frame to a multiple of `down`
    bound = math.ceil(CAP * down / up) + 2 * (half // up + 1) + down
    assert bound < 60 * file_rate / 10
    tol = _tolerance(file_rate, float(np.abs(whole).max()))
    ds = AudioDataset(tmp_path, max_samples=CAP, normalize=False, seed=1)
    worst = 0.0
    for epoch in range(3):
        start = _expected_start(ds, epoch, 0, L)
        frames_read["frames"] = 0
        got = ds[epoch]["audio"].numpy()
        assert 0 < frames_read["frames"] <= bound
        assert got.shape == (CAP,) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - whole[start : start + CAP]).max()))
    assert worst <= tol, (worst, tol)


@pytest.mark.parametrize("file_rate", [44100, 16000])
def test_window_at_file_edges_and_stereo(tmp_path, frames_read, file_rate):
    """Windows touching the first and the last sample match too (both paths zero-pad the same way
    outside the file); a stereo file is mixed down on the window only."""
    p = _write(tmp_path / "st.flac", 20, file_rate, channels=2)
    whole = load_audio(p, SR)
    L = whole.shape[0]
    tol = _tolerance(file_rate, float(np.abs(whole).max())) if file_rate != SR else 0.0
    for start in (0, 1, 7, L // 3, L - CAP - 3, L - CAP):
        frames_read["frames"] = 0
        got = audio.load_audio_window(p, SR, start, CAP)
        assert frames_read["frames"] < 20 * file_rate / 4
        assert got.shape == (CAP,) and got.dtype == np.float32
        err = float(np.abs(got - whole[start : start + CAP]).max())
        assert err <= tol, (start, err, tol)
    with pytest.raises(ValueError, match="outside"):
        audio.load_audio_window(p, SR, L - CAP + 1, CAP)


def test_whole_file_resampling_is_scipys_default(tmp_path):
    """load_audio's explicit filter is scipy resample_poly's default one: same output, bit for bit."""
    from scipy.signal import resample_poly

    p = _write(tmp_path / "a.wav", 1.3, 44100, subtype="FLOAT")
    x, _ = sf.read(str(p), dtype="float32")
    np.testing.assert_array_equal(load_audio(p, SR), resample_poly(x, 160, 441).astype(np.float32))


def test_eval_and_probe_paths(tmp_path, frames_read):
    """Eval mode with max_samples reads the first CAP samples only; without max_samples (the probe on
    whole utterances) the item is the whole normalized file."""
    p = _write(tmp_path / "long.flac", 30, 44100)
    whole = load_audio(p, SR)
    ev = AudioDataset(tmp_path, max_samples=CAP, normalize=False, train=False)
    frames_read["frames"] = 0
    for v in (0, 1, 5):
        np.testing.assert_array_equal(ev[v]["audio"].numpy(), ev[0]["audio"].numpy())
    assert frames_read["frames"] < 6 * 30 * 44100 / 10
    err = float(np.abs(ev[0]["audio"].numpy() - whole[:CAP]).max())
    assert err <= _tolerance(44100, float(np.abs(whole).max()))
    probe = AudioDataset(tmp_path, normalize=True, train=False)
    want = F.layer_norm(torch.from_numpy(whole), whole.shape, eps=1e-5)
    assert torch.equal(probe[0]["audio"], want)


def test_nan_checks_apply_to_the_window(tmp_path, monkeypatch):
    """A NaN inside the crop makes the item fall back to the next file; one outside it is not read."""
    x = 0.1 * np.random.RandomState(0).randn(10 * SR).astype(np.float32)
    x[5 * SR] = np.nan
    sf.write(str(tmp_path / "a.wav"), x, SR, subtype="FLOAT")
    sf.write(str(tmp_path / "b.wav"), x[:SR], SR, subtype="FLOAT")  # shorter than the crop, no NaN
    ds = AudioDataset(tmp_path, max_samples=CAP, normalize=False, seed=0)
    hits = {"in": 0, "out": 0}
    for epoch in range(40):
        start = _expected_start(ds, epoch, 0, 10 * SR)
        item = ds[epoch * 2]
        if start <= 5 * SR < start + CAP:
            hits["in"] += 1
            assert item["file_index"] == 1 and item["bad"] == [str(tmp_path / "a.wav")]
        else:
            hits["out"] += 1
            assert item["file_index"] == 0 and item["bad"] == []
            np.testing.assert_array_equal(item["audio"].numpy(), x[start : start + CAP])
    assert hits["in"] and hits["out"]


def test_header_longer_than_the_data_falls_back_to_the_whole_file(tmp_path, monkeypatch):
    """When the window read comes back short (the header promised more frames than the file holds),
    the item is decoded the old way, whole, with the crop drawn on the decoded length, instead of
    returning a short window."""
    p = _write(tmp_path / "a.wav", 10, SR, subtype="FLOAT")
    whole = load_audio(p, SR)
    ds = AudioDataset(tmp_path, max_samples=CAP, normalize=False, seed=0)
    orig = sf.SoundFile.frames
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: orig.fget(self) + 90 * SR))
    epoch = next(e for e in range(100) if _expected_start(ds, e, 0, 100 * SR) > 10 * SR)
    item = ds[epoch]
    start = _expected_start(ds, epoch, 0, 10 * SR)
    np.testing.assert_array_equal(item["audio"].numpy(), whole[start : start + CAP])


def test_tolerance_catches_a_margin_shorter_than_the_filter(tmp_path, monkeypatch):
    """The bound is tight enough to matter: reading two input frames too few on each side (a margin
    shorter than the filter's support) puts the window well outside it."""
    p = _write(tmp_path / "a.flac", 10, 44100)
    whole = load_audio(p, SR)
    up, _ = audio._ratio(44100, SR)
    orig = audio._window_frames
    monkeypatch.setattr(audio, "_window_frames", lambda s, n, u, d, half: orig(s, n, u, d, half - 2 * up))
    got = audio.load_audio_window(p, SR, 50_000, CAP)
    assert float(np.abs(got - whole[50_000 : 50_000 + CAP]).max()) > 10 * _tolerance(44100, 0.5)


def test_speech_length_files_are_normalized_whole_before_the_crop(tmp_path):
    """With normalize on, a file up to WHOLE_NORM_MAX_S is normalized over the whole utterance, then
    cropped (the reference's order); the window-only decode is for longer recordings."""
    from d2v.data.audio import WHOLE_NORM_MAX_S

    p = _write(tmp_path / "utt.wav", 30, SR, subtype="FLOAT")
    assert 30 <= WHOLE_NORM_MAX_S
    whole = torch.from_numpy(load_audio(p, SR))  # (480000,)
    ds = AudioDataset(tmp_path, max_samples=CAP, normalize=True, seed=2)
    normed = F.layer_norm(whole, whole.shape, eps=1e-5)
    start = _expected_start(ds, 0, 0, whole.shape[0])
    assert torch.equal(ds[0]["audio"], normed[start : start + CAP])
