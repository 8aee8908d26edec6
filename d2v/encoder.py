"""A pretrained d2v encoder for other projects: `d2v.load_encoder(path)`.

    enc = d2v.load_encoder("runs/tiny_image")            # a d2v run / checkpoint folder
    enc = d2v.load_encoder("data2vec2_base_audio.pt")    # or a fairseq data2vec 2.0 checkpoint file
    out = enc(source, padding_mask=None, all_layers=True)
    out.features      # (B, T, D) per-token features of the last block (extra/CLS tokens removed)
    out.cls           # (B, E, D) the extra (CLS) tokens' outputs, or None (audio, text)
    out.padding_mask  # (B, T) True = padding (audio frames, text pads), or None
    out.layers        # with all_layers: every main block's output, each (B, T, D); else None

Inputs are what the model was trained on: images (B, C, S, S) normalized with the run's data.mean /
data.std at model.image_size; 16 kHz waveforms (B, L), each normalized to zero mean and unit variance
when the run's data.normalize is true (as the released audio models were), with a padding mask
(B, L) True = padding; token ids (B, T) from the run's tokenizer (enc.tokenizer for text runs that
have one), <s> first, right-padded with id 1 and padding_mask (B, T).

The module is frozen (no gradients, always in eval mode: `enc.train()` keeps dropout off); move it
with `.to(device)`. By default the student's weights; `teacher=True` gives the EMA teacher's
(laid over the student, as the teacher runs during training).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from d2v.config import Config


class EncoderOutput(NamedTuple):
    features: torch.Tensor  # (B, T, D)
    cls: torch.Tensor | None  # (B, E, D)
    padding_mask: torch.Tensor | None  # (B, T)
    layers: list[torch.Tensor] | None  # depth x (B, T, D)


class Encoder(nn.Module):
    """Frozen feature extractor around a d2v Data2Vec2 (decoder dropped)."""

    def __init__(self, model: nn.Module, config: Config, tokenizer=None, source: str = ""):
        super().__init__()
        model.modality_encoder.decoder = None  # never used for features
        model.final_proj = None
        self.model = model.eval().requires_grad_(False)
        self.config, self.tokenizer, self.source = config, tokenizer, source
        self.modality, self.embed_dim = config.model.modality, config.model.embed_dim

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # frozen: dropout and layerdrop stay off

    @torch.no_grad()
    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                all_layers: bool = False) -> EncoderOutput:
        layers: list[torch.Tensor] = []
        hooks = [blk.register_forward_hook(lambda _m, _i, out: layers.append(out[0]))
                 for blk in self.model.blocks] if all_layers else []
        try:
            x, _, pad = self.model.encode(source, padding_mask=padding_mask)  # (B, E + T, D)
        finally:
            for h in hooks:
                h.remove()
        E = self.model.num_extra_tokens
        return EncoderOutput(x[:, E:], x[:, :E] if E else None, pad,
                             [y[:, E:] for y in layers] if all_layers else None)

    def extra_repr(self) -> str:
        m = self.config.model
        return f"{self.modality}, D={m.embed_dim}, depth={m.depth}, from {self.source}"


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and p.suffix in (".pt", ".pth", ".ckpt")


def run_tokenizer(cfg: Config, run_dir: Path | None, override: str | Path | None = None):
    """A text run's tokenizer: `override`, else data.tokenizer, else tokenizer.json in `run_dir`; None
    when there is none (never trained here: new ids would not be the embedding's)."""
    from d2v.data.text import load_tokenizer

    for cand in [override or cfg.data.tokenizer, None if run_dir is None else run_dir / "tokenizer.json"]:
        if cand is not None and Path(cand).expanduser().is_file():
            return load_tokenizer(cand)
    return None


def load_encoder(path: str | Path, *, teacher: bool = False, device: str | torch.device | None = None,
                 tokenizer: str | Path | None = None) -> Encoder:
    """A frozen Encoder from a d2v run or checkpoint folder (any backend, imported runs included), a
    `d2v export` file, or a fairseq data2vec 2.0 checkpoint file. `tokenizer` (text): a tokenizers JSON
    to attach instead of the run's."""
    from d2v.model import build_model

    p = Path(path).expanduser()
    tok = None
    if _is_checkpoint_file(p):
        from d2v.interop.fairseq import convert_fairseq, load_torch_file

        obj = load_torch_file(p)  # read once: a d2v export or a fairseq checkpoint
        if isinstance(obj, dict) and {"student", "teacher", "config"} <= set(obj):  # `d2v export`
            cfg = Config.from_dict(obj["config"])
            student, teacher_sd = obj["student"], obj["teacher"]
            if cfg.model.modality == "text":
                tok = run_tokenizer(cfg, None, tokenizer)
        else:
            conv = convert_fairseq(p, tokenizer=tokenizer, loaded=obj)
            cfg, student, teacher_sd, tok = conv.config, conv.student, conv.teacher, conv.tokenizer
    else:
        from d2v.weights import load_weights

        state, cfg_dict, _ = load_weights(p)
        cfg, student, teacher_sd = Config.from_dict(cfg_dict), state["model"], state["teacher"]
        if cfg.model.modality == "text":
            tok = run_tokenizer(cfg, run_folder(p), tokenizer)
    model = build_model(cfg)
    model.load_state_dict(student)
    if teacher:
        missing, unexpected = model.load_state_dict(teacher_sd, strict=False)
        if unexpected:
            raise RuntimeError(f"{p}: teacher keys not in the model: {unexpected[:5]}")
    enc = Encoder(model, cfg, tok, source=str(p))
    return enc.to(device) if device is not None else enc


def run_folder(p: Path) -> Path:
    """The run folder of a run, checkpoints/ or step folder path."""
    if (p / "state.pt").is_file():
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p.parent if p.name == "checkpoints" else p
