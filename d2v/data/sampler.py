"""Deterministic, resumable, rank-sharded infinite batch sampler and the image DataLoader builder.

Design (one clean contract, no epoch callbacks): the sampler yields *virtual* indices
v = epoch * num_samples + i, and the dataset derives (epoch, i) = divmod(v, len(dataset)) to seed
its per-item generator. DataLoader workers hold copies of the dataset, so nothing has to be told
about the epoch: the index alone carries it.

Global step s -> (epoch, batch) = divmod(s, steps_per_epoch). Epoch e shuffles with
`torch.randperm(num_samples, generator=seeded(derive_seed("sampler", seed, e)))`; with
drop_last the permutation is truncated to a multiple of world_size * batch_size, rank r takes
perm[r::world_size] and cuts it into batches. Starting at `start_step` therefore reproduces
exactly the batches an uninterrupted run would see from that step on.

References: torch.utils.data.DistributedSampler (rank::world_size sharding, padding when not
dropping the tail).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from d2v.data.images import collate_images
from d2v.data.seed import derive_seed

__all__ = ["ResumableBatchSampler", "build_loader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite stream of this rank's batches of virtual indices (see module docstring).

    drop_last=True: every batch is full; the per-epoch tail that does not fill a global batch
    (world_size * batch_size) is dropped. drop_last=False: the permutation is padded by wrapping
    around to a multiple of world_size and the last batch of each epoch may be short (same length
    on every rank). Either way the dataset must hold at least one global batch."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ResumableBatchSampler: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ResumableBatchSampler: need 0 <= rank < world_size, got "
                             f"rank={rank} world_size={world_size}")
        if start_step < 0:
            raise ValueError(f"ResumableBatchSampler: start_step must be >= 0, got {start_step}")
        super().__init__()
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"ResumableBatchSampler: dataset has {num_samples} samples, fewer than one global "
                f"batch of {global_batch} (batch_size {batch_size} x world_size {world_size})"
            )
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on each rank (identical on all ranks)."""
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.world_size)
        per_rank = math.ceil(self.num_samples / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch `epoch`, as dataset indices in [0, num_samples)."""
        g = torch.Generator().manual_seed(derive_seed("sampler", self.seed, epoch))
        perm = torch.randperm(self.num_samples, generator=g)  # (N,)
        if self.drop_last:
            perm = perm[: self.steps_per_epoch * self.batch_size * self.world_size]
        else:
            padded = math.ceil(self.num_samples / self.world_size) * self.world_size
            perm = torch.cat([perm, perm[: padded - self.num_samples]])  # wrap-around padding
        shard = perm[self.rank :: self.world_size].tolist()  # this rank's share of the epoch
        bs = self.batch_size
        return [shard[k : k + bs] for k in range(0, len(shard), bs)]

    def batch_at(self, step: int) -> list[int]:
        """Virtual indices of global step `step` on this rank."""
        epoch, b = divmod(step, self.steps_per_epoch)
        return [epoch * self.num_samples + i for i in self.epoch_batches(epoch)[b]]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        cached_epoch, batches = -1, []
        while True:
            epoch, b = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch_batches(epoch)
            offset = epoch * self.num_samples
            yield [offset + i for i in batches[b]]
            step += 1


def _init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: one intra-op thread per worker (workers already parallelize); SIGTERM
    and SIGINT are left to the main process, which finishes its step and checkpoints (d2v/preempt.py)."""
    from d2v.preempt import ignore_stop_signals

    torch.set_num_threads(1)
    ignore_stop_signals()


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    collate_fn: Callable = collate_images,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """Infinite DataLoader over `dataset` (anything that accepts virtual indices) with
    `batch_sampler` (default ResumableBatchSampler(len(dataset), batch_size, drop_last=True)) and
    `collate_fn`. Iterate it once and pull `next()` per step; batch k of the iterator is global
    step start_step + k. `pin_memory`: batches in page-locked memory (pinned by the loader's own
    thread), so a CUDA trainer's `.to(device, non_blocking=True)` copies asynchronously; pageable
    memory would be staged by the driver, which may wait for the work already queued on the device."""
    if batch_sampler is None:
        batch_sampler = ResumableBatchSampler(
            len(dataset), batch_size, seed=seed, start_step=start_step, drop_last=True,
            rank=rank, world_size=world_size,
        )
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        # the loader's own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run (which restores that RNG) would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(seed),
    )


