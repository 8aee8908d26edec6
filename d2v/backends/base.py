"""What a backend is: the strategy that runs the optimizer step for `d2v.trainer.Trainer`.

The trainer owns the loop (data, logging, the collapse guard, checkpoint cadence, stop signals, the
non-finite policy); a backend owns everything that depends on how the model is placed and updated:
joining the process group, wrapping the model, building the EMA teacher and the optimizer, one
optimizer step over the micro-batches, averaging logged stats over ranks, and writing / reading its
checkpoints. A new backend is one file in d2v/backends/ plus its name in `d2v.backends.BACKENDS` and
config.ENGINES.

Legend: B samples per micro-batch on this rank, R = B*M mask rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from d2v.config import Config, ConfigError
from d2v.ema import EMATeacher

# engine.* keys some backends implement; a backend lists the ones it implements in `engine_keys`, and
# make_backend refuses any other set to a non-default value (never silently ignored)
BACKEND_KEYS = ("zero_stage", "grad_accum_steps", "activation_checkpointing", "offload_optimizer",
                "optimizer", "ds_config", "max_nonfinite_steps")


@dataclass
class StepOutput:
    """One optimizer step, as the trainer sees it.

    out: the model's scalar outputs (loss, loss_reg, loss_cls, target_var, pred_var; device tensors,
    never read on the host here), or None when the step was skipped; skipped: None, "nonfinite" (a
    non-finite loss on some rank: no update) or "overflow" (fp16 loss-scale overflow); shown: the loss a
    non-finite skip reports (device tensor); stop / ckpt_due: a stop signal or train.ckpt_every_minutes,
    as all ranks agreed; ema_decay: the teacher's decay after the update (filled in by the trainer)."""
    out: dict | None
    grad_norm: torch.Tensor | float | None
    lr: float
    samples: int
    skipped: str | None = None
    shown: torch.Tensor | None = None
    stop: bool = False
    ckpt_due: bool = False
    ema_decay: float | None = None


class Backend(ABC):
    """Base class: one process, rank 0 of 1. Subclasses implement setup/step/save/load and override what
    else they change."""

    name: ClassVar[str] = "single"
    engine_keys: ClassVar[tuple[str, ...]] = ()  # the BACKEND_KEYS this backend implements
    checkpoint_kinds: ClassVar[tuple[str, ...]] = ("single",)  # state["engine"] values it resumes
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")  # train.precision values it runs

    rank, world_size, micro_steps = 0, 1, 1
    model: torch.nn.Module
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Config, device: str | None = None):
        self.cfg = cfg
        if cfg.train.precision not in self.precisions:
            ok = " and ".join(self.precisions)
            raise ConfigError(f"train.precision: {cfg.train.precision} needs engine.name=deepspeed (dynamic "
                              f"loss scaling); the {self.name} backend supports {ok}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """All ranks wait here (one process: nothing to wait for)."""

    @abstractmethod
    def setup(self, model: torch.nn.Module, teacher_init: dict | None = None) -> None:
        """Place `model` (the student, built on the CPU from the run's seed), build the teacher (a copy of
        the student, or the full fp32 state dict `teacher_init`: continued pretraining from imported
        weights) and the optimizer."""

    @abstractmethod
    def step(self, batches: list[tuple[torch.Tensor, object]], lr: float,
             requests: tuple[bool, bool]) -> StepOutput:
        """One optimizer step over `batches` (micro_steps (source (B, ...), MaskInfo over R rows) pairs on
        self.device) at learning rate `lr`; `requests` = this rank's (stop, checkpoint due) flags. The EMA
        update is not part of it (the trainer calls teacher.update after an applied step)."""

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Logged metrics: this rank's values (distributed backends: the mean over ranks)."""
        return stats

    @abstractmethod
    def save(self, out_dir: Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
        """Write checkpoint `step` (the trainer's `state`: step, skipped_steps; plus this backend's)."""

    @abstractmethod
    def load(self, state: dict, ck: Path) -> None:
        """Restore this backend's part of checkpoint `ck` (state.pt already read into `state`)."""

    def check_checkpoint(self, state: dict, ck: Path) -> None:
        """Refuse a checkpoint another backend wrote and this one cannot resume, saying what can."""
        kind = state.get("engine", "single")
        if kind not in self.checkpoint_kinds:
            how = (f" (ZeRO-{state['zero_stage']}, {state['world_size']} rank(s))" if "zero_stage" in state
                   else "")
            raise ValueError(f"{ck} was saved by the {kind} backend{how}: this run's engine.name={self.name} "
                             f"cannot resume it; resume it with engine.name={kind}, or run `d2v export "
                             f"--checkpoint {ck} --out FILE.pt` for plain torch weights")

    def banner(self) -> str | None:
        """A banner line about the backend, or None."""
        return None

    def close(self) -> None:
        """Release what setup() acquired beyond the process's lifetime (nothing by default)."""
