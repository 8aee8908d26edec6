"""Model: every flavor builds and trains a step at small size, targets come from the teacher's FFN
outputs, the teacher gets no gradients, and the loss equals a naive reference-style computation
(targets repeat_interleave'd M times and boolean-masked, as fairseq does).

Run: .venv/bin/python -m pytest -q tests/test_model.py
"""
import math

import pytest
import torch

from d2v import ops
from d2v.config import Config
from d2v.ema import EMATeacher
from d2v.masking import inverse_block_mask, make_maskinfo
from d2v.model import build_model
from d2v.registry import list_flavors


def make(flavor="tiny", **model):
    d = {"model": {"flavor": flavor, **model}, "masking": {"clone_batch": 2},
         "objective": {"average_top_k_layers": 3}}
    cfg = Config.from_dict(d)
    m = build_model(cfg)
    t = EMATeacher(m, 0.99, 0.999, 10)
    return cfg, m, t


def batch(cfg, B=2, M=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
    grid = cfg.model.grid
    mask = inverse_block_mask(B * M, grid, grid, mask_prob=0.8, mask_length=3, adjust=0.07, generator=g)
    return img, make_maskinfo(mask)


def test_flavors_registered():
    assert {"tiny", "base", "large"} <= set(list_flavors("image"))


@pytest.mark.parametrize("flavor", ["tiny", "base", "large"])
def test_every_flavor_forward_backward(flavor):
    over = {} if flavor == "tiny" else {"image_size": 64}  # 4x4 patch grid keeps it fast on CPU
    cfg, m, t = make(flavor, **over)
    img, mask = batch(cfg, B=1)
    out = m(img, mask, t)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []  # every student parameter (encoder, CLS, decoder) gets a gradient
    assert all(p.grad is None for p in t.module.parameters())


def test_base_flavor_matches_reference_shapes():
    cfg = Config.from_dict({"model": {"flavor": "base"}})
    m = build_model(cfg)
    n_enc = sum(p.numel() for n, p in m.named_parameters() if ".decoder." not in n)
    assert cfg.model.grid == 14 and len(m.blocks) == 10
    assert len(m.modality_encoder.context_encoder.blocks) == 2
    assert 85e6 < n_enc < 87.5e6  # ViT-B/16 encoder (~86M) + CLS
    assert m.modality_encoder.fixed_positional_encoder.positions.shape == (1, 196, 768)


def test_teacher_excludes_decoder_and_starts_equal():
    cfg, m, t = make()
    s = m.state_dict()
    ts = t.state_dict()
    assert not any(".decoder." in k for k in ts)
    assert set(ts) == {k for k in s if ".decoder." not in k}
    assert all(torch.equal(ts[k], s[k]) for k in ts)


def test_targets_are_teacher_ffn_outputs():
    cfg, m, t = make()
    img, _ = batch(cfg)
    captured = []
    hooks = [b.mlp.register_forward_hook(lambda mod, i, o: captured.append(o)) for b in t.module.blocks]
    y = t.targets(img, None, m)
    for h in hooks:
        h.remove()
    k = cfg.objective.average_top_k_layers
    expect = ops.build_targets([c[:, 1:] for c in captured[-k:]], final_norm="layer")
    assert torch.equal(y, expect)
    assert y.shape == (2, cfg.model.grid ** 2, cfg.model.embed_dim)


def naive_loss(m, t, img, mask, M):
    """The reference's way: repeat_interleave targets M times, index both with the boolean mask."""
    torch.manual_seed(123)
    x, _, _ = m.encode(img, mask=mask, clones=M)
    R, T, D = mask.mask.shape[0], mask.mask.shape[1], x.shape[-1]
    kept = x[:, 1:]
    noise = torch.randn(R, T, D) * m.objective.decoder_noise_std
    x_ = torch.cat([kept, noise[mask.mask].view(R, -1, D)], 1)
    full = torch.gather(x_, 1, mask.ids_restore[..., None].expand(-1, -1, D))
    pred = m.modality_encoder.decoder(full)
    y = t.targets(img, None, m)
    y_rep = y.repeat_interleave(M, 0)
    p, t = pred[mask.mask], y_rep[mask.mask]
    s = 1 / math.sqrt(D)
    reg = ((p - t) ** 2).sum() * s / p.shape[0]
    cls = 0.01 * s * ((x[:, 0] - y_rep.mean(1)) ** 2).sum()
    return reg, cls


def test_loss_matches_naive_reference():
    cfg, m, t = make()
    m.eval()  # no dropout; masking still applies
    img, mask = batch(cfg, B=3, M=2)
    # the model draws noise for every slot; the naive path places the same draws at masked slots
    torch.manual_seed(123)
    out = m(img, mask, t)
    reg, cls = naive_loss(m, t, img, mask, M=2)
    assert torch.allclose(out["loss_reg"], reg, rtol=1e-5)
    assert torch.allclose(out["loss_cls"], cls, rtol=1e-5)
    assert torch.allclose(out["loss"], reg + cls, rtol=1e-5)


def test_student_only_sees_kept_tokens():
    """Changing masked pixels changes the targets but not the student's encoder output."""
    cfg, m, t = make()
    m.eval()
    img, mask = batch(cfg, B=1, M=1)
    p = cfg.model.patch_size
    img2 = img.clone()
    masked_patch = int(mask.ids_masked[0, 0])
    r, c = divmod(masked_patch, cfg.model.grid)
    img2[..., r * p:(r + 1) * p, c * p:(c + 1) * p] += 5.0
    x1, _, _ = m.encode(img, mask=mask)
    x2, _, _ = m.encode(img2, mask=mask)
    assert torch.equal(x1, x2)
    assert not torch.equal(t.targets(img, None, m), t.targets(img2, None, m))


def test_sincos_positions_layout():
    from d2v.modalities.image import sincos_2d

    pe = sincos_2d(4, 16)  # (16 tokens, 16 dims): first half encodes the column, second the row
    assert pe.shape == (16, 16)
    assert torch.allclose(pe[0, :8], pe[4, :8]) and not torch.allclose(pe[0, 8:], pe[4, 8:])
    assert torch.allclose(pe[0, 8:], pe[1, 8:]) and not torch.allclose(pe[0, :8], pe[1, :8])
    assert torch.allclose(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
