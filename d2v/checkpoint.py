"""Atomic checkpoints: a run never loses its last good checkpoint.

Layout: <out_dir>/checkpoints/step_00001000/{state.pt, config.yaml} and a `latest` file naming the
newest complete one. A checkpoint is written into a temporary folder, fsynced, renamed into place,
and only then does `latest` move (itself via write-temp + rename); old ones beyond keep_last go last.
Re-saving a step that exists (after `--resume .../step_X` rolled a run back) renames the old folder
aside and deletes it only after `latest` moved. A crash at any point leaves `latest` naming a complete
checkpoint, except between those two renames, when it names the folder being replaced: resolving
then falls back, with a warning, to the newest complete step_* folder.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import yaml

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def begin_checkpoint(out_dir: str | Path, step: int, suffix: str | None = None) -> Path:
    """A fresh temporary folder for checkpoint `step` (all ranks of a run pass the same `suffix`)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:08d}.tmp-{suffix or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_state(tmp: Path, state: dict, config: dict) -> None:
    """state.pt (the completeness marker, written last) and config.yaml, fsynced."""
    _write_file(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def commit_checkpoint(out_dir: str | Path, step: int, tmp: Path, keep_last: int) -> Path:
    """Rename the complete temporary folder into place, then move `latest`, then prune."""
    root = checkpoint_root(out_dir)
    name = f"step_{step:08d}"
    final = root / name
    for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)
    if final.exists():  # re-saving the same step (after a resume): set the old one aside, delete it
        old = root / f".{name}.old-{os.getpid()}"  # once `latest` moved (it may name this step)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    _write_file(latest_tmp, (name + "\n").encode())
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    for old in root.glob(".step_*.old-*"):  # this one, and any a killed run left
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep_last)
    return final


def save_checkpoint(out_dir: str | Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
    tmp = begin_checkpoint(out_dir, step)
    write_state(tmp, state, config)
    return commit_checkpoint(out_dir, step, tmp, keep_last)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete step_* folders (with state.pt) under a checkpoints/ folder, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def _prune(root: Path, keep_last: int) -> None:
    done = complete_checkpoints(root)
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a checkpoints/ folder or a run folder; return the checkpoint folder:
    the one `latest` names, or, when `latest` is missing or names no complete checkpoint (a run killed
    while replacing it), the newest complete step_* folder, with a warning."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p, checkpoint_root(p)):
        latest = root / LATEST
        named = root / latest.read_text().strip() if latest.is_file() else None
        if named is not None and (named / STATE_FILE).is_file():
            return named
        done = complete_checkpoints(root)
        if done:
            why = f"{latest} names {named.name}, which has no {STATE_FILE}" if named else f"no {latest}"
            warnings.warn(f"{why}: using the newest complete checkpoint, {done[-1]}", stacklevel=2)
            return done[-1]
        if named is not None:
            raise FileNotFoundError(f"{latest} names {named.name}, which has no {STATE_FILE}, and no other "
                                    f"step_* folder in {root} is complete")
    raise FileNotFoundError(
        f"no checkpoint at {p}: expected a folder with {STATE_FILE}, or a run folder with "
        f"checkpoints/{LATEST}"
    )


def load_checkpoint(path: str | Path) -> tuple[dict, dict, Path]:
    """-> (state, config dict, checkpoint folder)."""
    ck = resolve_checkpoint(path)
    try:
        state = torch.load(ck / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or truncated file: say which
        raise RuntimeError(f"cannot read checkpoint {ck / STATE_FILE}: {e}") from e
    config = yaml.safe_load((ck / CONFIG_FILE).read_text())
    return state, config, ck


def load_weights(path: str | Path) -> tuple[dict, dict, Path]:
    """Like load_checkpoint, for either engine: state["model"] and state["teacher"] are consolidated
    fp32 state dicts (a DeepSpeed checkpoint is consolidated with zero_to_fp32, see d2v/engine.py)."""
    state, config, ck = load_checkpoint(path)
    if state.get("engine") == "deepspeed":
        from d2v.engine import consolidate

        state = dict(state)
        state["model"], state["teacher"] = consolidate(state, ck)
    return state, config, ck
