"""Checkpoints under faults: what a kill -9 during a write or a prune leaves is cleaned at the next start
(never a complete checkpoint, never the one `latest` names); a full disk, an exceeded quota or a
read-only folder is one CheckpointWriteError saying what to do, with the partial temp folder removed
and `latest` untouched; a truncated checkpoint or a temp folder given to --resume is one
CheckpointError naming the checkpoint to resume from instead.

Run: .venv/bin/python -m pytest -q tests/test_checkpoint_faults.py
"""
import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from d2v import checkpoint
from d2v.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    begin_checkpoint,
    check_writable,
    checkpoint_write_guard,
    clean_debris,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    write_state,
)

ENFORCE_FAIL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _run(tmp_path, steps=(1, 2, 3), keep_last=5):
    out = tmp_path / "run"
    for s in steps:
        save_checkpoint(out, s, {"step": s, "w": torch.full((256,), float(s))}, {"a": s}, keep_last=keep_last)
    return out, out / "checkpoints"


def _names(root):
    return sorted(p.name for p in root.iterdir())


def _latest(root):
    return (root / "latest").read_text().strip()


# ------------------------------------------------------------------------------------------ debris
def test_clean_debris_removes_leftovers_of_killed_writes_and_prunes(tmp_path, d2v_log):
    out, root = _run(tmp_path)
    complete = (root / "step_00000003" / "state.pt").read_bytes()
    # killed while writing: temp folders with no, a partial and a complete state.pt (single / DeepSpeed)
    (root / ".step_00000004.tmp-111").mkdir()
    (root / ".step_00000004.tmp-222").mkdir()
    (root / ".step_00000004.tmp-222" / "config.yaml").write_text("a: 4\n")
    (root / ".step_00000004.tmp-222" / "state.pt").write_bytes(complete[: len(complete) // 2])
    ds = root / ".step_00000005.tmp-ds"
    (ds / "ds").mkdir(parents=True)
    (ds / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 4096)
    (ds / "rank_00000.pt").write_bytes(b"r" * 100)
    (ds / "state.pt").write_bytes(complete)
    # killed while replacing a step / moving `latest` / pruning
    shutil.copytree(root / "step_00000002", root / ".step_00000002.old-333")
    (root / ".latest.tmp-444").write_text("step_00000004\n")
    (root / "step_00000000").mkdir()  # a pruned folder with only config.yaml left
    (root / "step_00000000" / "config.yaml").write_text("a: 0\n")
    (root / "step_00000009").mkdir()  # an empty one
    (root / "step_00000006" / "ds").mkdir(parents=True)  # DeepSpeed shards, no state.pt: incomplete
    (root / "step_00000006" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 1000)
    (root / ".step_00000007.tmp-keep").mkdir()  # a suffix the caller protects

    removed = clean_debris(out, keep_suffixes=("keep",))
    assert sorted(p.name for p in removed) == [
        ".latest.tmp-444", ".step_00000002.old-333", ".step_00000004.tmp-111", ".step_00000004.tmp-222",
        ".step_00000005.tmp-ds", "step_00000000", "step_00000006", "step_00000009"]
    assert _names(root) == [".step_00000007.tmp-keep", "latest", "step_00000001", "step_00000002",
                            "step_00000003"]
    state, cfg, ck = load_checkpoint(out)
    assert ck.name == "step_00000003" and state["step"] == 3 and cfg == {"a": 3}
    infos = [r.getMessage() for r in d2v_log if r.levelno == logging.INFO]
    assert len(infos) == 1 and ".step_00000005.tmp-ds" in infos[0] and "step_00000006" in infos[0], infos
    assert "MB freed" in infos[0]
    assert clean_debris(out, keep_suffixes=("keep",)) == []  # nothing left to do: no second line
    assert len([r for r in d2v_log if r.levelno == logging.INFO]) == 1


def test_clean_debris_keeps_the_folder_latest_names_even_incomplete(tmp_path):
    out, root = _run(tmp_path, steps=(1, 2))
    (root / "step_00000002" / "state.pt").unlink()
    assert clean_debris(out) == []
    assert (root / "step_00000002").is_dir() and _latest(root) == "step_00000002"
    assert clean_debris(tmp_path / "no-run") == []  # nothing there: nothing to do


def test_clean_debris_puts_back_the_step_latest_names_when_killed_between_renames(tmp_path, monkeypatch):
    out, root = _run(tmp_path, steps=(1, 2))
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.startswith(".step_00000002.tmp"):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 2, {"step": 2, "again": True}, {"a": 2}, keep_last=5)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not (root / "step_00000002").exists() and len(list(root.glob(".step_*"))) == 2

    clean_debris(out)
    assert _names(root) == ["latest", "step_00000001", "step_00000002"]
    state, _, ck = load_checkpoint(out)  # no fallback warning: `latest` names a complete folder again
    assert ck.name == "step_00000002" and "again" not in state


def test_prune_killed_midway_leaves_an_incomplete_folder_that_is_cleaned(tmp_path, monkeypatch):
    """Pruning removes state.pt first: a prune killed inside rmtree never leaves a folder that looks
    complete (state.pt) but lacks config.yaml or DeepSpeed's shards."""
    out, root = _run(tmp_path, steps=(1, 2))

    def killed(path, *a, **kw):
        raise KeyboardInterrupt("killed while pruning")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 3, {"step": 3}, {"a": 3}, keep_last=2)
    monkeypatch.undo()
    assert (root / "step_00000001").is_dir() and not (root / "step_00000001" / "state.pt").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert [p.name for p in clean_debris(out)] == ["step_00000001"]


