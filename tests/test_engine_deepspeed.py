"""The DeepSpeed engine with 2 ranks on gloo (spawned inside pytest), ZeRO stages 0-3, micro image model:
finite decreasing loss, the same losses under every stage, the EMA teacher equal to the EMA of the
consolidated student weights with no communication in the update, with bf16 the EMA of the fp32 master
weights under every stage (ZeRO 1-2: one all-gather per update), save -> crash -> resume equality,
non-finite losses (with gradient accumulation: the whole step dropped), the ZeRO-0 bf16 export of the
fp32 master weights. The test marked gpu runs one process on NCCL (skipped without a CUDA device).

All stages run in one spawned pair of processes (one process group; ~7 s start-up paid once); the
tests below read what each rank recorded.

Run: .venv/bin/python -m pytest -q tests/test_engine_deepspeed.py
"""
import contextlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from d2v.metrics import read_metrics
from tests.utils import Crash, crash_after_update, free_port, micro_overrides, poison_loss, rank_env

deepspeed = pytest.importorskip("deepspeed")

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_image.yaml"
STAGES = (0, 1, 2, 3)
STEPS = 8
WORLD = 2


# bf16 + gradient accumulation + activation checkpointing, on the stages with distinct teacher paths
# (ZeRO-3 also with the optimizer offloaded; ZeRO-0 bf16 keeps its fp32 masters in DeepSpeed's
# FP16_UnfusedOptimizer, which `d2v export` must read)
FEATURES = {"train.precision": "bf16", "engine.grad_accum_steps": 2, "engine.activation_checkpointing": True}
FEATURE_STAGES = (0, 2, 3)
# activation_checkpointing keys of a user JSON (engine.ds_config), given to the ZeRO-2 feature run
AC_JSON = {"activation_checkpointing": {"synchronize_checkpoint_boundary": True, "number_checkpoints": 3}}


def _cfg(out, stage, **extra):
    from d2v.config import load_config

    return load_config(TINY, micro_overrides(out, STEPS, **{
        "engine.name": "deepspeed", "engine.zero_stage": stage, "train.batch_size": 4,
        "train.ckpt_every": 4, "optim.lr": 3e-3, "ema.ema_start": 0.9, "ema.ema_end": 0.99, **extra}))


def _full_student(tr, stage):
    """Collective under ZeRO-3 and, with bf16, ZeRO 1-2: the consolidated student, by name, as the
    teacher's source: the fp32 master weights (with fp32 under ZeRO 0-2: the replicated module weights,
    which are the masters)."""
    named = list(tr.model.named_parameters())
    if tr.cfg.train.precision != "fp32" and stage in (1, 2):  # each rank's optimizer holds a slice
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: (safe_get_full_fp32_param(p) if p.requires_grad else p).detach().float().clone()
                for n, p in named}
    if tr.cfg.train.precision != "fp32" and stage == 0:  # whole on every rank, in DeepSpeed's wrapper
        pairs = zip(tr.optimizer.fp16_groups, tr.optimizer.fp32_groups)  # (module param, fp32 master)
        masters = {id(lp): hp for lo, hi in pairs for lp, hp in zip(lo, hi)}
        return {n: masters.get(id(p), p).detach().float().clone() for n, p in named}
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in named:
            if p.requires_grad:
                out[n] = safe_get_full_fp32_param(p).detach().float().clone()
            else:
                with deepspeed.zero.GatheredParameters([p]):
                    out[n] = p.detach().float().clone()
        return out
    return {n: p.detach().float().clone() for n, p in named}


def _module_weights(tr, stage):
    """Collective under ZeRO-3: the module's own weights (bf16 copies of the masters with bf16)."""
    out = {}
    for n, p in tr.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]) if stage == 3 else contextlib.nullcontext():
            out[n] = p.detach().float().clone()
    return out


def _update_calls(stage, precision):
    """The collectives one EMA update may make: ZeRO 1-2 with bf16/fp16 share the updated masters' slices
    of the teacher in one all-gather; everything else is local."""
    return ["all_gather_into_tensor"] if precision != "fp32" and stage in (1, 2) else []


def _full_teacher(tr, stage):
    sd = tr.teacher.full_state_dict() if stage == 3 else tr.teacher.state_dict()
    return {n: sd[n].detach().float().clone() for n in tr.teacher.names}


