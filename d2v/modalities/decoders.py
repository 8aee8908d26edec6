"""The data2vec 2.0 decoders: a small CNN over all positions (kept tokens + noise at masked slots)
followed by a projection back to the encoder width. 1-D for audio and text, 2-D for images.

Legend: R rows (samples x clones), T tokens, D encoder width, C decoder channels.

References: fairseq examples/data2vec/models/modalities/modules.py (Decoder1d, Decoder2d).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.config import DecoderConfig


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) of (B, C, ...); optional affine; fp32 statistics."""

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = False):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x_BC_: torch.Tensor) -> torch.Tensor:
        x = x_BC_.movedim(1, -1)
        y = F.layer_norm(x.float(), (self.channels,), self.weight, self.bias, self.eps)
        return y.to(x.dtype).movedim(-1, 1)


def _conv_stack(cfg: DecoderConfig, dim: int, conv: type) -> nn.ModuleList:
    """layers x [conv(k, groups, 'same' padding) -> channel LN (no affine) -> GELU]."""
    blocks = []
    for i in range(cfg.layers):
        c_in = dim if i == 0 else cfg.dim
        blocks.append(nn.Sequential(
            conv(c_in, cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups),
            ChannelLayerNorm(cfg.dim),
            nn.GELU(),
        ))
    return nn.ModuleList(blocks)


def _projection(cfg: DecoderConfig, dim: int) -> nn.Module:
    if cfg.projection_layers == 1:
        return nn.Linear(cfg.dim, dim)
    hidden = int(cfg.dim * cfg.projection_ratio)
    return nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _ConvDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, dim: int, conv: type):
        super().__init__()
        self.blocks = _conv_stack(cfg, dim, conv)
        self.residual = cfg.residual
        self.proj = _projection(cfg, dim)

    def _run(self, x_RC_: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            y = blk(x_RC_)
            # residual only where the channel count is unchanged (not after a D -> C first layer)
            x_RC_ = x_RC_ + y if self.residual and y.shape == x_RC_.shape else y
        return x_RC_

    def reset_projection(self) -> None:
        """The reference re-initializes the final Linear(s) with PyTorch defaults after BERT init."""
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()


class Decoder1d(_ConvDecoder):
    """Conv1d decoder over the token axis: (R, T, D) -> (R, T, D)."""

    def __init__(self, cfg: DecoderConfig, dim: int):
        super().__init__(cfg, dim, nn.Conv1d)

    def forward(self, x_RTD: torch.Tensor) -> torch.Tensor:
        x = self._run(x_RTD.transpose(1, 2))  # (R, C, T)
        return self.proj(x.transpose(1, 2))  # (R, T, D)


class Decoder2d(_ConvDecoder):
    """Conv2d decoder on the grid x grid patch layout: (R, T, D) -> (R, T, D), T = grid * grid."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: int):
        super().__init__(cfg, dim, nn.Conv2d)
        self.grid = grid

    def forward(self, x_RTD: torch.Tensor) -> torch.Tensor:
        R, T, D = x_RTD.shape
        x = self._run(x_RTD.transpose(1, 2).reshape(R, D, self.grid, self.grid))  # (R, C, g, g)
        return self.proj(x.flatten(2).transpose(1, 2))  # (R, T, D)


def build_decoder(cfg, grid: int | None = None) -> _ConvDecoder:
    """The decoder of a model config (ModelConfig): model.decoder.* over width model.embed_dim, Conv2d on
    a `grid` x `grid` token layout (images: the patch grid), else Conv1d over the token axis (audio,
    text). Every modality encoder builds its decoder here (the data2vec 1.0 linear head,
    model.head=linear, then replaces it: d2v.model)."""
    if grid is not None:
        return Decoder2d(cfg.decoder, cfg.embed_dim, grid)
    return Decoder1d(cfg.decoder, cfg.embed_dim)
