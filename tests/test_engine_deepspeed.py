"""The DeepSpeed engine with 2 ranks on gloo (spawned inside pytest), ZeRO stages 0-3, micro image model:
finite decreasing loss, the same losses under every stage, the EMA teacher equal to the EMA of the
consolidated student weights with no communication in the update, save -> crash -> resume equality.

All stages run in one spawned pair of processes (one process group; ~7 s start-up paid once); the
tests below read what each rank recorded.

Run: .venv/bin/python -m pytest -q tests/test_engine_deepspeed.py
"""
import os
import socket
from pathlib import Path

import pytest
import torch

from d2v.metrics import read_metrics
from tests.conftest import micro_overrides

deepspeed = pytest.importorskip("deepspeed")

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_image.yaml"
STAGES = (0, 1, 2, 3)
STEPS = 8
WORLD = 2


class Crash(RuntimeError):
    pass


# bf16 + gradient accumulation + activation checkpointing, on the stages with distinct teacher paths
# (ZeRO-3 also with the optimizer offloaded)
FEATURES = {"train.precision": "bf16", "engine.grad_accum_steps": 2, "engine.activation_checkpointing": True}
FEATURE_STAGES = (2, 3)


def _cfg(out, stage, **extra):
    from d2v.config import load_config

    return load_config(TINY, micro_overrides(out, STEPS, **{
        "engine.name": "deepspeed", "engine.zero_stage": stage, "train.batch_size": 4,
        "train.ckpt_every": 4, "optim.lr": 3e-3, "ema.ema_start": 0.9, "ema.ema_end": 0.99, **extra}))


def _full_student(tr, stage):
    """Collective under ZeRO-3: the consolidated student, by name, as the teacher's source: the fp32
    master weights under ZeRO-3, the (replicated) module weights under ZeRO 0-2."""
    named = list(tr.model.named_parameters())
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


def _full_teacher(tr, stage):
    sd = tr.teacher.full_state_dict() if stage == 3 else tr.teacher.state_dict()
    return {n: sd[n].detach().float().clone() for n in tr.teacher.names}


_COLLECTIVES = ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor")


def _track_ema(tr, stage, record):
    """Wrap teacher.update: count collectives inside it, and advance a reference EMA computed from
    the consolidated student (gathered here, in the test only)."""
    ref = _full_teacher(tr, stage)
    orig, dist = tr.teacher.update, torch.distributed
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}

    def update(step):
        calls, saved = [], {k: getattr(dist, k) for k in _COLLECTIVES}
        for k in _COLLECTIVES:
            setattr(dist, k, lambda *a, _k=k, **kw: (calls.append(_k), saved[_k](*a, **kw))[1])
        try:
            d = orig(step)
        finally:
            for k, f in saved.items():
                setattr(dist, k, f)
        record["update_collectives"] += len(calls)
        s = _full_student(tr, stage)
        for n in ref:
            ref[n] = d * ref[n] + (1 - d) * s[n] if n in trainable else s[n].clone()
        return d

    tr.teacher.update = update
    return ref


def _worker(rank, port, root):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), D2V_DEEPSPEED_SHM="0", D2V_CACHE=os.environ["D2V_CACHE"])
    torch.set_num_threads(1)
    from d2v.engine import DeepSpeedTrainer

    root = Path(root)
    out = {}
    for stage in STAGES:
        rec = {"update_collectives": 0}
        # full run, with the reference EMA
        tr = DeepSpeedTrainer(_cfg(root / f"z{stage}" / "a", stage), progress=False)
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
        tb = DeepSpeedTrainer(cfg_b, progress=False)
        orig = tb.teacher.update

        def crash(step, _orig=orig):
            d = _orig(step)
            if step == 6:
                raise Crash("simulated crash")
            return d

        tb.teacher.update = crash
        try:
            tb.train()
        except Crash:
            pass
        tc = DeepSpeedTrainer(cfg_b, resume=True, progress=False)
        rec["resumed_at"] = tc.step
        tc.train()
        sc, tcs = _full_student(tc, stage), _full_teacher(tc, stage)
        rec["resume_student_err"] = max((sc[n] - student_a[n]).abs().max().item() for n in sc)
        rec["resume_teacher_err"] = max((tcs[n] - teacher_a[n]).abs().max().item() for n in tcs)
        out[stage] = rec
    for stage in FEATURE_STAGES:
        rec = {"update_collectives": 0}
        extra = {"engine.offload_optimizer": True} if stage == 3 else {}  # optimizer step on the CPU
        tr = DeepSpeedTrainer(_cfg(root / f"f{stage}", stage, **FEATURES, **extra), progress=False)
        ref = _track_ema(tr, stage, rec)
        tr.train()
        teacher = _full_teacher(tr, stage)
        rec["ema_max_err"] = max((teacher[n] - ref[n]).abs().max().item() for n in ref)
        out[f"f{stage}"] = rec
    out["nan"] = _nan_runs(DeepSpeedTrainer, root, rank)
    out["killed_save"] = _killed_mid_checkpoint(DeepSpeedTrainer, root)
    torch.save(out, root / f"rank{rank}.pt")


