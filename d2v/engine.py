"""The DeepSpeed ZeRO engine for `d2v pretrain`: the trainer loop of d2v/trainer.py on a real
`deepspeed.initialize` engine (stages 0-3, bf16/fp16, clipping, gradient accumulation, activation
checkpointing, optimizer offload), with an EMA teacher that survives sharding.

The DeepSpeed config is derived from d2v's typed config (`deepspeed_config`); a user JSON
(`engine.ds_config`) may add or override any key d2v does not own, and is refused where it
contradicts a key d2v derives (the message names the d2v key to set instead).

EMA teacher per stage (see docs/deepspeed.md). The student the teacher averages is
the optimizer's fp32 master weights under every stage, as in the single-process trainer (fp32
parameters, bf16 autocast compute); with fp32 training the module parameters are the masters.
- ZeRO 0-2, fp32: module parameters are replicated and identical on every rank after
  `engine.step()`, so every rank keeps the full fp32 teacher and updates it locally
  (`d2v.ema.EMATeacher`), no communication.
- ZeRO 0-2, bf16/fp16 (`MasterEMATeacher`): the module holds low-precision copies of the masters.
  ZeRO-0 keeps every master whole on every rank (DeepSpeed's FP16_(Unfused)Optimizer): local update,
  no communication. ZeRO 1-2 split the masters over the ranks: each rank lerps the teacher elements
  whose masters its optimizer owns, then one fp32 all-gather of those updated elements (a teacher's
  worth in all) makes every rank's full teacher the same.
- ZeRO-3: the teacher is partitioned exactly like the student (`deepspeed.zero.Init(module=...)`:
  same per-parameter flatten/pad/slice over the same data-parallel group), and each rank lerps its
  own teacher shard `p.ds_tensor` toward its fp32 master shard of the student
  (`safe_get_local_fp32_param`) with `d2v.ops.ema_update_`: no gather of student weights for the
  update. The teacher's forward gathers each module's (fp32) parameters just before its forward
  and releases them after it, like any ZeRO-3 forward.

References: DeepSpeed docs config-json / zero3 ("Modifying Partitioned States"); DeepSpeed #2056,
OpenRLHF PR #1357 (EMA writes lost under ZeRO-3 without modifier_rank).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch
import yaml

from d2v import ops
from d2v._optional import require
from d2v.checkpoint import (
    CONFIG_FILE,
    begin_checkpoint,
    checkpoint_write_guard,
    commit_checkpoint,
    load_checkpoint,
    write_state,
)
from d2v.config import Config, ConfigError, _deep_merge, _flat, check_resume_config
from d2v.ema import EMATeacher, ema_decay
from d2v.log import get_logger
from d2v.trainer import Trainer, check_schedule_change, lr_at, param_groups, rng_state, set_rng_state

log = get_logger(__name__)
DS_TAG = "ds"  # DeepSpeed's own checkpoint inside each d2v checkpoint folder: <step>/ds/

# DeepSpeed keys d2v derives from its own config -> the d2v key that sets them
OWNED = {
    "train_batch_size": "train.batch_size x engine.grad_accum_steps x world size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "engine.grad_accum_steps",
    "gradient_clipping": "optim.clip_norm",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.offload_optimizer",
    "optimizer": "engine.optimizer and optim.*",
    "scheduler": "optim.lr / warmup_steps / min_lr",
}


def launched_distributed() -> bool:
    """True under the `deepspeed` launcher or torchrun (they export WORLD_SIZE / LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def use_deepspeed(cfg: Config) -> bool:
    name = cfg.engine.name
    return name == "deepspeed" or (name == "auto" and launched_distributed())


def deepspeed_config(cfg: Config, world_size: int, user: dict | None = None) -> dict:
    """The DeepSpeed config for `cfg` on `world_size` data-parallel ranks, with the user's JSON
    (`user`, else the file `engine.ds_config` when set) merged over it."""
    e, t = cfg.engine, cfg.train
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": t.batch_size * e.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "gradient_clipping": cfg.optim.clip_norm,
        "bf16": {"enabled": t.precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling; overflowing steps are skipped by DeepSpeed
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # d2v builds the optimizer (engine.optimizer); allow the torch one with an offloaded state
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # d2v logs (rank 0, metrics.csv)
        "wall_clock_breakdown": False,
    }
    if e.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False,
                                          "contiguous_memory_optimization": False}
    if user is None and e.ds_config:
        p = Path(e.ds_config).expanduser()
        if not p.is_file():
            raise ConfigError(f"engine.ds_config: file not found: {p}")
        try:
            user = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"engine.ds_config: {p} is not valid JSON: {err}") from None
    if user:
        derived = _flat(ds)
        for key, value in _flat(user).items():
            owner = next((o for k, o in OWNED.items() if key == k or key.startswith(k + ".")), None)
            if owner is not None and derived.get(key, object()) != value:
                raise ConfigError(f"engine.ds_config sets {key}={value!r}, which d2v derives from {owner} "
                                  f"(= {derived.get(key)!r}); set {owner} instead")
            if key.startswith("activation_checkpointing.") and not e.activation_checkpointing:
                raise ConfigError(f"engine.ds_config sets {key}={value!r}, but d2v checkpoints activations "
                                  f"only with engine.activation_checkpointing=true (it is false): set it, or "
                                  f"drop the key")
        ds = _deep_merge(ds, user)
    return ds


