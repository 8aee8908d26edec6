"""Fused paths of d2v.ops against their references: Triton kernels (Triton's CPU interpreter here, set by
conftest.py; compiled on a GPU), the C++ extension d2v._C, the dispatch rules, torch.compile, and a
mini-model whose losses must not depend on the path.

Error budget (a bound per op, not a tolerance tuned until green):
- gather / scatter / per-clone targets and their gradients move values without arithmetic: bit-exact
  (torch.equal), bf16 included. The fp32 -> bf16 cast of a fill is round-to-nearest-even on both sides.
- build_targets: inputs are read exactly (bf16 -> fp32 is exact); the Triton kernel reduces over T in
  fp32 in a different order than torch, so against float64 the error is a few fp32 ulps of O(1)
  normalized values times log2(T) accumulation depth: 1e-4 absolute covers T <= 1e4 (as test_ops.py).
- ema_update_: the fused paths compute ema + w * (p - ema) in fp32: three roundings of values bounded by
  max(|ema|, |p|), against float64 rtol 2**-22 and atol 1e-7 on O(1) values (as test_ops.py); the bf16
  teacher copy is bit-equal to the fp32 result rounded to nearest even.
- mini-model: 3 steps fused vs torch. The only inexact differences are the targets (<= 1e-6 relative)
  and the EMA (1 ulp), then 3 AdamW steps (lr 1e-3) through a 2-block model: losses agree to 1e-4
  relative; a wrong kernel (a wrong row or a missing normalization) moves them by O(1e-1).

Interpreter grids stay small (<= ~50 programs per launch, ~2 ms each; ../shared/ENV.md).

Run: .venv/bin/python -m pytest -q tests/test_kernels.py
"""
import os
import subprocess
import sys

import pytest
import torch

from d2v import _ext, ops
from d2v.kernels import _triton
from d2v.kernels import build_targets as kt
from d2v.kernels import ema_update as ke
from d2v.kernels import masked_gather as kg
from tests.test_ops import targets_fp64
from tests.utils import assert_close_verbose

EXT_REQUIRED = os.environ.get("D2V_SKIP_EXT") != "1"  # setup.py builds d2v._C unless told not to


@pytest.fixture
def impl(monkeypatch):
    """Force a path for the duration of a test: impl("triton")."""

    def force(value):
        monkeypatch.setenv("D2V_OPS_IMPL", value)
        ops._reset_backend()
        return ops.backend()

    yield force
    ops._reset_backend()


def _ids(R, T, K, g=None):
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(R)])  # distinct, unsorted


# ------------------------------------------------------------------------------------ gather / scatter


GATHER_SHAPES = [(1, 1, 1, 1), (3, 13, 5, 7), (2, 31, 17, 33), (2, 5, 5, 3), (4, 64, 12, 257)]  # K = T in one


@pytest.mark.parametrize("B,T,K,D", GATHER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gather_and_grad_exact(impl, B, T, K, D, dtype):
    assert impl("triton")["masked_gather"]["impl"] == "triton"
    x = torch.randn(B, T, D).to(dtype).requires_grad_()
    ids = _ids(B, T, K)
    out = ops.masked_gather(x, ids)
    assert torch.equal(out.detach(), kg.masked_gather_ref(x.detach(), ids))
    g = torch.randn(B, K, D).to(dtype)
    out.backward(g)
    assert torch.equal(x.grad, kg.gather_backward_ref(g, ids, T, 1))


def test_triton_gather_noncontiguous_int32_and_gradcheck(impl):
    impl("triton")
    base = torch.randn(7, 3, 11, dtype=torch.float64)
    x = base.transpose(0, 1)  # (3, 7, 11), strided in B and T
    ids = torch.tensor([[0, 4, 6], [1, 2, 3], [5, 6, 0]], dtype=torch.int32)
    assert torch.equal(ops.masked_gather(x, ids), kg.masked_gather_ref(x, ids))
    xg = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.masked_gather(t, ids), (xg,), fast_mode=True)
    kept = torch.randn(3, 3, 11, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, f: ops.masked_scatter(a, ids, f), (kept, fill), fast_mode=True)


