"""The step's modes: eager vs SDPA attention, the full-length student with a learned mask embedding
(`model.skip_masked: false`), the data2vec 1.0 linear head, and the reference-style `ref` ops path.

Error budget (fp32): eager and SDPA attention differ only in summation order and in where the
1/sqrt(d) scale is applied, so outputs agree to a few ulps of their magnitude; 1e-5 absolute on O(1)
activations is ~100 fp32 ulps, after 2 blocks.

Run: .venv/bin/python -m pytest -q tests/test_modes.py
"""
import math

import pytest
import torch

from d2v import ops
from d2v.blocks import Attention
from d2v.config import ConfigError, load_config
from d2v.ema import EMATeacher
from d2v.masking import make_maskinfo
from d2v.metrics import read_metrics
from d2v.model import build_model
from d2v.trainer import Trainer
from tests.utils import micro_overrides

CONFIGS = {"image": "configs/tiny_image.yaml", "audio": "configs/tiny_audio.yaml",
           "text": "configs/tiny_text.yaml"}
SMALL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder.dim=32",
         "model.decoder.layers=1", "model.decoder.groups=4", "objective.average_top_k_layers=2"]


def _model(modality, *extra):
    torch.manual_seed(0)
    cfg = load_config(CONFIGS[modality], SMALL + (["model.conv_dim=32", "model.conv_pos_groups=4"]
                                                  if modality == "audio" else []) + list(extra))
    m = build_model(cfg)
    return cfg, m, EMATeacher(m, 0.99, 0.999, 10)


def _source(modality, cfg, B):
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return torch.randn(B, 3, 32, 32, generator=g)
    if modality == "audio":
        return torch.randn(B, 8000, generator=g)
    return torch.randint(4, cfg.model.vocab_size, (B, 24), generator=g)


def _mask(R, T, n_masked, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R, T, dtype=torch.bool)
    for r in range(R):
        mask[r, torch.randperm(T, generator=g)[:n_masked]] = True
    return make_maskinfo(mask)


def _tokens(modality, m, src):
    return m.modality_encoder.local_features(src)[0].shape[1]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("N", [1, 7])
