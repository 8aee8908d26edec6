"""Shared test setup: seeded tests, a per-session data cache, small-config helpers, and the fixtures
that pick where the Triton kernels run (`triton_device`) and force a dispatch path (`impl`).

Triton kernels run compiled on CUDA tensors when a GPU is visible, else in Triton's CPU interpreter on
CPU tensors (TRITON_INTERPRET=1, set here by default when no GPU is visible): never the Triton path on
CPU tensors without the interpreter. With neither (TRITON_INTERPRET=0 on a CPU machine) the Triton tests
skip and say why; the torch-reference and dispatch tests still run.

Run: .venv/bin/python -m pytest -q tests
"""
import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run in Triton's CPU interpreter when no GPU is visible: the variable must be set before
# the first @triton.jit is defined (d2v.kernels defines them lazily, at first launch)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Embedded datasets are prepared once per session into a temporary cache."""
    if "D2V_CACHE" not in os.environ:
        os.environ["D2V_CACHE"] = str(tmp_path_factory.mktemp("d2v_cache"))
    yield


TRITON_SKIP = "Triton kernels need a CUDA device or TRITON_INTERPRET=1 (Triton's CPU interpreter)"


@pytest.fixture
def triton_device() -> torch.device:
    """Where a test runs the Triton kernels: CUDA (compiled) when a GPU is visible, else the CPU under
    Triton's interpreter; skipped when neither is available."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    from d2v.kernels import _triton

    if _triton.interpreting():
        return torch.device("cpu")
    pytest.skip(TRITON_SKIP)


@pytest.fixture
def impl(monkeypatch):
    """Force a dispatch path for the duration of a test: impl("triton") -> ops.backend()'s table."""
    from d2v import ops

    def force(value):
        monkeypatch.setenv("D2V_OPS_IMPL", value)
        ops._reset_backend()
        return ops.backend()

    yield force
    monkeypatch.delenv("D2V_OPS_IMPL", raising=False)
    ops._reset_backend()


def micro_overrides(out_dir, steps=6, **extra):
    """key=value overrides shrinking the tiny image recipe to a seconds-long run."""
    d = {
        "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
        "model.decoder.dim": 32, "model.decoder.layers": 1, "model.decoder.groups": 4,
        "objective.average_top_k_layers": 2, "masking.clone_batch": 2,
        "train.batch_size": 8, "train.max_steps": steps, "train.log_every": 1, "train.ckpt_every": 3,
        "train.out_dir": str(out_dir), "train.probe_after": False, "optim.warmup_steps": 2,
        "ema.anneal_end_step": steps, "data.num_workers": 0,
    }
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped (and said so) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
