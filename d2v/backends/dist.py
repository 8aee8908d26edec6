"""torch.distributed helpers the distributed backends share: joining the process group with a timeout,
the one per-step all-reduce of flags, averaging logged stats, and the collective checkpoint write
(every rank writes its own file into one temp folder; rank 0 commits it)."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Callable

import torch

from d2v.checkpoint import (
    CheckpointWriteError,
    begin_checkpoint,
    checkpoint_write_guard,
    commit_checkpoint,
    write_state,
)

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_distributed() -> bool:
    """True under the `deepspeed` launcher or torchrun (they export WORLD_SIZE / LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_timeouts(timeout_minutes: float) -> datetime.timedelta:
    """engine.timeout_minutes for every process group this process creates: a collective that waits this
    long for a rank fails the run instead of hanging on a dead peer. On gloo a dead peer's closed socket
    fails the survivors at once; NCCL needs its async error handling on (set here unless the user set
    it) to turn the timeout into an error that ends the process. Groups created later without a timeout
    (DeepSpeed's data-parallel groups: new_group(timeout=None)) take torch's module-wide default (30 min
    on gloo), not the world group's: that default is set too."""
    from torch.distributed import distributed_c10d as c10d

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def single_rank_env() -> None:
    """Without a launcher (`d2v pretrain engine.name=ddp|deepspeed`): a process group of one rank."""
    if launched_distributed():
        return
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        os.environ.setdefault(k, v)


def init_process_group(timeout_minutes: float) -> tuple[int, int]:
    """Join (or, with no launcher, create a 1-process) torch.distributed group -> (rank, world_size):
    NCCL on GPUs, gloo on CPUs."""
    timeout = set_timeouts(timeout_minutes)
    single_rank_env()
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def pick_device() -> torch.device:
    """cuda:LOCAL_RANK (made current) on GPUs, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class FlagAgreement:
    """The one collective a distributed step adds for the trainer, and its one host read: an all-reduce
    (MIN) of (every loss of this step finite here, no stop signal here, train.ckpt_every_minutes not due
    on this clock), so every rank skips, stops or checkpoints after the same step. The host flags
    travel in a non-blocking copy from a reused (pinned on CUDA) buffer."""

    def __init__(self, device: torch.device):
        self.device = device
        self._host = torch.ones(2)  # (2,) 1 = not requested
        if device.type == "cuda":
            self._host = self._host.pin_memory()

    def agree(self, ok: torch.Tensor, requests: tuple[bool, bool]) -> tuple[bool, bool, bool]:
        """ok: () bool on self.device -> (all finite, stop, checkpoint now), the same on every rank."""
        stop, due = requests
        self._host[0], self._host[1] = (0.0 if stop else 1.0), (0.0 if due else 1.0)
        flags = torch.cat([ok.float().reshape(1), self._host.to(self.device, non_blocking=True)])  # (3,)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        finite, go_on, not_due = flags.tolist()
        return finite == 1.0, go_on == 0.0, not_due == 0.0


def reduce_mean(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each logged value (every rank gets the same values, so the collapse guard
    and the non-finite check stop all ranks together). On `device`: NCCL reduces CUDA tensors only."""
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)  # (len(stats),)
    torch.distributed.all_reduce(t)
    return dict(zip(stats, (t / torch.distributed.get_world_size()).tolist()))


def broadcast_path(path: Path | None) -> Path:
    box = [str(path)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


def rank_file(ck: Path, rank: int) -> Path:
    return Path(ck) / f"rank_{rank:05d}.pt"


def write_rank_file(tmp: Path, rank: int, obj: dict) -> None:
    with open(rank_file(tmp, rank), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def collective_save(out_dir: Path, step: int, rank: int, suffix: str,
                    write_rank: Callable[[Path], None], main_state: Callable[[], dict], config: dict,
                    keep_last: int, device: torch.device | None = None) -> Path:
    """Collective checkpoint write: rank 0 makes the temp folder, every rank writes its part into it
    (`write_rank(tmp)`), then, after all finished, rank 0 writes state.pt (`main_state()`, the
    completeness marker) and commits: only then is the folder renamed and `latest` moved. -> the
    committed folder, on every rank.

    A rank that cannot write its part (disk full, read-only: CheckpointWriteError) tells the others in
    one all-reduce, so every rank raises at once instead of the others waiting at the barrier until the
    process-group timeout; rank 0 removes the temp folder, `latest` stays on the last complete one.
    `device`: where the flag travels (NCCL reduces CUDA tensors only)."""
    main = rank == 0
    tmp = broadcast_path(begin_checkpoint(out_dir, step, suffix=suffix) if main else None)
    error: CheckpointWriteError | None = None
    try:
        with checkpoint_write_guard(out_dir, step, tmp, cleanup=False):
            write_rank(tmp)
    except CheckpointWriteError as e:
        error = e
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)  # (1,)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item() > 0:
        if error is None:
            error = CheckpointWriteError(
                f"checkpoint step {step}: another rank could not write its part to {tmp} (its own message "
                f"says why: disk full or not writable); the last complete checkpoint is kept, --resume "
                f"from it once that is fixed", None, tmp.parent)
        torch.distributed.barrier()  # every rank stopped writing: now rank 0 may remove the folder
        with checkpoint_write_guard(out_dir, step, tmp, cleanup=main):
            raise error
    torch.distributed.barrier()
    final = tmp
    if main:
        write_state(tmp, main_state(), config)
        final = commit_checkpoint(out_dir, step, tmp, keep_last)
    return broadcast_path(final)


def load_rank_file(ck: Path, rank: int) -> dict:
    """This rank's file of checkpoint `ck`, or {} (a rank the saving run did not have)."""
    p = rank_file(ck, rank)
    return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else {}
