"""The FSDP2 backend (engine.name=fsdp2): torch's `fully_shard` on each main block and on the root, one
process per rank. Parameters, gradients and AdamW state are sharded over the ranks (dim 0 of every
parameter, as DTensors); each block's weights are all-gathered just before its forward and backward and
freed after.

The EMA teacher is sharded exactly like the student (the same `fully_shard` calls on its blocks and
root, over the same mesh), so its update is local: each rank lerps its teacher shards toward its own
student shards (`d2v.ops.ema_update_` on the DTensors' local tensors), no communication. The teacher's
`encode` (a method, not `forward`) is registered with FSDP so that it gathers the teacher's root
parameters like a forward does.

Per optimizer step, as the DDP backend: engine.grad_accum_steps micro-batches (gradient reduction only
after the last), one flag all-reduce (non-finite skip, stop signals, timed checkpoints) and its one
host read. Checkpoints: torch distributed checkpoint (DCP) of the sharded student, teacher and
optimizer in <step>/dcp/ (each rank writes its own shards; it resumes on any number of ranks),
rank_<r>.pt per rank (its RNG), state.pt last. `d2v export` consolidates one in a single process.

model.layerdrop must be 0: ranks skipping different blocks would enter different collectives.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from d2v import ops
from d2v.backends.dist import (
    collective_save,
    load_rank_file,
    write_rank_file,
)
from d2v.backends.torch_dp import TorchDataParallel
from d2v.config import ConfigError
from d2v.ema import EMATeacher
from d2v.optim import build_optimizer, param_groups
from d2v.rng import rng_state, set_rng_state

DCP_DIR = "dcp"  # the distributed checkpoint inside each d2v checkpoint folder: <step>/dcp/


def shard(module: torch.nn.Module, mesh) -> None:
    """fully_shard each main block, then the root (its own parameters: the modality encoder, decoder)."""
    from torch.distributed.fsdp import fully_shard

    for blk in getattr(module, "blocks", []):
        fully_shard(blk, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedEMA(EMATeacher):
    """The EMA teacher with both modules sharded: pairs re-made after sharding (fully_shard replaces
    the parameter objects), the update on local shards."""

    source = "the student's fp32 shards (each rank its own shard, no communication)"

    def repair(self, student: torch.nn.Module) -> None:
        self._pair(student)
        for i in self._avg:
            a, b = _local(self._ema[i]), _local(self._src[i])
            if a.shape != b.shape:
                raise RuntimeError(f"FSDP2 teacher: shard of {self.names[i]} is {tuple(a.shape)}, the "
                                   f"student's {tuple(b.shape)}: the modules are sharded differently")

    @torch.no_grad()
    def update(self, step: int) -> float:
        d = self.decay(step)
        if d >= 1.0:
            return d
        ema = [_local(self._ema[i]) for i in self._avg]  # this rank's shards
        ops.ema_update_(ema, [_local(self._src[i]) for i in self._avg], d)
        for i in self._copy:
            _local(self._ema[i]).copy_(_local(self._src[i]))
        for b, s in self._buffers:
            b.copy_(s)
        return d


class FSDP2Backend(TorchDataParallel):
    name = "fsdp2"
    checkpoint_kinds = ("fsdp2",)

    def __init__(self, cfg, device: str | None = None):
        if cfg.model.layerdrop > 0:  # refused before any process group is joined
            raise ConfigError(f"model.layerdrop={cfg.model.layerdrop}: the fsdp2 backend needs every rank to "
                              f"run every block (a skipped block would skip its collectives on that rank "
                              f"only); set model.layerdrop=0 or use engine.name=ddp or deepspeed")
        super().__init__(cfg, device)

    def setup(self, model: torch.nn.Module, teacher_init: dict | None = None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import register_fsdp_forward_method

        cfg, o = self.cfg, self.cfg.optim
        self.model = model.to(self.device)
        # built (paired by name) before sharding, from the same full weights on every rank
        self.teacher = ShardedEMA(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step,
                                  init=teacher_init)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        shard(self.model, self.mesh)
        shard(self.teacher.module, self.mesh)
        register_fsdp_forward_method(self.teacher.module, "encode")
        self.teacher.repair(self.model)
        self.optimizer = build_optimizer(cfg, param_groups(self.model, o.weight_decay, o.decay_1d),
                                         fused=True if self.device.type == "cuda" else None)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")

    def _forward(self, source, mask) -> dict:
        return self.model(source, mask, self.teacher)

    @contextlib.contextmanager
    def _sync(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # reduce-scatter after the last micro-batch only
        yield

    # --------------------------------------------------------------------------------- checkpoints
    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "teacher": get_model_state_dict(self.teacher.module),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def save(self, out_dir: Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
        import torch.distributed.checkpoint as dcp

        def write_rank(tmp: Path) -> None:
            dcp.save(self._dcp_state(), checkpoint_id=str(tmp / DCP_DIR))  # collective: each rank its shards
            write_rank_file(tmp, self.rank, {"rng": rng_state()})

        def main_state() -> dict:
            return {**state, "engine": self.name, "world_size": self.world_size}

        return collective_save(out_dir, step, self.rank, "fsdp2", write_rank, main_state, config, keep_last,
                               self.device)

    def load(self, state: dict, ck: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        sd = self._dcp_state()
        dcp.load(sd, checkpoint_id=str(ck / DCP_DIR))  # in place, resharded to this run's ranks
        set_model_state_dict(self.model, sd["model"])
        set_model_state_dict(self.teacher.module, sd["teacher"])
        set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])
        mine = load_rank_file(ck, self.rank)
        if "rng" in mine:  # a rank the saving run did not have keeps its fresh per-rank seed
            set_rng_state(mine["rng"])

    def banner(self) -> str:
        e = self.cfg.engine
        return (f"  engine: FSDP2 (fully_shard per block) on {self.world_size} rank(s) "
                f"({torch.distributed.get_backend()}) | grad accum {e.grad_accum_steps} | optimizer "
                f"{type(self.optimizer).__name__}\n  EMA teacher: fp32, sharded like the student, follows "
                f"{self.teacher.source}")


def consolidate(ck: Path) -> tuple[dict, dict]:
    """An fsdp2 d2v checkpoint -> (student, teacher) full fp32 state dicts on the CPU, in one process (no
    process group): DCP's own conversion to a torch.save file, then read back."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(Path(ck) / DCP_DIR), str(path))
        full = torch.load(path, map_location="cpu", weights_only=False)
    return full["model"], full["teacher"]
