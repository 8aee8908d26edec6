"""The d2v custom ops under torch.compile (aot_eager, fullgraph) and their fake implementations.

The Triton case runs where `triton_device` says (compiled on CUDA, interpreted on CPU, else skipped).
Error budget: the compiled graph runs the same ops in the same order, so gradients and the EMA are
bit-equal; the scalar loss may differ by reassociated fp32 sums of O(10) values: atol 1e-5, rtol 1e-6.

Run: .venv/bin/python -m pytest -q tests/kernels/test_custom_ops.py
"""
import pytest
import torch

from d2v import ops
from tests.utils import assert_close_verbose, rand_ids


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_custom_ops_under_torch_compile(impl, request, path):
    """A step using every op traces as one graph (fullgraph) and matches eager: loss within fp32
    rounding, input gradient and the in-place EMA bit-equal."""
    impl(path)
    dev = request.getfixturevalue("triton_device") if path == "triton" else torch.device("cpu")

    def step(x, ids, ids_m, fill, layers, ema, par):
        kept = ops.masked_gather(x, ids)
        full = ops.masked_scatter(kept * 2, ids, fill)
        y = ops.build_targets(layers, final_norm="layer")
        y_m = ops.masked_targets(y, ids_m, 2)
        ops.ema_update_(ema, par, 0.9)
        return (full.sum(1) * y_m.mean(1)[::2]).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    B, T, K, D = 2, 9, 4, 5
    ids, ids_m = rand_ids(B, T, K).to(dev), rand_ids(2 * B, T, T - K).to(dev)
    args = dict(ids=ids, ids_m=ids_m, fill=torch.randn(B, T, D, device=dev),
                layers=[torch.randn(B, T, D, device=dev) for _ in range(2)],
                par=[torch.randn(3, 2, device=dev), torch.randn(4, device=dev)])
    x1 = torch.randn(B, T, D, device=dev, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    ema1 = [torch.randn(3, 2, device=dev), torch.randn(4, device=dev)]
    ema2 = [e.clone() for e in ema1]
    eager = step(x1, ema=ema1, **args)
    comp = compiled(x2, ema=ema2, **args)
    eager.backward()
    comp.backward()
    assert_close_verbose(comp.detach(), eager.detach(), atol=1e-5, rtol=1e-6, what="compiled loss")
    assert torch.equal(x2.grad, x1.grad)
    assert all(torch.equal(a, b) for a, b in zip(ema1, ema2))


def test_fake_impls_give_shapes():
    """Under FakeTensorMode the ops return the shapes and dtypes the real ones do (gather, per-clone
    gather, scatter, fp32 targets of bf16 layers)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, ids = torch.empty(2, 9, 5), torch.zeros(6, 4, dtype=torch.long)
        assert torch.ops.d2v.masked_gather(x, ids, 3).shape == (6, 4, 5)
        assert torch.ops.d2v.masked_scatter(torch.empty(2, 4, 5), ids[:2], x).shape == (2, 9, 5)
        out = torch.ops.d2v.build_targets([x.bfloat16()], True, "none", 1e-5)
        assert out.shape == (2, 9, 5) and out.dtype == torch.float32
