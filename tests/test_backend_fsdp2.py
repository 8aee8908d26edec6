"""The FSDP2 backend (engine.name=fsdp2) with 2 ranks on gloo, spawned inside pytest, micro image
model: student, teacher and optimizer state sharded; the loss falls; the EMA teacher equals the EMA of
the gathered student; exact resume after a crash (bitwise: student, teacher, optimizer state, the rest
of the losses); a non-finite loss on one rank skips the step on both; engine.max_nonfinite_steps stops
the run; `d2v export` consolidates the distributed checkpoint in one process; torchrun starts
`d2v pretrain engine.name=fsdp2`.

Run: .venv/bin/python -m pytest -q tests/test_backend_fsdp2.py
"""
import math
import os
import shutil
import subprocess
import sys
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
        "engine.name": "fsdp2", "train.batch_size": 4, "train.ckpt_every": 4, "optim.lr": 3e-3,
        "ema.ema_start": 0.9, "ema.ema_end": 0.99, **extra}))


def _full(t: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor: the whole tensor on every rank."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _weights(tr) -> dict:
    """Collective: the gathered student, teacher and optimizer state."""
    sd = {f"student.{k}": _full(v) for k, v in tr.model.state_dict().items()}
    sd.update({f"teacher.{k}": _full(v) for k, v in tr.teacher.module.state_dict().items()})
    for i, st in enumerate(tr.optimizer.state.values()):
        sd.update({f"optim.{i}.{k}": _full(v) for k, v in sorted(st.items()) if torch.is_tensor(v)})
    return sd


def _track_ema(tr, rec):
    """Wrap the teacher update: after each, the expected teacher from the gathered student."""
    ref = {k: _full(v) for k, v in tr.teacher.module.state_dict().items()}
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    orig = tr.teacher.update

    def update(step):
        d = orig(step)
        student = {k: _full(v) for k, v in tr.model.state_dict().items()}
        for n in ref:
            ref[n] = d * ref[n] + (1 - d) * student[n] if n in trainable else student[n].clone()
        return d

    tr.teacher.update = update
    return ref


def _worker(rank, port, root):
    rank_env(rank, WORLD, port, D2V_CACHE=os.environ["D2V_CACHE"])
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    root, rec = Path(root), {}
    tr = Trainer(_cfg(root / "a"), progress=False)
    rec["banner"] = tr.banner()
    rec["sharded"] = all(type(p).__name__ == "DTensor" for p in tr.model.parameters())
    rec["local_numel"] = sum(p.to_local().numel() for p in tr.model.parameters())
    rec["full_numel"] = sum(p.numel() for p in tr.model.parameters())
    ref = _track_ema(tr, rec)
    tr.train()
    rec["a"] = _weights(tr)
    teacher = {k[len("teacher."):]: v for k, v in rec["a"].items() if k.startswith("teacher.")}
    rec["ema_err"] = max((teacher[n] - ref[n]).abs().max().item() for n in ref)
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
    w = _weights(tn)
    rec["nan1"] = {"skipped": summary["skipped_steps"], "steps": tn.step, "position": tn.data_position(),
                   "finite": all(bool(v.isfinite().all()) for v in w.values())}
    ts = Trainer(_cfg(root / "nan2", **{"engine.max_nonfinite_steps": 3}), progress=False)
    poison_loss(ts, lambda call, r: call >= 2 and r == 0)
    try:
        ts.train()
        rec["nan2"] = None
    except FloatingPointError as e:
        rec["nan2"] = (str(e), ts.step, ts.skipped_steps)
    tg = Trainer(_cfg(root / "accum", **{"engine.grad_accum_steps": 2, "train.max_steps": 3}), progress=False)
    summary = tg.train()
    rec["accum"] = {"steps": tg.step, "position": tg.data_position(), "loss": summary["final"]["loss"]}
    torch.save(rec, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=WORLD)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def _differ(a: dict, b: dict) -> list:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_sharded_training_and_the_ema_of_the_gathered_student(runs):
    root, recs = runs
    r = recs[0]
    assert "FSDP2 (fully_shard per block) on 2 rank(s) (gloo)" in r["banner"]
    assert r["sharded"] and r["local_numel"] < 0.6 * r["full_numel"], "each rank holds about half"
    assert r["ema_err"] < 1e-6, r["ema_err"]
    assert not _differ(recs[0]["a"], recs[1]["a"]), "gathered state differs between ranks"
    rows = read_metrics(root / "a" / "metrics.csv")
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x["loss"]) for x in rows) and rows[-1]["loss"] < rows[0]["loss"]


def test_crash_and_resume_is_bitwise(runs):
    root, recs = runs
    for r in recs:
        assert r["resumed_at"] == 4
        assert not _differ(r["a"], r["b"]), _differ(r["a"], r["b"])[:5]
    a, b = read_metrics(root / "a" / "metrics.csv"), read_metrics(root / "b" / "metrics.csv")
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    state, _, ck = load_checkpoint(root / "b")
    assert state["engine"] == "fsdp2" and state["world_size"] == 2 and (ck / "dcp" / ".metadata").is_file()


def test_nonfinite_loss_on_one_rank_skips_the_step_on_both(runs):
    _, recs = runs
    for r in recs:
        n = r["nan1"]
        assert n["skipped"] == 1 and n["steps"] == STEPS and n["finite"] and n["position"] == STEPS + 1
        msg, step, skipped = r["nan2"]
        assert "3 non-finite losses in a row" in msg and step == 1 and skipped == 3
        assert r["accum"]["steps"] == 3 and r["accum"]["position"] == 6 and math.isfinite(r["accum"]["loss"])


def test_export_consolidates_the_distributed_checkpoint(runs, tmp_path):
    """`d2v export` in one process (no process group) writes the gathered student and teacher."""
    from d2v.cli import main

    root, recs = runs
    out = tmp_path / "export.pt"
    assert main(["export", "--checkpoint", str(root / "a"), "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=False)
    full = recs[0]["a"]
    for n, v in exported["student"].items():
        assert torch.equal(v, full[f"student.{n}"]), n
    for n, v in exported["teacher"].items():
        assert torch.equal(v, full[f"teacher.{n}"]), n


def test_layerdrop_is_refused(tmp_path):
    from d2v.config import ConfigError
    from d2v.trainer import Trainer

    with pytest.raises(ConfigError, match="model.layerdrop=0.1: the fsdp2 backend needs every rank"):
        Trainer(_cfg(tmp_path / "run", **{"model.layerdrop": 0.1}), progress=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_torchrun_starts_two_fsdp2_ranks(tmp_path):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert exe, "torchrun is not installed next to this python"
    out = tmp_path / "run"
    cmd = [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "d2v", "pretrain",
           "--config", str(TINY), *micro_overrides(out, 4, **{"engine.name": "fsdp2", "train.batch_size": 4}),
           "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert log.count("d2v pretrain |") == 1 and "FSDP2 (fully_shard per block) on 2 rank(s)" in log
    state, _, ck = load_checkpoint(out)
    assert state["engine"] == "fsdp2" and ck.name == "step_00000004"


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