def test_prune_never_removes_the_checkpoint_just_committed(tmp_path):
    """After a rollback (--resume .../step_1) the old run's step_3 sorts after the new step_2: pruning
    must not delete step_2, which `latest` now names."""
    out, root = _run(tmp_path, steps=(1, 2, 3))
    save_checkpoint(out, 2, {"step": 2, "again": True}, {"a": 2}, keep_last=1)
    assert _latest(root) == "step_00000002"
    state, _, ck = load_checkpoint(out)
    assert ck.name == "step_00000002" and state["again"] is True
    assert _names(root) == ["latest", "step_00000002"]
    save_checkpoint(out, 3, {"step": 3}, {"a": 3}, keep_last=2)  # the usual case is unchanged
    save_checkpoint(out, 4, {"step": 4}, {"a": 4}, keep_last=2)
    assert _names(root) == ["latest", "step_00000003", "step_00000004"]


# ------------------------------------------------------------------------------ disk full, read-only
def _assert_intact(out, root, last="step_00000003"):
    assert _latest(root) == last
    assert not list(root.glob(".step_*")) and not list(root.glob(".latest*"))
    assert load_checkpoint(out)[2].name == last


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_real_enospc_while_writing_state_is_one_line_and_cleans_up(tmp_path):
    out, root = _run(tmp_path)
    tmp = begin_checkpoint(out, 4)
    (tmp / "state.pt").symlink_to("/dev/full")  # the kernel's own ENOSPC on every write
    with pytest.raises(CheckpointWriteError) as err:
        write_state(tmp, {"step": 4, "w": torch.zeros(1 << 16)}, {"a": 4})
    e = err.value
    assert e.errno == errno.ENOSPC and isinstance(e, OSError) and "\n" not in str(e)
    assert str(e).startswith(f"disk full while writing checkpoint step 4 to {root / 'step_00000004'} (")
    assert " MB needed, " in str(e) and " MB free); the last complete checkpoint is " in str(e)
    assert str(e).endswith(f"{root / 'step_00000003'}; free space or set train.keep_last lower, "
                           f"then --resume")
    assert not tmp.exists()
    _assert_intact(out, root)


@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk quota exceeded")])
def test_enospc_from_torch_save_leaves_latest_and_no_debris(tmp_path, monkeypatch, code, why):
    out, root = _run(tmp_path)

    def full(obj, f, *a, **kw):
        f.write(b"\0" * 1000)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=rf"^{why} while writing checkpoint step 4 .*"
                                                    r"step_00000003; free space or set train.keep_last "
                                                    r"lower, then --resume$"):
        save_checkpoint(out, 4, {"step": 4, "w": torch.zeros(1 << 20)}, {"a": 4}, keep_last=5)
    _assert_intact(out, root)


def test_enospc_moving_latest_leaves_latest_untouched(tmp_path, monkeypatch):
    out, root = _run(tmp_path)
    real = os.replace

    def full(src, dst):
        if Path(dst).name == "latest":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", full)
    with pytest.raises(CheckpointWriteError, match="disk full while writing checkpoint step 4"):
        save_checkpoint(out, 4, {"step": 4}, {"a": 4}, keep_last=5)
    monkeypatch.undo()
    _assert_intact(out, root)


def test_torch_save_enforce_fail_is_a_full_disk_only_when_space_is_short(tmp_path, monkeypatch):
    """torch.save to a path on a full disk raises RuntimeError("[enforce fail ...] unexpected pos"),
    no errno: it is a full disk when less space is free than the write needed."""
    out, root = _run(tmp_path)
    tmp = begin_checkpoint(out, 4, suffix="ds")
    dev_full = os.path.exists("/dev/full")

    def deepspeed_save():  # what DeepSpeed's engine.save_checkpoint does: torch.save to a path
        (tmp / "ds").mkdir()
        if dev_full:
            (tmp / "ds" / "mp_rank_00_model_states.pt").symlink_to("/dev/full")
            torch.save({"w": torch.zeros(1 << 16)}, str(tmp / "ds" / "mp_rank_00_model_states.pt"))
        raise RuntimeError(ENFORCE_FAIL)

    with pytest.raises(RuntimeError, match="enforce fail") as err:  # plenty free: not ours to explain
        with checkpoint_write_guard(out, 4, tmp):
            deepspeed_save()
    assert not isinstance(err.value, CheckpointWriteError) and tmp.exists()
    shutil.rmtree(tmp / "ds")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda p: usage._replace(free=1 << 20, used=usage.total - (1 << 20)))
    with pytest.raises(CheckpointWriteError,
                       match=r"^disk full while writing checkpoint step 4 .*1\.0 MB free"):
        with checkpoint_write_guard(out, 4, tmp):
            deepspeed_save()
    assert not tmp.exists()
    monkeypatch.undo()
    _assert_intact(out, root)


