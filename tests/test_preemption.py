"""Preemption and faults, end to end with real processes:

- SIGTERM (what Slurm and Kubernetes send) and SIGINT (Ctrl-C) sent to the whole process group (the
  main process and its DataLoader worker) finish the current step, write a checkpoint at that step and
  exit with EXIT_STOPPED (75); --resume continues from exactly there;
- two DeepSpeed ranks (gloo) where only one rank gets the SIGTERM: both stop after the same step, one
  checkpoint holds both ranks' state;
- one rank hung (SIGSTOPped): the other fails within engine.timeout_minutes instead of waiting forever;
  after the hung rank is killed, the run resumes from its last checkpoint on 2 ranks;
- train.ckpt_every_minutes checkpoints between train.ckpt_every steps; a longer train.max_steps on
  resume is refused unless train.allow_schedule_change (the lr would jump).

Run: .venv/bin/python -m pytest -q tests/test_preemption.py
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2v.checkpoint import complete_checkpoints, load_checkpoint
from d2v.metrics import read_metrics
from d2v.preempt import EXIT_STOPPED
from tests.utils import free_port, micro_overrides

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_image.yaml")
LONG = 100_000  # max_steps no test reaches: the runs end by signal


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", D2V_DEEPSPEED_SHM="0")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _start(out: Path, *extra, env=None, log_name="log.txt", **overrides) -> subprocess.Popen:
    args = micro_overrides(out, LONG, **{"train.ckpt_every": 1000, "ema.anneal_end_step": 50, **overrides})
    log = open(out.parent / log_name, "a")
    cmd = [sys.executable, "-m", "d2v", "pretrain", "--config", TINY, *args, "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_rows(out: Path, n: int, procs, timeout=180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        csv = out / "metrics.csv"
        if csv.is_file() and len(read_metrics(csv)) >= n:
            return
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"a process ended early (rc {[p.returncode for p in dead]})"
        time.sleep(0.2)
    raise AssertionError(f"no {n} logged steps within {timeout} s")


def _log(out: Path, name="log.txt") -> str:
    return (out.parent / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, sig):
    out = tmp_path / "run"
    p = _start(out, **{"data.num_workers": 1})  # the worker gets the signal too (the whole group)
    _wait_for_rows(out, 3, [p])
    os.killpg(p.pid, sig)
    rc = p.wait(timeout=120)
    log = _log(out)
    assert rc == EXIT_STOPPED, log[-3000:]
    assert f"{sig.name} received: finishing the current step" in log
    assert "Traceback" not in log, log[-3000:]
    state, _, ck = load_checkpoint(out)
    stopped = state["step"]
    assert stopped >= 3 and ck.name == f"step_{stopped:08d}"
    assert f"stopped by {sig.name} at step {stopped} after writing {ck}" in log
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == list(range(1, stopped + 1))
    assert not list((out / "checkpoints").glob(".step_*")), "no temp folder left behind"

    p = _start(out, "--resume", **{"data.num_workers": 1})  # the same command + --resume: from there
    _wait_for_rows(out, stopped + 2, [p])
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == EXIT_STOPPED
    log = _log(out)
    assert f"steps {stopped}->{LONG}" in log and f"resumed from {ck}" in log
    steps = [r["step"] for r in read_metrics(out / "metrics.csv")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= stopped + 2


def _start_ranks(out: Path, *extra, **overrides) -> list:
    """Two ranks started the way srun/torchrun start them (RANK, WORLD_SIZE, ... in the environment)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(_start(out, *extra, env=env, log_name=f"rank{rank}.txt",
                            **{"engine.name": "deepspeed", "train.batch_size": 4, **overrides}))
    return procs


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_gets_sigterm(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    procs = _start_ranks(out)
    try:
        _wait_for_rows(out, 3, procs)
        os.kill(procs[1].pid, signal.SIGTERM)  # only rank 1: the agreement must carry it to rank 0
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        _end(procs)
    logs = [_log(out, f"rank{r}.txt") for r in (0, 1)]
    assert rcs == [EXIT_STOPPED, EXIT_STOPPED], [t[-2000:] for t in logs]
    state, _, ck = load_checkpoint(out)
    assert state["world_size"] == 2 and state["step"] >= 3
    assert sorted(p.name for p in ck.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert f"stopped by a signal to another rank at step {state['step']}" in logs[0]
    assert read_metrics(out / "metrics.csv")[-1]["step"] == state["step"]


@pytest.mark.slow
def test_hung_rank_ends_the_run_within_the_timeout_then_it_resumes(tmp_path):
    """A SIGSTOPped rank keeps its sockets open (gloo sees no closed connection): only the process
    group's timeout (engine.timeout_minutes, 0.1 min here) ends the other rank's wait."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    procs = _start_ranks(out, **{"train.ckpt_every": 3, "engine.timeout_minutes": 0.1})
    try:
        _wait_for_rows(out, 4, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        rc0 = procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        _end(procs)
    assert rc0 == 69, f"rank 0 must fail once its peer stops answering (rc {rc0})"
    log0 = _log(out, "rank0.txt")
    assert "error: another rank died or stopped answering" in log0 and "Traceback" not in log0, log0[-3000:]
    assert "Traceback" in (out / "train.log").read_text(), "the traceback is kept in train.log"
    assert waited < 6 + 60, f"rank 0 waited {waited:.0f} s for a hung peer (timeout 6 s + start-up slack)"
    done = complete_checkpoints(out / "checkpoints")
    assert done, "a checkpoint was written before the hang"
    last = int(done[-1].name.split("_")[1])

    # a resume may change the timeout (it also bounds the start-up rendezvous: 6 s is short for a busy
    # machine's imports)
    # rank 0 may have logged steps past the checkpoint before the hang: the resume rewinds metrics.csv to
    # `last` rows, so more rows than the file holds now can only come from the resumed run (a signal
    # sent before its handlers are installed would kill rank 0 and leave rank 1 waiting for it)
    before = len(read_metrics(out / "metrics.csv"))
    procs = _start_ranks(out, "--resume", **{"train.ckpt_every": 3, "engine.timeout_minutes": 3})
    try:
        _wait_for_rows(out, max(last + 2, before + 1), procs)
        os.kill(procs[0].pid, signal.SIGTERM)
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        _end(procs)
    log0 = _log(out, "rank0.txt")
    assert rcs == [EXIT_STOPPED, EXIT_STOPPED], log0[-3000:]
    assert f"resumed from {done[-1]}" in log0
    steps = [r["step"] for r in read_metrics(out / "metrics.csv")]
    assert steps == list(range(1, len(steps) + 1)), "metrics rewound to the checkpoint, no step twice"


def _run(tmp_path, *overrides, resume=None):
    from d2v.config import load_config
    from d2v.trainer import Trainer

    cfg = load_config(TINY, micro_overrides(tmp_path / "run", **dict(o.split("=", 1) for o in overrides)))
    return Trainer(cfg, resume=resume, progress=False)


def test_ckpt_every_minutes_checkpoints_between_step_checkpoints(tmp_path):
    tr = _run(tmp_path, "train.max_steps=4", "train.ckpt_every=100", "train.keep_last=10",
              "train.ckpt_every_minutes=1e-6")
    tr.train()
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [
        f"step_{s:08d}" for s in (1, 2, 3, 4)]
    tr = _run(tmp_path / "b", "train.max_steps=4", "train.ckpt_every=100", "train.keep_last=10")
    tr.train()  # without the key: the final checkpoint only
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "run" / "checkpoints")] == ["step_00000004"]


def test_longer_schedule_on_resume_is_refused_unless_allowed(tmp_path):
    from d2v.config import ConfigError

    _run(tmp_path, "train.max_steps=4").train()
    with pytest.raises(ConfigError, match=r"train.max_steps 4 -> 8 changes the learning rate at the resume "
                                          r"step 4 from 0 to 0.000\d+.*allow_schedule_change"):
        _run(tmp_path, "train.max_steps=8", resume=True)
    tr = _run(tmp_path, "train.max_steps=8", "train.allow_schedule_change=true", resume=True)
    assert tr.step == 4
    # still inside the warmup, the schedule does not depend on max_steps: nothing to refuse
    _run(tmp_path / "w", "train.max_steps=1", "optim.warmup_steps=3").train()
    assert _run(tmp_path / "w", "train.max_steps=8", "optim.warmup_steps=3", resume=True).step == 1