# DeepSpeed's comm backend object (deepspeed.comm.comm.cdb): every DeepSpeed collective (ZeRO-3 gathers,
# safe_get_full_fp32_param's all-reduce) goes through it; it calls torch.distributed functions it captured
# at import, so patching torch.distributed alone would not see them
_DS_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
                   "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_gather",
                   "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "all_gather_object",
                   "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv", "batch_isend_irecv",
                   "gather", "scatter", "barrier")
# torch.distributed, which d2v itself calls
_TORCH_COLLECTIVES = ("all_gather_into_tensor", "all_gather", "broadcast", "broadcast_object_list",
                      "all_reduce", "reduce_scatter_tensor", "barrier")


@contextlib.contextmanager
def _calls_recorded(calls: list):
    """Inside: each collective (DeepSpeed's comm backend object, torch.distributed) and each DeepSpeed
    helper that gathers (safe_get_full_*, GatheredParameters) appends its name to `calls`, then runs."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils
    from deepspeed.runtime.zero import partition_parameters

    targets = ([(ds_comm.cdb, k) for k in _DS_COLLECTIVES]
               + [(torch.distributed, k) for k in _TORCH_COLLECTIVES]
               + [(deepspeed.utils, k) for k in ("safe_get_full_fp32_param", "safe_get_full_grad",
                                                 "safe_get_full_optimizer_state")]
               + [(deepspeed.zero, "GatheredParameters"), (partition_parameters, "GatheredParameters")])
    saved = [(obj, k, getattr(obj, k), k in vars(obj)) for obj, k in targets if hasattr(obj, k)]
    for obj, k, f, _ in saved:
        setattr(obj, k, lambda *a, _k=k, _f=f, **kw: (calls.append(_k), _f(*a, **kw))[1])
    try:
        yield
    finally:
        for obj, k, f, own in saved:
            if own:
                setattr(obj, k, f)
            else:  # a method of the backend's class: drop the instance attribute
                delattr(obj, k)


def _track_ema(tr, stage, record, module_ref=None):
    """Wrap teacher.update: record collectives and gathers inside it, and advance a reference EMA
    computed from the consolidated student (gathered here, in the test only). `module_ref`: a dict
    that receives the EMA of the module's own (bf16 with bf16) weights, the precision-blind reference."""
    ref = _full_teacher(tr, stage)
    if module_ref is not None:
        module_ref.update({n: t.clone() for n, t in ref.items()})
    orig = tr.teacher.update
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}

    def update(step):
        calls = []
        with _calls_recorded(calls):
            d = orig(step)
        record["update_collectives"].append(calls)
        for r, s in [(ref, _full_student(tr, stage))] + (
                [(module_ref, _module_weights(tr, stage))] if module_ref is not None else []):
            for n in r:
                r[n] = d * r[n] + (1 - d) * s[n] if n in trainable else s[n].clone()
        return d

    tr.teacher.update = update
    return ref


