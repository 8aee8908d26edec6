"""tools/cross_loss.py on a real micro run: every saved student against every saved teacher, on the
same batches; the same pair twice gives the same number; one checkpoint is refused with a message.

Run: .venv/bin/python -m pytest -q tests/test_cross_loss.py
"""
import math
import sys
from pathlib import Path

import pytest

from d2v.config import load_config
from d2v.trainer import Trainer
from tests.utils import micro_overrides

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from cross_loss import cross_loss  # noqa: E402


def test_cross_loss_table(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny_image.yaml",
                      micro_overrides(run, 4, **{"train.ckpt_every": 2, "train.keep_last": 3}))
    Trainer(cfg, progress=False).train()
    res = cross_loss(run, batches=2)
    assert res["steps"] == [2, 4]
    assert set(res["table"]) == {(2, 2), (2, 4), (4, 2), (4, 4)}
    for loss, frac in res["table"].values():
        assert math.isfinite(loss) and loss > 0 and 0 < frac < 10
    assert cross_loss(run, batches=2)["table"] == res["table"], "same batches, masks and noise each call"


def test_one_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    tiny = ROOT / "configs" / "tiny_image.yaml"
    cfg = load_config(tiny, micro_overrides(run, 2, **{"train.ckpt_every": 2}))
    Trainer(cfg, progress=False).train()
    with pytest.raises(SystemExit, match="needs at least two complete checkpoints, found 1"):
        cross_loss(run)
