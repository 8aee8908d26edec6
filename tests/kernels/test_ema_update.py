"""ema_update_: the fused paths (Triton multi-tensor kernel, C++ twin) and the torch paths against the
float64 formula, with and without the low-precision teacher copy (`out_lowp`), on small lists and on the
model's real parameter list.

The Triton tests run where `triton_device` says: compiled on CUDA tensors with a GPU, under Triton's CPU
interpreter on CPU tensors without one (one program per chunk: small lists there), skipped with neither.

Error budget: `tests.utils.check_ema`: ema + w * (p - ema) in fp32 is a few roundings of terms bounded by
|new| and w * |p - ema| (derivation in its docstring); the bf16/fp16 copy is bit-equal to the fp32 result
rounded to nearest even.

Run: .venv/bin/python -m pytest -q tests/kernels/test_ema_update.py
"""
import functools

import pytest
import torch
from d2v.kernels import ema_update as ke

from d2v import _ext, ops
from tests.utils import EXT_REQUIRED, check_ema, ema_case

EMA_SHAPES = [(1,), (7, 3), (128,), (5, 5, 5), (257,)]


@pytest.mark.parametrize("path", ["triton", "cpp"])
@pytest.mark.parametrize("pdtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("lowp", [None, torch.bfloat16, torch.float16])
def test_fused_ema_vs_fp64(impl, request, path, pdtypes, lowp):
    """The forced fused path (Triton on its device, the C++ twin on CPU) updates every tensor of a
    small list within the fp32 budget, for fp32, bf16 and mixed params, with and without out_lowp."""
    if path == "cpp" and _ext.load()[0] is None and not EXT_REQUIRED:
        pytest.skip("D2V_SKIP_EXT=1: d2v._C not built")
    dev = request.getfixturevalue("triton_device") if path == "triton" else torch.device("cpu")
    table = impl(path)
    assert table["ema_update_"]["impl"] == path
    ema, par = ema_case(EMA_SHAPES, pdtypes, dev)
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, dtype=lowp, device=dev) for e in ema] if lowp else None
    d = 0.9837
    ops.ema_update_(ema, par, d, out_lowp=low)
    check_ema(ema, ema0, par, d, low, what=path)


def test_triton_ema_many_chunks(triton_device):
    """Tensors spanning several chunks (chunk=64 -> 29 programs): every chunk lands, none twice."""
    ema, par = ema_case(EMA_SHAPES, (torch.bfloat16,), triton_device)
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, dtype=torch.bfloat16, device=triton_device) for e in ema]
    ke.ema_update_triton_(ema, par, 0.75, low, chunk=64)
    check_ema(ema, ema0, par, 0.75, low, what="chunk=64")


def test_ema_out_lowp_torch_paths(impl):
    """The torch (foreach) and ref (per-parameter loop) paths also fill out_lowp, within the budget."""
    for path in ("torch", "ref"):
        impl(path)
        ema, par = ema_case(EMA_SHAPES, (torch.float32, torch.bfloat16))
        ema0 = [e.clone() for e in ema]
        low = [torch.empty(e.shape, dtype=torch.bfloat16) for e in ema]
        ops.ema_update_(ema, par, 0.5, out_lowp=low)
        check_ema(ema, ema0, par, 0.5, low, what=path)


def test_ema_errors_name_the_problem():
    """A non-low-precision out_lowp tensor and a wrong out_lowp count raise errors that say so."""
    with pytest.raises(ValueError, match="out_lowp 0 must be bf16/fp16"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, out_lowp=[torch.zeros(2)])
    with pytest.raises(ValueError, match="1 out_lowp tensors vs 2"):
        ops.ema_update_([torch.zeros(2)] * 2, [torch.zeros(2)] * 2, 0.5, out_lowp=[torch.zeros(2).bfloat16()])


# ------------------------------------------------------------------------------------ model call site
# The teacher's trainable parameter list of a real model, plus the awkward tensors a model can also
# have: size-1 tensors, odd and non-16-multiple numels, one just past a chunk (a one-element tail chunk).
# "small" (the tiny recipe narrowed to D = 32, 2 blocks: 33 tensors, ~30k elements; ~40 programs) runs
# under the interpreter; "base" (ViT-B: 163 tensors, 88M elements, ~1.5k programs) on a GPU.
EXTRA_SHAPES = [(1,), (1, 1, 1), (3,), (17,), (7, 13), (ke.CHUNK + 1,)]
MODELS = {
    "small": {"flavor": "tiny", "depth": 2, "embed_dim": 32, "num_heads": 2,
              "decoder": {"dim": 32, "groups": 4, "layers": 1}},
    "base": {"flavor": "base"},
}


@functools.lru_cache(maxsize=2)
def _param_shapes(name: str) -> tuple:
    from d2v.config import Config
    from d2v.model import build_model

    model = build_model(Config.from_dict({"model": MODELS[name]}))
    return tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", ["small", pytest.param("base", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pdtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                     (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "bf16", "fp16", "mixed"])
@pytest.mark.parametrize("lowp", [None, torch.bfloat16, torch.float16],
                         ids=["no_lowp", "bf16_copy", "fp16_copy"])
def test_triton_ema_at_model_call_site(impl, triton_device, model, pdtypes, lowp):
    """The Triton EMA over a model's real parameter list plus size-1, odd-size and chunk-crossing
    tensors, at the end-of-anneal decay: every tensor within the fp32 budget of the float64 formula (a
    skipped chunk misses by w * |p - ema| ~ 1e-4, far outside it), every out_lowp copy bit-exact."""
    shapes = list(_param_shapes(model)) + EXTRA_SHAPES
    assert any(torch.Size(s).numel() % 16 for s in shapes) and any(torch.Size(s).numel() == 1 for s in shapes)
    assert impl("triton")["ema_update_"]["impl"] == "triton"
    ema, par = ema_case(shapes, pdtypes, triton_device)
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, dtype=lowp, device=triton_device) for e in ema] if lowp else None
    d = 0.9998
    ops.ema_update_(ema, par, d, out_lowp=low)
    check_ema(ema, ema0, par, d, low, what=f"{model} triton")
