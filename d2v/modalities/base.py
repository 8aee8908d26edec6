"""What every modality encoder provides, and the helpers they share.

A modality encoder owns everything modality-specific around the shared main blocks:
  local_features(source, padding_mask) -> (x (B, T, D), pad (B, T) bool or None)
      the feature extractor, run once per sample (its output also feeds the teacher for audio/text);
  contextualize(x (B, T, D), mask, clones, pad) -> (x (R, E + K, D), attn_bias or None)
      positions, the M-clone repeat, the kept-token gather, extra tokens, input LN + prenet blocks,
      and the attention bias the main blocks should use (ALiBi, key padding);
  decoder: (R, T, D) -> (R, T, D) predictions;
  local_modules: names of the feature-extractor submodules (dropped from the teacher when it reuses
      the student's features, `model.ema_local_encoder: false`);
  after_init(): re-initializations after the model's BERT init (the reference's order).
A modality registers its encoder class in its ModalitySpec (d2v.registry).

Legend: B samples, M clones, R = B*M rows, T tokens, K kept tokens, E extra tokens, H heads, D width.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2v import ops
from d2v.masking import MaskInfo


class ModalityEncoder(nn.Module):
    num_extra_tokens: int = 0
    local_modules: tuple[str, ...] = ("local_encoder",)
    decoder: nn.Module | None

    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        raise NotImplementedError

    def contextualize(self, x_BTD: torch.Tensor, mask: MaskInfo | None, clones: int = 1,
                      pad_BT: torch.Tensor | None = None):
        raise NotImplementedError

    def masked_input(self, x_BTD: torch.Tensor, mask: MaskInfo, clones: int,
                     mask_emb_D: torch.Tensor) -> torch.Tensor:
        """The full-length student input of `model.skip_masked: false` (data2vec 1.0 style): the
        features repeated for the clones, with the learned mask embedding at masked tokens -> (R, T, D).
        Substituted before `contextualize`, which adds the positions to every token."""
        x = clone_rows(x_BTD, clones)  # (R, T, D)
        return torch.where(mask.mask.unsqueeze(-1), mask_emb_D.to(x.dtype), x)

    def after_init(self) -> None:
        """Called once after the model's BERT init of every module: re-initializes what the reference
        does not BERT-init (the decoder's projection; a modality may add its own)."""
        if self.decoder is not None:
            self.decoder.reset_projection()


def clone_rows(x_B_: torch.Tensor, clones: int) -> torch.Tensor:
    """(B, ...) -> (B*clones, ...), sample-major: rows b*M .. b*M+M-1 are copies of sample b."""
    return x_B_.repeat_interleave(clones, dim=0) if clones > 1 else x_B_


def keep_tokens(x_BTD: torch.Tensor, mask: MaskInfo | None, clones: int) -> torch.Tensor:
    """Repeat for the clones and gather each row's kept tokens: (B, T, D) -> (R, K, D)."""
    if mask is None:
        return x_BTD
    return ops.masked_gather(clone_rows(x_BTD, clones), mask.ids_keep)


def key_padding_bias(pad_BT: torch.Tensor | None) -> torch.Tensor | None:
    """Additive attention bias (B, 1, 1, T): -inf at padded keys, 0 elsewhere (None if no padding)."""
    if pad_BT is None:
        return None
    bias = torch.zeros(pad_BT.shape, dtype=torch.float32, device=pad_BT.device)
    return bias.masked_fill(pad_BT, float("-inf"))[:, None, None, :]


def check_no_padding_with_mask(mask: MaskInfo | None, pad_BT: torch.Tensor | None) -> None:
    if mask is not None and pad_BT is not None:
        raise ValueError("masked (pretraining) batches must be unpadded: the data loader crops or packs "
                         "them to equal length")
