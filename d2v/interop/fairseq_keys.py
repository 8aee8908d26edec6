"""The key table between d2v's state dicts and the reference's (fairseq data2vec 2.0, `data2vec_multi`).

Every d2v key has one reference key, given by the rules below, except d2v's derived buffers, which the
reference does not store (they are rebuilt from the config). A checkpoint is mapped by walking the
keys of a d2v model built for its config: an unmapped, missing or mis-shaped key is an error naming it,
never a partial load.

Student (`model` in a fairseq checkpoint), d2v -> reference:
  blocks.{i}.*                                  -> blocks.{i}.*                     (every modality)
  modality_encoder.*                            -> modality_encoders.{IMAGE|AUDIO|TEXT}.*, then per modality:
  image  fixed_positional_encoder.positions     -> the same name; a buffer here, a frozen parameter there
  audio  local_encoder.conv_layers.{i}.0.weight -> local_encoder.conv_layers.{i}.0.weight
         local_encoder.conv_layers.{i}.1.*      -> local_encoder.conv_layers.{i}.2.1.*  (the reference's
                                                   TransposeLast modules take index slots)
         project_features.0.* (LayerNorm)       -> project_features.1.*
         project_features.1.* (Linear)          -> project_features.2.*
         relative_positional_encoder.layers.{i}.0.* -> relative_positional_encoder.{i+1}.0.*
         alibi_scale (H,)                       -> alibi_scale (1, 1, H, 1, 1)
         alibi_slopes (H,)                      -> not stored (a function of the head count)
  text   every key                              -> the same name
Teacher (`model["_ema"]`, the EMA's fp32 parameters): the student's rules under `_ema.`, except text,
whose EMA module is the main blocks themselves (`ema_encoder_only`): blocks.{i}.* -> _ema.{i}.*.

Legend: H attention heads.

References: fairseq examples/data2vec/models/data2vec2.py (state_dict, _load_from_state_dict),
modalities/audio.py, modalities/images.py.
"""
from __future__ import annotations

import re

import torch

EMA = "_ema"
MODALITY_NAMES = {"image": "IMAGE", "audio": "AUDIO", "text": "TEXT"}

# per-modality suffix rules under the modality encoder: (d2v pattern, -> reference key)
_AUDIO_RULES = [
    (r"local_encoder\.conv_layers\.(\d+)\.1\.(weight|bias)",
     lambda i, w: f"local_encoder.conv_layers.{i}.2.1.{w}"),
    (r"project_features\.0\.(weight|bias)", lambda w: f"project_features.1.{w}"),
    (r"project_features\.1\.(weight|bias)", lambda w: f"project_features.2.{w}"),
    (r"relative_positional_encoder\.layers\.(\d+)\.0\.(weight|bias)",
     lambda i, w: f"relative_positional_encoder.{int(i) + 1}.0.{w}"),
]
_RULES = {"image": [], "audio": _AUDIO_RULES, "text": []}
# d2v buffers the reference does not store: rebuilt from the config by the model's constructor
DERIVED = {"audio": {"modality_encoder.alibi_slopes"}}


class KeyMappingError(KeyError):
    """A checkpoint's keys or shapes do not fit the model its config describes."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _suffix_to_reference(suffix: str, modality: str) -> str:
    for ours, fwd in _RULES[modality]:
        m = re.fullmatch(ours, suffix)
        if m:
            return fwd(*m.groups())
    return suffix


def reference_key(key: str, modality: str, teacher: bool = False) -> str | None:
    """The reference's key for d2v state-dict key `key` (None: a derived buffer it does not store)."""
    if key in DERIVED.get(modality, ()):
        return None
    if key.startswith("blocks."):
        ref = key
    elif key.startswith("modality_encoder."):
        ref = f"modality_encoders.{MODALITY_NAMES[modality]}." + _suffix_to_reference(
            key[len("modality_encoder."):], modality)
    else:
        raise KeyMappingError(f"{key}: no reference key (d2v's data2vec 1.0 modes, model.head=linear or "
                              f"model.skip_masked=false, have parameters the reference model lacks)")
    if not teacher:
        return ref
    if modality == "text":  # the EMA module is model.blocks itself
        if not key.startswith("blocks."):
            raise KeyMappingError(f"{key}: the text teacher holds the main blocks only")
        return f"{EMA}.{key[len('blocks.'):]}"
    return f"{EMA}.{ref}"


