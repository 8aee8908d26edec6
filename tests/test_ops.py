"""d2v.ops against independent float64 references: build_targets, masked_gather/scatter, ema_update_,
and the dispatch report. Shapes cover size 1, odd/prime sizes, K = 1 and K = all, non-contiguous input.

Error budget: build_targets reads its inputs exactly (bf16 -> fp32 is exact) and reduces over T in
fp32, so against float64 on the same values the error is a few fp32 ulps of O(1) normalized outputs
times log2(T) accumulation depth: 1e-4 absolute covers T <= 1e4 with margin. ema_update_ is two fp32
roundings per element: rtol 2**-22, atol 1e-7 on O(1) values.

Run: .venv/bin/python -m pytest -q tests/test_ops.py
"""
import pytest
import torch
from d2v.kernels.ema_update import ema_update_ref_

from d2v import ops
from tests.utils import assert_close_verbose, targets_fp64

SHAPES = [(1, 1, 1), (2, 7, 3), (3, 13, 17), (5, 49, 32), (2, 197, 768)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("final_norm", ["none", "layer", "instance"])
def test_build_targets_vs_fp64(shape, dtype, k, final_norm):
    layers = [(torch.randn(*shape) * 3 + 1).to(dtype) for _ in range(k)]
    out = ops.build_targets(layers, instance_norm=True, final_norm=final_norm)
    assert out.dtype == torch.float32 and out.shape == shape
    assert_close_verbose(out, targets_fp64(layers, True, final_norm), atol=1e-4, what="build_targets")


def test_build_targets_noncontiguous_and_no_instance_norm():
    base = torch.randn(4, 11, 2, 9)
    layers = [base[:, :, 0], base[:, :, 1]]  # (4, 11, 9) views with stride
    assert not layers[0].is_contiguous()
    for inorm in (True, False):
        out = ops.build_targets(layers, instance_norm=inorm, final_norm="layer")
        assert_close_verbose(out, targets_fp64(layers, inorm, "layer"), atol=1e-4, what=f"inorm={inorm}")


def test_build_targets_normalizes_over_time_per_channel():
    y = torch.randn(3, 50, 6) * torch.arange(1, 7) + 5
    out = ops.build_targets([y], instance_norm=True, final_norm="none")
    assert torch.allclose(out.mean(1), torch.zeros(3, 6), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(3, 6), atol=1e-3)


def test_build_targets_errors():
    with pytest.raises(ValueError, match="at least one"):
        ops.build_targets([])
    with pytest.raises(ValueError, match="final_norm"):
        ops.build_targets([torch.randn(1, 2, 3)], final_norm="batch")
    with pytest.raises(ValueError, match="layer 1"):
        ops.build_targets([torch.randn(1, 2, 3), torch.randn(1, 3, 3)])


@pytest.mark.parametrize("B,T,K,D", [(1, 1, 1, 1), (3, 13, 5, 7), (4, 64, 12, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_gather_exact_and_grad(B, T, K, D, dtype):
    x = torch.randn(B, T, D).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(T)[:K].sort().values for _ in range(B)])
    out = ops.masked_gather(x, ids)
    expect = torch.stack([x.detach()[b, ids[b]] for b in range(B)])
    assert torch.equal(out.detach(), expect)
    g = torch.randn(B, K, D).to(dtype)
    out.backward(g)
    gx = torch.zeros(B, T, D, dtype=dtype)
    for b in range(B):
        gx[b, ids[b]] = g[b]
    assert torch.equal(x.grad, gx)


def test_masked_gather_noncontiguous_and_gradcheck():
    x = torch.randn(3, 9, 5, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    x = x[:, :, ::1].requires_grad_()
    ids = torch.tensor([[0, 4, 8], [1, 2, 3], [5, 6, 7]])
    assert torch.autograd.gradcheck(lambda t: ops.masked_gather(t, ids), (x,))
    fill = torch.randn(3, 9, 5, dtype=torch.float64, requires_grad=True)
    kept = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, f: ops.masked_scatter(a, ids, f), (kept, fill))


def test_masked_gather_shape_error():
    with pytest.raises(ValueError, match="ids_keep"):
        ops.masked_gather(torch.randn(2, 3, 4), torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_ema_update_formula(pdtype):
    shapes = [(1,), (7, 3), (128,), (5, 5, 5)]
    ema = [torch.randn(s) for s in shapes]
    par = [torch.randn(s).to(pdtype) for s in shapes]
    d = 0.9837
    expect = [e.double() * d + p.double() * (1 - d) for e, p in zip(ema, par)]
    ema_ref = [e.clone() for e in ema]
    ops.ema_update_(ema, par, d)
    ema_update_ref_(ema_ref, par, d)
    for e, r, x in zip(ema, ema_ref, expect):
        assert e.dtype == torch.float32
        assert_close_verbose(e, x, atol=1e-7, rtol=2**-22, what="ema_update_")
        assert_close_verbose(r, x, atol=1e-7, rtol=2**-22, what="ema_update_ref_")


def test_ema_update_errors():
    with pytest.raises(ValueError, match="float32"):
        ops.ema_update_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="shapes"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_backend_reports_and_can_be_forced(monkeypatch):
    table = ops.backend()
    assert set(table) == {"masked_gather", "masked_scatter", "masked_targets", "build_targets", "ema_update_"}
    assert all(v["impl"] in ("triton", "cuda", "cpp", "torch") and v["reason"] for v in table.values())
    monkeypatch.setenv("D2V_OPS_IMPL", "ref")
    ops._reset_backend()
    try:
        assert ops.backend()["ema_update_"]["variant"] == "ref"
        assert "forced" in ops.backend()["ema_update_"]["reason"]
        monkeypatch.setenv("D2V_OPS_IMPL", "bogus")
        ops._reset_backend()
        with pytest.raises(ValueError, match="D2V_OPS_IMPL"):
            ops.backend()
    finally:
        monkeypatch.delenv("D2V_OPS_IMPL")
        ops._reset_backend()
