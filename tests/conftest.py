"""Shared test setup: seeded tests, a per-session data cache, the fixtures that pick where the Triton
kernels run (`triton_device`) and force a dispatch path (`impl`), and the records of the "d2v" logger
(`d2v_log`). Helpers that test modules import live in tests/utils.py.

Triton kernels run compiled on CUDA tensors when a GPU is visible, else in Triton's CPU interpreter on
CPU tensors (TRITON_INTERPRET=1, set here by default when no GPU is visible): never the Triton path on
CPU tensors without the interpreter. With neither (TRITON_INTERPRET=0 on a CPU machine) the Triton tests
skip and say why; the torch-reference and dispatch tests still run.

Run: .venv/bin/python -m pytest -q tests
"""
import logging
import os
import random

import numpy as np
import pytest
import torch

from tests.utils import LogRecords

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


@pytest.fixture
def d2v_log():
    """The records logged under the "d2v" logger during the test, at DEBUG and up, whether or not the
    CLI's `setup_logging` stopped propagation: a `tests.utils.LogRecords` (`.records`, iteration,
    `.messages(level=logging.WARNING)`, `.text`, `.clear()`). The logger's level and handlers are
    restored afterwards."""
    cap, lg = LogRecords(), logging.getLogger("d2v")
    level = lg.level
    lg.addHandler(cap.handler)
    lg.setLevel(logging.DEBUG)
    try:
        yield cap
    finally:
        lg.removeHandler(cap.handler)
        lg.setLevel(level)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped (and said so) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
