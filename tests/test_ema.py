"""EMA teacher: the linear decay ramp, the update formula on real parameters, copied buffers,
frozen teacher at decay 1, and no gradients into the teacher.

Run: .venv/bin/python -m pytest -q tests/test_ema.py
"""
import pytest
import torch

from d2v.config import Config
from d2v.ema import EMATeacher, ema_decay
from d2v.model import build_model


def test_decay_schedule_linear_ramp():
    # fairseq get_annealed_rate: end - (end - start) * (1 - n / N) for n < N, else end
    assert ema_decay(0, 0.999, 0.99999, 100) == 0.999
    assert ema_decay(50, 0.999, 0.99999, 100) == pytest.approx((0.999 + 0.99999) / 2, abs=1e-12)
    assert ema_decay(100, 0.999, 0.99999, 100) == 0.99999
    assert ema_decay(10**6, 0.999, 0.99999, 100) == 0.99999
    steps = [ema_decay(n, 0.9, 1.0, 10) for n in range(11)]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d == pytest.approx(0.01) for d in diffs)
    assert ema_decay(5, 0.9, 0.99, 0) == 0.99  # no ramp


def small():
    cfg = Config.from_dict({"model": {"flavor": "tiny", "depth": 2, "embed_dim": 32, "num_heads": 2,
                                      "decoder": {"dim": 32, "groups": 4, "layers": 1}},
                            "objective": {"average_top_k_layers": 2}})
    return build_model(cfg)


def test_update_formula_and_timing():
    student = small()
    t = EMATeacher(student, start=0.5, end=0.9, anneal_end_step=4)
    before = {n: p.detach().clone() for n, p in t.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    d = t.update(step=2)  # after optimizer update 2: d(2) = 0.9 - 0.4 * 0.5 = 0.7
    assert d == pytest.approx(0.7)
    s = dict(student.named_parameters())
    for n, p in t.module.named_parameters():
        expect = 0.7 * before[n] + 0.3 * s[n].detach()
        assert torch.allclose(p, expect, atol=1e-6), n


def test_frozen_at_decay_one_and_buffers_copied():
    student = small()
    t = EMATeacher(student, start=1.0, end=1.0, anneal_end_step=0)
    snap = [p.clone() for p in t.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert t.update(1) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(snap, t.module.parameters()))
    # buffers (the fixed sin-cos table) follow the student by copy, not by averaging
    student.modality_encoder.fixed_positional_encoder.positions.add_(1.0)
    t2 = EMATeacher(student, start=0.5, end=0.5, anneal_end_step=0)
    student.modality_encoder.fixed_positional_encoder.positions.add_(1.0)
    t2.update(1)
    assert torch.equal(t2.module.modality_encoder.fixed_positional_encoder.positions,
                       student.modality_encoder.fixed_positional_encoder.positions)


def test_teacher_is_not_trained_and_not_in_student_state():
    student = small()
    t = EMATeacher(student, 0.9, 0.99, 10)
    assert all(not p.requires_grad for p in t.module.parameters())
    assert not t.module.training
    assert t.module.modality_encoder.decoder is None
    assert not any(k.startswith("_teacher") for k in student.state_dict())
    ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in ids for p in t.module.parameters())
    # the student holds no reference to its teacher (it is passed to the student's forward)
    assert not any(m is t.module for m in student.modules())
    assert not any(v is t or v is t.module for v in vars(student).values())