def test_read_only_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    out, root = _run(tmp_path)
    real = os.replace

    def ro(src, dst):
        if Path(src).name.startswith(".step_00000002.tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", ro)
    with pytest.raises(CheckpointWriteError, match=rf"^{root} is read-only / not writable \(Read-only file "
                                                    rf"system\): cannot write checkpoint step 2") as err:
        save_checkpoint(out, 2, {"step": 2, "again": True}, {"a": 2}, keep_last=5)  # re-saving a step
    assert err.value.errno == errno.EROFS
    monkeypatch.undo()
    _assert_intact(out, root)
    state, _, _ = load_checkpoint(root / "step_00000002")  # the step set aside was put back
    assert "again" not in state


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_chmod_read_only_checkpoints_folder(tmp_path):
    out, root = _run(tmp_path)
    root.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match=rf"^{root} is read-only / not writable"):
            save_checkpoint(out, 4, {"step": 4}, {"a": 4}, keep_last=5)
        with pytest.raises(CheckpointWriteError, match=rf"^{root} is read-only / not writable"):
            check_writable(out)
    finally:
        root.chmod(0o755)
    _assert_intact(out, root)


def test_check_writable(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "run"
    assert check_writable(out) == out and out.is_dir() and not list(out.iterdir())  # created, no probe left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=rf"^{blocker} is not a folder: cannot create the run "
                                                    rf"folder {blocker / 'run'}"):
        check_writable(blocker / "run")
    with pytest.raises(CheckpointWriteError, match=rf"^{blocker} is not a folder"):
        check_writable(blocker)

    real_open = os.open

    def denied(path, *a, **kw):
        if ".d2v-write-test" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(checkpoint.os, "open", denied)
    with pytest.raises(CheckpointWriteError, match=rf"^{out} is read-only / not writable \(Permission "
                                                    rf"denied\): cannot write in {out}") as err:
        check_writable(out)
    assert err.value.errno == errno.EACCES and "\n" not in str(err.value)


# ------------------------------------------------------------------------- resuming a damaged checkpoint
def test_truncated_checkpoint_is_one_line_naming_the_one_to_resume(tmp_path):
    out, root = _run(tmp_path)
    st = root / "step_00000003" / "state.pt"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    for path in (out, root / "step_00000003"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        msg = str(err.value)
        assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError) and "\n" not in msg
        assert msg.startswith(f"cannot read checkpoint {root / 'step_00000003'}: state.pt is incomplete or "
                              f"corrupt ("), msg
        assert msg.endswith(f"; resume from {root / 'step_00000002'} instead"), msg

    (root / "step_00000002" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000002: it has no config.yaml \(incomplete\); resume "
                                              r"from .*step_00000001 instead"):
        load_checkpoint(root / "step_00000002")

    alone, aroot = _run(tmp_path / "alone", steps=(1,))
    (aroot / "step_00000001" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"state.pt is incomplete or corrupt .*; {aroot} holds no "
                                              rf"other complete checkpoint$"):
        load_checkpoint(alone)


def test_resume_from_a_temp_folder_is_refused(tmp_path):
    out, root = _run(tmp_path)
    tmp = root / ".step_00000004.tmp-123"
    shutil.copytree(root / "step_00000003", tmp)  # even with a complete state.pt
    aside = root / ".step_00000002.old-9"
    shutil.copytree(root / "step_00000002", aside)
    for p, kind in ((tmp, "the temporary folder of an unfinished checkpoint write"),
                    (aside, "a checkpoint set aside while it was being replaced")):
        for f in (load_checkpoint, resolve_checkpoint):
            with pytest.raises(CheckpointError) as err:
                f(p)
            assert str(err.value) == (f"{p} is {kind}, not a checkpoint (the next run in that folder deletes "
                                      f"it); resume from {root / 'step_00000003'} instead")


def test_cli_prints_a_damaged_checkpoint_as_one_line(tmp_path, capsys):
    from d2v.cli import main

    out, root = _run(tmp_path)
    (root / "step_00000003" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.endswith(f"resume from {root / 'step_00000002'} instead"), err