def _worker(rank, port, root):
    rank_env(rank, WORLD, port, D2V_DEEPSPEED_SHM="0", D2V_CACHE=os.environ["D2V_CACHE"])
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    root = Path(root)
    out = {}
    for stage in STAGES:
        rec = {"update_collectives": []}
        # full run, with the reference EMA
        tr = Trainer(_cfg(root / f"z{stage}" / "a", stage), progress=False)
        rec["banner_params"] = re.search(r"([\d.]+)M student params", tr.banner()).group(1)
        ref = _track_ema(tr, stage, rec)
        tr.train()
        # ZeRO-3: between steps no teacher parameter is held whole (each rank keeps its shard only)
        rec["teacher_whole"] = (sum(p.data.numel() > 0 for p in tr.teacher.module.parameters())
                                if stage == 3 else 0)
        teacher = _full_teacher(tr, stage)
        rec["ema_max_err"] = max((teacher[n] - ref[n]).abs().max().item() for n in ref)
        rec["ema_moved"] = max((teacher[n] - _full_student(tr, stage)[n]).abs().max().item() for n in ref)
        student_a, teacher_a = _full_student(tr, stage), teacher
        if rank == 0:
            torch.save({"student": student_a, "teacher": teacher_a}, root / f"z{stage}" / "full_a.pt")
        # crash after step 6 (checkpoint at 4), then resume
        cfg_b = _cfg(root / f"z{stage}" / "b", stage)
        tb = Trainer(cfg_b, progress=False)
        crash_after_update(tb, 6)
        try:
            tb.train()
        except Crash:
            pass
        tc = Trainer(cfg_b, resume=True, progress=False)
        rec["resumed_at"] = tc.step
        tc.train()
        sc, tcs = _full_student(tc, stage), _full_teacher(tc, stage)
        rec["resume_student_err"] = max((sc[n] - student_a[n]).abs().max().item() for n in sc)
        rec["resume_teacher_err"] = max((tcs[n] - teacher_a[n]).abs().max().item() for n in tcs)
        out[stage] = rec
        if stage == 3:  # what a teacher update that gathers would call: the recorder must see it
            calls = []
            with _calls_recorded(calls):
                deepspeed.utils.safe_get_full_fp32_param(tc.teacher._src[tc.teacher._avg[0]])
                with deepspeed.zero.GatheredParameters(tc.teacher._ema[:1]):
                    pass
            out["watch_selftest"] = calls
    for stage in FEATURE_STAGES:
        rec = {"update_collectives": []}
        extra = {"engine.offload_optimizer": True} if stage == 3 else {}  # optimizer step on the CPU
        if stage == 2:
            (root / f"ac{rank}.json").write_text(json.dumps(AC_JSON))
            extra = {"engine.ds_config": str(root / f"ac{rank}.json")}
        tr = Trainer(_cfg(root / f"f{stage}", stage, **FEATURES, **extra), progress=False)
        from deepspeed.runtime.activation_checkpointing import checkpointing

        rec["ac_settings"] = (checkpointing.SYNCHRONIZE, checkpointing.num_layers)
        ref = _track_ema(tr, stage, rec)
        tr.train()
        teacher = _full_teacher(tr, stage)
        rec["ema_max_err"] = max((teacher[n] - ref[n]).abs().max().item() for n in ref)
        if stage == 0:  # the fp32 masters of DeepSpeed's bf16 wrapper, by name (replicated: every rank)
            name = {id(p): n for n, p in tr.model.named_parameters()}
            pairs = zip(tr.optimizer.fp16_groups, tr.optimizer.fp32_groups)  # (module param, fp32 master)
            rec["masters"] = {name[id(lp)]: hp.detach().clone() for lo, hi in pairs for lp, hp in zip(lo, hi)}
        out[f"f{stage}"] = rec
    out["bf16"] = _bf16_runs(Trainer, root)
    out["nan"] = _nan_runs(Trainer, root, rank)
    out["nan_accum"] = _nan_accum_runs(Trainer, root)
    out["killed_save"] = _killed_mid_checkpoint(Trainer, root)
    torch.save(out, root / f"rank{rank}.pt")


BF16_STEPS = 4
BF16 = {"train.precision": "bf16", "train.max_steps": BF16_STEPS, "train.ckpt_every": 2,
        "ema.anneal_end_step": BF16_STEPS}


def _bf16_runs(trainer_cls, root):
    """Every stage with bf16 from the same init: the teacher next to the EMA of the consolidated fp32
    masters and the EMA of the bf16 module weights; then crash after step 3 and resume from step 2."""
    rec = {}
    for stage in STAGES:
        r = rec[stage] = {"update_collectives": []}
        tr = trainer_cls(_cfg(root / f"bf{stage}" / "a", stage, **BF16), progress=False)
        r["banner"] = tr.banner().splitlines()[-1]
        module_ref = {}
        ref = _track_ema(tr, stage, r, module_ref)
        tr.train()
        teacher = _full_teacher(tr, stage)
        r["ema_max_err"] = max((teacher[n] - ref[n]).abs().max().item() for n in ref)
        r["module_ref_gap"] = max((ref[n] - module_ref[n]).abs().max().item() for n in ref)
        r["teacher"], r["masters"] = teacher, _full_student(tr, stage)
        tb = trainer_cls(_cfg(root / f"bf{stage}" / "b", stage, **BF16), progress=False)
        crash_after_update(tb, 3)
        try:
            tb.train()
        except Crash:
            pass
        tc = trainer_cls(_cfg(root / f"bf{stage}" / "b", stage, **BF16), resume=True, progress=False)
        r["resumed_at"] = tc.step
        tc.train()
        r["resume_teacher_equal"] = all(torch.equal(t, teacher[n])
                                        for n, t in _full_teacher(tc, stage).items())
        r["resume_masters_equal"] = all(torch.equal(t, r["masters"][n])
                                        for n, t in _full_student(tc, stage).items())
    return rec


