"""A mini-model trained 3 steps on the fused Triton ops and on torch: the losses must not depend on the
path. Runs where `triton_device` says (compiled on CUDA, interpreted on CPU, else skipped).

Error budget: the only inexact differences are the targets (a few fp32 ulps of O(1) values, see
tests.utils.targets_atol) and the EMA (1 ulp), then 3 AdamW steps (lr 1e-3) through a 2-block model:
losses agree to 1e-4 relative; a wrong kernel (a wrong row or a missing normalization) moves them by
O(1e-1).

Run: .venv/bin/python -m pytest -q tests/kernels/test_model_parity.py
"""
import torch

from tests.utils import assert_close_verbose


def _train_losses(device, steps=3):
    from d2v.config import Config
    from d2v.ema import EMATeacher
    from d2v.masking import inverse_block_mask, make_maskinfo
    from d2v.model import build_model

    torch.manual_seed(0)
    cfg = Config.from_dict({"model": {"flavor": "tiny"}, "masking": {"clone_batch": 2},
                            "objective": {"average_top_k_layers": 2}})
    m = build_model(cfg).to(device)
    teacher = EMATeacher(m, 0.9, 0.99, steps)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, steps + 1):
        img = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=g).to(device)
        grid = cfg.model.grid
        mask = make_maskinfo(inverse_block_mask(4, grid, grid, mask_prob=0.8, mask_length=3, adjust=0.07,
                                                generator=g)).to(device)
        out = m(img, mask, teacher)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        teacher.update(step)
        losses.append(out["loss"].detach())
    return torch.stack(losses).cpu()


def test_mini_model_losses_fused_vs_torch(impl, triton_device):
    """Three training steps of the tiny model give the same losses (1e-4 relative) with every op on the
    Triton path (the EMA included) as with every op on torch, on the Triton test device."""
    impl("torch")
    ref = _train_losses(triton_device)
    assert impl("triton")["ema_update_"]["impl"] == "triton"
    fused = _train_losses(triton_device)
    assert_close_verbose(fused, ref, atol=0.0, rtol=1e-4, what="losses triton vs torch")
    # (the C++ EMA is the CPU default: every other model test trains with it)
