"""Shared test setup: seeded tests, a per-session data cache, small-config helpers.

Run: .venv/bin/python -m pytest -q tests
"""
import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run in Triton's CPU interpreter when no GPU is visible: the variable must be set before
# the first @triton.jit is defined (d2v.kernels defines them lazily, at first launch) (../shared/ENV.md)
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
