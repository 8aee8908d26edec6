"""The EMA teacher under DeepSpeed, per ZeRO stage (docs/deepspeed.md). The student the teacher
averages is the optimizer's fp32 master weights under every stage, as in the single backend (fp32
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

References: DeepSpeed docs zero3 ("Modifying Partitioned States"); DeepSpeed #2056, OpenRLHF PR #1357
(EMA writes lost under ZeRO-3 without modifier_rank).
"""
from __future__ import annotations

import contextlib

import torch

from d2v import ops
from d2v.ema import EMATeacher


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
    averaging, unlike ZeRO-3 and the single backend). `bind(optimizer)` after
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

    def __init__(self, student, start, end, anneal_end_step, ds_config: dict, init: dict | None = None):
        # built (and paired by name) before the student is partitioned, like EMATeacher
        super().__init__(student, start, end, anneal_end_step, init=init)
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

    def targets(self, source, local, student):
        """The targets with the teacher's partitioned parameters gathered module by module
        (forward_gathering)."""
        with self.forward_gathering():
            return super().targets(source, local, student)

    def gathered(self):
        """Context: the full teacher parameters, read-only (released on exit)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self._ema)

    @contextlib.contextmanager
    def forward_gathering(self):
        """Context for the teacher's pass: each teacher module's own parameters are gathered just
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