@pytest.mark.parametrize("B,T,K,D", GATHER_SHAPES[:4])
@pytest.mark.parametrize("dtype,fill_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_triton_scatter_and_grads_exact(impl, B, T, K, D, dtype, fill_dtype):
    impl("triton")
    ids = _ids(B, T, K)
    kept = torch.randn(B, K, D).to(dtype).requires_grad_()
    fill = torch.randn(B, T, D).to(fill_dtype).requires_grad_()
    out = ops.masked_scatter(kept, ids, fill)
    kr, fr = kept.detach().clone().requires_grad_(), fill.detach().clone().requires_grad_()
    ref = kg.masked_scatter_ref(kr, ids, fr)
    assert out.dtype == dtype and torch.equal(out.detach(), ref.detach())
    g = torch.randn(B, T, D).to(dtype)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(kept.grad, kr.grad) and torch.equal(fill.grad, fr.grad)
    assert fill.grad.dtype == fill_dtype


def test_triton_scatter_strided_fill_and_no_fill_grad(impl):
    impl("triton")
    ids = _ids(2, 9, 4)
    kept = torch.randn(2, 4, 6, requires_grad=True)
    fill = torch.randn(9, 2, 6).transpose(0, 1)  # strided, no grad (the decoder's noise)
    out = ops.masked_scatter(kept, ids, fill)
    assert torch.equal(out.detach(), kg.masked_scatter_ref(kept.detach(), ids, fill))
    out.sum().backward()
    assert torch.equal(kept.grad, torch.ones(2, 4, 6))


@pytest.mark.parametrize("B,M,T,N,D", [(1, 1, 1, 1, 1), (2, 3, 13, 7, 5), (3, 2, 31, 20, 33)])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_masked_targets_match_repeat_interleave(impl, B, M, T, N, D, path):
    impl(path)
    y = torch.randn(B, T, D)
    ids = _ids(B * M, T, N)
    out = ops.masked_targets(y, ids, M)
    expect = torch.stack([y.repeat_interleave(M, 0)[r, ids[r]] for r in range(B * M)])  # the reference's way
    assert torch.equal(out, expect)


def test_masked_targets_grad_sums_over_clones():
    y = torch.randn(2, 5, 3, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [4, 4], [3, 0]])  # clone rows share a sample; a repeat in row 2
    ops.masked_targets(y, ids, 2).sum().backward()
    expect = torch.zeros(2, 5, 3)
    for r in range(4):
        for t in ids[r]:
            expect[r // 2, t] += 1
    assert torch.equal(y.grad, expect)


def test_masked_targets_shape_error():
    with pytest.raises(ValueError, match="clones=3"):
        ops.masked_targets(torch.randn(2, 5, 3), torch.zeros(5, 2, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------ build_targets

TARGET_SHAPES = [(1, 1, 1), (2, 7, 3), (3, 13, 17), (2, 37, 33)]


@pytest.mark.parametrize("shape", TARGET_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 6])  # K = 1 and K = all layers of a 6-block teacher
@pytest.mark.parametrize("final_norm", ["none", "layer", "instance"])
def test_triton_build_targets_vs_fp64(impl, shape, dtype, k, final_norm):
    assert impl("triton")["build_targets"]["impl"] == "triton"
    layers = [(torch.randn(*shape) * 3 + 1).to(dtype) for _ in range(k)]
    out = ops.build_targets(layers, instance_norm=True, final_norm=final_norm)
    assert out.dtype == torch.float32 and out.shape == shape
    assert_close_verbose(out, targets_fp64(layers, True, final_norm), atol=1e-4, what="build_targets triton")


@pytest.mark.parametrize("final_norm", ["none", "layer", "instance"])
def test_triton_build_targets_strided_views_and_no_instance_norm(impl, final_norm):
    impl("triton")
    ffn = [torch.randn(3, 1 + 19, 10) * 2 - 1 for _ in range(3)]  # (B, E + T, D) teacher outputs
    layers = [t[:, 1:] for t in ffn]  # CLS stripped: strided views, as the model passes them
    mixed = layers[:2] + [torch.randn(10, 19, 3).permute(2, 1, 0)]  # one layer with different strides
    for ls in (layers, mixed):
        assert not ls[0].is_contiguous()
        for inorm in (True, False):
            out = ops.build_targets(ls, instance_norm=inorm, final_norm=final_norm)
            assert_close_verbose(out, targets_fp64(ls, inorm, final_norm), atol=1e-4, what=f"inorm={inorm}")


def test_triton_build_targets_large_offset_is_stable(impl):
    """Two-pass statistics in registers: a channel mean 1e3x its spread loses nothing beyond the budget
    (sum / sum-of-squares in fp32 would lose ~1e-1)."""
    impl("triton")
    y = torch.randn(2, 50, 8) + 1000.0
    out = ops.build_targets([y], instance_norm=True, final_norm="none")
    assert_close_verbose(out, targets_fp64([y], True, "none"), atol=1e-3, what="offset")


def test_triton_build_targets_too_long_says_so(impl):
    impl("triton")
    with pytest.raises(ValueError, match="T <= 4096"):
        ops.build_targets([torch.randn(1, kt.MAX_T + 1, 1)])


# ------------------------------------------------------------------------------------ ema_update_

EMA_SHAPES = [(1,), (7, 3), (128,), (5, 5, 5), (257,)]


def _ema_case(pdtypes):
    ema = [torch.randn(s) for s in EMA_SHAPES]
    par = [torch.randn(s).to(pdtypes[i % len(pdtypes)]) for i, s in enumerate(EMA_SHAPES)]
    return ema, par


def _check_ema(ema, ema0, par, d, low=None, what=""):
    for i, (e, e0, p) in enumerate(zip(ema, ema0, par)):
        expect = e0.double() * d + p.double() * (1 - d)
        assert_close_verbose(e, expect, atol=1e-7, rtol=2**-22, what=f"{what} tensor {i}")
        if low is not None:
            assert torch.equal(low[i], e.to(low[i].dtype)), f"{what}: low-precision copy {i}"


@pytest.mark.parametrize("path", ["triton", "cpp"])
@pytest.mark.parametrize("pdtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("lowp", [None, torch.bfloat16, torch.float16])
def test_fused_ema_vs_fp64(impl, path, pdtypes, lowp):
    if path == "cpp" and _ext.load()[0] is None and not EXT_REQUIRED:
        pytest.skip("D2V_SKIP_EXT=1: d2v._C not built")
    table = impl(path)
    assert table["ema_update_"]["impl"] == path
    ema, par = _ema_case(pdtypes)
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, dtype=lowp) for e in ema] if lowp else None
    d = 0.9837
    ops.ema_update_(ema, par, d, out_lowp=low)
    _check_ema(ema, ema0, par, d, low, what=path)


def test_triton_ema_many_chunks():
    """Tensors spanning several chunks (chunk=64 -> 29 programs): every chunk lands, none twice."""
    ema, par = _ema_case((torch.bfloat16,))
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, dtype=torch.bfloat16) for e in ema]
    ke.ema_update_triton_(ema, par, 0.75, low, chunk=64)
    _check_ema(ema, ema0, par, 0.75, low, what="chunk=64")


