"""What the torch data-parallel backends (ddp.py, fsdp2.py) share: joining the process group, one
optimizer step over engine.grad_accum_steps micro-batches with the non-finite skip agreed in one flag
all-reduce, and stats averaged over ranks. A subclass says how the model is called (`_forward`), how
gradient reduction is held back on all but the last micro-batch (`_sync`), and builds everything in
`setup` (model, teacher, optimizer, self._params, self.autocast)."""
from __future__ import annotations

from abc import abstractmethod

import torch

from d2v.backends.base import Backend, StepOutput
from d2v.backends.dist import FlagAgreement, init_process_group, pick_device, reduce_mean
from d2v.optim import set_lr


class TorchDataParallel(Backend):
    engine_keys = ("grad_accum_steps", "max_nonfinite_steps", "optimizer")

    def __init__(self, cfg, device: str | None = None):
        super().__init__(cfg, device)
        self.rank, self.world_size = init_process_group(cfg.engine.timeout_minutes)
        self.device = torch.device(device) if device else pick_device()
        self.micro_steps = cfg.engine.grad_accum_steps
        self._agreement = FlagAgreement(self.device)

    def barrier(self) -> None:
        torch.distributed.barrier()

    @abstractmethod
    def _forward(self, source: torch.Tensor, mask) -> dict:
        """The wrapped model's call with the teacher: the STAT_KEYS as scalar tensors."""

    @abstractmethod
    def _sync(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients reduced only when `last`."""

    def step(self, batches, lr, requests) -> StepOutput:
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        n, out = 0, None
        ok = shown = None  # () on the device: every loss so far finite here; the loss a skip reports
        last = len(batches) - 1
        for i, (source, mask) in enumerate(batches):
            with self._sync(i == last):
                with self.autocast:
                    out = self._forward(source, mask)
                loss = out["loss"]
                finite = torch.isfinite(loss.detach())
                shown = loss.detach() if shown is None else torch.where(ok, loss.detach(), shown)
                ok = finite if ok is None else ok & finite
                # identical to `loss` while ok; a zero loss from the first non-finite one on; divided by
                # the micro-batch count as DeepSpeed does
                used = torch.where(ok, loss, torch.zeros_like(loss))
                (used / len(batches) if len(batches) > 1 else used).backward()
            n += source.shape[0]
        finite, stop, due = self._agreement.agree(ok, requests)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(None, None, lr, n, skipped="nonfinite", shown=shown, stop=stop, ckpt_due=due)
        clip = self.cfg.optim.clip_norm
        gnorm = torch.nn.utils.clip_grad_norm_(self._params, clip) if clip > 0 else None
        if gnorm is not None and hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()  # sharded parameters: the norm over all shards (a collective)
        self.optimizer.step()
        return StepOutput(out, gnorm, lr, n, stop=stop, ckpt_due=due)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        return reduce_mean(stats, self.device)