def to_reference_tensor(key: str, t: torch.Tensor, modality: str, num_heads: int) -> torch.Tensor:
    """d2v's tensor of `key` in the reference's shape."""
    if modality == "audio" and key == "modality_encoder.alibi_scale":
        return t.reshape(1, 1, num_heads, 1, 1)
    return t


def from_reference_tensor(key: str, t: torch.Tensor, modality: str, num_heads: int) -> torch.Tensor:
    if modality == "audio" and key == "modality_encoder.alibi_scale":
        if t.numel() != num_heads:
            raise KeyMappingError(f"{key}: the checkpoint's alibi_scale has shape {tuple(t.shape)}; d2v "
                                  f"learns one scale per head shared by all layers ({num_heads} values, "
                                  f"learned_alibi_scale_per_head without _per_layer)")
        return t.reshape(num_heads)
    return t


def export_state(sd: dict[str, torch.Tensor], modality: str, num_heads: int,
                 teacher: bool = False) -> dict[str, torch.Tensor]:
    """A d2v student (or teacher) state dict -> the reference's keys and shapes (derived buffers dropped)."""
    out = {}
    for k, t in sd.items():
        ref = reference_key(k, modality, teacher)
        if ref is not None:
            out[ref] = to_reference_tensor(k, t, modality, num_heads)
    return out


def import_state(ref: dict[str, torch.Tensor], template: dict[str, torch.Tensor], modality: str,
                 num_heads: int, teacher: bool = False, where: str = "") -> dict[str, torch.Tensor]:
    """The reference's state dict `ref` -> d2v's, keyed and shaped like `template` (the state dict of a
    d2v model built for the checkpoint's config). Every key of `ref` must be used and every key of the
    template found (derived buffers are taken from the template), with equal shapes and floating dtype;
    otherwise KeyMappingError naming the keys."""
    what = f"{where}{'teacher (_ema)' if teacher else 'student'}"
    out: dict[str, torch.Tensor] = {}
    wanted: dict[str, str] = {}
    for k in template:
        r = reference_key(k, modality, teacher)
        if r is None:
            out[k] = template[k].clone()
        else:
            wanted[r] = k
    missing = sorted(r for r in wanted if r not in ref)
    extra = sorted(r for r in ref if r not in wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) the model needs are missing: {_few(missing)}")
        if extra:
            parts.append(f"{len(extra)} key(s) have no place in the model: {_few(extra)}")
        raise KeyMappingError(f"{what}: {'; '.join(parts)} (is the checkpoint's config the one it was "
                              f"trained with?)")
    for r, k in wanted.items():
        t = from_reference_tensor(k, ref[r], modality, num_heads)
        if not torch.is_tensor(t) or tuple(t.shape) != tuple(template[k].shape):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise KeyMappingError(f"{what}: {r} has shape {shape}; the model built from the checkpoint's "
                                  f"config expects {tuple(template[k].shape)} for it")
        if not t.is_floating_point():
            raise KeyMappingError(f"{what}: {r} has dtype {t.dtype}, expected a floating-point tensor")
        out[k] = t.detach().to(template[k].dtype).clone()
    return out


def split_ema(model_sd: dict) -> tuple[dict, dict | None]:
    """A fairseq checkpoint's `model` entry -> (student state dict, teacher state dict or None). The
    teacher is a nested `_ema` dict, or flattened `_ema.*` keys."""
    student = {k: v for k, v in model_sd.items() if k != EMA and not k.startswith(EMA + ".")}
    if isinstance(model_sd.get(EMA), dict):
        teacher = {f"{EMA}.{k}": v for k, v in model_sd[EMA].items()}
    else:
        teacher = {k: v for k, v in model_sd.items() if k.startswith(EMA + ".")}
    return student, (teacher or None)


def nest_ema(student: dict, teacher: dict) -> dict:
    """(student, `_ema.*` teacher) -> a `model` entry as the reference saves it (the teacher nested)."""
    return {**student, EMA: {k[len(EMA) + 1:]: v for k, v in teacher.items()}}


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")

