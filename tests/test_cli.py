"""The `d2v` command line end to end, as a user runs it: pretrain + probe on the embedded digits,
pretraining on a user folder of JPEG/PNG files with a corrupt one, probe and export of a checkpoint,
and clear errors (exit code 2) for bad config keys and unusable data.

Run: .venv/bin/python -m pytest -q tests/test_cli.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.utils import micro_overrides

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_image.yaml")


def d2v(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "d2v", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_pretrain_then_probe_on_embedded_digits(tmp_path):
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", TINY, "--no-progress", *micro_overrides(out, steps=4),
            "train.probe_after=true")
    assert r.returncode == 0, r.stderr
    assert "d2v pretrain | image/tiny" in r.stderr and "done: 4 steps" in r.stdout  # banner: stderr
    assert "linear probe" in r.stdout and "random_init" in r.stdout
    res = json.loads((out / "probe.json").read_text())
    assert res["n_train"] == 1000 and res["n_test"] == 797 and res["step"] == 4
    for enc in ("pretrained", "teacher", "random_init"):
        assert 10.0 <= res[enc]["full"] <= 100.0 and 0 <= res[enc]["10shot"] <= 100.0
    assert (out / "loss_curve.png").is_file() and (out / "metrics.csv").is_file()


def write_images(folder: Path, n_per_class=10):
    rng = np.random.RandomState(0)
    for cls, base in (("cats", 40), ("dogs", 200)):
        d = folder / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            arr = np.clip(rng.normal(base, 30, size=(40 + i, 48, 3)), 0, 255).astype(np.uint8)
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(arr).save(d / f"{i}.{ext}")


@pytest.mark.slow
def test_pretrain_on_user_folder_with_corrupt_file_then_probe_and_export(tmp_path):
    data = tmp_path / "images"
    write_images(data)
    (data / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", TINY, "--no-progress",
            *micro_overrides(out, steps=3, **{"data.path": str(data), "train.batch_size": 4}))
    assert r.returncode == 0, r.stderr
    assert "20 samples" in r.stderr
    assert "broken.jpg" in r.stdout + r.stderr  # reported by path
    assert "skipped 1 unreadable" in r.stdout

    p = d2v("probe", "--checkpoint", str(out), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["n_train"] == 16 and res["n_test"] == 4  # stratified 80/20 split of the labelled folder

    exp = tmp_path / "export.pt"
    e = d2v("export", "--checkpoint", str(out), "--out", str(exp))
    assert e.returncode == 0, e.stderr
    blob = torch.load(exp, map_location="cpu", weights_only=False)
    assert set(blob) >= {"student", "teacher", "config", "step"} and blob["step"] == 3
    assert any(k.startswith("blocks.0.attn.qkv") for k in blob["teacher"])


def test_bad_config_key_exits_2_naming_it(tmp_path):
    r = d2v("pretrain", "--config", TINY, "optim.learning_rate=0.1", f"train.out_dir={tmp_path}")
    assert r.returncode == 2
    assert "unknown config key 'optim.learning_rate'" in r.stderr and "tiny_image.yaml" in r.stderr


def test_folder_of_only_bad_files_fails_clearly(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"not a png")
    r = d2v("pretrain", "--config", TINY, f"data.path={data}", f"train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert "no readable images" in r.stderr and str(data) in r.stderr


def test_probe_without_checkpoint_fails_clearly(tmp_path):
    r = d2v("probe", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "no checkpoint" in r.stderr


@pytest.mark.slow
def test_unlabelled_folder_pretrains_and_skips_probe_with_a_note(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(8):
        Image.fromarray(rng.randint(0, 255, size=(36, 36, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", TINY, "--no-progress",
            *micro_overrides(out, steps=2, **{"data.path": str(data), "train.batch_size": 4,
                                              "train.probe_after": True}))
    assert r.returncode == 0, r.stderr
    assert "probe skipped: the class probe needs labelled data" in r.stdout
    assert (out / "checkpoints" / "latest").exists() or list((out / "checkpoints").glob("step_*"))
    assert not (out / "probe.json").exists()
    p = d2v("probe", "--checkpoint", str(out))  # asked for explicitly, the probe is an error
    assert p.returncode == 2 and "needs labelled data" in p.stderr


def test_main_script_passes_overrides_before_resume():
    """scripts/main.sh forwards its arguments as overrides; --resume (optional folder) goes last."""
    from d2v.cli import parse_args

    line = next(x for x in (ROOT / "scripts" / "main.sh").read_text().splitlines() if x.startswith("exec "))
    argv = line.split("d2v ", 1)[1].replace('"$@"', "train.max_steps=300 data.path=/my/images").split()
    args = parse_args(argv)
    assert args.command == "pretrain" and args.resume is True
    assert args.overrides == ["train.max_steps=300", "data.path=/my/images"]


def test_options_and_overrides_in_any_order():
    """argparse's nargs='*' took only the first run of positionals: `--no-probe` between overrides
    failed with 'unrecognized arguments'."""
    from d2v.cli import parse_args

    args = parse_args(["pretrain", "--config", "tiny_image", "data.path=/d", "--no-probe",
                       "train.max_steps=10", "--quiet", "train.seed=3"])
    assert args.overrides == ["data.path=/d", "train.max_steps=10", "train.seed=3"]
    assert args.no_probe and args.quiet and args.resume is None
    # --resume takes an optional folder: a key=value right after it is an override, not the folder
    args = parse_args(["pretrain", "--config", "tiny_image", "--resume", "train.max_steps=10", "--no-probe"])
    assert args.resume is True and args.overrides == ["train.max_steps=10"]
    args = parse_args(["-q", "config", "--config", "tiny_text", "model.depth=2"])
    assert args.command == "config" and args.quiet and args.overrides == ["model.depth=2"]


def test_version_and_config_commands(tmp_path):
    r = d2v("--version", timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("d2v 0.") and "torch" in r.stdout, r.stderr
    r = d2v("config", "--config", "tiny_text", "train.max_steps=7", "--quiet", "optim.lr=1e-3", timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)  # the resolved config, from a recipe name
    assert cfg["model"]["modality"] == "text" and cfg["train"]["max_steps"] == 7
    assert cfg["optim"]["lr"] == 1e-3 and cfg["model"]["vocab_size"] > 0
    r = d2v("config", "--config", "tiny_text", "model.depth=0", timeout=120)
    assert r.returncode == 2 and "model.depth" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_export_into_missing_folder_and_second_run_on_a_locked_folder(tmp_path):
    from d2v.runlock import RunLock

    out = tmp_path / "run"
    r = d2v("pretrain", "--config", TINY, "--no-progress", *micro_overrides(out, steps=2))
    assert r.returncode == 0, r.stderr
    assert (out / "train.log").is_file() and "d2v pretrain | image/tiny" in (out / "train.log").read_text()
    assert not (out / ".d2v.lock").exists(), "the lock is released at the end"
    e = d2v("export", "--checkpoint", str(out), "--out", str(tmp_path / "nope" / "w.pt"))
    assert e.returncode == 2 and "does not exist" in e.stderr and "Traceback" not in e.stderr
    with RunLock(out):  # a live holder (this process): a second run there is refused, naming it
        r = d2v("pretrain", "--config", TINY, "--no-progress", *micro_overrides(out, steps=4), "--resume",
                "train.allow_schedule_change=true")
    assert r.returncode == 2 and f"pid {os.getpid()}".lower() in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_quiet_keeps_results_and_drops_the_banner(tmp_path):
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", TINY, "--quiet", *micro_overrides(out, steps=1))
    assert r.returncode == 0, r.stderr
    assert "done: 1 steps" in r.stdout and "d2v pretrain |" not in r.stderr + r.stdout
    assert "d2v pretrain |" in (out / "train.log").read_text()  # the run log has everything
