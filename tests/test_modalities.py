"""Audio and text modalities on the shared model: every flavor trains a step, the teacher shares
exactly what the spec says per modality, ALiBi is built for kept positions only and equals the
reference's full bias gathered on both axes, the student never sees masked tokens, padding does not
change features, and the loss equals a naive reference-style computation.

Run: .venv/bin/python -m pytest -q tests/test_modalities.py
"""
import math

import pytest
import torch

from d2v.audio_frames import conv_output_length
from d2v.config import Config
from d2v.ema import EMATeacher
from d2v.masking import make_maskinfo, random_mask, span_mask
from d2v.modalities.audio import alibi_slopes
from d2v.model import build_model
from d2v.registry import list_flavors

SMALL = {  # shrink base/large flavors so a CPU step takes well under a second
    "audio": dict(conv_dim=32, embed_dim=48, num_heads=12, depth=3, prenet_depth=1, conv_pos_depth=2,
                  layerdrop=0.0, conv_pos_groups=4, decoder=dict(dim=24, groups=4)),
    "text": dict(vocab_size=97, max_positions=40, embed_dim=48, num_heads=12, depth=3,
                 decoder=dict(dim=24)),
}


def make(modality, flavor="tiny", small=True, **model):
    over = dict(SMALL[modality]) if small else {}
    over.update(model)
    cfg = Config.from_dict({"model": {"modality": modality, "flavor": flavor, **over},
                            "masking": {"clone_batch": 2}, "objective": {"average_top_k_layers": 2}})
    m = build_model(cfg)
    t = EMATeacher(m, 0.99, 0.999, 10)
    return cfg, m, t


def batch(cfg, B=2, M=2, seed=0, length=None):
    """Source (B, ...) and a MaskInfo over B*M rows, masked like the modality's recipe."""
    g = torch.Generator().manual_seed(seed)
    if cfg.model.modality == "audio":
        L = length or 4000  # 0.25 s -> 12 frames
        src = torch.randn(B, L, generator=g)
        T = conv_output_length(L)
        mask = span_mask(B * M, T, mask_prob=0.5, mask_length=3, adjust=0.05, generator=g)
    else:
        T = length or 24
        src = torch.randint(4, cfg.model.vocab_size, (B, T), generator=g)
        mask = random_mask(B * M, T, mask_prob=0.48, generator=g)
    return src, make_maskinfo(mask)


def test_flavors_registered():
    assert {"tiny", "base", "large"} <= set(list_flavors("audio"))
    assert {"tiny", "base"} <= set(list_flavors("text"))


@pytest.mark.parametrize("modality,flavor", [("audio", "tiny"), ("audio", "base"), ("audio", "large"),
                                             ("text", "tiny"), ("text", "base")])
def test_every_flavor_forward_backward(modality, flavor):
    cfg, m, t = make(modality, flavor, small=flavor != "tiny")
    src, mask = batch(cfg)
    out = m(src, mask, t)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []  # the CNN / embeddings get gradients through every clone
    assert all(p.grad is None for p in t.module.parameters())


def test_reference_sizes():
    a = build_model(Config.from_dict({"model": {"modality": "audio", "flavor": "base"}}))
    n_cnn = sum(p.numel() for p in a.modality_encoder.local_encoder.parameters())
    n_blocks = sum(p.numel() for p in a.blocks.parameters())
    assert 4.1e6 < n_cnn < 4.3e6  # wav2vec 2.0 base CNN: ~4.2M
    assert 84e6 < n_blocks < 86e6  # 12 x 7.1M
    t = build_model(Config.from_dict({"model": {"modality": "text", "flavor": "base"}}))
    dec = t.modality_encoder.decoder
    assert len(dec.blocks) == 5 and not dec.residual
    assert [type(x).__name__ for x in dec.proj] == ["Linear", "GELU", "Linear"]
    assert dec.proj[0].out_features == 1536


def _param_names(module):
    return {n for n, _ in module.named_parameters()}


def test_teacher_sharing_rules():
    _, a, ta = make("audio")
    names = _param_names(ta.module)
    assert not any(n.startswith(("modality_encoder.local_encoder", "modality_encoder.project_features",
                                 "modality_encoder.decoder")) for n in names)
    assert {"modality_encoder.alibi_scale", "modality_encoder.context_encoder.norm.weight"} <= names
    assert any(n.startswith("modality_encoder.relative_positional_encoder") for n in names)
    _, x, tx = make("text")
    assert all(n.startswith("blocks.") for n in _param_names(tx.module))
    assert _param_names(tx.module) == {n for n in _param_names(x) if n.startswith("blocks.")}
    _, i, ti = make_image()
    assert {n for n in _param_names(i) if ".decoder." not in n} == _param_names(ti.module)


def make_image():
    cfg = Config.from_dict({"model": {"flavor": "tiny", "depth": 2},
                            "objective": {"average_top_k_layers": 2}})
    m = build_model(cfg)
    return cfg, m, EMATeacher(m, 0.99, 0.999, 10)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_teacher_uses_the_students_features(modality):
    """Audio/text targets change when the student's feature extractor changes (it is shared); image
    targets do not (the teacher has its own EMA patch embedding)."""
    cfg, m, t = make(modality)
    m.eval()
    src, _ = batch(cfg)
    y0 = t.targets(src, m.modality_encoder.local_features(src)[0], m)
    with torch.no_grad():
        for p in m.modality_encoder.local_encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    y1 = t.targets(src, m.modality_encoder.local_features(src)[0], m)
    assert not torch.allclose(y0, y1)
    cfg, im, it = make_image()
    img = torch.randn(2, 3, 32, 32)
    y0 = it.targets(img, None, im)
    with torch.no_grad():
        im.modality_encoder.local_encoder.proj.weight.add_(1.0)
    assert torch.equal(y0, it.targets(img, None, im))