def test_ema_out_lowp_torch_paths(impl):
    for path in ("torch", "ref"):
        impl(path)
        ema, par = _ema_case((torch.float32, torch.bfloat16))
        ema0 = [e.clone() for e in ema]
        low = [torch.empty(e.shape, dtype=torch.bfloat16) for e in ema]
        ops.ema_update_(ema, par, 0.5, out_lowp=low)
        _check_ema(ema, ema0, par, 0.5, low, what=path)


def test_ema_errors_name_the_problem():
    with pytest.raises(ValueError, match="out_lowp 0 must be bf16/fp16"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, out_lowp=[torch.zeros(2)])
    with pytest.raises(ValueError, match="1 out_lowp tensors vs 2"):
        ops.ema_update_([torch.zeros(2)] * 2, [torch.zeros(2)] * 2, 0.5, out_lowp=[torch.zeros(2).bfloat16()])


# ------------------------------------------------------------------------------------ C++ extension


def test_cpp_extension_is_built():
    """setup.py (scripts/setup.sh) builds d2v._C whenever a compiler is found; CI must not lose it."""
    mod, why = _ext.load()
    if not EXT_REQUIRED:
        pytest.skip(f"D2V_SKIP_EXT=1 ({why})")
    assert mod is not None, why
    assert mod.with_cuda is False or torch.version.cuda is not None