def build_optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    """The client optimizer named by engine.optimizer, over d2v's param groups."""
    o, name = cfg.optim, cfg.engine.optimizer
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    on_gpu = torch.cuda.is_available()
    if name == "torch_adamw":
        return torch.optim.AdamW(groups, fused=on_gpu and not cfg.engine.offload_optimizer, **kw)
    if name == "deepspeed_adam":  # JIT-builds DeepSpeed's op on first use (~1 min on CPU)
        if cfg.engine.offload_optimizer or not on_gpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam
    except ImportError:
        raise ConfigError("engine.optimizer: apex_fused_adam needs NVIDIA apex (built from source, "
                          "github.com/NVIDIA/apex; the PyPI 'apex' is another package); use torch_adamw "
                          "or deepspeed_adam") from None
    return ApexFusedAdam(groups, adam_w_mode=True, **kw)


def init_distributed(timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Join (or, with no launcher, create a 1-process) process group -> (rank, world_size).

    `timeout_minutes` (engine.timeout_minutes) bounds how long a collective waits for a rank: past it
    the run fails instead of hanging on a dead peer. On gloo a dead peer's closed socket fails the
    survivors at once; NCCL needs its async error handling on (set here unless the user set it) to turn
    the timeout into an error that ends the process."""
    import datetime

    import deepspeed

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # groups created later without a timeout (DeepSpeed's data-parallel groups: new_group(timeout=None))
    # take torch's module-wide default (30 min on gloo), not the world group's: set that default too
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout

    if os.environ.get("D2V_DEEPSPEED_SHM", "1") == "0":  # skip the ~30 s JIT of the CPU shm comm op
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not launched_distributed():  # a plain `d2v pretrain engine.name=deepspeed`: one rank
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)}.items():
            os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def register_method_params(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when its forward runs. Parameters used by a method
    (the modality encoder's CLS tokens and ALiBi scales: `contextualize`, not `forward`) are
    registered on the root module, whose forward is the step."""
    from deepspeed.runtime.zero import register_external_parameter

    me = getattr(model, "modality_encoder", None)
    if me is not None:
        for p in me.parameters(recurse=False):
            register_external_parameter(model, p)


class MasterEMATeacher(EMATeacher):
    """ZeRO 0-2 with bf16/fp16: the full fp32 teacher on every rank follows the fp32 master weights,
    not the module's low-precision copies of them (which would round the student to bf16/fp16 before
    averaging, unlike ZeRO-3 and the single-process trainer). `bind(optimizer)` after
    deepspeed.initialize finds the masters:

    - ZeRO-0 (FP16_UnfusedOptimizer / FP16_Optimizer): every master is whole on every rank
      (`fp32_groups`, or `fp32_groups_flat` split in parameter order): local update, no communication.
    - ZeRO 1-2 (DeepSpeedZeroOptimizer, BF16_Optimizer): rank r's optimizer owns one contiguous slice
      of the flat masters; `param._hp_mapping` says which elements of a parameter that slice holds
      (`lp_fragment_address`) and views them in fp32 (`hp_fragment`). Each rank lerps those elements
      of its teacher, then one all-gather of every rank's updated elements (fp32, packed, padded to
      the largest rank's count) writes the others' elements into each rank's teacher. Per step: a
      lerp over 1/world of the teacher and ~4 bytes x teacher parameters received per rank (the
      bytes ZeRO-3's teacher forward gathers too; the teacher's fp32 values are needed whole on every
      rank for its forward, and only their owner has the masters, so one teacher-sized exchange is
      the least an exact update can do)."""

    source = "fp32 masters (bind() not called yet)"

    @torch.no_grad()
    def bind(self, optimizer) -> None:
        """Collective under ZeRO 1-2 (every rank calls): pair the averaged parameters with their
        masters and agree on who sends which teacher elements."""
        dist = torch.distributed
        avg = [self._src[i] for i in self._avg]
        self._group = None
        if all(hasattr(p, "_hp_mapping") for p in avg):  # masters split over the ranks
            groups = {id(p._dp_group) for p in avg}
            if len(groups) != 1:
                raise RuntimeError("EMA teacher: the student's parameters are split over several "
                                   "data-parallel groups; d2v expects one")
            self._group = avg[0]._dp_group
            mine = [(i, p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel)
                    for i, p in zip(self._avg, avg) if p._hp_mapping is not None]
            world, rank = dist.get_world_size(self._group), dist.get_rank(self._group)
            layouts = [None] * world
            dist.all_gather_object(layouts, mine, group=self._group)
            self._check_cover(layouts)
            flat = [t.view(-1) for t in self._ema]
            self._mine = [(flat[i].narrow(0, s, n), i, n) for i, s, n in mine]
            self._width = max(sum(n for _, _, n in lay) for lay in layouts)  # elements each rank sends
            # the received buffer, split: per rank its fragments, then its padding
            self._sizes, self._theirs, self._pick = [], [], []
            for r, lay in enumerate(layouts):
                for i, s, n in lay:
                    if r != rank:
                        self._pick.append(len(self._sizes))
                        self._theirs.append(flat[i].narrow(0, s, n))
                    self._sizes.append(n)
                self._sizes.append(self._width - sum(n for _, _, n in lay))
            self.source = ("fp32 masters (each rank its optimizer's slice, then one fp32 all-gather per step)"
                           if world > 1 else "fp32 masters (all on this one rank, no communication)")
        elif hasattr(optimizer, "fp16_groups"):  # ZeRO-0: whole masters on every rank
            masters = {}
            for i, lps in enumerate(optimizer.fp16_groups):
                hps = (optimizer.fp32_groups[i] if hasattr(optimizer, "fp32_groups")
                       else optimizer.fp32_groups_flat[i].split([p.numel() for p in lps]))
                masters.update({id(lp): hp.view(lp.shape) for lp, hp in zip(lps, hps)})
            missing = [self.names[i] for i in self._avg if id(self._src[i]) not in masters]
            if missing:
                raise RuntimeError(f"EMA teacher: no fp32 master in {type(optimizer).__name__} for "
                                   f"{missing[:5]}")
            self._mine = [(self._ema[i], i, self._ema[i].numel()) for i in self._avg]
            self._masters = masters
            self.source = "fp32 masters (whole on every rank, no communication)"
        else:
            raise RuntimeError(f"EMA teacher: cannot find the fp32 master weights in DeepSpeed's "
                               f"{type(optimizer).__name__} (no _hp_mapping on the parameters, no "
                               f"fp16_groups): d2v supports ZeRO 0-3 with DeepSpeed's own optimizer "
                               f"wrappers")

    def _check_cover(self, layouts: list) -> None:
        """Every averaged parameter's elements are owned exactly once over the ranks."""
        owned = {i: 0 for i in self._avg}
        for lay in layouts:
            for i, _, n in lay:
                owned[i] += n
        bad = [self.names[i] for i, n in owned.items() if n != self._ema[i].numel()]
        if bad:
            raise RuntimeError(f"EMA teacher: the ranks' fp32 master slices do not cover {bad[:5]} exactly "
                               f"once")

    def _master(self, i: int, n: int, device) -> torch.Tensor:
        """The fp32 master elements this rank owns of averaged parameter i, on the teacher's device
        (with an offloaded optimizer they are on the CPU)."""
        if self._group is None:
            m = self._masters[id(self._src[i])]
        else:
            mapping = self._src[i]._hp_mapping
            m = None if mapping is None else mapping.get_hp_fragment()
            if m is None or m.numel() != n:
                raise RuntimeError(f"EMA teacher: the fp32 master slice of {self.names[i]} changed since "
                                   f"bind()")
        return m.to(device, non_blocking=True)

    @torch.no_grad()
    def update(self, step: int) -> float:
        d = self.decay(step)
        if d >= 1.0:
            return d
        mine = [t for t, _, _ in self._mine]
        ops.ema_update_(mine, [self._master(i, n, t.device).view(t.shape) for t, i, n in self._mine], d)
        if self._group is not None and torch.distributed.get_world_size(self._group) > 1:
            self._share(mine)
        for i in self._copy:
            self._ema[i].copy_(self._src[i])
        for b, s in self._buffers:
            b.copy_(s)
        return d

    def _share(self, mine: list) -> None:
        """One all-gather: each rank sends its updated teacher elements (packed, zero-padded to the same
        count) and copies every other rank's into its teacher."""
        dist = torch.distributed
        device = self._ema[0].device
        pad = torch.zeros(self._width - sum(t.numel() for t in mine), dtype=torch.float32, device=device)
        send = torch.cat([*mine, pad])  # (width,)
        got = torch.empty(self._width * dist.get_world_size(self._group), dtype=torch.float32, device=device)
        dist.all_gather_into_tensor(got, send, group=self._group)
        chunks = got.split(self._sizes)
        torch._foreach_copy_(self._theirs, [chunks[j] for j in self._pick])  # one fused copy on GPUs


class ShardedEMATeacher(EMATeacher):
    """ZeRO-3: the teacher partitioned like the student; each rank updates only its own shard."""

    source = "fp32 master shards (each rank its own shard, no communication)"

    def __init__(self, student, start, end, anneal_end_step, ds_config: dict):
        # built (and paired by name) before the student is partitioned, like EMATeacher
        super().__init__(student, start, end, anneal_end_step)
        self.ds_config = ds_config

    def partition(self) -> None:
        """After deepspeed.initialize: partition the teacher over the same group as the student."""
        import deepspeed

        deepspeed.zero.Init(module=self.module, config_dict_or_path=self.ds_config, dtype=torch.float32)
        for t in self._ema:
            if not hasattr(t, "ds_tensor"):
                raise RuntimeError("ZeRO-3 teacher: a teacher parameter was not partitioned")

    @torch.no_grad()
    def update(self, step: int) -> float:
        from deepspeed.utils import safe_get_local_fp32_param

        d = self.decay(step)
        if d >= 1.0:
            return d
        ema, src = [], []
        for i in self._avg:
            shard = safe_get_local_fp32_param(self._src[i])  # this rank's fp32 master slice
            t = self._ema[i].ds_tensor
            if shard.numel() != t.numel():
                raise RuntimeError(f"ZeRO-3 teacher: shard of {self.names[i]} has {t.numel()} elements, the "
                                   f"student's fp32 master shard {shard.numel()}: partitions differ")
            ema.append(t.view(-1))
            src.append(shard.view(-1).to(t.device, non_blocking=True))  # offloaded optimizer: on the CPU
        ops.ema_update_(ema, src, d)
        for i in self._copy:  # frozen student params: copy the (identically partitioned) shard
            self._ema[i].ds_tensor.copy_(self._src[i].ds_tensor)
        for b, s in self._buffers:
            b.copy_(s)
        return d

    def gathered(self):
        """Context: the full teacher parameters, read-only (released on exit)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self._ema)

    @contextlib.contextmanager
    def forward_gathering(self):
        """Context for the student's forward: each teacher module's own parameters are gathered just
        before its forward and released after it (peak: one block of the teacher), those used by
        methods rather than a forward (the CLS tokens) for the whole context."""
        import deepspeed

        loose = [p for p in self.module.modality_encoder.parameters(recurse=False)] \
            if getattr(self.module, "modality_encoder", None) is not None else []
        open_: dict[int, object] = {}

        def pre(mod, _args):
            ctx = deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)))
            ctx.__enter__()
            open_[id(mod)] = ctx

        def post(mod, _args, _out):
            open_.pop(id(mod)).__exit__(None, None, None)

        handles = []
        for mod in self.module.modules():
            if mod is not self.module and any(True for _ in mod.parameters(recurse=False)) \
                    and not any(p is q for p in mod.parameters(recurse=False) for q in loose):
                handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        try:
            with deepspeed.zero.GatheredParameters(loose):
                yield
        finally:
            for h in handles:
                h.remove()
            for ctx in open_.values():
                ctx.__exit__(None, None, None)

    def state_dict(self) -> dict:
        """This rank's teacher shards (flat fp32), by parameter name, plus the buffers."""
        sd = {n: t.ds_tensor.detach().clone() for n, t in zip(self.names, self._ema)}
        sd.update({f"buffer:{n}": b.detach().clone() for n, b in self.module.named_buffers()})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n, t in zip(self.names, self._ema):
                if sd[n].numel() != t.ds_tensor.numel():
                    raise ValueError(f"teacher shard {n}: saved {sd[n].numel()} elements, this rank holds "
                                     f"{t.ds_tensor.numel()}: a ZeRO-3 run resumes on the same world size")
                t.ds_tensor.copy_(sd[n])
            for n, b in self.module.named_buffers():
                b.copy_(sd[f"buffer:{n}"])

    def full_state_dict(self) -> dict:
        """Collective (every rank calls): the consolidated fp32 teacher."""
        with self.gathered():
            return {n: t.detach().clone() for n, t in self.module.state_dict().items()}


def _checkpoint_blocks(model: torch.nn.Module, ds_config: dict) -> None:
    """Recompute each main block's forward in the backward pass (DeepSpeed activation checkpointing,
    configured from ds_config["activation_checkpointing"], so the user JSON's keys there apply);
    parameter names are unchanged, so the teacher pairing and checkpoints are unaffected."""
    from deepspeed import checkpointing

    checkpointing.configure(None, deepspeed_config=ds_config)
    for blk in model.blocks:
        blk.forward = functools.partial(checkpointing.checkpoint, blk.forward)


class DeepSpeedTrainer(Trainer):
    """d2v's trainer loop (d2v/trainer.py) on a `deepspeed.initialize` engine, one process per rank."""
    deepspeed = True

    def _init_world(self) -> None:
        if self.cfg.train.compile:
            raise ConfigError("train.compile: the DeepSpeed engine does not compile the step (ZeRO's "
                              "parameter hooks are untested under torch.compile); use engine.name=single "
                              "or train.compile=false")
        self.rank, self.world_size = init_distributed(self.cfg.engine.timeout_minutes)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        elif self.cfg.train.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 "
                              "or fp32")
        self.micro_steps = self.cfg.engine.grad_accum_steps

    def _barrier(self) -> None:
        torch.distributed.barrier()  # rank 0 cleaned the run folder: now every rank may resolve there

    def _build_engine(self) -> None:
        import deepspeed

        cfg, e, o = self.cfg, self.cfg.engine, self.cfg.optim
        self.ds_config = deepspeed_config(cfg, self.world_size)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        # the teacher averages the fp32 masters: the module params with fp32 (ZeRO 0-2), else DeepSpeed's
        teacher_cls = ShardedEMATeacher if e.zero_stage == 3 else MasterEMATeacher if low else EMATeacher
        kw = {"ds_config": self.ds_config} if e.zero_stage == 3 else {}
        self.teacher = teacher_cls(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step,
                                   **kw)
        if e.activation_checkpointing:
            _checkpoint_blocks(self.model, self.ds_config)
        # the optimizer d2v builds; DeepSpeed wraps it (self.optimizer) and calls its step() to update
        self.client_optimizer = build_optimizer(cfg, param_groups(self.model, o.weight_decay, o.decay_1d))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.client_optimizer, config=self.ds_config)
        if e.zero_stage == 3:
            register_method_params(self.model)
            self.teacher.partition()
        elif low:
            self.teacher.bind(self.optimizer)
        self.autocast = torch.autocast(self.device.type, dtype=low or torch.bfloat16, enabled=low is not None)

    nonfinite_in_a_row = 0

    def _train_step(self, it):
        """One optimizer step over engine.grad_accum_steps micro-batches.

        A non-finite loss on any rank drops the whole step, with no host sync per micro-batch: each rank
        keeps a device flag (every loss of the window so far finite here) and, from its first non-finite
        loss on, backpropagates zero instead (torch.where: no NaN enters through the loss). After the
        window's last backward, one all-reduce of the flags and one host read (`_agree`)
        decide on every rank alike whether the boundary's engine.step() applies the update; a dropped
        step still runs it (reduce, clip, clear the gradients, so DeepSpeed's bookkeeping stays aligned)
        with the update suppressed (`_no_update`). Its batches are consumed; it counts as skipped and
        toward engine.max_nonfinite_steps in a row.

        That read is the one host sync per optimizer step, and one is the floor with DeepSpeed's API:
        whether the client optimizer runs must be decided in Python before engine.step() calls it (for
        bf16/fp32 DeepSpeed has no skip of its own; its fp16 overflow skip would also lower the loss
        scale), and engine.step() itself reads the gradient norm or overflow flag on the host right after
        (ZeRO 1-2), so the device is drained at that point anyway."""
        lr = lr_at(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n, out = 0, None
        ok = shown = None  # () on the device: all losses so far finite on this rank; the loss a skip reports
        for i in range(self.micro_steps):
            source, mask = self._next_batch(it)
            with self.autocast, self._teacher_params():
                out = self.engine(source, mask)
            loss = out["loss"]
            finite = torch.isfinite(loss.detach())
            # reported if the step is dropped: this rank's first non-finite loss, else its last one
            shown = loss.detach() if shown is None else torch.where(ok, loss.detach(), shown)
            ok = finite if ok is None else ok & finite
            # identical to `loss` (and its gradient) while ok; a zero loss from the first non-finite one on
            self.engine.backward(torch.where(ok, loss, torch.zeros_like(loss)))
            n += source.shape[0]
            if i < self.micro_steps - 1:
                self.engine.step()  # inside the window: DeepSpeed only counts the micro-batch
        if not self._agree(ok):
            with self._no_update():
                self.engine.step()  # the boundary: gradients reduced and cleared, no update
            self.skipped_steps += 1
            self._count_nonfinite(float(shown))  # host read on a skipped step only
            return None, None, lr, n
        self.engine.step()  # the boundary: DeepSpeed's optimizer step
        self.nonfinite_in_a_row = 0
        if not self.engine.was_step_applied():  # fp16 overflow: DeepSpeed skipped it, lowered the scale
            self.skipped_steps += 1
            return None, None, lr, n
        return out, self.engine.get_global_grad_norm(), lr, n

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

    _agreed = (False, False)  # (stop, checkpoint now) as all ranks agreed at the last step's boundary

    def _agree(self, ok: torch.Tensor) -> bool:
        """Collective, once per optimizer step: True when every rank's flag `ok` (a () bool on this
        rank's device: NCCL reduces CUDA tensors only) is True. The same all-reduce carries each rank's
        stop request (a SIGTERM/SIGINT that reached it) and whether train.ckpt_every_minutes passed on
        its clock, so every rank stops or checkpoints after the same step (`_requests`). Its .item()
        is the optimizer step's one host sync; the host flags travel in a non-blocking copy."""
        stop, due = self._local_requests()
        host = torch.tensor([0.0 if stop else 1.0, 0.0 if due else 1.0])  # (2,) 0 = requested
        if self.device.type == "cuda":
            host = host.pin_memory()
        flags = torch.cat([ok.float().reshape(1), host.to(self.device, non_blocking=True)])  # (3,)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        finite, go_on, not_due = flags.tolist()
        self._agreed = (go_on == 0.0, not_due == 0.0)
        return finite == 1.0

    def _requests(self) -> tuple[bool, bool]:
        return self._agreed

    def _count_nonfinite(self, value: float) -> None:
        """After a step was skipped (self.skipped_steps counts it): warn, or stop past the limit."""
        self.nonfinite_in_a_row += 1
        limit = self.cfg.engine.max_nonfinite_steps
        if self.is_main:
            log.warning(f"non-finite loss ({value} on rank {self.rank}, or on another rank) at step "
                        f"{self.step + 1}: skipped ({self.nonfinite_in_a_row} in a row, limit "
                        f"engine.max_nonfinite_steps={limit})")
        if self.nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step + 1} "
                f"(engine.max_nonfinite_steps={limit}); {self.skipped_steps} steps skipped in all. "
                f"Lower optim.lr, raise optim.warmup_steps or use fp32; resume from the last checkpoint "
                f"with --resume")

    def _teacher_params(self):
        if isinstance(self.teacher, ShardedEMATeacher):
            return self.teacher.forward_gathering()
        return contextlib.nullcontext()

    def _reduce_stats(self, stats: dict) -> dict:
        """Logged metrics are the mean over ranks (every rank gets the same values, so the collapse
        guard and the non-finite check stop all ranks together). On self.device: NCCL (the process
        group on GPUs) reduces CUDA tensors only."""
        t = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)  # (len(stats),)
        torch.distributed.all_reduce(t)
        return dict(zip(stats, (t / self.world_size).tolist()))

    def banner(self) -> str:
        e = self.cfg.engine
        return (super().banner() + f"\n  engine: DeepSpeed ZeRO-{e.zero_stage} on {self.world_size} rank(s) "
                f"({torch.distributed.get_backend()}) | grad accum {e.grad_accum_steps} | optimizer "
                f"{type(self.optimizer).__name__} | activation checkpointing {e.activation_checkpointing}"
                f"\n  EMA teacher: fp32, follows the {self.teacher.source}")

    # --------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Collective. <step>/ds/ (DeepSpeed: module, optimizer partitions), rank_<r>.pt (this rank's RNG
        and, under ZeRO-3, teacher shards), then state.pt (step, full teacher for ZeRO 0-2) written
        last by rank 0 after every rank finished; only then is the folder renamed and `latest` moved."""
        dist = torch.distributed
        tmp = None
        if self.is_main:
            tmp = begin_checkpoint(self.out_dir, self.step, suffix="ds")
        box = [str(tmp)]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        with checkpoint_write_guard(self.out_dir, self.step, tmp, cleanup=self.is_main):
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            mine = {"rng": rng_state()}
            if isinstance(self.teacher, ShardedEMATeacher):
                mine["teacher_shards"] = self.teacher.state_dict()
            with open(tmp / f"rank_{self.rank:05d}.pt", "wb") as f:
                torch.save(mine, f)
                f.flush()
                os.fsync(f.fileno())
        dist.barrier()
        final = tmp
        if self.is_main:
            state = {"step": self.step, "skipped_steps": self.skipped_steps, "engine": "deepspeed",
                     "world_size": self.world_size,
                     "zero_stage": self.cfg.engine.zero_stage}
            if not isinstance(self.teacher, ShardedEMATeacher):
                state["teacher"] = self.teacher.state_dict()
            write_state(tmp, state, self.cfg.to_dict())
            final = commit_checkpoint(self.out_dir, self.step, tmp, self.cfg.train.keep_last)
        box = [str(final)]
        dist.broadcast_object_list(box, src=0)
        return Path(box[0])

    def _restore(self, path) -> None:
        state, saved_cfg, ck = load_checkpoint(path)
        check_resume_config(saved_cfg, self.cfg.to_dict(), ck)
        check_schedule_change(saved_cfg, self.cfg, int(state["step"]), ck)
        if state.get("engine") != "deepspeed":
            raise ValueError(f"{ck} is a single-process checkpoint; resume it with engine.name=single")
        stage, saved_ws = state["zero_stage"], state["world_size"]
        if saved_ws != self.world_size and stage != 0:
            raise ValueError(f"{ck} was saved by {saved_ws} ranks under ZeRO-{stage}: it resumes on "
                             f"{saved_ws} ranks only (this run has {self.world_size}); ZeRO-0 resumes on any")
        self.engine.load_checkpoint(str(ck), tag=DS_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        mine_path = ck / f"rank_{self.rank:05d}.pt"
        mine = torch.load(mine_path, map_location="cpu", weights_only=False) if mine_path.is_file() else {}
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        else:
            self.teacher.load_state_dict(mine["teacher_shards"])
        if "rng" in mine:  # a new rank (ZeRO-0 on more ranks) keeps its fresh per-rank seed
            set_rng_state(mine["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = ck


def _param_group_names(ck: Path) -> list[list[str]]:
    """Parameter names of d2v's optimizer param groups (d2v/trainer.py param_groups) for the model in
    ck's config.yaml, in DeepSpeed's order (it drops empty groups); built on the meta device."""
    from d2v.registry import build_model

    cfg = Config.from_dict(yaml.safe_load((ck / CONFIG_FILE).read_text()))
    with torch.device("meta"):
        model = build_model(cfg)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_1d)
    return [[name[id(p)] for p in g["params"]] for g in groups if g["params"]]


def _zero0_student(ck: Path) -> dict:
    """ZeRO-0 (zero_to_fp32 does not read it, DeepSpeed #6699): the module is saved whole, and with
    bf16/fp16 it holds the low-precision copies; the fp32 master weights are in the optimizer state
    of DeepSpeed's wrapper: `fp32_groups` (FP16_UnfusedOptimizer, torch optimizers: one tensor per
    parameter) or `fp32_groups_flat` (FP16_Optimizer, fused Adam: one flat tensor per group), in the
    order of d2v's param groups. Buffers and frozen parameters come from the module (as trained)."""
    files = sorted((ck / DS_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ck / DS_TAG}: no mp_rank_*_model_states.pt")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    student = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    opt = saved.get("optimizer") or {}
    if "fp32_groups" in opt:
        masters = [list(g) for g in opt["fp32_groups"]]
    elif "fp32_groups_flat" in opt:
        masters = None  # split below, once the names (and so the shapes) are known
    else:  # fp32 training: the module weights are the masters
        return student
    names = _param_group_names(ck)
    if masters is None:
        flat = opt["fp32_groups_flat"]  # per group: (sum of its parameters' numel,)
        if [f.numel() for f in flat] != [sum(student[n].numel() for n in g) for g in names]:
            raise ValueError(f"{files[0]}: fp32_groups_flat sizes {[f.numel() for f in flat]} do not match "
                             f"the param groups of the model in {ck / CONFIG_FILE}")
        masters = [list(f.split([student[n].numel() for n in g])) for f, g in zip(flat, names)]
    if [len(g) for g in masters] != [len(g) for g in names]:
        raise ValueError(f"{files[0]}: fp32 master groups of {[len(g) for g in masters]} tensors, the model "
                         f"in {ck / CONFIG_FILE} has param groups of {[len(g) for g in names]}")
    for group_names, group in zip(names, masters):
        for n, w in zip(group_names, group):
            if w.numel() != student[n].numel():
                raise ValueError(f"{files[0]}: the fp32 master for {n} has {w.numel()} elements, the module "
                                 f"weight {student[n].numel()}")
            student[n] = w.float().reshape(student[n].shape).clone()
    return student


def consolidate(state: dict, ck: Path) -> tuple[dict, dict]:
    """A DeepSpeed d2v checkpoint -> (student, teacher) consolidated fp32 state dicts, on CPU, in one
    process (no process group): the student's fp32 master weights through DeepSpeed's zero_to_fp32
    (ZeRO 1-3) or from the saved whole module and its optimizer state (ZeRO-0), the teacher from
    state.pt (ZeRO 0-2) or from the per-rank shards (ZeRO-3: each parameter's flat, padded slices
    concatenated in rank order)."""
    stage = state["zero_stage"]
    if stage == 0:
        student = _zero0_student(ck)
    else:
        require("deepspeed", "exporting a ZeRO-1/2/3 checkpoint")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        student = dict(get_fp32_state_dict_from_zero_checkpoint(str(ck), tag=DS_TAG))
    if "teacher" in state:
        return student, state["teacher"]
    ranks = [torch.load(ck / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)["teacher_shards"]
             for r in range(state["world_size"])]
    teacher = {}
    for name, shard in ranks[0].items():
        if name.startswith("buffer:"):
            teacher[name[len("buffer:"):]] = shard
            continue
        ref = student[name]  # the teacher's parameters are a subset of the student's, same shapes
        teacher[name] = torch.cat([r[name].reshape(-1) for r in ranks])[: ref.numel()].view(ref.shape).clone()
    return student, teacher


def make_trainer(cfg: Config, **kw) -> Trainer:
    """The trainer `d2v pretrain` runs: DeepSpeed when engine.name says so (auto: under a launcher)."""
    if use_deepspeed(cfg):
        require("deepspeed", "the DeepSpeed engine (engine.name=deepspeed, or a torchrun/deepspeed launch)")
        return DeepSpeedTrainer(cfg, **kw)
    return Trainer(cfg, **kw)


__all__ = ["deepspeed_config", "use_deepspeed", "launched_distributed", "build_optimizer",
           "init_distributed", "MasterEMATeacher", "ShardedEMATeacher", "DeepSpeedTrainer", "make_trainer",
           "ema_decay", "OWNED"]
