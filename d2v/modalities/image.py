"""Image modality: patch embedding, fixed 2-D sin-cos positions, CLS token, input LN + prenet,
and the Conv2d decoder.

Legend: B images, M clones, R = B*M rows, T = grid*grid patches, K kept patches, E extra (CLS)
tokens, D width.

Module names follow the reference checkpoint (modality_encoders.IMAGE.*): every key maps by its
prefix (d2v.interop.fairseq_keys); the sin-cos table is a buffer here, a frozen parameter there.

References: fairseq examples/data2vec/models/modalities/images.py, modules.py (Decoder2d),
models/mae.py (get_2d_sincos_pos_embed).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2v.blocks import Block, BlockEncoder
from d2v.config import ModelConfig
from d2v.masking import MaskInfo
from d2v.modalities.base import ModalityEncoder, keep_tokens
from d2v.modalities.decoders import build_decoder


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


class ImageEncoder(ModalityEncoder):
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
        self.context_encoder = BlockEncoder(prenet, nn.LayerNorm(D, eps=cfg.norm_eps), cfg.prenet_dropout)
        self.decoder: nn.Module | None = build_decoder(cfg, grid=cfg.grid)
        self.num_patches = cfg.grid * cfg.grid
        self.patch_size = cfg.patch_size

    def local_features(self, img_BCHW: torch.Tensor, padding_mask=None):
        if padding_mask is not None:
            raise ValueError("images have no padding")
        return self.local_encoder(img_BCHW), None  # (B, T, D)

    def contextualize(self, x_BTD: torch.Tensor, mask: MaskInfo | None, clones: int = 1, pad_BT=None):
        """Patch features -> + sin-cos positions (before masking) -> clones, kept tokens ->
        [CLS] + tokens through the input LN + prenet: (R, E + K, D); no attention bias."""
        x = keep_tokens(self.fixed_positional_encoder(x_BTD), mask, clones)  # (R, K, D)
        extra = self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.context_encoder(torch.cat([extra, x], dim=1)), None  # (R, E + K, D)
