"""A fairseq data2vec 2.0 checkpoint's `cfg` <-> a d2v Config.

`config_from_fairseq(cfg)` reads the reference's model section (`cfg["model"]`, its
`modalities.<name>` sub-section) plus what it finds of the optimizer, schedule and seed, and says
what it could not carry over:
- a field that changes what the weights compute (pre-LN blocks, a transformer decoder, per-layer ALiBi
  scales, a different CNN geometry, ...) is refused (FairseqConfigError naming the field);
- a training-time setting d2v does not implement (drop path, channel masking, ...) is reported as not
  represented: the weights load exactly, but continued pretraining in d2v differs there.
`config_to_fairseq(cfg)` is the inverse for export (only the fields d2v has; the reference's defaults
fill in the rest when its config dataclass is built).

References: fairseq examples/data2vec/models/data2vec2.py (Data2VecMultiConfig),
modalities/base.py (D2vModalityConfig, D2vDecoderConfig), modalities/{images,audio,text}.py.
"""
from __future__ import annotations

import ast
from typing import Any

from d2v.audio_frames import CONV_LAYERS
from d2v.config import Config, ConfigError
from d2v.registry import get_modality

MODALITIES = {"IMAGE": "image", "AUDIO": "audio", "TEXT": "text"}


class FairseqConfigError(ValueError):
    """The checkpoint's config describes a model d2v cannot compute exactly."""


# (fairseq field of cfg["model"], d2v key); applied both ways
_TOP = [
    ("depth", "model.depth"), ("num_heads", "model.num_heads"), ("norm_eps", "model.norm_eps"),
    ("embed_dim", "model.embed_dim"), ("mlp_ratio", "model.mlp_ratio"),
    ("encoder_dropout", "model.encoder_dropout"), ("post_mlp_drop", "model.post_mlp_dropout"),
    ("attention_dropout", "model.attention_dropout"), ("activation_dropout", "model.activation_dropout"),
    ("layerdrop", "model.layerdrop"), ("ema_encoder_only", "model.ema_encoder_only"),
    ("average_top_k_layers", "objective.average_top_k_layers"),
    ("instance_norm_target_layer", "objective.instance_norm_target_layer"),
    ("loss_beta", "objective.loss_beta"), ("loss_scale", "objective.loss_scale"),
    ("cls_loss", "objective.cls_loss"), ("min_target_var", "objective.min_target_var"),
    ("min_pred_var", "objective.min_pred_var"), ("clone_batch", "masking.clone_batch"),
    ("ema_decay", "ema.ema_start"), ("ema_end_decay", "ema.ema_end"),
    ("ema_anneal_end_step", "ema.anneal_end_step"),
]
# (field of cfg["model"]["modalities"][name], d2v key)
_MOD = [
    ("prenet_depth", "model.prenet_depth"), ("prenet_dropout", "model.prenet_dropout"),
    ("num_extra_tokens", "model.num_extra_tokens"), ("ema_local_encoder", "model.ema_local_encoder"),
    ("mask_noise_std", "objective.decoder_noise_std"), ("mask_prob", "masking.mask_prob"),
    ("mask_length", "masking.mask_length"), ("mask_prob_adjust", "masking.mask_prob_adjust"),
]
_DECODER = [
    ("decoder_dim", "model.decoder.dim"), ("decoder_kernel", "model.decoder.kernel"),
    ("decoder_layers", "model.decoder.layers"), ("decoder_groups", "model.decoder.groups"),
    ("decoder_residual", "model.decoder.residual"), ("input_dropout", "model.decoder.input_dropout"),
    ("projection_layers", "model.decoder.projection_layers"),
    ("projection_ratio", "model.decoder.projection_ratio"),
]
_PER_MODALITY = {
    "image": [("input_size", "model.image_size"), ("patch_size", "model.patch_size"),
              ("in_chans", "model.in_chans")],
    "audio": [("conv_pos_width", "model.conv_pos_width"), ("conv_pos_groups", "model.conv_pos_groups"),
              ("conv_pos_depth", "model.conv_pos_depth"), ("use_alibi_encoder", "model.use_alibi")],
    "text": [("max_source_positions", "model.max_positions")],
}

# fields whose other values change what the weights compute: d2v supports only these
_MODEL_FIXED_TOP = {"layer_norm_first": False, "norm_affine": True, "shared_decoder": None,
                    "decoder_group": False}