def test_cpp_ema_direct_and_errors():
    mod, why = _ext.load()
    if mod is None:
        pytest.skip(why) if not EXT_REQUIRED else pytest.fail(why)
    n = (1 << 18) + 17  # above the parallel threshold: several OpenMP work items and a ragged tail
    ema, par = [torch.randn(n), torch.randn(3)], [torch.randn(n).bfloat16(), torch.randn(3)]
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(n, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16)]
    mod.ema_update_cpu(ema, par, 0.999, low)
    _check_ema(ema, ema0, par, 0.999, low, what="cpp direct")
    with pytest.raises(RuntimeError, match="pair 0 shapes differ"):
        mod.ema_update_cpu([torch.zeros(3)], [torch.zeros(4)], 0.5)
    with pytest.raises(RuntimeError, match="must be float32"):
        mod.ema_update_cpu([torch.zeros(3).double()], [torch.zeros(3)], 0.5)
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.ema_update_cpu([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], 0.5)


def test_cpp_ema_strided_param_through_ops(impl):
    if _ext.load()[0] is None and not EXT_REQUIRED:
        pytest.skip("D2V_SKIP_EXT=1")
    impl("ema_update_=cpp")
    ema, par = [torch.randn(4, 6)], [torch.randn(6, 4).t()]  # a transposed (strided) param
    ema0 = [e.clone() for e in ema]
    ops.ema_update_(ema, par, 0.9)
    _check_ema(ema, ema0, par, 0.9, what="strided")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("D2V_TEST_JIT") != "1",
                    reason="JIT build takes 40-75 s on 2 cores: D2V_TEST_JIT=1 runs it")
