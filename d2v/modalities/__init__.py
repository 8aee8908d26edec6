"""Modality encoders (feature extractor, positions, masking-aware contextualization, decoder) for
image, audio and text; everything else in d2v is shared between them."""
from __future__ import annotations

from d2v.config import ModelConfig
from d2v.modalities.base import ModalityEncoder


def build_modality_encoder(cfg: ModelConfig) -> ModalityEncoder:
    if cfg.modality == "image":
        from d2v.modalities.image import ImageEncoder

        return ImageEncoder(cfg)
    if cfg.modality == "audio":
        from d2v.modalities.audio import AudioEncoder

        return AudioEncoder(cfg)
    if cfg.modality == "text":
        from d2v.modalities.text import TextEncoder

        return TextEncoder(cfg)
    raise ValueError(f"model.modality: unknown modality {cfg.modality!r}")


__all__ = ["ModalityEncoder", "build_modality_encoder"]
