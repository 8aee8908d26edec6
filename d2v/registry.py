"""The modalities d2v knows, each one `ModalitySpec` registered once (`register_modality`), with its
named architecture presets (`model.flavor`) and the defaults of the other config sections.

A spec says everything the shared code needs about a modality: the batch key of its input, what a
sample is called, its presets and section defaults, the config keys it owns and their checks, and
where its encoder, data builders and synthetic benchmark batch live (import paths, loaded by the
layer that uses them, so this module stays pure data and imports nothing of d2v or torch).

A flavor fixes the architecture fields of ModelConfig; recipe keys under `model:` override them.
Values for base/large are the reference's (fairseq data2vec 2.0 v2 task configs). The section
defaults make `model: {modality: audio}` alone give the reference's audio masking, targets, EMA and
optimizer settings.

References: timm models/_registry.py; torchtitan model_registry (a debug flavor that runs on CPU).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

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



# ------------------------------------------------------------------------------------------ checks
# Cross-key rules of a modality's own keys, run by Config.validate after every key passed on its own.
# `cfg` is a d2v.config.Config, `c` its error collector (c.fail, c.divisible).
def _image_checks(cfg: Any, c: Any) -> None:
    m = cfg.model
    if m.embed_dim % 4:
        c.fail(f"model.embed_dim must be a multiple of 4 (2-D sin-cos positions), got {m.embed_dim}")
    if m.image_size % m.patch_size:
        c.fail(f"model.image_size ({m.image_size}) must be a multiple of model.patch_size ({m.patch_size})")
        return
    # every masked copy must keep one patch (the student's input) and mask one (the loss);
    # kept = int(L * (1 - mask_prob)), as d2v.masking.inverse_block_mask counts it
    n, p = m.grid ** 2, cfg.masking.mask_prob
    kept = int(n * (1.0 - p))
    where = f"of the {n} patches ({m.image_size}/{m.patch_size} per side)"
    if kept < 1:
        c.fail(f"masking.mask_prob: {p} keeps 0 {where}; lower it")
    elif kept >= n:
        c.fail(f"masking.mask_prob: {p} masks 0 {where}; raise it")


def _no_extra_tokens(cfg: Any, c: Any) -> None:
    m = cfg.model
    if m.num_extra_tokens != 0:
        c.fail(f"model.num_extra_tokens ({m.num_extra_tokens}): {m.modality} models have no extra (CLS) "
               f"tokens, as in the reference; only image models do")


def _audio_checks(cfg: Any, c: Any) -> None:
    _no_extra_tokens(cfg, c)
    m = cfg.model
    if m.conv_pos_depth:
        c.divisible("model.embed_dim", m.embed_dim, "model.conv_pos_groups", m.conv_pos_groups)


def _text_checks(cfg: Any, c: Any) -> None:
    _no_extra_tokens(cfg, c)
    T = cfg.data.tokens_per_sample
    if T is not None and T > cfg.model.max_positions:
        c.fail(f"data.tokens_per_sample ({T}) exceeds model.max_positions ({cfg.model.max_positions})")


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class ModalitySpec:
    """One modality, registered once. Import paths are "module:attribute" (or a module), loaded lazily."""

    name: str
    source_key: str  # the batch key holding the model input ("image", "audio", "tokens")
    sample_unit: str  # what one sample is called in throughput lines ("images", ...)
    bench_unit: str  # the benchmark's throughput unit ("images/s", "audio_s/s", "tokens/s")
    flavors: dict[str, dict]  # model.flavor -> ModelConfig fields
    # ModelConfig / DataConfig fields only this modality reads: setting one for another modality is an error
    model_keys: tuple[str, ...] = ()
    data_keys: tuple[str, ...] = ()
    section_defaults: dict[str, dict] = field(default_factory=dict)  # other sections' defaults
    check: Callable[[Any, Any], None] | None = None  # cross-key rules (see the checks above)
    encoder: str = ""  # its ModalityEncoder class (d2v.modalities.build_modality_encoder)
    # its data module: pretrain_data(cfg, start_step, rank, world_size, pin_memory, resumed) -> (dataset,
    # loader), probe_tasks(cfg, run_dir) -> [ProbeTask], synthetic_batch(cfg, seed) (d2v.data.build)
    data: str = ""


_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec) -> ModalitySpec:
    """Add a modality (or replace one of the same name); returns the spec."""
    _REGISTRY[spec.name] = spec
    return spec


def modality_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_modality(name: str) -> ModalitySpec:
    """The spec of a registered modality; KeyError naming model.modality and the registered ones."""
    if name not in _REGISTRY:
        raise KeyError(f"model.modality: expected one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


register_modality(ModalitySpec(
    name="image", source_key="image", sample_unit="images", bench_unit="images/s",
    flavors=_FLAVORS["image"], model_keys=("image_size", "patch_size", "in_chans"),
    data_keys=("crop_scale", "crop_ratio", "hflip", "mean", "std"),
    section_defaults=_MODALITY_DEFAULTS["image"], check=_image_checks,
    encoder="d2v.modalities.image:ImageEncoder", data="d2v.data.build_image"))
register_modality(ModalitySpec(
    name="audio", source_key="audio", sample_unit="utterances", bench_unit="audio_s/s",
    flavors=_FLAVORS["audio"],
    model_keys=("conv_dim", "conv_pos_depth", "conv_pos_width", "conv_pos_groups", "use_alibi"),
    data_keys=("sample_rate", "max_sample_size", "min_sample_size", "normalize"),
    section_defaults=_MODALITY_DEFAULTS["audio"], check=_audio_checks,
    encoder="d2v.modalities.audio:AudioEncoder", data="d2v.data.build_audio"))
register_modality(ModalitySpec(
    name="text", source_key="tokens", sample_unit="sequences", bench_unit="tokens/s",
    flavors=_FLAVORS["text"], model_keys=("vocab_size", "max_positions"),
    data_keys=("tokenizer", "tokens_per_sample"),
    section_defaults=_MODALITY_DEFAULTS["text"], check=_text_checks,
    encoder="d2v.modalities.text:TextEncoder", data="d2v.data.build_text"))


# ------------------------------------------------------------------------------------------ lookups
def list_flavors(modality: str = "image") -> list[str]:
    return sorted(_REGISTRY[modality].flavors) if modality in _REGISTRY else []


def modality_defaults(modality: str) -> dict:
    """Section defaults (masking, objective, ema, optim, ...) of a modality (a fresh copy)."""
    return copy.deepcopy(dict(get_modality(modality).section_defaults))


def flavor_defaults(flavor: str, modality: str = "image", key: str = "model.flavor") -> dict:
    """The ModelConfig fields of a registered flavor (a fresh copy); KeyError with a message naming
    `key` and the registered flavors for an unknown one (config.py turns it into a ConfigError)."""
    table = get_modality(modality).flavors
    if flavor not in table:
        raise KeyError(f"{key}: unknown flavor {flavor!r}; registered: {', '.join(sorted(table))}")
    return dict(copy.deepcopy(table[flavor]), flavor=flavor, modality=modality)
