"""The single-process backend: torch AdamW on the module's fp32 parameters, optional bf16 autocast,
gradient clipping, optional torch.compile of the whole forward (student, teacher, targets, loss).

No host read in its step: a non-finite loss is not detected per step (that would cost a device sync
each step) but at the next log step, where the trainer stops the run naming the last checkpoint; the
distributed backends read one flag per step anyway and skip such steps (engine.max_nonfinite_steps).
"""
from __future__ import annotations

from pathlib import Path

import torch

from d2v.backends.base import Backend, StepOutput
from d2v.checkpoint import save_checkpoint
from d2v.ema import EMATeacher
from d2v.optim import param_groups, set_lr
from d2v.rng import rng_state, set_rng_state


def compile_model(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """`model` under torch.compile (train.compile): its forward is the whole step's computation
    (student, EMA teacher, targets, loss) and its backward is compiled with it (AOTAutograd); the
    d2v.ops custom ops trace as opaque nodes (fake implementations). The model itself is unchanged
    (the returned wrapper shares its parameters; state dicts keep their keys).

    Random ops (decoder noise, dropout) stay on torch's own generator (inductor's fallback_random), so
    a compiled step draws the same noise as an eager one: losses agree up to float reassociation, and
    a checkpoint's RNG state resumes the same stream with compile on or off.

    The optimizer step, gradient clipping and the EMA update stay outside: the EMA is one fused op
    already (nothing to fuse it with), and writing the teacher's parameters inside the graph that reads
    them would only add functionalization copies."""
    import torch._inductor

    options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
    return torch.compile(model, options=options)


class SingleBackend(Backend):
    name = "single"
    checkpoint_kinds = ("single", "ddp")  # the same files: the full model, teacher and optimizer

    def setup(self, model: torch.nn.Module, teacher_init: dict | None = None) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self.model = model.to(self.device)
        self.teacher = EMATeacher(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step,
                                  init=teacher_init)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay, o.decay_1d),
                                           lr=o.lr, betas=o.betas, eps=o.eps)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")
        # what the step calls: the model, or the model under torch.compile (train.compile)
        self.forward = compile_model(self.model, cfg.train.compile_mode) if cfg.train.compile else self.model

    def step(self, batches, lr, requests) -> StepOutput:
        (source, mask), = batches
        with self.autocast:
            out = self.forward(source, mask, self.teacher)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip = self.cfg.optim.clip_norm
        gnorm = torch.nn.utils.clip_grad_norm_(self._params, clip) if clip > 0 else None
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return StepOutput(out, gnorm, lr, source.shape[0], stop=requests[0], ckpt_due=requests[1])

    def save(self, out_dir: Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
        state = {**state, "engine": self.name, "model": self.model.state_dict(),
                 "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": rng_state()}
        return save_checkpoint(out_dir, step, state, config, keep_last)

    def load(self, state: dict, ck: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