def _poison(tr, when):
    """Make the loss NaN on the calls `when(call_index, rank)` selects (the other rank stays finite)."""
    fwd, calls = tr.model.forward, [0]

    def forward(*a, **kw):
        out = fwd(*a, **kw)
        calls[0] += 1
        if when(calls[0], tr.rank):
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    tr.model.forward = forward


def _killed_mid_checkpoint(trainer_cls, root):
    """Every rank dies after DeepSpeed wrote its part of the step-8 checkpoint, before state.pt."""
    from d2v.checkpoint import resolve_checkpoint

    cfg = _cfg(root / "killed", 1)
    tr = trainer_cls(cfg, progress=False)
    save = tr.engine.save_checkpoint

    def save_then_die(path, *a, **kw):
        save(path, *a, **kw)
        if tr.step == STEPS:
            raise Crash("killed mid-checkpoint")

    tr.engine.save_checkpoint = save_then_die
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
    _poison(tr, lambda call, r: call == 3 and r == 1)  # one bad batch, on rank 1 only
    tr.train()
    rec["steps"], rec["skipped"] = tr.step, tr.skipped_steps
    tr = trainer_cls(_cfg(root / "nan2", 2, **{"engine.max_nonfinite_steps": 3}), progress=False)
    _poison(tr, lambda call, r: call >= 2 and r == 0)  # diverged for good on rank 0
    try:
        tr.train()
        rec["error"] = None
    except FloatingPointError as e:
        rec["error"], rec["stopped_at"] = str(e), tr.step
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ds")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(root)), nprocs=WORLD)
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
        assert r["update_collectives"] == 0, "the EMA update must not communicate (no gather)"
        assert r["teacher_whole"] == 0, "ZeRO-3: the teacher's gathered parameters must be released"


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
    for r in recs:
        assert r[f"f{stage}"]["ema_max_err"] < 1e-6, r[f"f{stage}"]
        assert r[f"f{stage}"]["update_collectives"] == 0


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
        "from d2v.registry import build_model\n"
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
        assert r["nan"]["stopped_at"] == 1, r["nan"]
        assert "3 non-finite losses in a row" in r["nan"]["error"]
        assert "engine.max_nonfinite_steps=3" in r["nan"]["error"]
    rows = read_metrics(root / "nan1" / "metrics.csv")
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([x["loss"] for x in rows])))


def _one_rank_resume(rank, port, root):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), D2V_DEEPSPEED_SHM="0")
    torch.set_num_threads(1)
    from d2v.engine import DeepSpeedTrainer

    root, rec = Path(root), {}
    try:
        DeepSpeedTrainer(_cfg(root / "z1" / "a", 1, **{"train.max_steps": STEPS + 2}), resume=True,
                         progress=False)
    except ValueError as e:
        rec["z1_error"] = str(e)
    tr = DeepSpeedTrainer(_cfg(root / "z0" / "a", 0, **{"train.max_steps": STEPS + 2}), resume=True,
                          progress=False)
    rec["resumed_at"] = tr.step
    rec["teacher_err"] = max((v - tr.teacher.state_dict()[k]).abs().max().item()
                             for k, v in torch.load(root / "z0" / "full_a.pt")["teacher"].items())
    tr.train()
    rec["steps"] = tr.step
    torch.save(rec, root / "one_rank.pt")


def test_zero0_resumes_on_another_world_size_others_refuse(runs):
    import torch.multiprocessing as mp

    root, _ = runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_one_rank_resume, args=(port, str(root)), nprocs=1)
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