def test_jit_build_of_the_extension(tmp_path):
    """Without the prebuilt module and with D2V_JIT_EXT=1, csrc/ is JIT-built with ninja and works."""
    code = (
        "import sys, torch; sys.modules['d2v._C'] = None\n"  # hide the prebuilt module
        "from d2v import _ext; mod, why = _ext.load(); assert mod is not None, why; print(why)\n"
        "e, p = [torch.zeros(5)], [torch.ones(5)]; mod.ema_update_cpu(e, p, 0.75)\n"
        "assert torch.equal(e[0], torch.full((5,), 0.25))\n"
    )
    env = dict(os.environ, D2V_JIT_EXT="1", TORCH_EXTENSIONS_DIR=str(tmp_path), MAX_JOBS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "JIT-built from csrc/ (CPU only)" in r.stdout


def test_without_jit_permission_the_reason_says_how():
    code = ("import sys; sys.modules['d2v._C'] = None\n"
            "from d2v import _ext, ops; print(_ext.load()[1]); print(ops.backend()['ema_update_'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("D2V_JIT_EXT", "D2V_OPS_IMPL")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "set D2V_JIT_EXT=1" in r.stdout and "'impl': 'torch'" in r.stdout and "foreach" in r.stdout


# ------------------------------------------------------------------------------------ dispatch


def test_auto_on_cpu_reports_paths_and_reasons(impl):
    if torch.cuda.is_available():
        pytest.skip("reports the CUDA choice on a GPU machine")
    table = impl("auto")
    for op in ("masked_gather", "masked_scatter", "masked_targets", "build_targets"):
        assert table[op]["impl"] == "torch" and "CPU tensors: torch" in table[op]["reason"]
        assert "CUDA tensors: Triton" in table[op]["reason"]  # triton is a dev dependency
    mod, _ = _ext.load()
    want = "cpp" if mod is not None else "torch"
    assert table["ema_update_"]["impl"] == want and "foreach" in table["ema_update_"]["reason"]


def test_forced_paths_and_clear_errors(impl, monkeypatch):
    t = impl("triton,ema_update_=torch")
    assert [t[o]["impl"] for o in ("masked_gather", "build_targets", "ema_update_")] == ["triton", "triton", "torch"]
    if _ext.load()[0] is not None:
        t = impl("cpp")
        assert t["ema_update_"]["impl"] == "cpp" and t["masked_gather"]["impl"] == "torch"
        assert "no cpp kernel for masked_gather" in t["masked_gather"]["reason"]
    if _ext.load()[0] is None or not _ext.load()[0].with_cuda:
        with pytest.raises(RuntimeError, match="CUDA extension path"):
            impl("cuda")
    with pytest.raises(ValueError, match="masked_gather has no cpp kernel"):
        impl("masked_gather=cpp")
    with pytest.raises(ValueError, match="unknown op 'gather'"):
        impl("gather=triton")
    with pytest.raises(ValueError, match="'fast' is not one of"):
        impl("fast")


def test_triton_missing_is_reported_not_fatal(impl, monkeypatch):
    monkeypatch.setattr(_triton, "status", lambda: (False, "triton is not installed (pip install triton)"))
    t = impl("auto")
    assert "CUDA tensors: torch (triton is not installed" in t["build_targets"]["reason"]
    with pytest.raises(RuntimeError, match="forces the Triton path but triton is not installed"):
        impl("triton")


def test_triton_on_cpu_without_interpreter_says_how(impl, monkeypatch):
    impl("triton")
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.masked_gather(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.long))


def test_package_imports_and_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from d2v import ops\n"
            "r = ops.backend()['build_targets']; assert r['impl'] == 'torch', r; print(r['reason'])\n"
            "print(ops.build_targets([torch.randn(2, 3, 4)]).shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "D2V_OPS_IMPL"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "triton is not installed" in r.stdout and "torch.Size([2, 3, 4])" in r.stdout


# ------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_custom_ops_under_torch_compile(impl, path):
    impl(path)

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
    ids, ids_m = _ids(B, T, K), _ids(2 * B, T, T - K)
    args = dict(ids=ids, ids_m=ids_m, fill=torch.randn(B, T, D), layers=[torch.randn(B, T, D) for _ in range(2)],
                par=[torch.randn(3, 2), torch.randn(4)])
    x1 = torch.randn(B, T, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    ema1, ema2 = [torch.randn(3, 2), torch.randn(4)], None
    ema2 = [e.clone() for e in ema1]
    eager = step(x1, ema=ema1, **args)
    comp = compiled(x2, ema=ema2, **args)
    eager.backward()
    comp.backward()
    assert_close_verbose(comp.detach(), eager.detach(), atol=1e-5, rtol=1e-6, what="compiled loss")
    assert torch.equal(x2.grad, x1.grad)
    assert all(torch.equal(a, b) for a, b in zip(ema1, ema2))


def test_fake_impls_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, ids = torch.empty(2, 9, 5), torch.zeros(6, 4, dtype=torch.long)
        assert torch.ops.d2v.masked_gather(x, ids, 3).shape == (6, 4, 5)
        assert torch.ops.d2v.masked_scatter(torch.empty(2, 4, 5), ids[:2], x).shape == (2, 9, 5)
        out = torch.ops.d2v.build_targets([x.bfloat16()], True, "none", 1e-5)
        assert out.shape == (2, 9, 5) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------ mini-model parity


def _train_losses(steps=3):
    from d2v.config import Config
    from d2v.ema import EMATeacher
    from d2v.masking import inverse_block_mask, make_maskinfo
    from d2v.registry import build_model

    torch.manual_seed(0)
    cfg = Config.from_dict({"model": {"flavor": "tiny"}, "masking": {"clone_batch": 2},
                            "objective": {"average_top_k_layers": 2}})
    m = build_model(cfg)
    teacher = EMATeacher(m, 0.9, 0.99, steps)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, steps + 1):
        img = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
        grid = cfg.model.grid
        mask = make_maskinfo(inverse_block_mask(4, grid, grid, mask_prob=0.8, mask_length=3, adjust=0.07,
                                                generator=g))
        out = m(img, mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        teacher.update(step)
        losses.append(out["loss"].detach())
    return torch.stack(losses)


def test_mini_model_losses_fused_vs_torch(impl):
    impl("torch")
    ref = _train_losses()
    assert impl("triton")["ema_update_"]["impl"] == "triton"
    fused = _train_losses()
    assert_close_verbose(fused, ref, atol=0.0, rtol=1e-4, what="losses triton vs torch")
    # (the C++ EMA is the CPU default: every other model test trains with it)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_compiled_matches_reference(impl, dtype):
    """Compiled Triton (not the interpreter) at a ViT-B-like shape."""
    impl("triton")
    dev = "cuda"
    x = torch.randn(32, 196, 768, device=dev).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(196, device=dev)[:40] for _ in range(32)])
    out = ops.masked_gather(x, ids)
    assert torch.equal(out, kg.masked_gather_ref(x.detach(), ids))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, kg.gather_backward_ref(torch.ones_like(out), ids, 196, 1))
    fill = torch.randn(32, 196, 768, device=dev, dtype=dtype)
    assert torch.equal(ops.masked_scatter(out.detach(), ids, fill), kg.masked_scatter_ref(out.detach(), ids, fill))
    layers = [torch.randn(16, 196, 768, device=dev).to(dtype) for _ in range(10)]
    for fn in ("none", "layer", "instance"):
        got = ops.build_targets(layers, final_norm=fn)
        assert_close_verbose(got, targets_fp64(layers, True, fn), atol=1e-4, what=f"gpu targets {fn}")
    ema = [torch.randn(s, device=dev) for s in [(1,), (768, 768), (3 * 768,), (70001,)]]
    par = [torch.randn(e.shape, device=dev).to(dtype) for e in ema]
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(e.shape, device=dev, dtype=torch.bfloat16) for e in ema]
    ops.ema_update_(ema, par, 0.9998, out_lowp=low)
    _check_ema(ema, ema0, par, 0.9998, low, what="gpu triton")


@pytest.mark.gpu
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_extension_ema(impl, pdtype):
    mod, why = _ext.load()
    if mod is None or not mod.with_cuda:
        pytest.skip(f"d2v._C has no CUDA kernels here ({why})")
    impl("ema_update_=cuda")
    shapes = [(1,), (3,), (768, 768), (70001,)] + [(5,)] * 60  # > 48 tensors: several launches
    ema = [torch.randn(s, device="cuda") for s in shapes]
    par = [torch.randn(s, device="cuda").to(pdtype) for s in shapes]
    par[1] = torch.randn(4, device="cuda").to(pdtype)[1:]  # misaligned: the scalar tail path
    ema0 = [e.clone() for e in ema]
    low = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    ops.ema_update_(ema, par, 0.999, out_lowp=low)
    _check_ema(ema, ema0, par, 0.999, low, what="cuda ext")
