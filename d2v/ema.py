"""The EMA teacher: a frozen copy of the student (minus the decoder, and per modality minus the parts
it shares with the student: `Data2Vec2.strip_to_teacher`) whose fp32 parameters follow
theta_t <- d * theta_t + (1 - d) * theta_s after every optimizer step, with d ramped linearly. It
also builds the regression targets (`EMATeacher.targets`), which the student's forward asks for: the
teacher is passed to it, never held by it.

References: fairseq examples/data2vec/models/data2vec2.py (make_ema_teacher, make_targets, set_num_updates),
modalities/base.py (get_annealed_rate), fairseq/modules/ema_module.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from d2v import ops


def ema_decay(step: int, start: float, end: float, anneal_end_step: int) -> float:
    """Linear ramp in optimizer updates: start at step 0, end from anneal_end_step on."""
    if step >= anneal_end_step or anneal_end_step == 0:
        return end
    return end - (end - start) * (1.0 - step / anneal_end_step)


class EMATeacher:
    """Owns the teacher module; `update(step)` runs after optimizer step `step` (1-based) and moves the
    teacher towards the student it was built from: its fp32 parameters, which are what the optimizer
    updates (engines that keep low-precision module copies pair the teacher with their fp32 master
    weights instead: d2v.backends.deepspeed.ema)."""

    source = "fp32 module weights (they are the masters; no communication)"  # what the banner reports

    def __init__(self, student: nn.Module, start: float, end: float, anneal_end_step: int,
                 init: dict | None = None):
        """A copy of `student` (the reference's start), or, with `init`, a teacher state dict (full fp32
        tensors: continued pretraining from saved or imported weights)."""
        teacher = copy.deepcopy(student)
        teacher.strip_to_teacher()  # no decoder; per modality, no feature extractor / only the blocks
        teacher.float().eval().requires_grad_(False)
        if init is not None:
            teacher.load_state_dict(init)
        self.module = teacher
        self.start, self.end, self.anneal_end_step = start, end, anneal_end_step
        self._pair(student)

    def _pair(self, student: nn.Module) -> None:
        s_params = dict(student.named_parameters())
        s_buffers = dict(student.named_buffers())
        self.names = [n for n, _ in self.module.named_parameters()]
        missing = [n for n in self.names if n not in s_params]
        if missing:
            raise KeyError(f"teacher parameters missing from the student: {missing[:5]}")
        self._ema = [p for _, p in self.module.named_parameters()]
        self._src = [s_params[n] for n in self.names]
        # trainable student params are averaged; frozen ones and buffers (sin-cos table) are copied
        self._avg = [i for i, p in enumerate(self._src) if p.requires_grad]
        self._copy = [i for i, p in enumerate(self._src) if not p.requires_grad]
        self._buffers = [(b, s_buffers[n]) for n, b in self.module.named_buffers() if n in s_buffers]

    @torch.no_grad()
    def targets(self, source: torch.Tensor, local: torch.Tensor | None, student: nn.Module) -> torch.Tensor:
        """The teacher's pass on the unmasked samples -> float32 targets (B, T, D): the average of its
        instance-normed top-K FFN outputs (objective.average_top_k_layers, extra tokens stripped).

        What it sees follows the modality's teacher sharing (`Data2Vec2.strip_to_teacher`). Image:
        its own EMA feature extractor on `source`. Audio: the student's features `local` (B, T, D)
        through its own positional encoder, ALiBi scale, input LN and blocks. Text: `local` through
        the `student`'s context encoder, then its blocks. Called from the student's forward, which has
        `local` (the student's feature-extractor output, dropout included)."""
        t = self.module
        cfg, obj = t.cfg, t.objective
        t.eval()
        if cfg.ema_encoder_only:
            _, ffn, _ = t.encode(local=local, context=student.modality_encoder, collect_ffn=True)
        elif not cfg.ema_local_encoder:
            _, ffn, _ = t.encode(local=local, collect_ffn=True)
        else:
            _, ffn, _ = t.encode(source, collect_ffn=True)
        E = student.num_extra_tokens
        k = obj.average_top_k_layers or len(ffn)
        layers = [y[:, E:] for y in ffn[-k:]]  # K x (B, T, D)
        return ops.build_targets(layers, instance_norm=obj.instance_norm_target_layer,
                                 final_norm=obj.final_norm)

    def decay(self, step: int) -> float:
        return ema_decay(step, self.start, self.end, self.anneal_end_step)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """EMA step after optimizer update number `step`; returns the decay used (1.0 = frozen)."""
        d = self.decay(step)
        if d >= 1.0:
            return d
        ops.ema_update_([self._ema[i] for i in self._avg], [self._src[i] for i in self._avg], d)
        for i in self._copy:
            self._ema[i].copy_(self._src[i])
        for b, s in self._buffers:
            b.copy_(s)
        return d

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