def test_eager_attention_matches_sdpa(with_bias, N):
    torch.manual_seed(0)
    att = Attention(24, 3).eval()
    x = torch.randn(2, N, 24)
    bias = None
    if with_bias:  # ALiBi-like values plus a padded key
        bias = torch.randn(2, 3, N, N)
        if N > 1:
            bias[1, :, :, -1] = float("-inf")
    ref = att(x, bias)
    att.impl = "eager"
    torch.testing.assert_close(att(x, bias), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("modality", list(CONFIGS))
def test_model_attention_setting_reaches_every_block_and_keeps_the_loss(modality):
    cfg, m_sdpa, t_sdpa = _model(modality)
    _, m_eager, t_eager = _model(modality, "model.attention=eager")
    impls = {a.impl for a in m_eager.modules() if isinstance(a, Attention)}
    assert impls == {"eager"}
    m_eager.load_state_dict(m_sdpa.state_dict())
    t_eager.load_state_dict(t_sdpa.state_dict())
    src = _source(modality, cfg, 2)
    T = _tokens(modality, m_sdpa, src)
    mask = _mask(4, T, T // 2)
    torch.manual_seed(3)
    a = m_sdpa(src, mask, t_sdpa)["loss"]
    torch.manual_seed(3)
    b = m_eager(src, mask, t_eager)["loss"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", list(CONFIGS))
def test_full_length_student_with_nothing_masked_equals_the_skipping_student(modality):
    """With a mask that hides nothing, both input paths encode the same tokens the same way."""
    cfg, skip, _ = _model(modality)
    _, full, _ = _model(modality, "model.skip_masked=false")
    missing, unexpected = full.load_state_dict(skip.state_dict(), strict=False)
    assert missing == ["mask_emb"] and unexpected == []
    skip.eval(), full.eval()  # no dropout draws
    src = _source(modality, cfg, 2)
    local, _ = skip.modality_encoder.local_features(src)
    mask = _mask(4, local.shape[1], 0)
    a, _, _ = skip.encode(local=local, mask=mask, clones=2)
    b, _, _ = full.encode(local=full.modality_encoder.masked_input(local, mask, 2, full.mask_emb))
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_full_length_student_never_sees_masked_content(modality):
    """Changing the input under masked tokens changes the targets but not the student's outputs."""
    cfg, m, teacher = _model(modality, "model.skip_masked=false", "model.head=linear")
    m.eval()
    src = _source(modality, cfg, 1)
    T = _tokens(modality, m, src)
    mask = _mask(1, T, T // 2)
    changed = src.clone()
    if modality == "image":  # repaint the 4x4 pixel patches that are masked (grid 8)
        for t in mask.ids_masked[0].tolist():
            r, c = divmod(t, 8)
            changed[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.randn(3, 4, 4)
    else:
        changed[0, mask.ids_masked[0]] = torch.randint(4, cfg.model.vocab_size, (mask.ids_masked.shape[1],))

    def student(s):
        local, _ = m.modality_encoder.local_features(s)
        return m.encode(local=m.modality_encoder.masked_input(local, mask, 1, m.mask_emb))[0]

    torch.testing.assert_close(student(changed), student(src), atol=0, rtol=0)
    def targets(s):
        return teacher.targets(s, None if modality == "image" else m.modality_encoder.local_features(s)[0], m)

    assert not torch.equal(targets(changed), targets(src))


@pytest.mark.parametrize("modality", list(CONFIGS))
def test_data2vec1_head_trains_mask_embedding_and_projection_only_in_the_student(modality):
    cfg, m, t = _model(modality, "model.skip_masked=false", "model.head=linear", "objective.cls_loss=0")
    assert m.modality_encoder.decoder is None and m.final_proj is not None
    src = _source(modality, cfg, 2)
    T = _tokens(modality, m, src)
    out = m(src, _mask(2, T, T // 2), t)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert m.mask_emb.grad is not None and m.mask_emb.grad.abs().sum() > 0
    assert m.final_proj.weight.grad.abs().sum() > 0
    names = [n for n, _ in t.module.named_parameters()]
    assert not any(n.startswith(("mask_emb", "final_proj")) or ".decoder." in n for n in names)


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_every_mode_starts_from_the_same_encoder_for_the_same_seed(modality):
    """Time-to-quality compares the modes from one init: the 1.0-mode parameters are drawn last."""
    _, m2, _ = _model(modality)
    _, m1, _ = _model(modality, "model.skip_masked=false", "model.head=linear", "objective.cls_loss=0")
    s1 = m1.state_dict()
    shared = [k for k in m2.state_dict()
              if ".decoder." not in k and not k.startswith("modality_encoder.decoder")]
    assert len(shared) > 10 and all(k in s1 for k in shared)
    for k in shared:
        assert torch.equal(m2.state_dict()[k], s1[k]), k


def test_linear_head_needs_the_full_length_student():
    with pytest.raises(ConfigError, match="model.skip_masked"):
        load_config(CONFIGS["image"], ["model.head=linear"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(CONFIGS["image"], ["model.attention=flash"])


def test_ref_ops_repeat_targets_like_the_reference_and_agree_exactly(monkeypatch):
    torch.manual_seed(0)
    y = torch.randn(3, 11, 5)
    ids = torch.stack([torch.randperm(11)[:4] for _ in range(6)])  # (R=6, N=4), M=2
    outs = {}
    for impl in ("torch", "ref"):
        monkeypatch.setenv("D2V_OPS_IMPL", impl)
        ops._reset_backend()
        outs[impl] = ops.masked_targets(y, ids, 2)
    ops._reset_backend()
    assert torch.equal(outs["ref"], outs["torch"])
    assert torch.equal(outs["ref"][3], y[1][ids[3]])


def test_data2vec1_recipe_trains_and_checkpoints(tmp_path):
    """configs/tiny_image_d2v1.yaml through the real trainer (a few steps on the embedded digits)."""
    over = micro_overrides(tmp_path / "run", 4, **{"masking.clone_batch": 1, "objective.cls_loss": 0.0})
    cfg = load_config("configs/tiny_image_d2v1.yaml", over)
    trainer = Trainer(cfg, progress=False)
    assert "full-length student + mask embedding, linear head (data2vec 1.0)" in trainer.banner()
    summary = trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert summary["steps"] == 4 and len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
