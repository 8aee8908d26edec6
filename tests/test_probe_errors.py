"""The linear probe on too little labelled data, and what it says while it runs.

A class with one example used to end a finished pretraining with sklearn's "The least populated classes
in y have only 1 member ... [1]": now a one-line ValueError names the class by its folder name, its
count and how many examples per class the probe needs. A tiny held-out set gets a warning that its
accuracy is noisy. Progress (per task and encoder: features, fits) goes to the "d2v.probe" logger,
nothing to stdout.

Run: cd /work/main && .venv/bin/python -m pytest -x -q tests/test_probe_errors.py
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.config import Config
from d2v.probe import HELD_OUT, MIN_CV_FOLDS, probe_encoders

GRAY = {"a": 0, "b": 60, "c": 120, "d": 180, "e": 240}  # one flat gray level per class: separable


def _write(root: Path, counts: dict[str, int]) -> None:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for j in range(n):
            arr = np.full((8, 8, 3), GRAY[c], dtype=np.uint8)
            arr[0, 0] = j  # distinct files
            Image.fromarray(arr).save(root / c / f"{j}.png")


class MeanPixel(torch.nn.Module):
    """Stand-in encoder: the mean pixel per channel, which names the class exactly."""

    def extract_features(self, x, pool=None, padding_mask=None):
        return x.mean(dim=(2, 3))


def _probe(root: Path):
    cfg = Config.from_dict({"model": {"modality": "image"}, "data": {"path": str(root)}})
    enc = MeanPixel()
    # 1-shot and 2 training examples per class where the size does not matter: the fewest fits
    return probe_encoders(cfg, {"pretrained": enc, "random_init": enc}, "mean", 1, 0, torch.device("cpu"))


@pytest.fixture
def probe_log():
    """Records of the "d2v.probe" logger at info and up (whatever logging setup ran before)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    lg = logging.getLogger("d2v.probe")
    h, old = Keep(logging.INFO), lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


def test_one_example_class_without_test_split_names_the_class(tmp_path):
    _write(tmp_path, {"a": 8, "b": 1, "c": 8})
    with pytest.raises(ValueError) as err:
        _probe(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "least populated" not in msg
    assert str(tmp_path) in msg and "class 'b' has 1 example" in msg
    # k-fold CV needs 2 per class in the training part, plus 1 held out when the probe splits itself
    assert f"at least {MIN_CV_FOLDS + 1} examples per class" in msg and "hold out" in msg


def test_one_example_class_in_train_split_names_the_class(tmp_path):
    _write(tmp_path / "train", {"a": 6, "b": 1, "c": 6})
    _write(tmp_path / "test", {"a": 3, "b": 3, "c": 3})
    with pytest.raises(ValueError) as err:
        _probe(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "train") in msg and "class 'b' has 1 example" in msg
    assert f"at least {MIN_CV_FOLDS} examples per class" in msg and "hold out" not in msg


def test_held_out_share_smaller_than_the_class_count_is_explained(tmp_path):
    _write(tmp_path, {c: 3 for c in GRAY})  # 15 examples, 20% = 3 held out for 5 classes
    with pytest.raises(ValueError) as err:
        _probe(tmp_path)
    msg = str(err.value)
    assert "test_size" not in msg and "15 examples in 5 classes" in msg and f"{HELD_OUT:.0%}" in msg
    assert "at least 21 examples" in msg  # ceil(0.2 * 21) = 5 held out, one per class


def test_tiny_held_out_set_warns_that_accuracy_is_noisy(tmp_path, probe_log):
    _write(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    _write(tmp_path / "test", {"a": 1, "b": 1, "c": 1})
    res = _probe(tmp_path)
    assert res["class"]["pretrained"]["full"] == 100.0
    warned = [r.getMessage() for r in probe_log if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "3 held-out examples" in warned[0] and "noisy" in warned[0]


def test_enough_held_out_data_does_not_warn(tmp_path, probe_log):
    _write(tmp_path / "train", {"a": 2, "b": 2})
    _write(tmp_path / "test", {"a": 10, "b": 10})
    _probe(tmp_path)
    assert not [r for r in probe_log if r.levelno >= logging.WARNING]


def test_progress_goes_to_the_log_not_stdout(tmp_path, probe_log, capsys):
    _write(tmp_path / "train", {"a": 2, "b": 2})
    _write(tmp_path / "test", {"a": 10, "b": 10})
    _probe(tmp_path)
    assert capsys.readouterr().out == ""
    info = [r.getMessage() for r in probe_log if r.levelno == logging.INFO]
    assert any(m.startswith("probe class: 4 train / 20 held-out examples, 2 classes") for m in info)
    for enc in ("pretrained", "random_init"):
        assert any(m.startswith(f"probe class: {enc} features 4/20") for m in info), info
        assert any(m.startswith(f"probe class: {enc} logistic regression fit: full") for m in info), info


def test_unlabelled_task_is_skipped_with_a_log_warning(tmp_path, probe_log, recwarn, monkeypatch):
    """A task without labels next to a labelled one is skipped with a warning through the logger (no
    Python warning)."""
    import d2v.probe as probe
    from d2v.data.build import build_probe_tasks
    from d2v.data.common import ProbeTask

    _write(tmp_path / "train", {"a": 2, "b": 2})
    _write(tmp_path / "test", {"a": 10, "b": 10})

    class Unlabelled:
        root, labels = tmp_path / "loose", [-1, -1, -1]

    def tasks(cfg, run_dir=None):
        (t,) = build_probe_tasks(cfg, run_dir)
        return [t, ProbeTask("other", Unlabelled(), None, t.collate, t.source_key)]

    monkeypatch.setattr(probe, "build_probe_tasks", tasks)
    res = _probe(tmp_path)
    assert list(res) == ["class"]
    warned = [r.getMessage() for r in probe_log if r.levelno == logging.WARNING]
    assert warned == [f"probe task skipped: the other probe needs labelled data: {tmp_path / 'loose'} has "
                      f"unlabelled examples (put each class in its own subfolder, or give a label column)"]
    assert not [w for w in recwarn if "skipped" in str(w.message)]