_MODEL_FIXED_MOD = {"decoder.add_positions_masked": False, "decoder.add_positions_all": False}
_MODEL_FIXED_PER_MODALITY = {
    "image": {"fixed_positions": True, "transformer_decoder": False, "enc_dec_transformer": False,
              "use_alibi_encoder": False},
    "audio": {"extractor_mode": "layer_norm", "conv_pos_pre_ln": False, "learned_alibi": False},
    "text": {"learned_pos": True, "no_scale_embedding": True, "layernorm_embedding": True,
             "no_token_positional_embeddings": False, "use_alibi_encoder": False},
}
_ALIBI_FIXED = {"learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
                "learned_alibi_scale_per_layer": False}
# training-time settings d2v runs with only the given value: another value is reported, not refused
_TRAINING_TOP = {"start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "dropout_input": 0.0,
                 "end_of_block_targets": False, "layer_norm_target_layer": False,
                 "batch_norm_target_layer": False, "recon_loss": 0.0, "d2v_loss": 1.0, "skip_ema": False}
_TRAINING_MOD = {"prenet_layerdrop": 0.0, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
                 "keep_masked_pct": 0.0, "add_masks": False, "remove_masks": False, "mask_dropout": 0.0,
                 "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_prob_min": None,
                 "local_grad_mult": 1.0}
# the mask generator d2v uses per modality (inverse block masks for images, spans otherwise)
_INVERSE_MASK = {"image": True, "audio": False, "text": False}


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def modality_of(model_cfg: dict, state_keys) -> str:
    """The d2v modality of a fairseq data2vec_multi model config (or, failing that, its weights)."""
    name = model_cfg.get("supported_modality")
    if name is None:
        found = {k.split(".")[1] for k in state_keys if k.startswith("modality_encoders.")}
        if len(found) != 1:
            raise FairseqConfigError(f"cfg.model.supported_modality is not set and the weights hold "
                                     f"modality encoders {sorted(found) or 'none'}: cannot tell the modality")
        name = found.pop()
    name = str(name).split(".")[-1].upper()  # an enum may come as "Modality.IMAGE"
    if name not in MODALITIES:
        raise FairseqConfigError(f"cfg.model.supported_modality: {name!r} is not a modality d2v knows "
                                 f"(expected one of {sorted(MODALITIES)})")
    return MODALITIES[name]


def _list_expr(node: ast.AST) -> list:
    """Evaluate the reference's spec expression: literals joined by + and repeated by * (no eval)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _list_expr(node.left) + _list_expr(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _list_expr(node.left) * ast.literal_eval(node.right)
    value = ast.literal_eval(node)
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value


def conv_dim_of(spec: str) -> int:
    """The channel count of a feature_encoder_spec that has d2v's 7-layer CNN geometry; else refused."""
    try:
        layers = _list_expr(ast.parse(str(spec), mode="eval").body)
        layers = [(int(c), int(k), int(s)) for c, k, s in layers]
    except (ValueError, SyntaxError, TypeError) as e:
        raise FairseqConfigError(f"cfg.model.modalities.audio.feature_encoder_spec: cannot read {spec!r} "
                                 f"({e})") from None
    geometry = tuple((int(k), int(s)) for _, k, s in layers)
    channels = {int(c) for c, _, _ in layers}
    if geometry != CONV_LAYERS or len(channels) != 1:
        raise FairseqConfigError(
            f"cfg.model.modalities.audio.feature_encoder_spec: {spec!r}; d2v's CNN has 7 layers of "
            f"(kernel, stride) {list(CONV_LAYERS)} with one channel count")
    return channels.pop()


def _optim_fields(cfg: dict, out: dict, notes: list[str]) -> None:
    """lr, betas, eps, weight decay, warmup, clipping and steps, from a plain or composite optimizer."""
    opt = cfg.get("optimization") or {}
    optimizer = cfg.get("optimizer") or {}
    sched = cfg.get("lr_scheduler") or {}
    if optimizer.get("_name") == "composite":  # the released v2 configs: one "default" group
        group = (optimizer.get("groups") or {}).get("default") or {}
        if "lr_float" in group:
            _set(out, "optim.lr", float(group["lr_float"]))
        optimizer = group.get("optimizer") or {}
        sched = group.get("lr_scheduler") or sched
    elif opt.get("lr"):
        lr = opt["lr"]
        _set(out, "optim.lr", float(lr[0] if isinstance(lr, (list, tuple)) else lr))
    betas = optimizer.get("adam_betas")
    if isinstance(betas, str):
        betas = ast.literal_eval(betas)
    if betas is not None:
        _set(out, "optim.betas", [float(b) for b in betas])
    for src, dst in (("adam_eps", "optim.eps"), ("weight_decay", "optim.weight_decay")):
        if optimizer.get(src) is not None:
            _set(out, dst, float(optimizer[src]))
    if sched.get("warmup_updates") is not None:
        _set(out, "optim.warmup_steps", int(sched["warmup_updates"]))
    if sched.get("_name") not in (None, "cosine"):
        notes.append(f"lr_scheduler {sched.get('_name')!r}: d2v uses linear warmup + cosine")
    if opt.get("clip_norm") is not None:
        _set(out, "optim.clip_norm", float(opt["clip_norm"]))
    if opt.get("max_update"):
        _set(out, "train.max_steps", int(opt["max_update"]))