def _killed_mid_checkpoint(trainer_cls, root):
    """Every rank dies after DeepSpeed wrote its part of the step-8 checkpoint, before state.pt."""
    from d2v.checkpoint import resolve_checkpoint

    cfg = _cfg(root / "killed", 1)
    tr = trainer_cls(cfg, progress=False)
    save = tr.backend.engine.save_checkpoint

    def save_then_die(path, *a, **kw):
        save(path, *a, **kw)
        if tr.step == STEPS:
            raise Crash("killed mid-checkpoint")

    tr.backend.engine.save_checkpoint = save_then_die
    try:
        tr.train()
    except Crash:
        pass
    rec = {"latest": resolve_checkpoint(root / "killed").name,
           "partial": sorted(p.name for p in (root / "killed" / "checkpoints").glob(".step_*"))}
    tr = trainer_cls(cfg, resume=True, progress=False)
    rec["resumed_at"] = tr.step
    tr.train()
    rec["final"] = resolve_checkpoint(root / "killed").name
    return rec


def _nan_runs(trainer_cls, root, rank):
    rec = {}
    tr = trainer_cls(_cfg(root / "nan1", 2), progress=False)
    poison_loss(tr, lambda call, r: call == 3 and r == 1)  # one bad batch, on rank 1 only
    rec["summary_skipped"] = tr.train()["skipped_steps"]
    rec["steps"], rec["skipped"] = tr.step, tr.skipped_steps
    tr = trainer_cls(_cfg(root / "nan2", 2, **{"engine.max_nonfinite_steps": 3}), progress=False)
    poison_loss(tr, lambda call, r: call >= 2 and r == 0)  # diverged for good on rank 0
    try:
        tr.train()
        rec["error"] = None
    except FloatingPointError as e:
        rec["error"], rec["stopped_at"] = str(e), tr.step
    return rec


NAN_ACCUM_STAGES = (0, 1, 2, 3)
NAN_ACCUM_STEPS = 4
# grad_accum_steps=2: forward calls 3 and 4 are step 2's two micro-batches; {call: ranks whose loss is NaN}
NAN_ACCUM_CASES = {"last": {4: (1,)},  # the last micro-batch only, on rank 1
                   "all": {3: (0,), 4: (1,)}}  # every micro-batch of the step (the first on rank 0)


def _client_state(tr) -> list:
    """The tensors of the optimizer d2v built (moments, step counts), in a fixed order."""
    opt = tr.backend.client_optimizer
    return [v.detach().clone() for s in opt.state.values() for _, v in sorted(s.items())
            if torch.is_tensor(v)]


def _nan_accum_runs(trainer_cls, root):
    """Gradient accumulation with a NaN in one step: each skipped step is checked around its call (the
    student and the optimizer state unchanged), the warnings' values and the batches drawn recorded."""
    rec = {}
    for stage in NAN_ACCUM_STAGES:
        for case, bad in NAN_ACCUM_CASES.items():
            tr = trainer_cls(_cfg(root / f"nanacc{stage}{case}", stage, **{
                "engine.grad_accum_steps": 2, "train.max_steps": NAN_ACCUM_STEPS}), progress=False)
            poison_loss(tr, lambda call, r, _bad=bad: r in _bad.get(call, ()))
            r = rec[(stage, case)] = {"warned": [], "batches": 0, "skips": []}
            step, next_batch, count = tr.train_step, tr._next_batch, tr._count_nonfinite

            def train_step(batches, _tr=tr, _r=r, _stage=stage, _step=step):
                before, state = _full_student(_tr, _stage), _client_state(_tr)
                res = _step(batches)
                if res.out is None:
                    after, state_after = _full_student(_tr, _stage), _client_state(_tr)
                    _r["skips"].append({
                        "param_err": max((after[n] - before[n]).abs().max().item() for n in before),
                        "state_same": len(state) == len(state_after) and all(
                            torch.equal(a, b) for a, b in zip(state, state_after))})
                return res

            def draw(it, _r=r, _next=next_batch):
                _r["batches"] += 1
                return _next(it)

            def counted(value, _r=r, _count=count):
                _r["warned"].append(value)
                return _count(value)

            tr.train_step, tr._next_batch, tr._count_nonfinite = train_step, draw, counted
            summary = tr.train()
            r.update(steps=tr.step, skipped=tr.skipped_steps, summary_skipped=summary["skipped_steps"],
                     data_position=tr.data_position(),
                     params_finite=all(bool(v.isfinite().all()) for v in _full_student(tr, stage).values()))
    # stops once engine.max_nonfinite_steps=2 windows in a row had a NaN: the message counts them
    tr = trainer_cls(_cfg(root / "nanacc_stop", 1, **{"engine.grad_accum_steps": 2,
                                                      "engine.max_nonfinite_steps": 2}), progress=False)
    poison_loss(tr, lambda call, r: call >= 3 and r == 0)
    try:
        tr.train()
        rec["stop"] = None
    except FloatingPointError as e:
        rec["stop"] = (str(e), tr.step, tr.skipped_steps)
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ds")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=WORLD)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("stage", STAGES)
def test_loss_finite_and_decreasing(runs, stage):
    root, _ = runs
    rows = read_metrics(root / f"z{stage}" / "a" / "metrics.csv")
    loss = [r["loss"] for r in rows]
    assert len(loss) == STEPS and all(torch.isfinite(torch.tensor(loss)))
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2, loss


