"""Audio (raw waveform) modality: the 7-layer CNN feature extractor (stride 320 = 20 ms at 16 kHz),
LayerNorm + projection, the grouped-conv relative positional encoder, ALiBi with a learned per-head
scale, input LN + prenet, and the Conv1d decoder.

Legend: B utterances, L samples, M clones, R = B*M rows, T frames, K kept frames, H heads,
C CNN channels, D width.

The teacher reuses the student's CNN + projection output (`model.ema_local_encoder: false`) and has
its own EMA positional encoder, ALiBi scale and input LN (spec §5). ALiBi is built for the kept
positions only: the student's bias is (R, H, K, K), never (R, H, T, T).

References: fairseq examples/data2vec/models/modalities/audio.py, base.py (get_alibi,
get_alibi_bias, masked_alibi), fairseq/models/wav2vec/wav2vec2.py (ConvFeatureExtractionModel).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from d2v import ops
from d2v.audio_frames import CONV_LAYERS, conv_output_length
from d2v.blocks import Block, BlockEncoder
from d2v.config import ModelConfig
from d2v.masking import MaskInfo
from d2v.modalities.base import (
    ModalityEncoder,
    check_no_padding_with_mask,
    clone_rows,
    key_padding_bias,
)
from d2v.modalities.decoders import ChannelLayerNorm, build_decoder


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (H,): geometric 2^(-8i/n) for the largest power of two n <= H, then every
    other slope of the 2n sequence for the remaining heads (H=12: 2^-1..2^-8, 2^-0.5..2^-3.5)."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(n)
    if n < num_heads:
        slopes += geometric(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


class ConvFeatureExtractor(nn.Module):
    """Waveform (B, L) -> (B, C, T): 7 x [Conv1d (no bias, kaiming normal) -> channel LN (affine,
    fp32) -> GELU]."""

    def __init__(self, channels: int):
        super().__init__()
        layers, c_in = [], 1
        for k, s in CONV_LAYERS:
            conv = nn.Conv1d(c_in, channels, k, stride=s, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            layers.append(nn.Sequential(conv, ChannelLayerNorm(channels, affine=True), nn.GELU()))
            c_in = channels
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav_BL: torch.Tensor) -> torch.Tensor:
        x = wav_BL.unsqueeze(1)  # (B, 1, L)
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, C, T)


class ConvPositionalEncoder(nn.Module):
    """depth x [Conv1d(D, D, k, groups) -> channel LN (no affine) -> GELU] over (B, T, D); its output
    is added to the features (no residual inside, no weight norm)."""

    def __init__(self, dim: int, depth: int, width: int, groups: int):
        super().__init__()
        k = max(3, width // depth) if depth else 1
        self.layers = nn.ModuleList([
            nn.Sequential(
                nn.Conv1d(dim, dim, k, padding=k // 2, groups=groups), ChannelLayerNorm(dim), nn.GELU()
            )
            for _ in range(depth)
        ])

    def forward(self, x_BTD: torch.Tensor, pad_BT: torch.Tensor | None = None) -> torch.Tensor:
        """With a padding mask, padded frames are zeroed before every layer, so valid frames see
        exactly what the conv's own zero padding would give an unpadded sequence."""
        T = x_BTD.shape[1]
        keep = None if pad_BT is None else (~pad_BT).unsqueeze(1).to(x_BTD.dtype)  # (B, 1, T)
        x = x_BTD.transpose(1, 2)  # (B, D, T)
        for layer in self.layers:
            if keep is not None:
                x = x * keep
            x = layer(x)[..., :T]  # an even kernel would add one frame: trim (the reference's SamePad)
        return x.transpose(1, 2)


class AudioEncoder(ModalityEncoder):
    local_modules = ("local_encoder", "project_features")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.embed_dim, cfg.num_heads
        self.num_extra_tokens = 0
        self.local_encoder = ConvFeatureExtractor(cfg.conv_dim)
        self.project_features = nn.Sequential(nn.LayerNorm(cfg.conv_dim), nn.Linear(cfg.conv_dim, D))
        self.relative_positional_encoder = ConvPositionalEncoder(D, cfg.conv_pos_depth, cfg.conv_pos_width,
                                                                 cfg.conv_pos_groups)
        self.use_alibi = cfg.use_alibi
        self.register_buffer("alibi_slopes", alibi_slopes(H))  # (H,)
        # learned per-head scale, shared by all layers, clamped >= 0 (spec §4.3)
        self.alibi_scale = nn.Parameter(torch.ones(H)) if cfg.use_alibi else None
        prenet = [Block(D, H, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout, cfg.attention_dropout,
                        cfg.activation_dropout, cfg.post_mlp_dropout) for _ in range(cfg.prenet_depth)]
        self.context_encoder = BlockEncoder(prenet, nn.LayerNorm(D, eps=cfg.norm_eps), cfg.prenet_dropout)
        self.decoder: nn.Module | None = build_decoder(cfg)

    def after_init(self) -> None:
        super().after_init()
        self.project_features[1].reset_parameters()  # the reference re-initializes it with torch's defaults

    def local_features(self, wav_BL: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Waveforms (B, L) (+ sample padding mask (B, L), True = pad) -> (B, T, D) and the frame
        padding mask (B, T) (None without padding)."""
        if padding_mask is not None:
            wav_BL = wav_BL.masked_fill(padding_mask, 0.0)
        x = self.local_encoder(wav_BL).transpose(1, 2)  # (B, T, C)
        x = self.project_features(x)  # (B, T, D)
        pad = None
        if padding_mask is not None:
            valid = (~padding_mask).sum(1).tolist()  # eval-time path: one host read per batch is fine
            frames = torch.tensor([conv_output_length(n) for n in valid], device=x.device)
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= frames[:, None]  # (B, T)
        return x, pad

    def alibi_bias(self, pos_RK: torch.Tensor) -> torch.Tensor:
        """-(slope_h * scale_h) * |p_i - p_j| for the given frame positions -> (R, H, K, K) fp32."""
        dist = (pos_RK[:, :, None] - pos_RK[:, None, :]).abs().float()  # (R, K, K)
        slope = self.alibi_slopes * self.alibi_scale.float().clamp(min=0)  # (H,)
        return -slope[None, :, None, None] * dist[:, None]  # (R, H, K, K)

    def contextualize(self, x_BTD: torch.Tensor, mask: MaskInfo | None, clones: int = 1,
                      pad_BT: torch.Tensor | None = None):
        """Positional conv (on the full sequence with masked frames zeroed), kept frames, ALiBi for
        the kept positions, input LN + dropout + prenet -> (R, K, D) and the bias for the blocks."""
        check_no_padding_with_mask(mask, pad_BT)
        if mask is not None:
            x = clone_rows(x_BTD, clones)  # (R, T, D)
            visible = (~mask.mask).unsqueeze(-1).to(x.dtype)  # (R, T, 1)
            x_pos = self.relative_positional_encoder(x * visible)  # sees visible frames only
            x = ops.masked_gather(x, mask.ids_keep) + ops.masked_gather(x_pos, mask.ids_keep)  # (R, K, D)
            pos = mask.ids_keep  # (R, K)
        else:
            x = x_BTD + self.relative_positional_encoder(x_BTD, pad_BT)  # (B, T, D)
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, T)
        bias = self.alibi_bias(pos) if self.use_alibi else None
        pad_bias = key_padding_bias(pad_BT)
        if pad_bias is not None:
            bias = pad_bias if bias is None else bias + pad_bias
        return self.context_encoder(x, bias), bias