def config_from_fairseq(ckpt_cfg: dict, state_keys, vocab_size: int | None = None
                        ) -> tuple[Config, list[str]]:
    """-> (d2v Config, notes on what is not represented). Raises FairseqConfigError for a model d2v
    cannot compute exactly, naming the field."""
    if not isinstance(ckpt_cfg, dict) or not isinstance(ckpt_cfg.get("model"), dict):
        raise FairseqConfigError("the checkpoint has no cfg['model'] section (a fairseq >= 0.10 "
                                 "checkpoint of the data2vec_multi model is expected)")
    model = ckpt_cfg["model"]
    name = model.get("_name")
    if name not in (None, "data2vec_multi"):
        raise FairseqConfigError(f"cfg.model._name is {name!r}: d2v imports data2vec 2.0 "
                                 f"('data2vec_multi') checkpoints")
    modality = modality_of(model, state_keys)
    mods = model.get("modalities") or {}
    mod = mods.get(modality)
    if not isinstance(mod, dict):
        raise FairseqConfigError(f"cfg.model.modalities.{modality}: missing from the checkpoint's config")
    where, mwhere = "cfg.model", f"cfg.model.modalities.{modality}"
    refused: list[str] = []
    notes: list[str] = []

    def fixed(section: dict, table: dict, at: str, refuse: bool) -> None:
        for k, want in table.items():
            try:
                have = _get(section, k)
            except (KeyError, TypeError):
                continue  # absent: the reference's default, which is the supported value
            if not _same(have, want):
                msg = f"{at}.{k} = {have!r} (d2v supports {want!r})"
                (refused if refuse else notes).append(msg)

    fixed(model, _MODEL_FIXED_TOP, where, True)
    fixed(mod, _MODEL_FIXED_MOD, mwhere, True)
    fixed(mod, _MODEL_FIXED_PER_MODALITY[modality], mwhere, True)
    if modality == "audio" and mod.get("use_alibi_encoder"):
        fixed(mod, _ALIBI_FIXED, mwhere, True)
        if mod.get("num_alibi_heads", model.get("num_heads")) != model.get("num_heads"):
            refused.append(f"{mwhere}.num_alibi_heads = {mod.get('num_alibi_heads')} (d2v uses one ALiBi "
                           f"head per attention head, {model.get('num_heads')})")
    if mod.get("embed_dim", model.get("embed_dim")) != model.get("embed_dim"):
        refused.append(f"{mwhere}.embed_dim = {mod.get('embed_dim')} differs from {where}.embed_dim")
    if refused:
        raise FairseqConfigError("the checkpoint's model differs from what d2v computes: "
                                 + "; ".join(refused))
    fixed(model, _TRAINING_TOP, where, False)
    fixed(mod, _TRAINING_MOD, mwhere, False)
    if "inverse_mask" in mod and bool(mod["inverse_mask"]) != _INVERSE_MASK[modality]:
        notes.append(f"{mwhere}.inverse_mask = {mod['inverse_mask']!r} (d2v masks {modality} with "
                     f"{'inverse block' if _INVERSE_MASK[modality] else 'span'} masks)")
    text_dropout = mod.get("dropout", model.get("encoder_dropout", 0.0))
    if modality == "text" and not _same(text_dropout, model.get("encoder_dropout", 0.0)):
        notes.append(f"{mwhere}.dropout = {mod['dropout']} (d2v's embedding dropout is "
                     f"model.encoder_dropout = {model.get('encoder_dropout')})")
    if model.get("layer_norm_targets") and model.get("instance_norm_targets"):
        notes.append(f"{where}: both layer_norm_targets and instance_norm_targets (d2v applies one: layer)")

    out: dict = {"model": {"modality": modality}}
    for src, dst in _TOP:
        if src in model:
            _set(out, dst, model[src])
    for src, dst in _MOD + _PER_MODALITY[modality]:
        if src in mod:
            _set(out, dst, mod[src])
    for src, dst in _DECODER:
        if src in (mod.get("decoder") or {}):
            _set(out, dst, mod["decoder"][src])
    final = "layer" if model.get("layer_norm_targets") else "instance" if model.get("instance_norm_targets") \
        else "none"
    _set(out, "objective.final_norm", final)
    if modality == "audio" and "feature_encoder_spec" in mod:
        _set(out, "model.conv_dim", conv_dim_of(mod["feature_encoder_spec"]))
    if modality == "text" and vocab_size is not None:
        _set(out, "model.vocab_size", int(vocab_size))
    if model.get("max_update"):
        _set(out, "train.max_steps", int(model["max_update"]))
    seed = (ckpt_cfg.get("common") or {}).get("seed", model.get("seed"))
    if seed is not None:
        _set(out, "train.seed", int(seed))
    _optim_fields(ckpt_cfg, out, notes)
    out["model"]["flavor"] = _closest_flavor(modality, out["model"])
    try:
        cfg = Config.from_dict(out)
    except ConfigError as e:
        raise FairseqConfigError("the checkpoint's config does not give a valid d2v config: "
                                 + "; ".join(e.errors)) from None
    return cfg, notes