@pytest.mark.parametrize("stage", STAGES[1:])
def test_same_losses_as_zero0(runs, stage):
    """ZeRO partitions state, not the math: in fp32 every stage gives ZeRO-0's losses."""
    root, _ = runs
    ref = [r["loss"] for r in read_metrics(root / "z0" / "a" / "metrics.csv")]
    got = [r["loss"] for r in read_metrics(root / f"z{stage}" / "a" / "metrics.csv")]
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_teacher_is_ema_of_consolidated_student(runs, stage):
    _, recs = runs
    for rank, rec in enumerate(recs):
        r = rec[stage]
        assert r["ema_moved"] > 1e-4, "the student moved away from the teacher: the check has teeth"
        assert r["ema_max_err"] < 1e-6, (rank, r)
        assert r["update_collectives"] == [[]] * STEPS, "the EMA update must not communicate (no gather)"
        assert r["teacher_whole"] == 0, "ZeRO-3: the teacher's gathered parameters must be released"


def test_update_watch_sees_gathers(runs):
    """The recorder the test above wraps the update in sees a ZeRO-3 gather (DeepSpeed's allgather goes
    through a torch.distributed function it captured at import: patching torch.distributed misses it)
    and the gathering helpers, when a ZeRO-3 teacher update would call them."""
    for r in runs[1]:
        calls = r["watch_selftest"]
        assert {"safe_get_full_fp32_param", "GatheredParameters", "all_gather_into_tensor"} <= set(calls), \
            calls


@pytest.mark.parametrize("stage", STAGES)
def test_crash_and_resume_matches_uninterrupted(runs, stage):
    root, recs = runs
    for r in recs:
        assert r[stage]["resumed_at"] == 4
        assert r[stage]["resume_student_err"] == 0.0, r[stage]
        assert r[stage]["resume_teacher_err"] == 0.0, r[stage]
    a = read_metrics(root / f"z{stage}" / "a" / "metrics.csv")
    b = read_metrics(root / f"z{stage}" / "b" / "metrics.csv")
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], (x, y)


@pytest.mark.parametrize("stage", FEATURE_STAGES)
def test_bf16_grad_accum_activation_checkpointing(runs, stage):
    root, recs = runs
    rows = read_metrics(root / f"f{stage}" / "metrics.csv")
    assert len(rows) == STEPS and all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    ref = read_metrics(root / f"z{stage}" / "a" / "metrics.csv")
    assert rows[0]["loss"] != ref[0]["loss"]  # bf16 and 2 micro-batches really changed the run
    for r in recs:  # the source is the fp32 masters (the bf16 module weights would be > 1e-6 off)
        assert r[f"f{stage}"]["ema_max_err"] < 1e-6, r[f"f{stage}"]
        assert r[f"f{stage}"]["update_collectives"] == [_update_calls(stage, "bf16")] * STEPS


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_teacher_is_ema_of_the_fp32_masters(runs, stage):
    """bf16: DeepSpeed's module holds bf16 copies of the fp32 master weights. Under every stage the
    teacher is the EMA of the masters (consolidated after each step, in the test), not of the bf16
    copies, the same on both ranks, exactly resumed; the update is local except under ZeRO 1-2 (one
    all-gather: the masters are split over the ranks)."""
    _, recs = runs
    for rank, rec in enumerate(recs):
        r = rec["bf16"][stage]
        assert r["module_ref_gap"] > 1e-5, "the EMA of the bf16 weights differs: the check has teeth"
        assert r["ema_max_err"] < 1e-6, (rank, r["ema_max_err"], r["module_ref_gap"])
        assert r["update_collectives"] == [_update_calls(stage, "bf16")] * BF16_STEPS, r["update_collectives"]
        assert r["resumed_at"] == 2 and r["resume_teacher_equal"] and r["resume_masters_equal"], r
    t0, t1 = (rec["bf16"][stage]["teacher"] for rec in recs)
    assert all(torch.equal(t0[n], t1[n]) for n in t0), "the ranks' teachers differ"


