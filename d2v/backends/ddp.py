"""The DDP backend (engine.name=ddp): torch DistributedDataParallel, one process per rank (torchrun or
the deepspeed launcher; without a launcher, a group of one). Every rank keeps the whole model, the
whole fp32 EMA teacher and the whole AdamW state; gradients are averaged by DDP's bucketed all-reduce
during the backward, so every rank applies the same update and the teacher needs no communication.

Per optimizer step: engine.grad_accum_steps micro-batches (all but the last under no_sync, the loss
divided by their number, as DeepSpeed does), one flag all-reduce (`FlagAgreement`: a non-finite loss
on any rank skips the step on all, and stop signals / timed checkpoints are agreed) and its one host
read. Checkpoints are the single backend's files (state.pt: model, teacher, optimizer, rank 0's RNG)
plus rank_<r>.pt per rank (its RNG): a DDP checkpoint resumes on any number of ranks, or in one
process with engine.name=single, and exports with no consolidation.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from d2v.backends.dist import (
    collective_save,
    load_rank_file,
    write_rank_file,
)
from d2v.backends.torch_dp import TorchDataParallel
from d2v.ema import EMATeacher
from d2v.optim import build_optimizer, param_groups
from d2v.rng import rng_state, set_rng_state


class DDPBackend(TorchDataParallel):
    name = "ddp"
    checkpoint_kinds = ("single", "ddp")

    def setup(self, model: torch.nn.Module, teacher_init: dict | None = None) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self.model = model.to(self.device)
        self.teacher = EMATeacher(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step,
                                  init=teacher_init)
        self.optimizer = build_optimizer(cfg, param_groups(self.model, o.weight_decay, o.decay_1d),
                                         fused=True if self.device.type == "cuda" else None)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the buffers (position tables) are constants, the same on every rank: no sync per forward
        # (torch >= 2.14 names the option forward_sync_buffers; broadcast_buffers before)
        options = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in options
                   else {"broadcast_buffers": False})
        # layerdrop skips blocks at random: their parameters get no gradient in that step
        self.ddp = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=cfg.model.layerdrop > 0, **no_sync)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")

    def _forward(self, source, mask) -> dict:
        return self.ddp(source, mask, self.teacher)

    def _sync(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def save(self, out_dir: Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
        def main_state() -> dict:
            return {**state, "engine": self.name, "world_size": self.world_size,
                    "model": self.model.state_dict(), "teacher": self.teacher.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "rng": rng_state()}

        return collective_save(out_dir, step, self.rank, "ddp",
                               lambda tmp: write_rank_file(tmp, self.rank, {"rng": rng_state()}),
                               main_state, config, keep_last, self.device)

    def load(self, state: dict, ck: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        mine = load_rank_file(ck, self.rank)
        if "rng" in mine:
            set_rng_state(mine["rng"])
        elif self.rank == 0:  # a single-process checkpoint
            set_rng_state(state["rng"])
        # else: a rank the saving run did not have keeps its fresh per-rank seed

    def banner(self) -> str:
        e = self.cfg.engine
        return (f"  engine: DDP on {self.world_size} rank(s) ({torch.distributed.get_backend()}) | "
                f"grad accum {e.grad_accum_steps} | optimizer {type(self.optimizer).__name__} | "
                f"EMA teacher: fp32, whole on every rank")