def _closest_flavor(modality: str, model: dict) -> str:
    """The preset whose width and depth the checkpoint has (its name shows in banners), else base;
    every architecture key is set explicitly anyway."""
    for name, preset in get_modality(modality).flavors.items():
        if preset.get("embed_dim") == model.get("embed_dim") and preset.get("depth") == model.get("depth"):
            return name
    return "base"


def config_to_fairseq(cfg: Config) -> dict:
    """A d2v Config -> the `cfg` of a fairseq checkpoint (model, task, common, optimization sections)."""
    d = cfg.to_dict()
    m = cfg.model.modality
    model: dict = {"_name": "data2vec_multi", "supported_modality": m.upper()}
    mod: dict = {"type": m.upper(), "model_depth": cfg.model.depth, "decoder": {},
                 "inverse_mask": _INVERSE_MASK[m]}
    for src, dst in _TOP:
        model[src] = _get(d, dst)
    if model["average_top_k_layers"] is None:  # d2v: all main blocks; the reference needs the number
        model["average_top_k_layers"] = cfg.model.depth
    for src, dst in _MOD + _PER_MODALITY[m]:
        mod[src] = _get(d, dst)
    for src, dst in _DECODER:
        mod["decoder"][src] = _get(d, dst)
    model.update(_MODEL_FIXED_TOP)
    model.update(_TRAINING_TOP)
    for k, v in _MODEL_FIXED_MOD.items():
        _set(mod, k, v)
    mod.update(_MODEL_FIXED_PER_MODALITY[m])
    mod.update(_TRAINING_MOD)
    final = cfg.objective.final_norm
    model["layer_norm_targets"], model["instance_norm_targets"] = final == "layer", final == "instance"
    model["max_update"] = cfg.train.max_steps
    model["seed"] = cfg.train.seed
    if m == "audio":
        c = cfg.model.conv_dim
        mod["feature_encoder_spec"] = repr([(c, k, s) for k, s in CONV_LAYERS])
        mod["num_alibi_heads"] = cfg.model.num_heads
        if cfg.model.use_alibi:
            mod.update(_ALIBI_FIXED)
    if m == "image":
        mod["embed_dim"] = cfg.model.embed_dim
    if m == "text":
        mod["dropout"] = cfg.model.encoder_dropout
    model["modalities"] = {m: mod}
    o = cfg.optim
    return {
        "model": model,
        "task": {"_name": {"image": "mae_image_pretraining", "audio": "audio_pretraining",
                           "text": "masked_lm"}[m]},
        "common": {"seed": cfg.train.seed},
        "optimization": {"max_update": cfg.train.max_steps, "lr": [o.lr], "clip_norm": o.clip_norm},
        "optimizer": {"_name": "adam", "adam_betas": list(o.betas), "adam_eps": o.eps,
                      "weight_decay": o.weight_decay},
        "lr_scheduler": {"_name": "cosine", "warmup_updates": o.warmup_steps},
    }