def test_text_teacher_sees_the_students_dropout_features():
    """In train mode the teacher consumes exactly the student's (dropped-out) embedding output."""
    cfg, m, t = make("text", encoder_dropout=0.5)
    m.train()
    src, _ = batch(cfg)
    torch.manual_seed(1)
    local1 = m.modality_encoder.local_features(src)[0]
    local2 = m.modality_encoder.local_features(src)[0]
    assert not torch.equal(local1, local2)  # dropout is active
    y1, y2 = t.targets(src, local1, m), t.targets(src, local2, m)
    assert not torch.equal(y1, y2) and torch.equal(y1, t.targets(src, local1.clone(), m))


def test_alibi_slopes_match_reference():
    s12 = alibi_slopes(12)
    expect = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert torch.allclose(s12, torch.tensor(expect))
    assert torch.allclose(alibi_slopes(16), torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))


def test_alibi_for_kept_positions_equals_gathered_full_bias():
    cfg, m, _ = make("audio")
    me = m.modality_encoder
    with torch.no_grad():
        me.alibi_scale.copy_(torch.linspace(-0.5, 2.0, me.alibi_scale.numel()))  # negative -> clamped to 0
    T = 15
    mask = make_maskinfo(span_mask(3, T, mask_prob=0.5, mask_length=3))
    full = me.alibi_bias(torch.arange(T).expand(3, T))  # (R, H, T, T), the reference's bias
    idx = mask.ids_keep  # (R, K)
    ref = torch.stack([full[r][:, idx[r]][:, :, idx[r]] for r in range(3)])  # rows and cols gathered
    kept = me.alibi_bias(idx)
    assert kept.shape == (3, cfg.model.num_heads, idx.shape[1], idx.shape[1])
    assert torch.equal(kept, ref)
    assert torch.all(kept[:, 0] == 0)  # head 0 has scale -0.5 -> clamped to 0


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_student_never_sees_masked_tokens(modality):
    """Changing the features of masked tokens leaves the student's encoder output unchanged
    (audio: the positional conv runs with masked frames zeroed)."""
    cfg, m, t = make(modality)
    m.eval()
    src, mask = batch(cfg, B=1, M=2)
    local = m.modality_encoder.local_features(src)[0]
    local2 = local.clone()
    local2[0, mask.ids_masked[0]] += 3.0  # hits masked tokens of clone 0 (and possibly kept ones of clone 1)
    x1 = m.encode(local=local, mask=mask, clones=2)[0]
    x2 = m.encode(local=local2, mask=mask, clones=2)[0]
    assert torch.equal(x1[0], x2[0])
    y1 = t.targets(src, local, m)
    assert not torch.equal(y1, t.targets(src, local2, m))  # the teacher does see them


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_padding_does_not_change_features(modality):
    cfg, m, _ = make(modality)
    m.eval()
    if modality == "audio":
        a, b = torch.randn(1, 4000), torch.randn(1, 2500)
        src = torch.zeros(2, 4000)
        src[0], src[1, :2500] = a[0], b[0]
    else:
        a, b = torch.randint(4, 97, (1, 20)), torch.randint(4, 97, (1, 11))
        src = torch.full((2, 20), 1)
        src[0], src[1, :11] = a[0], b[0]
    pad = torch.zeros(2, src.shape[1], dtype=torch.bool)
    pad[1, b.shape[1]:] = True
    both = m.extract_features(src, padding_mask=pad)
    torch.testing.assert_close(both[0], m.extract_features(a)[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], m.extract_features(b)[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_loss_matches_naive_reference(modality):
    cfg, m, t = make(modality)
    m.eval()
    src, mask = batch(cfg, B=3, M=2)
    torch.manual_seed(123)
    out = m(src, mask, t)
    torch.manual_seed(123)
    local = m.modality_encoder.local_features(src)[0]
    x = m.encode(local=local, mask=mask, clones=2)[0]
    R, T, D = mask.mask.shape[0], mask.mask.shape[1], x.shape[-1]
    noise = torch.randn(R, T, D) * m.objective.decoder_noise_std
    x_ = torch.cat([x, noise[mask.mask].view(R, -1, D)], 1)
    full = torch.gather(x_, 1, mask.ids_restore[..., None].expand(-1, -1, D))
    pred = m.modality_encoder.decoder(full)
    y = t.targets(src, local, m).repeat_interleave(2, 0)
    s = cfg.objective.loss_scale or 1 / math.sqrt(D)
    reg = ((pred[mask.mask] - y[mask.mask]) ** 2).sum() * s / mask.mask.sum()
    assert cfg.objective.cls_loss == 0 and float(out["loss_cls"]) == 0.0
    assert torch.allclose(out["loss"], reg, rtol=1e-5)
    assert (cfg.objective.loss_scale == 1.0) == (modality == "text")  # text: scale 1; audio: 1/sqrt(D)
