"""The real `deepspeed` launcher (and torchrun) starts 2 processes (CPU, gloo) running `d2v pretrain`:
the DeepSpeed engine is picked automatically (engine.name auto), rank 0 alone prints and logs, the run
finishes with a complete checkpoint, and resumes with engine.name=deepspeed named instead of auto.

Run: .venv/bin/python -m pytest -q tests/test_launcher.py
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2v.checkpoint import load_checkpoint
from d2v.metrics import read_metrics
from tests.utils import free_port, micro_overrides

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launcher_two_processes(tmp_path, launcher):
    exe = shutil.which(launcher, path=str(Path(sys.executable).parent))
    assert exe, f"the {launcher} launcher script is not installed next to this python"
    out = tmp_path / "run"
    overrides = micro_overrides(out, 4, **{"engine.zero_stage": 1, "train.batch_size": 4})
    start = ([exe, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "d2v"]
             if launcher == "deepspeed" else
             [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "d2v"])
    cmd = [*start, "pretrain", "--config", str(ROOT / "configs" / "tiny_image.yaml"), *overrides,
           "--no-probe", "--no-progress"]
    env = dict(os.environ, D2V_DEEPSPEED_SHM="0", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert log.count("d2v pretrain |") == 1, "the banner is printed by rank 0 only"
    assert "DeepSpeed ZeRO-1 on 2 rank(s) (gloo)" in log
    assert log.count("\ndone: 4 steps") == 1
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4]
    state, _, ck = load_checkpoint(out)
    assert ck.name == "step_00000004" and state["world_size"] == 2 and state["engine"] == "deepspeed"
    assert sorted(p.name for p in ck.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    if launcher == "torchrun":  # the run (engine.name auto) resumes with engine.name=deepspeed named
        more = [o for o in overrides if not o.startswith("train.max_steps=")]
        cmd = [*start, "pretrain", "--config", str(ROOT / "configs" / "tiny_image.yaml"), *more,
               "train.max_steps=6", "train.allow_schedule_change=true", "engine.name=deepspeed", "--no-probe",
               "--no-progress", "--resume"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
        log = res.stdout + res.stderr
        assert res.returncode == 0, log[-4000:]
        assert "resumed from" in log and log.count("\ndone: 6 steps (2 this run)") == 1, log[-4000:]
        assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
