"""masked_gather / masked_scatter / masked_targets: the Triton kernels against torch, forward and backward,
at small shapes and at the model's call sites (cloned rows, CLS-stripped strided views, clones = 16).

The Triton tests run where `triton_device` says: compiled on CUDA tensors with a GPU, under Triton's CPU
interpreter on CPU tensors without one (grids stay small there: ~2 ms per program instance), skipped
with neither. Error budget: these ops move values without arithmetic, so every comparison is bit-exact
(torch.equal), bf16/fp16 included; a fp32 -> bf16 fill cast is round-to-nearest-even on both sides.

Run: .venv/bin/python -m pytest -q tests/kernels/test_masked_gather.py
"""
import pytest
import torch
from d2v.kernels import masked_gather as kg

from d2v import ops
from d2v.masking import make_maskinfo
from d2v.modalities.base import clone_rows
from tests.utils import rand_ids

GATHER_SHAPES = [(1, 1, 1, 1), (3, 13, 5, 7), (2, 31, 17, 33), (2, 5, 5, 3), (4, 64, 12, 257)]  # K = T in one


@pytest.mark.parametrize("B,T,K,D", GATHER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gather_and_grad_exact(impl, triton_device, B, T, K, D, dtype):
    """Forced Triton gather and its backward equal torch.gather and the scatter of the gradient, bit
    for bit, at size-1, odd and K = T shapes."""
    assert impl("triton")["masked_gather"]["impl"] == "triton"
    dev = triton_device
    x = torch.randn(B, T, D, device=dev).to(dtype).requires_grad_()
    ids = rand_ids(B, T, K).to(dev)
    out = ops.masked_gather(x, ids)
    assert torch.equal(out.detach(), kg.masked_gather_ref(x.detach(), ids))
    g = torch.randn(B, K, D, device=dev).to(dtype)
    out.backward(g)
    assert torch.equal(x.grad, kg.gather_backward_ref(g, ids, T, 1))


def test_triton_gather_noncontiguous_int32_and_gradcheck(impl, triton_device):
    """Triton gather of an input strided in B and T with int32 ids is exact, and gather and scatter
    pass gradcheck in float64."""
    impl("triton")
    dev = triton_device
    base = torch.randn(7, 3, 11, dtype=torch.float64, device=dev)
    x = base.transpose(0, 1)  # (3, 7, 11), strided in B and T
    ids = torch.tensor([[0, 4, 6], [1, 2, 3], [5, 6, 0]], dtype=torch.int32, device=dev)
    assert torch.equal(ops.masked_gather(x, ids), kg.masked_gather_ref(x, ids))
    xg = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.masked_gather(t, ids), (xg,), fast_mode=True)
    kept = torch.randn(3, 3, 11, dtype=torch.float64, device=dev, requires_grad=True)
    fill = torch.randn(3, 7, 11, dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, f: ops.masked_scatter(a, ids, f), (kept, fill), fast_mode=True)


