"""Transformer blocks shared by every modality: post-LN blocks that also return their FFN output
(the data2vec 2.0 target source), and the BlockEncoder (input LN + prenet blocks).

Legend: B rows, N tokens in the row (CLS + kept tokens), D width, H heads.

References: fairseq examples/data2vec/models/modalities/modules.py (AltBlock, AltAttention,
BlockEncoder).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv with bias). `impl` "sdpa" runs torch's fused
    scaled_dot_product_attention; "eager" materializes softmax(q k^T / sqrt(d) + bias) in fp32 and
    multiplies by v, as the reference code does (the model sets it from `model.attention`)."""

    impl: str = "sdpa"

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BND: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D/H)
        if attn_bias is not None:  # (B or 1, H or 1, N, N) additive, fp32 -> the logits' dtype
            attn_bias = attn_bias.to(q.dtype)
        p = self.attn_drop if self.training else 0.0
        if self.impl == "eager":
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_bias is not None:
                logits = logits + attn_bias
            attn = F.dropout(logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype), p, self.training)
            out = attn @ v  # (B, H, N, D/H)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)  # (B, H, N, D/H)
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Post-LN block: a = x + attn(x); r = norm1(a); t = mlp(r); out = norm2(r + drop(t)).

    Returns (out, t): t, the FFN output before the residual and the second LayerNorm, is what the
    teacher's targets are built from."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 encoder_dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0, post_mlp_dropout: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, attention_dropout, encoder_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.post_mlp_dropout = nn.Dropout(post_mlp_dropout)

    def forward(self, x_BND: torch.Tensor, attn_bias: torch.Tensor | None = None):
        r = self.norm1(x_BND + self.attn(x_BND, attn_bias))
        t = self.mlp(r)
        return self.norm2(r + self.post_mlp_dropout(t)), t


class BlockEncoder(nn.Module):
    """Input LayerNorm (post-LN models) -> dropout -> modality-specific prenet blocks."""

    def __init__(self, blocks: list[Block], norm: nn.LayerNorm | None, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BND: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            x_BND = self.norm(x_BND)
        x_BND = self.dropout(x_BND)
        for blk in self.blocks:
            x_BND, _ = blk(x_BND, attn_bias)
        return x_BND
