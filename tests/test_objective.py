"""The logged statistics of d2v.objective: target_var / pred_var follow the reference's compute_var
(fairseq examples/data2vec/models/data2vec2.py: sqrt(unbiased variance over tokens + 1e-6), mean over dims).

Run: .venv/bin/python -m pytest -q tests/test_objective.py
"""
import pytest
import torch

from d2v.objective import std_over_tokens


@pytest.mark.parametrize("N,D", [(2, 1), (7, 3), (64, 128)])
def test_std_over_tokens_is_the_reference_formula(N, D):
    g = torch.Generator().manual_seed(N * D)
    scale = torch.linspace(1e-4, 2.0, D, dtype=torch.float64)  # near the 1e-6 floor up to order 1
    y = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    n = y.shape[0]
    var = ((y - y.mean(0)) ** 2).sum(0) / (n - 1)  # unbiased, per dim, written out
    expect = torch.sqrt(var + 1e-6).mean()
    got = std_over_tokens(y.float())
    assert got.dtype == torch.float32
    # float32 sums over N tokens: a few ulps of the variance, halved by the sqrt
    torch.testing.assert_close(got.double(), expect, rtol=N * 2e-7 + 1e-6, atol=0)


def test_constant_tokens_give_the_floor_not_zero():
    """Identical tokens have zero variance: the reference's +1e-6 makes that sqrt(1e-6) = 1e-3, which the
    collapse guard (min_target_var, min_pred_var) compares against."""
    y = torch.ones(10, 4)
    assert std_over_tokens(y).item() == pytest.approx(1e-3, rel=1e-6)
    assert std_over_tokens(torch.randn(10, 4).to(torch.bfloat16)).dtype == torch.float32