def test_bf16_teachers_agree_across_stages(runs):
    """The same masters give the same teacher under every stage: ZeRO 1, 2 and 3 train the same fp32
    masters here, bit for bit, and their teachers agree (the teacher feeds the loss, so one that followed
    other weights would change the masters too). ZeRO-0's masters differ (DeepSpeed reduces its bf16
    gradients another way): the test above checks it against its own masters."""
    for rec in runs[1]:
        bf = rec["bf16"]
        for stage in (2, 3):
            err = max((bf[1]["teacher"][n] - t).abs().max().item() for n, t in bf[stage]["teacher"].items())
            same = all(torch.equal(bf[1]["masters"][n], m) for n, m in bf[stage]["masters"].items())
            assert err <= 1e-6 and same, f"ZeRO-{stage}: teacher diff {err}, same masters {same}"


@pytest.mark.parametrize("stage", STAGES)
def test_banner_names_the_teachers_source(runs, stage):
    for rec in runs[1]:
        line = rec["bf16"][stage]["banner"]
        assert line.startswith("  EMA teacher: fp32, follows the fp32 master"), line
        assert ("all-gather" in line) == (stage in (1, 2)), line


def test_zero0_fused_wrapper_masters_are_split_by_parameter(tmp_path):
    """ZeRO-0 with a fused Adam (FP16_Optimizer, GPU only): one flat fp32 master per param group, in the
    group's parameter order; the teacher follows each parameter's slice of it (a stand-in wrapper, no
    process group)."""
    from types import SimpleNamespace

    from d2v.backends.deepspeed.ema import MasterEMATeacher
    from d2v.model import build_model
    from d2v.optim import param_groups

    cfg = _cfg(tmp_path, 0, **{"train.precision": "bf16"})
    model = build_model(cfg)
    teacher = MasterEMATeacher(model, 0.9, 0.99, 10)
    groups = [g["params"] for g in param_groups(model, 0.05, False)]
    flat = [torch.cat([p.detach().reshape(-1) for p in g]) + 0.25 for g in groups]  # masters != module
    teacher.bind(SimpleNamespace(fp16_groups=groups, fp32_groups_flat=flat))
    before = {n: t.clone() for n, t in zip(teacher.names, teacher._ema)}
    d = teacher.update(1)
    master = {id(p): m.view(p.shape)
              for g, f in zip(groups, flat) for p, m in zip(g, f.split([q.numel() for q in g]))}
    for n, t, s in zip(teacher.names, teacher._ema, teacher._src):
        assert torch.allclose(t, d * before[n] + (1 - d) * master[id(s)], atol=1e-7), n
    assert "no communication" in teacher.source


def test_user_activation_checkpointing_keys_are_applied(runs):
    """engine.ds_config's activation_checkpointing keys reach deepspeed.checkpointing.configure."""
    _, recs = runs
    ac = AC_JSON["activation_checkpointing"]
    for r in recs:
        assert r["f2"]["ac_settings"] == (True, ac["number_checkpoints"])
        assert r["f3"]["ac_settings"] == (False, None)  # DeepSpeed's defaults: no user JSON there


def test_activation_checkpointing_keys_need_the_d2v_switch(tmp_path):
    from d2v.backends.deepspeed.config import deepspeed_config
    from d2v.config import ConfigError

    cfg = _cfg(tmp_path, 1)  # engine.activation_checkpointing false
    with pytest.raises(ConfigError, match="activation_checkpointing.profile=True.*engine.activation_checkp"):
        deepspeed_config(cfg, 2, user={"activation_checkpointing": {"profile": True}})
    on = _cfg(tmp_path, 1, **{"engine.activation_checkpointing": True})
    assert deepspeed_config(on, 2, user={"activation_checkpointing": {"profile": True}})[
        "activation_checkpointing"]["profile"] is True


