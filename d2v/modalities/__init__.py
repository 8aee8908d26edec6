"""Modality encoders (feature extractor, positions, masking-aware contextualization, decoder) for
image, audio and text; everything else in d2v is shared between them. Which class a modality uses is
its registered spec's `encoder` (d2v.registry)."""
from __future__ import annotations

import importlib

from d2v.config import ModelConfig
from d2v.modalities.base import ModalityEncoder
from d2v.registry import get_modality


def build_modality_encoder(cfg: ModelConfig) -> ModalityEncoder:
    """The encoder class registered for cfg.modality ("module:Class"), built from the model config."""
    module, _, name = get_modality(cfg.modality).encoder.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, ModalityEncoder):
        raise TypeError(f"modality {cfg.modality!r}: encoder {cls.__name__} is not a ModalityEncoder")
    return cls(cfg)


__all__ = ["ModalityEncoder", "build_modality_encoder"]
