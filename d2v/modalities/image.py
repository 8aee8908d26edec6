"""Image modality: patch embedding, fixed 2-D sin-cos positions, CLS token, input LN + prenet,
and the Conv2d decoder.

Legend: B images, M clones, T = grid*grid patches, K kept patches, E extra (CLS) tokens,
D width, C decoder channels.

Module names follow the reference checkpoint (modality_encoders.IMAGE.*), so that key mapping for
import/export is a prefix table (see d2v.model.REFERENCE_KEY_PREFIXES).

References: fairseq examples/data2vec/models/modalities/images.py, modules.py (Decoder2d),
models/mae.py (get_2d_sincos_pos_embed); ../shared/spec/data2vec2.md §4.2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.blocks import Block, BlockEncoder
from d2v.config import DecoderConfig, ModelConfig


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table (T, D), token n = row*grid + col. First D/2 dims encode the column,
    last D/2 the row; each half is [sin(p*w_k) | cos(p*w_k)] with w_k = 10000^(-k/(D/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, D/2)
        ang = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (T, D)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(img_BCHW).flatten(2).transpose(1, 2)  # (B, T, D)


class FixedPositionalEncoder(nn.Module):
    def __init__(self, positions_TD: torch.Tensor):
        super().__init__()
        self.register_buffer("positions", positions_TD.unsqueeze(0))  # (1, T, D), not trained

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD + self.positions.to(x_BTD.dtype)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), no affine parameters."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = x_BCHW.permute(0, 2, 3, 1)
        return F.layer_norm(x, (self.channels,), eps=self.eps).permute(0, 3, 1, 2)


class Decoder2d(nn.Module):
    """layers x [Conv2d(k, groups) -> channel LN (no affine) -> GELU] with residuals where the channel
    count is unchanged, then Linear(C -> D). Input/output (B, T, D) on a grid x grid layout."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        blocks = []
        for i in range(cfg.layers):
            c_in = dim if i == 0 else cfg.dim
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups),
                ChannelLayerNorm(cfg.dim),
                nn.GELU(),
            ))
        self.blocks = nn.ModuleList(blocks)
        self.residual = cfg.residual
        self.proj = nn.Linear(cfg.dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.transpose(1, 2).reshape(B, D, self.grid, self.grid)  # (B, D, g, g)
        for blk in self.blocks:
            y = blk(x)
            x = x + y if self.residual and y.shape == x.shape else y
        x = x.flatten(2).transpose(1, 2)  # (B, T, C)
        return self.proj(x)  # (B, T, D)


class ImageEncoder(nn.Module):
    """Everything image-specific before the shared main blocks, plus the decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.num_extra_tokens = cfg.num_extra_tokens
        self.local_encoder = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.fixed_positional_encoder = FixedPositionalEncoder(sincos_2d(cfg.grid, D))
        self.extra_tokens = nn.Parameter(torch.randn(1, cfg.num_extra_tokens, D))  # N(0, 1) init
        prenet = [Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout,
                        cfg.attention_dropout, cfg.activation_dropout, cfg.post_mlp_dropout)
                  for _ in range(cfg.prenet_depth)]
        self.context_encoder = BlockEncoder(prenet, nn.LayerNorm(D, eps=cfg.norm_eps))
        self.decoder: Decoder2d | None = Decoder2d(cfg.decoder, D, cfg.grid)
        self.num_patches = cfg.grid * cfg.grid
        self.patch_size = cfg.patch_size

    def local_features(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.local_encoder(img_BCHW)  # (B, T, D)

    def add_positions(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.fixed_positional_encoder(x_BTD)

    def contextualize(self, x_BKD: torch.Tensor) -> torch.Tensor:
        """Positioned (and already masked-gathered) tokens -> [CLS] + tokens through LN + prenet."""
        extra = self.extra_tokens.expand(x_BKD.shape[0], -1, -1).to(x_BKD.dtype)
        return self.context_encoder(torch.cat([extra, x_BKD], dim=1))  # (B, E + K, D)

    def reset_decoder_projection(self) -> None:
        """The reference re-initializes the decoder's final Linear with PyTorch defaults after BERT init."""
        if self.decoder is not None:
            self.decoder.proj.reset_parameters()
