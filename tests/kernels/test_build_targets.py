"""build_targets: the Triton target builder against a float64 reference, at small shapes, at the model's
call site (K = 10 CLS-stripped strided layers of (B, T + 1, D) teacher outputs) and over sequence
lengths from T = 1 to long sequences.

The Triton tests run where `triton_device` says: compiled on CUDA tensors with a GPU, under Triton's CPU
interpreter on CPU tensors without one (small grids there), skipped with neither.

Error budget: `tests.utils.targets_atol`, an element-wise bound derived from the fp32 roundings of the
reductions over T (and D) and the K-layer average, computed from the inputs in float64 (the derivation
is in its docstring). Inputs are read exactly (bf16/fp16 -> fp32 is exact), so the bound holds for every
input dtype. A wrong kernel (a wrong row, a missing normalization) errs by O(1e-1) and more.

Run: .venv/bin/python -m pytest -q tests/kernels/test_build_targets.py
"""
import pytest
import torch
from d2v.kernels import build_targets as kt

from d2v import ops
from tests.utils import assert_close_verbose, targets_atol, targets_fp64

FINAL_NORMS = ["none", "layer", "instance"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TARGET_SHAPES = [(1, 1, 1), (2, 7, 3), (3, 13, 17), (2, 37, 33)]


def _check(out, layers, instance_norm, final_norm, what):
    """out is fp32 of the layers' shape and within the fp32 budget of the float64 reference."""
    assert out.dtype == torch.float32 and out.shape == layers[0].shape, what
    atol = targets_atol(layers, instance_norm, final_norm)
    assert_close_verbose(out, targets_fp64(layers, instance_norm, final_norm), atol=atol, what=what)


@pytest.mark.parametrize("shape", TARGET_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 6])  # K = 1 and K = all layers of a 6-block teacher
@pytest.mark.parametrize("final_norm", FINAL_NORMS)
def test_triton_build_targets_vs_fp64(impl, triton_device, shape, dtype, k, final_norm):
    """Forced Triton targets of contiguous layers (size-1 and odd shapes, K = 1 and 6) are fp32 and
    within the fp32 budget of the float64 reference, for every final norm."""
    assert impl("triton")["build_targets"]["impl"] == "triton"
    layers = [(torch.randn(*shape, device=triton_device) * 3 + 1).to(dtype) for _ in range(k)]
    out = ops.build_targets(layers, instance_norm=True, final_norm=final_norm)
    _check(out, layers, True, final_norm, "build_targets triton")


@pytest.mark.parametrize("final_norm", FINAL_NORMS)
def test_triton_build_targets_strided_views_and_no_instance_norm(impl, triton_device, final_norm):
    """Triton targets of CLS-stripped strided views, and of layers with differing strides, with and
    without the per-layer instance norm, are within budget of the float64 reference."""
    impl("triton")
    dev = triton_device
    ffn = [torch.randn(3, 1 + 19, 10, device=dev) * 2 - 1 for _ in range(3)]  # (B, E + T, D) teacher outputs
    layers = [t[:, 1:] for t in ffn]  # CLS stripped: strided views, as the model passes them
    mixed = layers[:2] + [torch.randn(10, 19, 3, device=dev).permute(2, 1, 0)]  # one layer with other strides
    for ls in (layers, mixed):
        assert not ls[0].is_contiguous()
        for inorm in (True, False):
            out = ops.build_targets(ls, instance_norm=inorm, final_norm=final_norm)
            _check(out, ls, inorm, final_norm, f"inorm={inorm}")


def test_triton_build_targets_large_offset_is_stable(impl, triton_device):
    """A channel mean 1e3x its spread loses nothing beyond 1e-3: the statistics are two-pass (centred).
    A one-pass sum / sum-of-squares variance in fp32 would lose ~1e-1 here. (The worst-case budget of
    `targets_atol` for this input is ~2e-2, proportional to mean / sd; the fixed 1e-3 is the tighter
    guard that separates the two algorithms.)"""
    impl("triton")
    y = torch.randn(2, 50, 8, device=triton_device) + 1000.0
    out = ops.build_targets([y], instance_norm=True, final_norm="none")
    assert_close_verbose(out, targets_fp64([y], True, "none"), atol=1e-3, what="offset")