@pytest.mark.parametrize("B,T,K,D", GATHER_SHAPES[:4])
@pytest.mark.parametrize("dtype,fill_dtype", [(torch.float32, torch.float32),
                                              (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_triton_scatter_and_grads_exact(impl, triton_device, B, T, K, D, dtype, fill_dtype):
    """Forced Triton scatter (kept rows into a fill, possibly of another dtype) equals torch's scatter,
    and both gradients equal torch's, bit for bit; the fill's gradient keeps the fill's dtype."""
    impl("triton")
    dev = triton_device
    ids = rand_ids(B, T, K).to(dev)
    kept = torch.randn(B, K, D, device=dev).to(dtype).requires_grad_()
    fill = torch.randn(B, T, D, device=dev).to(fill_dtype).requires_grad_()
    out = ops.masked_scatter(kept, ids, fill)
    kr, fr = kept.detach().clone().requires_grad_(), fill.detach().clone().requires_grad_()
    ref = kg.masked_scatter_ref(kr, ids, fr)
    assert out.dtype == dtype and torch.equal(out.detach(), ref.detach())
    g = torch.randn(B, T, D, device=dev).to(dtype)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(kept.grad, kr.grad) and torch.equal(fill.grad, fr.grad)
    assert fill.grad.dtype == fill_dtype


def test_triton_scatter_strided_fill_and_no_fill_grad(impl, triton_device):
    """Triton scatter reads a strided fill that needs no gradient (the decoder's noise) exactly, and the
    kept rows' gradient is the gathered output gradient."""
    impl("triton")
    dev = triton_device
    ids = rand_ids(2, 9, 4).to(dev)
    kept = torch.randn(2, 4, 6, device=dev, requires_grad=True)
    fill = torch.randn(9, 2, 6, device=dev).transpose(0, 1)  # strided, no grad (the decoder's noise)
    out = ops.masked_scatter(kept, ids, fill)
    assert torch.equal(out.detach(), kg.masked_scatter_ref(kept.detach(), ids, fill))
    out.sum().backward()
    assert torch.equal(kept.grad, torch.ones(2, 4, 6, device=dev))


@pytest.mark.parametrize("B,M,T,N,D", [(1, 1, 1, 1, 1), (2, 3, 13, 7, 5), (3, 2, 31, 20, 33)])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_masked_targets_match_repeat_interleave(impl, request, B, M, T, N, D, path):
    """Per-clone targets (Triton or torch path) equal indexing the M-times repeated targets, as the
    reference does; the torch path runs on CPU tensors everywhere."""
    impl(path)
    dev = request.getfixturevalue("triton_device") if path == "triton" else torch.device("cpu")
    y = torch.randn(B, T, D, device=dev)
    ids = rand_ids(B * M, T, N).to(dev)
    out = ops.masked_targets(y, ids, M)
    expect = torch.stack([y.repeat_interleave(M, 0)[r, ids[r]] for r in range(B * M)])  # the reference's way
    assert torch.equal(out, expect)


def test_masked_targets_grad_sums_over_clones():
    """The gradient of per-clone targets (default path) sums over the clone rows of a sample and over
    repeated positions."""
    y = torch.randn(2, 5, 3, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [4, 4], [3, 0]])  # clone rows share a sample; a repeat in row 2
    ops.masked_targets(y, ids, 2).sum().backward()
    expect = torch.zeros(2, 5, 3)
    for r in range(4):
        for t in ids[r]:
            expect[r // 2, t] += 1
    assert torch.equal(y.grad, expect)


def test_masked_targets_shape_error():
    """Row counts that are not B * clones raise a ValueError naming the clones."""
    with pytest.raises(ValueError, match="clones=3"):
        ops.masked_targets(torch.randn(2, 5, 3), torch.zeros(5, 2, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------ model call sites
# Shapes: "small" runs under the interpreter too (R = 32 rows: tens of programs per launch); "vit_b" is
# the base image recipe (16 samples x 16 clones, 196 patches + CLS, 39 kept, D = 768), compiled on a GPU.
CALL_SITES = [
    pytest.param(dict(B=2, M=16, E=1, T=13, K=4, D=24), id="small"),
    pytest.param(dict(B=16, M=16, E=1, T=196, K=39, D=768), id="vit_b", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _mask(R, T, K, dev):
    """A MaskInfo as the data loader makes it: R rows with exactly T - K masked positions each."""
    mask = torch.zeros(R, T, dtype=torch.bool)
    for r in range(R):
        mask[r, torch.randperm(T)[: T - K]] = True
    return make_maskinfo(mask).to(dev)


def _leaf(*shape, dtype, dev):
    """A random leaf and an identical twin for the torch reference."""
    a = torch.randn(*shape, device=dev).to(dtype).requires_grad_()
    return a, a.detach().clone().requires_grad_()


@pytest.mark.parametrize("size", CALL_SITES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_scatter_at_model_call_sites(impl, triton_device, size, dtype):
    """At the model's four call sites the Triton path equals the torch one bit for bit, forward and
    backward: the student's gather of cloned rows (M = 16; its rows also scattered back into a fill),
    the decoder-input scatter of a CLS-stripped strided view into a noise fill, the gather of the
    decoder's output at the masked positions, and the data2vec 1.0 gather of a CLS-stripped
    full-length view."""
    B, M, E, T, K, D = (size[k] for k in "BMETKD")
    R, dev = B * M, triton_device
    impl("triton")
    mi = _mask(R, T, K, dev)
    g = {}  # one random output gradient per call site, shared by both paths

    def grad(name, shape):
        if name not in g:
            g[name] = torch.randn(*shape, device=dev).to(dtype)
        return g[name]

    # student input: clone_rows (repeat_interleave) then the gather of each row's kept tokens
    local, local_ref = _leaf(B, T, D, dtype=dtype, dev=dev)
    out = ops.masked_gather(clone_rows(local, M), mi.ids_keep)
    ref = kg.masked_gather_ref(clone_rows(local_ref, M), mi.ids_keep)
    assert torch.equal(out.detach(), ref.detach())
    out.backward(grad("student", out.shape))
    ref.backward(grad("student", out.shape))
    assert torch.equal(local.grad, local_ref.grad)
    # the gathered (contiguous) rows scattered back into a full-length fill
    fill = torch.randn(R, T, D, device=dev).to(dtype)
    kept = out.detach()
    out = ops.masked_scatter(kept, mi.ids_keep, fill)
    assert torch.equal(out, kg.masked_scatter_ref(kept, mi.ids_keep, fill))

    # decoder input: x[:, E:] of the student's (R, E + K, D) output, kept rows scattered into noise
    x, x_ref = _leaf(R, E + K, D, dtype=dtype, dev=dev)
    noise = torch.randn(R, T, D, device=dev).to(dtype) * 0.01
    assert not x[:, E:].is_contiguous()
    out = ops.masked_scatter(x[:, E:], mi.ids_keep, noise)
    ref = kg.masked_scatter_ref(x_ref[:, E:], mi.ids_keep, noise)
    assert torch.equal(out.detach(), ref.detach())
    out.backward(grad("decoder_in", out.shape))
    ref.backward(grad("decoder_in", out.shape))
    assert torch.equal(x.grad, x_ref.grad)

    # predictions: the decoder's (R, T, D) output at the masked positions
    pred, pred_ref = _leaf(R, T, D, dtype=dtype, dev=dev)
    out = ops.masked_gather(pred, mi.ids_masked)
    ref = kg.masked_gather_ref(pred_ref, mi.ids_masked)
    assert torch.equal(out.detach(), ref.detach())
    out.backward(grad("pred", out.shape))
    ref.backward(grad("pred", out.shape))
    assert torch.equal(pred.grad, pred_ref.grad)

    # data2vec 1.0: the full-length student's x[:, E:] at the masked positions
    xf, xf_ref = _leaf(R, E + T, D, dtype=dtype, dev=dev)
    out = ops.masked_gather(xf[:, E:], mi.ids_masked)
    ref = kg.masked_gather_ref(xf_ref[:, E:], mi.ids_masked)
    assert torch.equal(out.detach(), ref.detach())
    out.backward(grad("pred", out.shape))
    ref.backward(grad("pred", out.shape))
    assert torch.equal(xf.grad, xf_ref.grad)


@pytest.mark.parametrize("size", CALL_SITES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_clone_targets_at_model_call_site(impl, triton_device, size, dtype):
    """Per-clone targets with clones = 16 (the base recipe): the Triton gather of the shared (B, T, D)
    targets at each clone row's masked positions equals the reference's repeat-then-index, bit for bit."""
    B, M, T, K, D = (size[k] for k in "BMTKD")
    impl("triton")
    dev = triton_device
    mi = _mask(B * M, T, K, dev)
    y = torch.randn(B, T, D, device=dev).to(dtype)
    out = ops.masked_targets(y, mi.ids_masked, M)
    assert out.shape == (B * M, T - K, D)
    assert torch.equal(out, kg.masked_gather_ref(y.repeat_interleave(M, 0), mi.ids_masked))
