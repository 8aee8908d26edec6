"""Clear messages for unusable data, audio and images: a missing manifest file says "file not found";
a folder whose files all pass the header check but fail to decode raises DataDecodeError (a
ValueError: one line and exit 2 on the command line, also from a DataLoader worker); decode
fallbacks and start-up skip lists are logged once ("d2v" logger, no Python warning with a source
line), while `bad_files` and the items' "bad" lists stay as they were.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_data_errors.py
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from d2v.data.audio import AudioDataset
from d2v.data.files import DataDecodeError
from d2v.data.images import ImageFolderDataset

SR = 16000


def _wav(path: Path, n: int = 3200, nan: bool = False, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.RandomState(seed).randn(n).astype(np.float32)
    if nan:
        x[:] = np.nan
    sf.write(str(path), x, SR, subtype="FLOAT")
    return path


def _jpeg(path: Path, truncate: bool = False, seed: int = 0) -> Path:
    """A 64x64 JPEG; `truncate` keeps the header and the first 40% of the file (PIL's header check
    passes, decoding fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
    return path


# ---- missing manifest files -----------------------------------------------------------------------


def test_manifest_missing_file_says_file_not_found(tmp_path, d2v_log):
    """Before: 'cannot open (LibsndfileError: Error opening ...: System error.)'."""
    _wav(tmp_path / "d" / "good.wav")
    (tmp_path / "d" / "sub").mkdir()
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "d" / "dangling.wav")
    m = tmp_path / "m.tsv"
    m.write_text("d\ngood.wav\nmissing.wav\ndangling.wav\nsub\n")
    ds = AudioDataset(m)
    reasons = dict(ds.bad_files)
    assert reasons[str(tmp_path / "d" / "missing.wav")] == "file not found"
    assert reasons[str(tmp_path / "d" / "dangling.wav")] == "file not found (broken symbolic link)"
    assert reasons[str(tmp_path / "d" / "sub")] == "is a directory, not a file"
    (msg,) = d2v_log.messages()
    assert "missing.wav (file not found)" in msg and "System error" not in msg


# ---- folders of files that pass the header check but do not decode --------------------------------


def _check_decode_error(err: DataDecodeError, root: Path, count: int, reason: str) -> None:
    msg = str(err)
    assert isinstance(err, ValueError) and "\n" not in msg and "Traceback" not in msg
    assert str(root) in msg and f"{count} consecutive" in msg
    assert "pass the start-up header check" in msg and reason in msg
    assert msg.count(str(root)) == 1 + 3  # the folder, then the paths of the first 3 reasons
    assert f"and {count - 3} more" in msg


def test_audio_folder_of_nan_wavs_raises_data_decode_error(tmp_path, d2v_log):
    """Before: RuntimeError 'AudioDataset: 10 consecutive files failed to decode' with a traceback."""
    root = tmp_path / "nan"
    for k in range(12):
        _wav(root / f"{k:02d}.wav", nan=True)
    ds = AudioDataset(root)
    assert ds.bad_files == [] and len(ds) == 12  # the headers are fine
    with pytest.raises(DataDecodeError) as err:
        ds[0]
    _check_decode_error(err.value, root, 10, "NaN or inf")


def test_image_folder_of_truncated_jpegs_raises_data_decode_error(tmp_path, d2v_log):
    root = tmp_path / "trunc"
    for k in range(12):
        _jpeg(root / f"{k:02d}.jpg", truncate=True, seed=k)
    ds = ImageFolderDataset(root, image_size=8)
    assert ds.bad_files == [] and len(ds) == 12
    with pytest.raises(DataDecodeError) as err:
        ds[3]
    _check_decode_error(err.value, root, 10, "truncated")


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_data_decode_error_from_a_worker_stays_one_line(tmp_path, d2v_log, modality):
    """A DataLoader worker re-raises as DataDecodeError("Caught ... Original Traceback ..."): the
    exception keeps only the original message (what the command line prints)."""
    root = tmp_path / modality
    if modality == "audio":
        for k in range(4):
            _wav(root / f"{k}.wav", nan=True)
        ds = AudioDataset(root)
    else:
        for k in range(4):
            _jpeg(root / f"{k}.jpg", truncate=True, seed=k)
        ds = ImageFolderDataset(root, image_size=8)
    with pytest.raises(DataDecodeError) as here:
        ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(DataDecodeError) as there:
        next(iter(loader))
    assert str(there.value) == str(here.value)
    assert DataDecodeError("plain message").args == ("plain message",)


# ---- warnings: once, logged, counting unchanged ---------------------------------------------------


def test_audio_warnings_once_per_file_and_per_root(tmp_path, d2v_log):
    root = tmp_path / "a"
    for k in range(3):
        _wav(root / f"{k}.wav", seed=k)
    _wav(root / "0b.wav", nan=True)  # index 1: passes the header, fails to decode
    (root / "9.wav").write_bytes(b"not audio" * 20)  # fails the header check
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = AudioDataset(root)
        second = AudioDataset(root)
        items = [first[1], first[1 + 4], second[1], first[1]]
    assert rec == []  # no Python warnings (they echo a source line)
    for ds in (first, second):  # every dataset still lists its bad files
        assert [p for p, _ in ds.bad_files] == [str(root / "9.wav")]
    assert all(it["bad"] == [str(root / "0b.wav")] and it["file_index"] == 2 for it in items)
    msgs = d2v_log.messages()
    assert len(msgs) == 2, msgs
    assert "skipping 1 unusable audio file" in msgs[0] and "9.wav" in msgs[0]
    assert "0b.wav" in msgs[1] and "falling back to index 2" in msgs[1]
    assert all(r.name == "d2v.data.audio" for r in d2v_log.records if r.levelno == logging.WARNING)


def test_image_warnings_once_per_file_and_per_root(tmp_path, d2v_log):
    root = tmp_path / "i"
    for k in range(3):
        _jpeg(root / f"{k}.jpg", seed=k)
    _jpeg(root / "0b.jpg", truncate=True)  # index 1
    (root / "9.jpg").write_bytes(b"not an image" * 20)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ImageFolderDataset(root, image_size=8)
        second = ImageFolderDataset(root, image_size=8)
        items = [first[1], first[1 + 4], second[1], first[1]]
    assert rec == []
    for ds in (first, second):
        assert [p for p, _ in ds.bad_files] == [str(root / "9.jpg")]
    assert all(it["bad"] == [str(root / "0b.jpg")] and it["index"] == 2 for it in items)
    msgs = d2v_log.messages()
    assert len(msgs) == 2, msgs
    assert "skipping 1 unreadable image file" in msgs[0] and "9.jpg" in msgs[0]
    assert "0b.jpg: failed to decode" in msgs[1] and "falling back to index 2" in msgs[1]
    assert all(r.name == "d2v.data.images" for r in d2v_log.records if r.levelno == logging.WARNING)
