"""Registered model flavors: named architecture presets for `model.flavor`.

A flavor fixes the architecture fields of ModelConfig; recipe keys under `model:` override them.
Values for base/large are the reference's (fairseq data2vec 2.0 v2 task configs). The other config
sections get per-modality defaults (`modality_defaults`), so `model: {modality: audio}` alone gives
the reference's audio masking, targets, EMA and optimizer settings.

Pure data: this module imports nothing of d2v (the model is built by d2v.model.build_model).

References: timm models/_registry.py; torchtitan model_registry (a debug flavor that runs on CPU).
"""
from __future__ import annotations

import copy

_AUDIO_BASE = dict(
    embed_dim=768, depth=12, prenet_depth=0, num_heads=12, mlp_ratio=4.0, norm_eps=1e-5, conv_dim=512,
    conv_pos_depth=5, conv_pos_width=95, conv_pos_groups=16, use_alibi=True, num_extra_tokens=0,
    encoder_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, post_mlp_dropout=0.1,
    prenet_dropout=0.1, layerdrop=0.05, ema_encoder_only=False, ema_local_encoder=False,
    decoder=dict(dim=384, kernel=7, layers=4, groups=16, residual=True, input_dropout=0.1,
                 projection_layers=1),
)
_TEXT_BASE = dict(
    vocab_size=50265, max_positions=512, embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
    mlp_ratio=4.0, norm_eps=1e-5, num_extra_tokens=0, encoder_dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, post_mlp_dropout=0.1, prenet_dropout=0.0, layerdrop=0.0,
    ema_encoder_only=True, ema_local_encoder=False,
    decoder=dict(dim=768, kernel=9, layers=5, groups=1, residual=False, input_dropout=0.1,
                 projection_layers=2, projection_ratio=2.0),
)

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
                      decoder=dict(dim=1024, kernel=5, layers=3, groups=16, residual=True,
                                   input_dropout=0.0)),
    },
    "audio": {
        # CPU recipe: 64-channel CNN (same 7 layers, stride 320), D 128, 4 blocks, 2 positional convs (k 19)
        "tiny": dict(_AUDIO_BASE, embed_dim=128, depth=4, num_heads=4, conv_dim=64, conv_pos_depth=2,
                     conv_pos_width=38, layerdrop=0.0,
                     decoder=dict(dim=64, kernel=7, layers=2, groups=8, residual=True, input_dropout=0.1,
                                  projection_layers=1)),
        # LibriSpeech base (spec §0, §4.3): 12 post-LN blocks, ALiBi, Conv1d decoder 4 x (384, k7, groups 16)
        "base": dict(_AUDIO_BASE),
        # Libri-light large (spec §6.2): 8 prenet + 16 main blocks, D 1024, decoder dim 768
        "large": dict(_AUDIO_BASE, embed_dim=1024, depth=16, prenet_depth=8, num_heads=16,
                      decoder=dict(dim=768, kernel=7, layers=4, groups=16, residual=True, input_dropout=0.1,
                                   projection_layers=1)),
    },
    "text": {
        # CPU recipe: 4k BPE vocabulary, 128 positions, D 128, 4 blocks, decoder 2 x (128, k5) + 2-layer head
        "tiny": dict(_TEXT_BASE, vocab_size=4096, max_positions=128, embed_dim=128, depth=4, num_heads=4,
                     decoder=dict(dim=128, kernel=5, layers=2, groups=1, residual=False, input_dropout=0.1,
                                  projection_layers=2, projection_ratio=2.0)),
        # RoBERTa-base size (spec §0, §4.4): 12 blocks, decoder 5 x Conv1d(768, k9), no residual, 2-layer head
        "base": dict(_TEXT_BASE),
    },
}

# Per-modality defaults of the other config sections (spec §0, §6.2 base rows); a recipe overrides them.
# K (average_top_k_layers) defaults to all main blocks, which fits every flavor: the base recipes set
# the reference values (audio 8 of 12, text 12).
_MODALITY_DEFAULTS: dict[str, dict] = {
    "image": {},  # the dataclass defaults are the image base recipe's
    "audio": {
        "masking": dict(mask_prob=0.5, mask_length=5, mask_prob_adjust=0.05, clone_batch=8),
        "objective": dict(average_top_k_layers=None, final_norm="none", cls_loss=0.0, loss_scale=None,
                          min_target_var=0.1, min_pred_var=0.01),
        "ema": dict(ema_start=0.999, ema_end=0.99999, anneal_end_step=75000),
        "optim": dict(lr=7.5e-4, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, decay_1d=True,
                      warmup_steps=8000, clip_norm=0.0),
        "train": dict(max_steps=400000),
        "data": dict(max_sample_size=320000, min_sample_size=32000),
        "probe": dict(pool="mean"),
    },
    "text": {
        "masking": dict(mask_prob=0.48, mask_length=1, mask_prob_adjust=0.0, clone_batch=8),
        "objective": dict(average_top_k_layers=None, final_norm="none", cls_loss=0.0, loss_scale=1.0,
                          min_target_var=0.1, min_pred_var=0.01),
        "ema": dict(ema_start=0.9999, ema_end=0.99999, anneal_end_step=100000),
        "optim": dict(lr=2e-4, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, decay_1d=False,
                      warmup_steps=4000, clip_norm=1.0),
        "train": dict(max_steps=1000000, batch_size=4),
        "probe": dict(pool="mean"),
    },
}


def list_flavors(modality: str = "image") -> list[str]:
    return sorted(_FLAVORS.get(modality, {}))


def modality_defaults(modality: str) -> dict:
    """Section defaults (masking, objective, ema, optim, ...) of a modality (a fresh copy)."""
    return copy.deepcopy(_MODALITY_DEFAULTS.get(modality, {}))


def flavor_defaults(flavor: str, modality: str = "image", key: str = "model.flavor") -> dict:
    """The ModelConfig fields of a registered flavor (a fresh copy); KeyError with a message naming
    `key` and the registered flavors for an unknown one (config.py turns it into a ConfigError)."""
    table = _FLAVORS.get(modality)
    if table is None:
        raise KeyError(f"model.modality: no flavors registered for {modality!r}")
    if flavor not in table:
        raise KeyError(f"{key}: unknown flavor {flavor!r}; registered: {', '.join(sorted(table))}")
    return dict(copy.deepcopy(table[flavor]), flavor=flavor, modality=modality)
