"""Text modality: token embedding + learned absolute positions + embedding LayerNorm + dropout, an
input LN only before prenet blocks (none in the released configs), and the Conv1d decoder (no
residual) with a 2-layer projection.

Legend: B sequences, M clones, R = B*M rows, T tokens, K kept tokens, D width.

The teacher is the EMA of the main blocks only (`model.ema_encoder_only: true`): it is fed the
student's embedding output (train-mode dropout included) through the student's context encoder
(spec §5, pitfall 10).

References: fairseq examples/data2vec/models/modalities/text.py, fairseq
modules/learned_positional_embedding.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2v.blocks import Block, BlockEncoder
from d2v.config import ModelConfig
from d2v.masking import MaskInfo
from d2v.modalities.base import (
    ModalityEncoder,
    check_no_padding_with_mask,
    clone_rows,
    keep_tokens,
    key_padding_bias,
)
from d2v.modalities.decoders import build_decoder

PAD_ID = 1  # fairseq dictionary order: <s>=0, <pad>=1, </s>=2, <unk>=3


class TokenEmbedding(nn.Module):
    """ids (B, T) -> dropout(LN(embed(ids) + pos)); positions count from PAD_ID + 1, pads get the
    (zero) padding position, as fairseq's learned positional embedding."""

    def __init__(self, vocab_size: int, max_positions: int, dim: int, eps: float, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.embed_positions = nn.Embedding(max_positions + PAD_ID + 1, dim, padding_idx=PAD_ID)
        self.layernorm_embedding = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.max_positions = max_positions

    def forward(self, ids_BT: torch.Tensor, pad_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids_BT.shape
        if T > self.max_positions:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_positions ({self.max_positions})")
        pos = torch.arange(PAD_ID + 1, PAD_ID + 1 + T, device=ids_BT.device).expand(B, T)  # (B, T)
        if pad_BT is not None:
            pos = pos.masked_fill(pad_BT, PAD_ID)
        x = self.embed_tokens(ids_BT) + self.embed_positions(pos)
        return self.dropout(self.layernorm_embedding(x))  # (B, T, D)


class TextEncoder(ModalityEncoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.num_extra_tokens = 0
        self.local_encoder = TokenEmbedding(cfg.vocab_size, cfg.max_positions, D, cfg.norm_eps,
                                            cfg.encoder_dropout)
        prenet = [Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout,
                        cfg.attention_dropout, cfg.activation_dropout, cfg.post_mlp_dropout)
                  for _ in range(cfg.prenet_depth)]
        # an input LN and prenet_dropout only with a prenet, as the reference (without one, the embedding
        # LN plays that role)
        norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.prenet_depth else None
        self.context_encoder = BlockEncoder(prenet, norm, cfg.prenet_dropout if cfg.prenet_depth else 0.0)
        self.decoder: nn.Module | None = build_decoder(cfg)

    def local_features(self, ids_BT: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self.local_encoder(ids_BT, padding_mask), padding_mask  # (B, T, D), (B, T)

    def masked_input(self, x_BTD: torch.Tensor, mask: MaskInfo, clones: int,
                     mask_emb_D: torch.Tensor) -> torch.Tensor:
        """Text features already hold their positions: a masked token becomes
        dropout(LN(mask_emb + position)), like a <mask> token id -> (R, T, D)."""
        x = clone_rows(x_BTD, clones)  # (R, T, D)
        le, T = self.local_encoder, x.shape[1]
        pos = le.embed_positions(torch.arange(PAD_ID + 1, PAD_ID + 1 + T, device=x.device))  # (T, D)
        m = le.dropout(le.layernorm_embedding(mask_emb_D + pos)).to(x.dtype)  # (T, D)
        return torch.where(mask.mask.unsqueeze(-1), m[None], x)

    def contextualize(self, x_BTD: torch.Tensor, mask: MaskInfo | None, clones: int = 1,
                      pad_BT: torch.Tensor | None = None):
        """Embeddings (positions included) -> clones, kept tokens -> prenet (R, K, D); key padding bias."""
        check_no_padding_with_mask(mask, pad_BT)
        bias = key_padding_bias(pad_BT)
        return self.context_encoder(keep_tokens(x_BTD, mask, clones), bias), bias
