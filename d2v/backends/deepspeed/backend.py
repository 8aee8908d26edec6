"""The DeepSpeed backend (engine.name=deepspeed): d2v's step on a real `deepspeed.initialize` engine
(ZeRO stages 0-3, bf16/fp16, clipping, gradient accumulation, activation checkpointing, optimizer
offload), one process per rank, with an EMA teacher that survives sharding (ema.py).

Checkpoints: <step>/ds/ (DeepSpeed's own: module, optimizer partitions), rank_<r>.pt (each rank's RNG
and, under ZeRO-3, its teacher shards), then state.pt (step, full teacher for ZeRO 0-2) written last by
rank 0 after every rank finished. export.py consolidates one into plain fp32 state dicts.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from d2v.backends.base import Backend, StepOutput
from d2v.backends.deepspeed.config import DS_TAG, deepspeed_config
from d2v.backends.deepspeed.ema import MasterEMATeacher, ShardedEMATeacher, register_method_params
from d2v.backends.dist import (
    FlagAgreement,
    collective_save,
    load_rank_file,
    pick_device,
    reduce_mean,
    set_timeouts,
    single_rank_env,
    write_rank_file,
)
from d2v.config import ConfigError
from d2v.ema import EMATeacher
from d2v.optim import build_optimizer, param_groups, set_lr
from d2v.rng import rng_state, set_rng_state


def init_distributed(timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Join (or, with no launcher, create a 1-process) process group through DeepSpeed ->
    (rank, world_size), with engine.timeout_minutes on every group (dist.set_timeouts)."""
    import os

    import deepspeed

    timeout = set_timeouts(timeout_minutes)
    if os.environ.get("D2V_DEEPSPEED_SHM", "1") == "0":  # skip the ~30 s JIT of the CPU shm comm op
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    single_rank_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def checkpoint_blocks(model: torch.nn.Module, ds_config: dict) -> None:
    """Recompute each main block's forward in the backward pass (DeepSpeed activation checkpointing,
    configured from ds_config["activation_checkpointing"], so the user JSON's keys there apply);
    parameter names are unchanged, so the teacher pairing and checkpoints are unaffected."""
    from deepspeed import checkpointing

    checkpointing.configure(None, deepspeed_config=ds_config)
    for blk in model.blocks:
        blk.forward = functools.partial(checkpointing.checkpoint, blk.forward)


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    engine_keys = ("zero_stage", "grad_accum_steps", "activation_checkpointing", "offload_optimizer",
                   "optimizer", "ds_config", "max_nonfinite_steps")
    checkpoint_kinds = ("deepspeed",)
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, cfg, device: str | None = None):
        super().__init__(cfg, device)
        if cfg.train.compile:  # auto under a launcher (config.validate catches engine.name=deepspeed)
            raise ConfigError("train.compile: the DeepSpeed engine does not compile the step (ZeRO's "
                              "parameter hooks are untested under torch.compile); use engine.name=single "
                              "or train.compile=false")
        self.rank, self.world_size = init_distributed(cfg.engine.timeout_minutes)
        self.device = torch.device(device) if device else pick_device()
        if self.device.type != "cuda" and cfg.train.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 "
                              "or fp32")
        self.micro_steps = cfg.engine.grad_accum_steps

    def barrier(self) -> None:
        torch.distributed.barrier()

    def setup(self, model: torch.nn.Module, teacher_init: dict | None = None) -> None:
        import deepspeed

        cfg, e, o = self.cfg, self.cfg.engine, self.cfg.optim
        self.model = model.to(self.device)
        self.ds_config = deepspeed_config(cfg, self.world_size)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        # the teacher averages the fp32 masters: the module params with fp32 (ZeRO 0-2), else DeepSpeed's
        teacher_cls = ShardedEMATeacher if e.zero_stage == 3 else MasterEMATeacher if low else EMATeacher
        kw = {"ds_config": self.ds_config} if e.zero_stage == 3 else {}
        self.teacher = teacher_cls(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step,
                                   init=teacher_init, **kw)
        if e.activation_checkpointing:
            checkpoint_blocks(self.model, self.ds_config)
        # the optimizer d2v builds; DeepSpeed wraps it (self.optimizer) and calls its step() to update
        on_gpu = self.device.type == "cuda"
        self.client_optimizer = build_optimizer(cfg, param_groups(self.model, o.weight_decay, o.decay_1d),
                                                fused=on_gpu and not e.offload_optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.client_optimizer, config=self.ds_config)
        if e.zero_stage == 3:
            register_method_params(self.model)
            self.teacher.partition()
        elif low:
            self.teacher.bind(self.optimizer)
        self.autocast = torch.autocast(self.device.type, dtype=low or torch.bfloat16, enabled=low is not None)
        self._agreement = FlagAgreement(self.device)

    def step(self, batches, lr, requests) -> StepOutput:
        """One optimizer step over engine.grad_accum_steps micro-batches.

        A non-finite loss on any rank drops the whole step, with no host sync per micro-batch: each rank
        keeps a device flag (every loss of the window so far finite here) and, from its first non-finite
        loss on, backpropagates zero instead (torch.where: no NaN enters through the loss). After the
        window's last backward, one all-reduce of the flags and one host read (FlagAgreement) decide on
        every rank alike whether the boundary's engine.step() applies the update; a dropped step still
        runs it (reduce, clip, clear the gradients, so DeepSpeed's bookkeeping stays aligned) with the
        update suppressed (`_no_update`).

        That read is the one host sync per optimizer step, and one is the floor with DeepSpeed's API:
        whether the client optimizer runs must be decided in Python before engine.step() calls it (for
        bf16/fp32 DeepSpeed has no skip of its own; its fp16 overflow skip would also lower the loss
        scale), and engine.step() itself reads the gradient norm or overflow flag on the host right after
        (ZeRO 1-2), so the device is drained at that point anyway."""
        set_lr(self.optimizer, lr)
        n, out = 0, None
        ok = shown = None  # () on the device: all losses so far finite on this rank; the loss a skip reports
        last = len(batches) - 1
        for i, (source, mask) in enumerate(batches):
            with self.autocast:
                out = self.engine(source, mask, self.teacher)
            loss = out["loss"]
            finite = torch.isfinite(loss.detach())
            # reported if the step is dropped: this rank's first non-finite loss, else its last one
            shown = loss.detach() if shown is None else torch.where(ok, loss.detach(), shown)
            ok = finite if ok is None else ok & finite
            # identical to `loss` (and its gradient) while ok; a zero loss from the first non-finite one on
            self.engine.backward(torch.where(ok, loss, torch.zeros_like(loss)))
            n += source.shape[0]
            if i < last:
                self.engine.step()  # inside the window: DeepSpeed only counts the micro-batch
        finite, stop, due = self._agreement.agree(ok, requests)
        if not finite:
            with self._no_update():
                self.engine.step()  # the boundary: gradients reduced and cleared, no update
            return StepOutput(None, None, lr, n, skipped="nonfinite", shown=shown, stop=stop, ckpt_due=due)
        self.engine.step()  # the boundary: DeepSpeed's optimizer step
        if not self.engine.was_step_applied():  # fp16 overflow: DeepSpeed skipped it, lowered the scale
            return StepOutput(None, None, lr, n, skipped="overflow", stop=stop, ckpt_due=due)
        return StepOutput(out, self.engine.get_global_grad_norm(), lr, n, stop=stop, ckpt_due=due)

    @contextlib.contextmanager
    def _no_update(self):
        """engine.step() at the boundary reduces, clips and clears the gradients as usual, but the
        optimizer d2v built does not step: no parameter update, no weight decay, its state (moments,
        step count) unchanged, so the (unchanged) fp32 masters are copied back to the module. The
        ZeRO-3 partial offload's GPU-side optimizer is silenced too."""
        opts = [self.client_optimizer, getattr(self.optimizer, "backup_optimizer", None)]
        opts = [o for o in opts if o is not None]
        for o in opts:
            if "step" in vars(o):
                raise RuntimeError(f"{type(o).__name__} has an instance attribute 'step': cannot skip its "
                                   f"update")
            o.step = lambda *args, **kwargs: None  # shadows the class's step()
        try:
            yield
        finally:
            for o in opts:
                del o.step

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        return reduce_mean(stats, self.device)

    def banner(self) -> str:
        e = self.cfg.engine
        return (f"  engine: DeepSpeed ZeRO-{e.zero_stage} on {self.world_size} rank(s) "
                f"({torch.distributed.get_backend()}) | grad accum {e.grad_accum_steps} | optimizer "
                f"{type(self.optimizer).__name__} | activation checkpointing {e.activation_checkpointing}"
                f"\n  EMA teacher: fp32, follows the {self.teacher.source}")

    # --------------------------------------------------------------------------------- checkpoints
    def save(self, out_dir: Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
        """Collective. <step>/ds/ (DeepSpeed: module, optimizer partitions), rank_<r>.pt (this rank's RNG
        and, under ZeRO-3, teacher shards), then state.pt (step, full teacher for ZeRO 0-2) written
        last by rank 0 after every rank finished; only then is the folder renamed and `latest` moved."""
        sharded = isinstance(self.teacher, ShardedEMATeacher)

        def write_rank(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            mine = {"rng": rng_state()}
            if sharded:
                mine["teacher_shards"] = self.teacher.state_dict()
            write_rank_file(tmp, self.rank, mine)

        def main_state() -> dict:
            st = {**state, "engine": self.name, "world_size": self.world_size,
                  "zero_stage": self.cfg.engine.zero_stage}
            if not sharded:
                st["teacher"] = self.teacher.state_dict()
            return st

        return collective_save(out_dir, step, self.rank, "ds", write_rank, main_state, config, keep_last,
                               self.device)

    def check_checkpoint(self, state: dict, ck: Path) -> None:
        super().check_checkpoint(state, ck)
        stage, saved_ws = state["zero_stage"], state["world_size"]
        if saved_ws != self.world_size and stage != 0:
            raise ValueError(f"{ck} was saved by {saved_ws} ranks under ZeRO-{stage}: it resumes on "
                             f"{saved_ws} ranks only (this run has {self.world_size}); ZeRO-0 resumes on any")

    def load(self, state: dict, ck: Path) -> None:
        self.engine.load_checkpoint(str(ck), tag=DS_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        mine = load_rank_file(ck, self.rank)
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        else:
            self.teacher.load_state_dict(mine["teacher_shards"])
        if "rng" in mine:  # a new rank (ZeRO-0 on more ranks) keeps its fresh per-rank seed
            set_rng_state(mine["rng"])