def test_deepspeed_engine_refuses_train_compile_before_joining_a_group(tmp_path):
    from d2v.config import ConfigError
    from d2v.trainer import Trainer

    with pytest.raises(ConfigError, match="train.compile: the DeepSpeed engine does not compile the step"):
        Trainer(_cfg(tmp_path, 0, **{"train.compile": True}), progress=False)
    assert not torch.distributed.is_initialized()


def test_zero0_bf16_export_is_the_fp32_masters(runs, tmp_path):
    """ZeRO-0 + bf16: the module holds bf16 copies; `d2v export` writes the optimizer's fp32 masters."""
    from d2v.cli import main

    root, recs = runs
    out = tmp_path / "export.pt"
    assert main(["export", "--checkpoint", str(root / "f0"), "--out", str(out)]) == 0
    student = torch.load(out, weights_only=False)["student"]
    ck = root / "f0" / "checkpoints" / f"step_{STEPS:08d}"
    module = torch.load(ck / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    masters = recs[0]["f0"]["masters"]
    assert set(masters) == {n for n, v in module.items() if v.dtype == torch.bfloat16}
    for n, m in masters.items():
        assert student[n].dtype == torch.float32 and torch.equal(student[n], m), n
        assert torch.equal(m.to(torch.bfloat16), module[n]), n  # the module weight is its bf16 rounding
    assert any(not torch.equal(m, module[n].float()) for n, m in masters.items())  # more than bf16 bits


def test_banner_counts_partitioned_params(runs):
    _, recs = runs
    for r in recs:
        counts = {r[stage]["banner_params"] for stage in STAGES}
        assert len(counts) == 1 and counts != {"0.00"}, counts  # ZeRO-3 counts ds_numel, not the empty shard


@pytest.mark.parametrize("stage", STAGES)
def test_export_loads_without_deepspeed(runs, stage, tmp_path):
    """`d2v export` consolidates (zero_to_fp32 for ZeRO 1-3, the teacher shards for ZeRO-3); the file
    loads into a plain model in a process where deepspeed cannot be imported."""
    import subprocess
    import sys

    from d2v.cli import main

    root, _ = runs
    out = tmp_path / "export.pt"
    assert main(["export", "--checkpoint", str(root / f"z{stage}" / "a"), "--out", str(out)]) == 0
    full = torch.load(root / f"z{stage}" / "full_a.pt")
    exported = torch.load(out, weights_only=False)
    assert exported["step"] == STEPS
    for n, v in full["student"].items():
        assert torch.equal(exported["student"][n].float(), v), n
    for n, v in full["teacher"].items():
        assert torch.equal(exported["teacher"][n], v), n
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import torch\n"
        "from d2v.config import Config\n"
        "from d2v.model import build_model\n"
        "from d2v.probe import teacher_encoder\n"
        f"d = torch.load({str(out)!r}, weights_only=False)\n"
        "m = build_model(Config.from_dict(d['config']))\n"
        "m.load_state_dict(d['student'])\n"
        "teacher_encoder(m, d['teacher'], 'export')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_nonfinite_loss_skips_then_stops(runs):
    root, recs = runs
    for r in recs:  # both ranks skipped the same step (rank 0's loss was finite)
        assert r["nan"]["steps"] == STEPS and r["nan"]["skipped"] == 1
        assert r["nan"]["summary_skipped"] == 1
        assert r["nan"]["stopped_at"] == 1, r["nan"]
        assert "3 non-finite losses in a row" in r["nan"]["error"]
        assert "engine.max_nonfinite_steps=3" in r["nan"]["error"]
    rows = read_metrics(root / "nan1" / "metrics.csv")
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([x["loss"] for x in rows])))


@pytest.mark.parametrize("stage", NAN_ACCUM_STAGES)
@pytest.mark.parametrize("case", NAN_ACCUM_CASES)
def test_nonfinite_micro_batch_drops_the_whole_accumulated_step(runs, stage, case):
    """grad_accum_steps=2, a NaN in step 2's last micro-batch or in all of them (on either rank): the
    step is skipped whole (student and optimizer state unchanged), counted once, its batches consumed,
    and training goes on finite."""
    root, recs = runs
    for rank, rec in enumerate(recs):
        r = rec["nan_accum"][(stage, case)]
        assert r["steps"] == NAN_ACCUM_STEPS and r["skipped"] == 1 and r["summary_skipped"] == 1, r
        assert r["skips"] == [{"param_err": 0.0, "state_same": True}], r
        assert r["batches"] == r["data_position"] == (NAN_ACCUM_STEPS + 1) * 2, r
        assert r["params_finite"], r
        assert len(r["warned"]) == 1, r
    # the warning shows the bad micro-batch's loss: rank 1's last one, rank 0's first one
    assert math.isnan(recs[1 if case == "last" else 0]["nan_accum"][(stage, case)]["warned"][0])
    rows = read_metrics(root / f"nanacc{stage}{case}" / "metrics.csv")
    assert [x["step"] for x in rows] == list(range(1, NAN_ACCUM_STEPS + 1))
    assert all(math.isfinite(x["loss"]) for x in rows)