def test_triton_build_targets_many_layers_over_launches(impl, triton_device):
    """More layers than one strip launch takes (ViT-L averages 18) are summed over several launches that
    continue the fp32 running sum; the result stays within the fp32 budget for every final norm, on
    CLS-stripped views."""
    impl("triton")
    layers = [torch.randn(2, 6, 5, device=triton_device)[:, 1:] * 2 - 1
              for _ in range(kt._STRIP_MAX_LAYERS + 3)]
    for final_norm in ("none", "layer", "instance"):
        _check(ops.build_targets(layers, final_norm=final_norm), layers, True, final_norm, f"K={len(layers)}")


def test_triton_build_targets_long_sequence_any_length(impl, triton_device):
    """Sequences past the strip path's reach go through the split-T kernels, with no length limit: T = 4097
    (one past a power of two, so the last T-chunk holds a single step) builds targets within the fp32
    budget for every final norm."""
    impl("triton")
    layers = [torch.randn(1, 4097, 2, device=triton_device) * 3 + 1 for _ in range(2)]
    for final_norm in ("none", "layer", "instance"):
        _check(ops.build_targets(layers, final_norm=final_norm), layers, True, final_norm, "T=4097")


# ------------------------------------------------------------------------------------ model call site
# "small" runs under the interpreter too (B programs x one channel tile); "vit_b" is the base image
# recipe's teacher (16 samples, 196 patches + CLS, D = 768, top 10 layers), compiled on a GPU.
CALL_SITES = [
    pytest.param(dict(B=2, T=13, D=24, K=10), id="small"),
    pytest.param(dict(B=16, T=196, D=768, K=10), id="vit_b", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("size", CALL_SITES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("final_norm", FINAL_NORMS)
@pytest.mark.parametrize("layout", ["cls_stripped", "contiguous"])
def test_targets_at_model_call_site(impl, triton_device, size, dtype, final_norm, layout):
    """The model's call: K = 10 layers, each `t[:, 1:]` of a (B, T + 1, D) teacher output (a strided
    view; or contiguous), fp32/bf16/fp16, every final norm: within the fp32 budget of float64."""
    B, T, D, K = (size[k] for k in "BTDK")
    impl("triton")
    ffn = [(torch.randn(B, 1 + T, D, device=triton_device) * 3 + 1).to(dtype) for _ in range(K)]
    layers = [t[:, 1:] for t in ffn]
    if layout == "contiguous":
        layers = [t.contiguous() for t in layers]
    assert layers[0].is_contiguous() == (layout == "contiguous")
    out = ops.build_targets(layers, instance_norm=True, final_norm=final_norm)
    _check(out, layers, True, final_norm, f"{layout} {dtype} final={final_norm}")


# T = 1 and 3 (degenerate statistics), 700 (past the short-sequence tile: a long-sequence path if the
# launcher has one) under the interpreter with a narrow D; longer ones on a GPU with D = 768.
SEQ_LENGTHS = [
    pytest.param(dict(B=2, T=1, D=8, K=3), id="T1"),
    pytest.param(dict(B=2, T=3, D=8, K=3), id="T3"),
    pytest.param(dict(B=1, T=700, D=8, K=3), id="T700"),
    pytest.param(dict(B=2, T=999, D=768, K=8), id="T999_audio", marks=pytest.mark.gpu),
    pytest.param(dict(B=2, T=4096, D=768, K=4), id="T4096", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("size", SEQ_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("final_norm", FINAL_NORMS)
def test_targets_sequence_lengths(impl, triton_device, size, dtype, final_norm):
    """Triton targets of CLS-stripped views at T = 1 (every instance-normed value is 0), T = 3 and long
    sequences are within the fp32 budget of float64."""
    B, T, D, K = (size[k] for k in "BTDK")
    impl("triton")
    layers = [(torch.randn(B, 1 + T, D, device=triton_device) * 3 + 1).to(dtype)[:, 1:] for _ in range(K)]
    out = ops.build_targets(layers, instance_norm=True, final_norm=final_norm)
    _check(out, layers, True, final_norm, f"T={T} {dtype} final={final_norm}")
    if T == 1:  # y - mean(y) over one step is exactly 0 in any precision, and stays 0 through every norm
        assert torch.equal(out, torch.zeros_like(out))
