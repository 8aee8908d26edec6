"""Masking invariants: exact counts, ratios, block shape, seeded determinism, MaskInfo round trip.

Run: .venv/bin/python -m pytest -q tests/test_masking.py
"""
import pytest
import torch

from d2v import ops
from d2v.masking import inverse_block_mask, make_maskinfo, random_mask, span_mask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid,prob,length,adjust", [(14, 0.8, 3, 0.07), (14, 0.75, 3, 0.1),
                                                     (8, 0.8, 3, 0.07), (5, 0.5, 2, 0.0), (7, 0.6, 1, 0.0)])
def test_inverse_block_exact_counts(grid, prob, length, adjust):
    m = inverse_block_mask(64, grid, grid, mask_prob=prob, mask_length=length, adjust=adjust, generator=gen())
    L = grid * grid
    assert m.shape == (64, L) and m.dtype == torch.bool
    assert (m.sum(1) == L - int(L * (1 - prob))).all()


def test_inverse_block_reference_numbers():
    # ViT-B: 196 patches, keep int(196 * 0.2) = 39 -> 157 masked in every row (spec §3.3)
    m = inverse_block_mask(32, 14, 14, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen())
    assert (m.sum(1) == 157).all()


def test_inverse_block_keeps_blocks():
    """Kept patches come in clamped 3x3 blocks: with zero adjust and keep = one block, the kept set is
    exactly a 3x3 square (or an edge-squashed rectangle topped up at random) in most rows."""
    grid = 9
    m = inverse_block_mask(200, grid, grid, mask_prob=1 - 9 / 81, mask_length=3, adjust=0.0, generator=gen(1))
    keep = (~m).view(200, grid, grid)
    squares = 0
    for k in keep:
        rows, cols = k.nonzero(as_tuple=True)
        if rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2:
            squares += 1
    # centres away from the edge (7 x 7 of 81 positions ~ 60%) give perfect 3x3 squares
    assert squares > 0.45 * 200


def test_inverse_block_kept_patches_are_clustered():
    """Block masking keeps neighbouring patches far more often than a uniform random mask."""
    def neighbour_rate(m, grid):
        k = (~m).view(-1, grid, grid).float()
        right = (k[:, :, 1:] * k[:, :, :-1]).sum() / k[:, :, :-1].sum()
        return float(right)
    blk = inverse_block_mask(256, 14, 14, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen())
    rnd = random_mask(256, 196, mask_prob=0.8, generator=gen())
    assert neighbour_rate(blk, 14) > 2 * neighbour_rate(rnd, 14)


def test_masks_seeded_determinism():
    a = inverse_block_mask(8, 14, 14, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen(3))
    b = inverse_block_mask(8, 14, 14, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen(3))
    c = inverse_block_mask(8, 14, 14, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows (clones) are independent


@pytest.mark.parametrize("T", [1, 7, 50, 101])
def test_span_and_random_counts(T):
    s = span_mask(16, T, mask_prob=0.5, mask_length=5, adjust=0.05, generator=gen())
    assert (s.sum(1) == int(T * 0.5)).all()
    r = random_mask(16, T, mask_prob=0.48, generator=gen())
    assert (r.sum(1) == T - int(T * 0.52)).all()


def test_bad_mask_args():
    with pytest.raises(ValueError, match="mask_prob"):
        inverse_block_mask(2, 4, 4, mask_prob=1.0, mask_length=3)
    with pytest.raises(ValueError, match="mask_length"):
        span_mask(2, 10, mask_prob=0.5, mask_length=0)


def test_maskinfo_round_trip():
    m = inverse_block_mask(6, 8, 8, mask_prob=0.8, mask_length=3, adjust=0.07, generator=gen())
    info = make_maskinfo(m)
    K = 64 - int(m[0].sum())
    assert info.ids_keep.shape == (6, K) and info.ids_masked.shape == (6, 64 - K)
    assert not m.gather(1, info.ids_keep).any() and m.gather(1, info.ids_masked).all()
    shuffle = torch.cat([info.ids_keep, info.ids_masked], 1)
    assert torch.equal(shuffle.gather(1, info.ids_restore), torch.arange(64).expand(6, -1))
    x = torch.randn(6, 64, 5)
    kept = ops.masked_gather(x, info.ids_keep)
    back = ops.masked_scatter(kept, info.ids_keep, torch.zeros_like(x))
    assert torch.equal(back[~m], x[~m]) and (back[m] == 0).all()
    # the reference's restore path: cat(kept, fill) gathered with ids_restore gives the same tensor
    fill = torch.randn(6, 64 - K, 5)
    ref = torch.gather(torch.cat([kept, fill], 1), 1, info.ids_restore[..., None].expand(-1, -1, 5))
    full = torch.zeros_like(x)
    full.scatter_(1, info.ids_masked[..., None].expand(-1, -1, 5), fill)
    assert torch.equal(ops.masked_scatter(kept, info.ids_keep, full), ref)


def test_maskinfo_rejects_unequal_rows():
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        make_maskinfo(m)
