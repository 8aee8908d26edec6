"""The image probe on a train/ + test/ folder whose class sets differ: test labels must follow the
train split's class list (the report's case: train {a, b, c}, test {a, c}; the wrong numbering gave
50% where the right one gives 100%).

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest -q tests/test_probe_labels.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.config import Config
from d2v.probe import probe_encoders

GRAY = {"a": 0, "b": 128, "c": 255}  # one flat gray level per class: trivially separable


def _write_split(root: Path, classes: tuple[str, ...], n: int) -> None:
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(n):
            arr = np.full((8, 8, 3), GRAY[c], dtype=np.uint8)
            arr[0, 0] = j  # distinct files
            Image.fromarray(arr).save(root / c / f"{j}.png")


class MeanPixel(torch.nn.Module):
    """Stand-in encoder: the feature is the mean pixel per channel, which names the class exactly."""

    def extract_features(self, x, pool=None, padding_mask=None):
        return x.mean(dim=(2, 3))  # (B, 3)


def _cfg(root: Path) -> Config:
    return Config.from_dict({"model": {"modality": "image"}, "data": {"path": str(root)}})


def test_image_probe_test_split_missing_a_class(tmp_path):
    _write_split(tmp_path / "train", ("a", "b", "c"), n=6)
    _write_split(tmp_path / "test", ("a", "c"), n=3)
    enc = MeanPixel()
    res = probe_encoders(_cfg(tmp_path), {"pretrained": enc, "random_init": enc}, "mean", 5, 0,
                         torch.device("cpu"))
    r = res["class"]
    assert r["classes"] == 3 and r["n_test"] == 6
    assert r["pretrained"]["full"] == 100.0


def test_image_probe_test_only_class_is_an_error(tmp_path):
    _write_split(tmp_path / "train", ("a", "b"), n=6)
    _write_split(tmp_path / "test", ("a", "c"), n=3)
    enc = MeanPixel()
    with pytest.raises(ValueError, match="'c'") as err:
        probe_encoders(_cfg(tmp_path), {"pretrained": enc, "random_init": enc}, "mean", 5, 0,
                       torch.device("cpu"))
    assert str(tmp_path / "test") in str(err.value)


def test_probe_runs_only_the_named_tasks_and_needs_no_random_init(tmp_path):
    _write_split(tmp_path / "train", ("a", "b"), n=6)
    _write_split(tmp_path / "test", ("a", "b"), n=3)
    enc = MeanPixel()
    res = probe_encoders(_cfg(tmp_path), {"pretrained": enc}, "mean", 5, 0, torch.device("cpu"),
                         tasks=["class"])
    assert list(res) == ["class"] and res["class"]["pretrained"]["full"] == 100.0
    assert "gain_full" not in res["class"]  # no random init, no gain
    with pytest.raises(ValueError, match=r"\['word'\] unknown for image.*\['class'\]"):
        probe_encoders(_cfg(tmp_path), {"pretrained": enc}, "mean", 5, 0, torch.device("cpu"), tasks=["word"])