def test_nonfinite_windows_in_a_row_stop_with_the_right_counts(runs):
    for rec in runs[1]:
        msg, step, skipped = rec["nan_accum"]["stop"]
        assert step == 1 and skipped == 2, rec["nan_accum"]["stop"]
        assert "2 non-finite losses in a row at step 2" in msg and "2 steps skipped in all" in msg, msg


def _one_rank_resume(rank, port, root):
    rank_env(0, 1, port, D2V_DEEPSPEED_SHM="0")
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    root, rec = Path(root), {}
    longer = {"train.max_steps": STEPS + 2, "train.allow_schedule_change": True}  # the lr jump is accepted
    try:
        Trainer(_cfg(root / "z1" / "a", 1, **longer), resume=True, progress=False)
    except ValueError as e:
        rec["z1_error"] = str(e)
    tr = Trainer(_cfg(root / "z0" / "a", 0, **longer), resume=True, progress=False)
    rec["resumed_at"] = tr.step
    rec["teacher_err"] = max((v - tr.teacher.state_dict()[k]).abs().max().item()
                             for k, v in torch.load(root / "z0" / "full_a.pt")["teacher"].items())
    tr.train()
    rec["steps"] = tr.step
    torch.save(rec, root / "one_rank.pt")


def test_zero0_resumes_on_another_world_size_others_refuse(runs):
    import torch.multiprocessing as mp

    root, _ = runs
    mp.spawn(_one_rank_resume, args=(free_port(), str(root)), nprocs=1)
    rec = torch.load(root / "one_rank.pt")
    assert "saved by 2 ranks under ZeRO-1" in rec["z1_error"] and "resumes on 2 ranks only" in rec["z1_error"]
    assert rec["resumed_at"] == STEPS and rec["teacher_err"] == 0.0 and rec["steps"] == STEPS + 2
    rows = read_metrics(root / "z0" / "a" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 3))
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))


def test_killed_mid_checkpoint_keeps_latest_complete(runs):
    _, recs = runs
    for r in recs:
        k = r["killed_save"]
        assert k["latest"] == "step_00000004", k  # the half-written step 8 never became latest
        assert k["partial"] == [".step_00000008.tmp-ds"], k
        assert k["resumed_at"] == 4 and k["final"] == f"step_{STEPS:08d}", k


def _gpu_worker(rank, port, root):
    rank_env(0, 1, port, D2V_DEEPSPEED_SHM="0")
    from d2v.trainer import Trainer

    root, rec = Path(root), {}
    for stage in (0, 3):
        cfg = _cfg(root / f"gpu{stage}", stage, **{"train.precision": "bf16", "engine.grad_accum_steps": 2,
                                                    "train.max_steps": 4, "train.log_every": 1})
        tr = Trainer(cfg, progress=False)
        poison_loss(tr, lambda call, r: call == 3)  # step 2's first micro-batch: the skip path's collectives
        summary = tr.train()
        rec[stage] = {"backend": torch.distributed.get_backend(), "device": tr.device.type, "steps": tr.step,
                      "skipped": summary["skipped_steps"]}
    torch.save(rec, root / "gpu.pt")


@pytest.mark.gpu
def test_gpu_nccl_bf16_logs_every_step(tmp_path):
    """One process on NCCL (CUDA tensors only): the per-step metric all-reduce, the per-optimizer-step
    finiteness all-reduce, a skipped step and the checkpoint's object broadcasts, ZeRO-0 and ZeRO-3."""
    import torch.multiprocessing as mp

    mp.spawn(_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    rec = torch.load(tmp_path / "gpu.pt")
    for stage in (0, 3):
        assert rec[stage] == {"backend": "nccl", "device": "cuda", "steps": 4, "skipped": 1}, rec
        rows = read_metrics(tmp_path / f"gpu{stage}" / "metrics.csv")
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
