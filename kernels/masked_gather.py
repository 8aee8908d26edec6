"""Masked-token gather (student input) and its inverse (decoder input).

Legend: B rows, T tokens, K kept tokens, D width.

References: fairseq examples/data2vec/models/modalities/base.py (gather_unmasked, decoder_input).
"""
from __future__ import annotations

import torch


def masked_gather_ref(x_BTD: torch.Tensor, ids_keep_BK: torch.Tensor) -> torch.Tensor:
    """Kept tokens x[b, ids_keep[b, k]] -> (B, K, D); differentiable in x."""
    if x_BTD.dim() != 3 or ids_keep_BK.dim() != 2 or x_BTD.shape[0] != ids_keep_BK.shape[0]:
        raise ValueError(
            f"masked_gather expects x (B, T, D) and ids_keep (B, K), "
            f"got {tuple(x_BTD.shape)} and {tuple(ids_keep_BK.shape)}"
        )
    idx = ids_keep_BK.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1])  # (B, K, D)
    return torch.gather(x_BTD, 1, idx)


def masked_scatter_ref(
    x_kept_BKD: torch.Tensor, ids_keep_BK: torch.Tensor, fill_BTD: torch.Tensor
) -> torch.Tensor:
    """Inverse of masked_gather: a copy of fill (B, T, D) with row ids_keep[b, k] replaced by
    x_kept[b, k]. Differentiable in x_kept and fill (fill's gradient is zero at kept slots)."""
    idx = ids_keep_BK.unsqueeze(-1).expand(-1, -1, fill_BTD.shape[-1])  # (B, K, D)
    return fill_BTD.to(x_kept_BKD.dtype).scatter(1, idx, x_kept_BKD)
