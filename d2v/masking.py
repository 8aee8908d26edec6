"""Mask generators for data2vec 2.0 and the MaskInfo contract used by the student.

Legend: B rows (samples x clones), T tokens per row, K kept tokens per row, D width.
Convention (MAE / fairseq): mask True = masked = hidden from the student and predicted;
every row of a mask has exactly the same number of masked positions, so kept tokens can be
gathered into a dense (B, K, D) tensor.

References: fairseq data_utils.compute_block_mask_2d / compute_block_mask_1d,
modalities/base.py random_masking and make_maskinfo (the reference's behaviour).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["MaskInfo", "make_maskinfo", "inverse_block_mask", "span_mask", "random_mask"]


class MaskInfo(NamedTuple):
    mask: torch.Tensor  # (B, T) bool, True = masked
    ids_keep: torch.Tensor  # (B, K) int64, positions of kept tokens in increasing order
    ids_restore: torch.Tensor  # (B, T) int64, inverse permutation of ids_shuffle
    ids_masked: torch.Tensor  # (B, T - K) int64, positions of masked tokens in increasing order

    def to(self, device, non_blocking: bool = False) -> "MaskInfo":
        return MaskInfo(*(t.to(device, non_blocking=non_blocking) for t in self))


def make_maskinfo(mask_BT: torch.Tensor) -> MaskInfo:
    """Turn a (B, T) bool mask with equal masked count per row into gather/restore indices.

    Call it where the mask is built (CPU, data loader side): reading the kept count is a host read."""
    if mask_BT.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask_BT.shape)}")
    n_masked = mask_BT.sum(1)
    if mask_BT.shape[0] > 0 and not bool((n_masked == n_masked[0]).all()):
        raise ValueError(
            f"every mask row must hide the same number of tokens, got counts {n_masked.tolist()}"
        )
    len_keep = mask_BT.shape[1] - int(n_masked[0]) if mask_BT.shape[0] > 0 else mask_BT.shape[1]
    # stable sort: kept (0) first in their original order, then masked (1)
    ids_shuffle = torch.argsort(mask_BT.to(torch.int8), dim=1, stable=True)  # (B, T)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, T)
    return MaskInfo(mask_BT, ids_shuffle[:, :len_keep].contiguous(), ids_restore,
                    ids_shuffle[:, len_keep:].contiguous())


def _exact_count(selected_BL: torch.Tensor, target: int, generator) -> torch.Tensor:
    """Trim or top up each row of a bool (B, L) selection to exactly `target` True cells.

    Excess cells are cleared uniformly at random among the selected ones, missing cells are
    added uniformly at random among the unselected ones (one top-k over random keys)."""
    B, L = selected_BL.shape
    noise = torch.rand(B, L, generator=generator)
    key = selected_BL.float() * 2.0 + noise  # selected cells rank above all unselected ones
    top = key.topk(target, dim=1).indices
    out = torch.zeros(B, L, dtype=torch.bool)
    out.scatter_(1, top, True)
    return out


def _check_prob(mask_prob: float, name: str = "mask_prob") -> None:
    if not 0.0 <= mask_prob < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {mask_prob}")


def inverse_block_mask(
    batch: int,
    height: int,
    width: int,
    *,
    mask_prob: float,
    mask_length: int,
    adjust: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """data2vec 2.0 image masking: sample blocks of patches to KEEP, mask the rest.

    keep fraction p = 1 - mask_prob; int(L*(p+adjust)/mask_length**2) block centres per row,
    each grown to a mask_length x mask_length block with coordinates clamped to the grid,
    then every row is trimmed/topped up at random to exactly int(L*p) kept patches.
    Returns a bool (batch, height*width) mask, True = masked."""
    _check_prob(mask_prob)
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    L = height * width
    p_keep = 1.0 - mask_prob
    n_keep = int(L * p_keep)
    keep = torch.zeros(batch, L, dtype=torch.bool)
    if mask_length > 1:
        n_centers = int(L * (p_keep + adjust) / mask_length**2)
        if n_centers > 0:
            centers = torch.randint(0, L, (batch, n_centers), generator=generator)  # (B, C)
            ci, cj = centers // width, centers % width
            offs = torch.arange(mask_length) - mask_length // 2  # (b,)
            ri = (ci[..., None] + offs).clamp(0, height - 1)  # (B, C, b)
            rj = (cj[..., None] + offs).clamp(0, width - 1)  # (B, C, b)
            cells = ri[..., :, None] * width + rj[..., None, :]  # (B, C, b, b)
            keep.scatter_(1, cells.reshape(batch, -1), True)
    keep = _exact_count(keep, n_keep, generator)
    return ~keep


def span_mask(
    batch: int,
    length: int,
    *,
    mask_prob: float,
    mask_length: int,
    adjust: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """1-D block masking (data2vec 2.0 audio): int(T*(mask_prob+adjust)/mask_length) centres,
    each masking [c - mask_length//2, c - mask_length//2 + mask_length) clamped to [0, T-1],
    then every row is adjusted at random to exactly int(T*mask_prob) masked frames.
    Returns a bool (batch, length) mask, True = masked."""
    _check_prob(mask_prob)
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    n_mask = int(length * mask_prob)
    masked = torch.zeros(batch, length, dtype=torch.bool)
    n_centers = int(length * (mask_prob + adjust) / mask_length)
    if n_centers > 0 and length > 0:
        centers = torch.randint(0, length, (batch, n_centers), generator=generator)  # (B, C)
        offs = torch.arange(mask_length) - mask_length // 2
        cells = (centers[..., None] + offs).clamp(0, length - 1)  # (B, C, b)
        masked.scatter_(1, cells.reshape(batch, -1), True)
    return _exact_count(masked, n_mask, generator)


def random_mask(
    batch: int, length: int, *, mask_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform random token masking (data2vec 2.0 text): each row keeps exactly
    int(T*(1-mask_prob)) tokens chosen uniformly. Returns bool (batch, length), True = masked."""
    _check_prob(mask_prob)
    n_keep = int(length * (1.0 - mask_prob))
    none = torch.zeros(batch, length, dtype=torch.bool)
    return ~_exact_count(none, n_keep, generator)
