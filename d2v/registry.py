"""Registered model flavors: named architecture presets for `model.flavor`.

A flavor fixes the architecture fields of ModelConfig; recipe keys under `model:` override them.
Values for base/large come from ../shared/spec/data2vec2.md §0, §4.2 and §6.2.

References: timm models/_registry.py; torchtitan model_registry (a debug flavor that runs on CPU).
"""
from __future__ import annotations

import copy

_FLAVORS: dict[str, dict[str, dict]] = {
    "image": {
        # CPU recipe: 32x32 inputs, 8x8 patch grid, 0.8M-parameter encoder (spec/probe_feasibility.md)
        "tiny": dict(image_size=32, patch_size=4, embed_dim=128, depth=4, prenet_depth=0, num_heads=4,
                     mlp_ratio=4.0, norm_eps=1e-6,
                     decoder=dict(dim=128, kernel=3, layers=3, groups=8, residual=True, input_dropout=0.0)),
        # ViT-B/16: 2 prenet + 10 main post-LN blocks, Conv2d decoder 6 x (768, k3, groups 16)
        "base": dict(image_size=224, patch_size=16, embed_dim=768, depth=10, prenet_depth=2, num_heads=12,
                     mlp_ratio=4.0, norm_eps=1e-6,
                     decoder=dict(dim=768, kernel=3, layers=6, groups=16, residual=True, input_dropout=0.0)),
        # ViT-L/16: 24 main blocks, no prenet, decoder 3 x (1024, k5, groups 16)
        "large": dict(image_size=224, patch_size=16, embed_dim=1024, depth=24, prenet_depth=0, num_heads=16,
                      mlp_ratio=4.0, norm_eps=1e-6,
                      decoder=dict(dim=1024, kernel=5, layers=3, groups=16, residual=True, input_dropout=0.0)),
    },
}


def list_flavors(modality: str = "image") -> list[str]:
    return sorted(_FLAVORS.get(modality, {}))


def flavor_defaults(flavor: str, modality: str = "image", key: str = "model.flavor") -> dict:
    """The ModelConfig fields of a registered flavor (a fresh copy)."""
    from d2v.config import ConfigError

    table = _FLAVORS.get(modality)
    if table is None:
        raise ConfigError(f"model.modality: no flavors registered for {modality!r}")
    if flavor not in table:
        raise ConfigError(f"{key}: unknown flavor {flavor!r}; registered: {', '.join(sorted(table))}")
    return dict(copy.deepcopy(table[flavor]), flavor=flavor, modality=modality)


def build_model(cfg):
    """Build the student Data2Vec2 for a full Config (seed the RNG first for a reproducible init)."""
    from d2v.model import Data2Vec2

    return Data2Vec2(cfg.model, cfg.objective)
