"""Test helpers: verbose closeness assertions.

Run: (imported by tests)
"""
import torch


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0,
                         what: str = "") -> None:
    """Like torch.testing.assert_close, but reports the mismatch count, first indices and max/mean diff."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"first at {idx}; max |diff| {float(diff.nan_to_num().max()):.3g}, "
            f"mean |diff| {float(diff.nan_to_num().mean()):.3g}"
        )
