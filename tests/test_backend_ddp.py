"""The DDP backend (engine.name=ddp) with 2 ranks on gloo, spawned inside pytest, micro image model:
the ranks stay identical (DDP averages the gradients), exact resume after a crash (bitwise: student,
teacher, optimizer state, the rest of the losses), a non-finite loss on one rank skips the step on
both, engine.max_nonfinite_steps stops the run, gradient accumulation, cross-resume with the single
backend; and torchrun starting `d2v pretrain engine.name=ddp`.

Run: .venv/bin/python -m pytest -q tests/test_backend_ddp.py
"""
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2v.checkpoint import load_checkpoint
from d2v.metrics import read_metrics
from tests.utils import Crash, crash_after_update, free_port, micro_overrides, poison_loss, rank_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_image.yaml"
STEPS = 8
WORLD = 2


def _cfg(out, **extra):
    from d2v.config import load_config

    return load_config(TINY, micro_overrides(out, STEPS, **{
        "engine.name": "ddp", "train.batch_size": 4, "train.ckpt_every": 4, "optim.lr": 3e-3,
        "ema.ema_start": 0.9, "ema.ema_end": 0.99, **extra}))


def _weights(tr) -> dict:
    sd = {f"student.{k}": v.detach().clone() for k, v in tr.model.state_dict().items()}
    sd.update({f"teacher.{k}": v.detach().clone() for k, v in tr.teacher.state_dict().items()})
    for i, st in enumerate(tr.optimizer.state.values()):
        sd.update({f"optim.{i}.{k}": v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    return sd


def _worker(rank, port, root):
    rank_env(rank, WORLD, port, D2V_CACHE=os.environ["D2V_CACHE"])
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    root, rec = Path(root), {}
    # the whole run
    tr = Trainer(_cfg(root / "a"), progress=False)
    rec["banner"] = tr.banner()
    tr.train()
    rec["a"] = _weights(tr)
    # crash after step 6 (checkpoint at 4), resume: the same end state, bit for bit
    tb = Trainer(_cfg(root / "b"), progress=False)
    crash_after_update(tb, 6)
    try:
        tb.train()
    except Crash:
        pass
    tc = Trainer(_cfg(root / "b"), resume=True, progress=False)
    rec["resumed_at"] = tc.step
    tc.train()
    rec["b"] = _weights(tc)
    # a NaN on rank 1 only, at the third step: that step is skipped on both ranks
    tn = Trainer(_cfg(root / "nan1"), progress=False)
    poison_loss(tn, lambda call, r: call == 3 and r == 1)
    summary = tn.train()
    rec["nan1"] = {"skipped": summary["skipped_steps"], "steps": tn.step,
                   "finite": all(bool(v.isfinite().all()) for v in _weights(tn).values()),
                   "position": tn.data_position(), "w": _weights(tn)}
    # diverged for good on rank 0: stops after engine.max_nonfinite_steps skips in a row
    ts = Trainer(_cfg(root / "nan2", **{"engine.max_nonfinite_steps": 3}), progress=False)
    poison_loss(ts, lambda call, r: call >= 2 and r == 0)
    try:
        ts.train()
        rec["nan2"] = None
    except FloatingPointError as e:
        rec["nan2"] = (str(e), ts.step, ts.skipped_steps)
    # gradient accumulation: 2 micro-batches per step
    tg = Trainer(_cfg(root / "accum", **{"engine.grad_accum_steps": 2, "train.max_steps": 3}), progress=False)
    summary = tg.train()
    rec["accum"] = {"steps": tg.step, "position": tg.data_position(), "w": _weights(tg),
                    "loss": summary["final"]["loss"]}
    torch.save(rec, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=WORLD)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def _equal(a: dict, b: dict) -> list:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_ranks_stay_identical_and_the_loss_falls(runs):
    root, recs = runs
    assert "DDP on 2 rank(s) (gloo)" in recs[0]["banner"]
    for key in ("a", "b", "accum"):
        w0, w1 = recs[0][key] if key != "accum" else recs[0]["accum"]["w"], \
            recs[1][key] if key != "accum" else recs[1]["accum"]["w"]
        assert not _equal(w0, w1), f"{key}: ranks differ in {_equal(w0, w1)[:5]}"
    rows = read_metrics(root / "a" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_crash_and_resume_is_bitwise(runs):
    root, recs = runs
    for r in recs:
        assert r["resumed_at"] == 4
        assert not _equal(r["a"], r["b"]), _equal(r["a"], r["b"])[:5]
    a, b = read_metrics(root / "a" / "metrics.csv"), read_metrics(root / "b" / "metrics.csv")
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    state, _, ck = load_checkpoint(root / "b")
    assert state["engine"] == "ddp" and state["world_size"] == 2
    assert sorted(p.name for p in ck.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_nonfinite_loss_on_one_rank_skips_the_step_on_both(runs):
    _, recs = runs
    for r in recs:
        n = r["nan1"]
        assert n["skipped"] == 1 and n["steps"] == STEPS and n["finite"]
        assert n["position"] == STEPS + 1, "the skipped step's batches count as consumed"
    assert not _equal(recs[0]["nan1"]["w"], recs[1]["nan1"]["w"])
    for r in recs:
        msg, step, skipped = r["nan2"]
        assert "3 non-finite losses in a row" in msg and "engine.max_nonfinite_steps=3" in msg
        assert step == 1 and skipped == 3


def test_gradient_accumulation(runs):
    _, recs = runs
    for r in recs:
        assert r["accum"]["steps"] == 3 and r["accum"]["position"] == 6 and math.isfinite(r["accum"]["loss"])


def _single_worker(rank, port, root, resume):
    rank_env(0, 1, port)
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    more = {"train.max_steps": 10, "train.allow_schedule_change": True} if resume else {}
    tr = Trainer(_cfg(Path(root) / "one", **{"train.num_threads": 1, **more}), resume=resume, progress=False)
    tr.train()
    torch.save(_weights(tr), Path(root) / f"one_{int(resume)}.pt")


def test_one_rank_ddp_equals_the_single_backend_and_they_resume_each_other(tmp_path):
    """DDP on one rank computes what the single backend computes (same init, batches, noise, AdamW); a
    single-backend checkpoint resumes under DDP and the DDP one under the single backend."""
    import torch.multiprocessing as mp

    from d2v.trainer import Trainer

    threads = torch.get_num_threads()
    try:  # one thread, as in the spawned rank: the same reduction order in every matmul
        single = Trainer(_cfg(tmp_path / "s", **{"engine.name": "single", "train.num_threads": 1}),
                         progress=False)
        single.train()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_single_worker, args=(free_port(), str(tmp_path), False), nprocs=1)
    ddp = torch.load(tmp_path / "one_0.pt")
    ref = _weights(single)
    assert ddp.keys() == ref.keys()
    worst = max((ddp[k].float() - ref[k].float()).abs().max().item() for k in ref)
    assert worst == 0.0, f"1-rank DDP differs from the single backend by {worst}"
    # the DDP checkpoint resumes in one process (engine.name=single), the single one under DDP
    more = {"engine.name": "single", "train.max_steps": 10, "train.allow_schedule_change": True,
            "train.num_threads": 1}
    try:
        tr = Trainer(_cfg(tmp_path / "one", **more), resume=True, progress=False)
        assert tr.step == STEPS
        tr.train()
    finally:
        torch.set_num_threads(threads)
    assert tr.step == 10
    shutil.rmtree(tmp_path / "one")
    shutil.copytree(tmp_path / "s", tmp_path / "one")
    mp.spawn(_single_worker, args=(free_port(), str(tmp_path), True), nprocs=1)
    assert read_metrics(tmp_path / "one" / "metrics.csv")[-1]["step"] == 10


@pytest.mark.slow
def test_torchrun_starts_two_ddp_ranks(tmp_path):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert exe, "torchrun is not installed next to this python"
    out = tmp_path / "run"
    cmd = [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "d2v", "pretrain",
           "--config", str(TINY), *micro_overrides(out, 4, **{"engine.name": "ddp", "train.batch_size": 4}),
           "--no-probe", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert log.count("d2v pretrain |") == 1 and "DDP on 2 rank(s) (gloo)" in log
    assert log.count("\ndone: 4 steps") == 1
    state, _, ck = load_checkpoint(out)
    assert state["engine"] == "ddp" and state["world_size"] == 2 and ck.name == "step_00000004"


def _gpu_worker(rank, port, root):
    rank_env(0, 1, port)
    from d2v.trainer import Trainer

    cfg = _cfg(Path(root) / "gpu", **{"train.precision": "bf16", "engine.grad_accum_steps": 2,
                                      "train.max_steps": 4, "train.log_every": 1})
    tr = Trainer(cfg, progress=False)
    poison_loss(tr, lambda call, r: call == 3)  # step 2's first micro-batch: the skip path's collectives
    summary = tr.train()
    torch.save({"backend": torch.distributed.get_backend(), "device": tr.device.type, "steps": tr.step,
                "skipped": summary["skipped_steps"]}, Path(root) / "gpu.pt")


@pytest.mark.gpu
def test_gpu_nccl_bf16_with_a_skipped_step(tmp_path):
    """One process on NCCL (CUDA tensors only): the flag all-reduce, the metric all-reduce, a skipped
    step and the collective checkpoint write."""
    import torch.multiprocessing as mp

    mp.spawn(_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    rec = torch.load(tmp_path / "gpu.pt")
    assert rec == {"backend": "nccl", "device": "cuda", "steps": 4, "skipped": 1}, rec
    rows = read_metrics(tmp_path / "gpu" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)


def _full_disk_worker(rank, port, root):
    rank_env(rank, WORLD, port, D2V_CACHE=os.environ["D2V_CACHE"])
    torch.set_num_threads(1)
    import errno

    import d2v.backends.ddp as ddp
    from d2v.checkpoint import CheckpointWriteError
    from d2v.trainer import Trainer

    write = ddp.write_rank_file

    def full_disk_on_rank1_at_step4(tmp, r, obj):
        if r == 1 and ".step_00000004" in str(tmp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(tmp, r, obj)

    ddp.write_rank_file = full_disk_on_rank1_at_step4
    tr = Trainer(_cfg(Path(root) / "full", **{"train.max_steps": 4, "train.ckpt_every": 2}), progress=False)
    t0 = time.monotonic()
    try:
        tr.train()
        rec = {"error": None}
    except CheckpointWriteError as e:
        rec = {"error": str(e), "s": time.monotonic() - t0}
    torch.save(rec, Path(root) / f"full{rank}.pt")


def test_a_rank_that_cannot_write_its_part_stops_every_rank_at_once(tmp_path):
    """Rank 1 hits a full disk writing its part of checkpoint 4: both ranks raise CheckpointWriteError
    right away (no wait for the process-group timeout), the temp folder is gone, `latest` is step 2."""
    import torch.multiprocessing as mp

    from d2v.checkpoint import resolve_checkpoint

    mp.spawn(_full_disk_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"full{r}.pt") for r in range(WORLD))
    assert r1["error"] and "disk full" in r1["error"], r1
    assert r0["error"] and "another rank could not write its part" in r0["error"], r0
    assert r0["s"] < 60, f"rank 0 waited {r0['s']:.0f} s (the process-group timeout is 10 min)"
    assert resolve_checkpoint(tmp_path / "full").name == "step_00000002"
    assert not list((tmp_path / "full" / "checkpoints").glob(".step_*")), "the temp folder is removed"
