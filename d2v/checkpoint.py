"""Atomic checkpoints: a run never loses its last good checkpoint.

Layout: <out_dir>/checkpoints/step_00001000/{state.pt, config.yaml} and a `latest` file naming the
newest complete one. A checkpoint is written into a temporary folder, fsynced, renamed into place,
and only then does `latest` move (itself via write-temp + rename); old ones beyond keep_last go last.
Re-saving a step that exists (after `--resume .../step_X` rolled a run back) renames the old folder
aside and deletes it only after `latest` moved. A crash at any point leaves `latest` naming a complete
checkpoint, except between those two renames, when it names the folder being replaced: resolving
then falls back, with a warning, to the newest complete step_* folder.

What a crash or a full disk leaves behind, and who handles it:
- `clean_debris(out_dir)` (the trainer calls it at start, holding the run lock, before resolving the
  checkpoint): temp folders, folders set aside, `latest` temps and step_* folders without state.pt
  that a killed write or prune left; never a complete checkpoint nor the folder `latest` names.
- Writes (begin_checkpoint, write_state, commit_checkpoint, or any code under
  `checkpoint_write_guard`) raise `CheckpointWriteError` on a full disk, an exceeded quota or a
  read-only folder (torch.save's "[enforce fail at inline_container.cc] unexpected pos" included, told
  apart by the free space left), after removing their partial temp folder; `latest` is untouched.
  `check_writable(out_dir)` probes the run folder before any work.
- Reads: a truncated or unreadable checkpoint, or a temp folder passed to --resume, raise
  `CheckpointError` naming the newest complete checkpoint of that run to resume from instead.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from d2v.log import get_logger

log = get_logger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
LATEST = "latest"
# state["engine"] of a checkpoint that holds weights only (student, teacher, step; no optimizer or RNG
# state): written by `d2v import`; a run resumed from it starts a fresh optimizer on any backend
WEIGHTS_ONLY = "weights"

_TMP = re.compile(r"^\.step_(\d+)\.tmp-(.+)$")  # a checkpoint being written
_OLD = re.compile(r"^\.step_(\d+)\.old-(.+)$")  # a checkpoint set aside while being replaced
_LATEST_TMP = re.compile(r"^\.latest\.tmp-(.+)$")
_STEP = re.compile(r"^step_(\d+)$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_MIN_FREE = 16 << 20  # a torch.save RuntimeError with less free space than this is a full disk


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be resumed or loaded (incomplete, corrupt, a temp folder); the message
    is one line and names the newest complete checkpoint to use instead, if the run has one. A
    ValueError for the CLI's one-line errors; a RuntimeError as load_checkpoint raised before."""


class CheckpointWriteError(OSError):
    """A checkpoint (or the run folder) could not be written: disk full, quota exceeded, read-only or
    not writable. `errno` is the cause's (ENOSPC, EDQUOT, EROFS, EACCES, ...); the message is one line
    saying what to do. The partial temp folder is already removed and `latest` is untouched."""

    def __init__(self, message: str, errno_: int | None = None, folder: Path | None = None):
        super().__init__(message)
        self.errno = errno_
        self.folder = folder


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


def _mb(n: int | None) -> str:
    return "? MB" if n is None else f"{n / 2**20:,.1f} MB"


def _tree_bytes(path: Path | None) -> int:
    """Bytes of the regular files under `path` (symlinks not followed); 0 when it is gone."""
    if path is None:
        return 0
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for top, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(top, f))
            except OSError:
                continue
            if not os.path.islink(os.path.join(top, f)):
                total += st.st_size
    return total


def _state_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in a (nested) state dict: roughly what torch.save writes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        try:
            st = obj.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key in seen:
                return 0
            seen.add(key)
            return st.nbytes()
        except Exception:  # noqa: BLE001 - meta / subclass tensors: their logical size
            return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in obj)
    return 0


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return None


def _step_of(tmp: Path) -> int | None:
    m = _TMP.match(tmp.name)
    return int(m.group(1)) if m else None


def _latest_name(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP.match(name) else None


def _last_complete(root: Path, exclude: Path | None = None) -> Path | None:
    """What --resume would continue from, without warnings: the folder `latest` names when complete,
    else the newest complete step_*; never `exclude` (a damaged one) nor one whose state.pt is visibly
    truncated (torch.save writes a zip archive: its directory, at the end, is cheap to check). None
    when there is none."""
    def ok(p: Path) -> bool:
        if exclude is not None and p.name == exclude.name and p.parent.resolve() == exclude.parent.resolve():
            return False
        try:
            return (p / STATE_FILE).is_file() and zipfile.is_zipfile(p / STATE_FILE)
        except OSError:
            return False

    name = _latest_name(root)
    if name is not None and ok(root / name):
        return root / name
    done = [p for p in complete_checkpoints(root) if ok(p)]
    return done[-1] if done else None


def last_complete_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's checkpoint that --resume continues from (see resolve_checkpoint), or None; no warning."""
    return _last_complete(checkpoint_root(out_dir))


def _remove_partial(tmp: Path | None) -> None:
    """Remove a checkpoint's temporary folder (only ever a .step_*.tmp-* one)."""
    if tmp is not None and _TMP.match(tmp.name) and (tmp.exists() or tmp.is_symlink()):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except OSError:
                pass


def _as_write_error(e: BaseException, out_dir: Path, step: int | None, tmp: Path | None, state,
                    cleanup: bool) -> CheckpointWriteError | None:
    """A full disk / exceeded quota / read-only folder -> CheckpointWriteError (after removing the
    partial temp folder when `cleanup`); None for anything else."""
    root = checkpoint_root(out_dir)
    code = e.errno if isinstance(e, OSError) else None
    if code not in _DISK_FULL and code not in _READ_ONLY and not isinstance(e, RuntimeError):
        return None
    written = _tree_bytes(tmp) if tmp is not None and _TMP.match(tmp.name) else 0
    last = _last_complete(root)
    need = max(_state_bytes(state) if state is not None else 0, _tree_bytes(last), written)
    if isinstance(e, RuntimeError):  # torch.save to a path: "[enforce fail at inline_container.cc:..]
        free = _free_bytes(tmp if tmp is not None else root)  # unexpected pos ..", no errno: a full disk
        if free is None or free >= max(_MIN_FREE, need - written):  # if it left too little room
            return None
        code = errno.ENOSPC
    if cleanup:
        _remove_partial(tmp)
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    last_s = last or "none (none written yet)"
    where = root / f"step_{step:08d}" if step is not None else (tmp or root)
    if code in _DISK_FULL:
        why = "disk quota exceeded" if code == getattr(errno, "EDQUOT", None) and code != errno.ENOSPC \
            else "disk full"
        return CheckpointWriteError(
            f"{why} while writing {what} to {where} ({_mb(need) if need else 'size unknown'} needed, "
            f"{_mb(_free_bytes(root))} free); the last complete checkpoint is {last_s}; "
            f"free space or set train.keep_last lower, then --resume", code, root)
    folder = root if root.exists() else _nearest_existing(root)
    return CheckpointWriteError(
        f"{folder} is read-only / not writable ({os.strerror(code)}): cannot write {what}; make it writable "
        f"or set train.out_dir to a writable folder, then --resume (the last complete checkpoint is "
        f"{last_s})", code, folder)


@contextmanager
def checkpoint_write_guard(out_dir: str | Path, step: int | None, tmp: Path | None = None, state=None,
                           cleanup: bool = True):
    """Run a checkpoint write (d2v's own, or DeepSpeed's engine.save_checkpoint into `tmp`) so that a
    full disk, an exceeded quota or a read-only folder raises one CheckpointWriteError; `cleanup`
    removes the partial temp folder `tmp` first (pass False on ranks that must not delete what other
    ranks are still writing). `state` (what is being saved) sizes the "needed" figure. Other errors
    pass through unchanged, and nothing is removed for them."""
    try:
        yield
    except CheckpointWriteError:
        if cleanup:
            _remove_partial(tmp)
        raise
    except (OSError, RuntimeError) as e:
        err = _as_write_error(e, Path(out_dir), step, tmp, state, cleanup)
        if err is None:
            raise
        raise err from e


def begin_checkpoint(out_dir: str | Path, step: int, suffix: str | None = None) -> Path:
    """A fresh temporary folder for checkpoint `step` (all ranks of a run pass the same `suffix`)."""
    root = checkpoint_root(out_dir)
    tmp = root / f".step_{step:08d}.tmp-{suffix or os.getpid()}"
    with checkpoint_write_guard(out_dir, step, tmp):
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    return tmp


def write_state(tmp: Path, state: dict, config: dict) -> None:
    """state.pt (the completeness marker, written last) and config.yaml, fsynced."""
    tmp = Path(tmp)
    with checkpoint_write_guard(tmp.parent.parent, _step_of(tmp), tmp, state=state):
        _write_file(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def commit_checkpoint(out_dir: str | Path, step: int, tmp: Path, keep_last: int) -> Path:
    """Rename the complete temporary folder into place, then move `latest`, then prune. On a full
    disk or read-only folder: CheckpointWriteError, the temp folder removed, `latest` untouched (and a
    folder set aside for a re-saved step put back)."""
    root = checkpoint_root(out_dir)
    name = f"step_{step:08d}"
    final = root / name
    latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    old = None
    try:
        with checkpoint_write_guard(out_dir, step, tmp):
            for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                _fsync_dir(sub)
            if final.exists():  # re-saving the same step (after a resume): set the old one aside, delete
                old = root / f".{name}.old-{os.getpid()}"  # it once `latest` moved (it may name this step)
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_file(latest_tmp, (name + "\n").encode())
            os.replace(latest_tmp, root / LATEST)
    except CheckpointWriteError:
        try:
            latest_tmp.unlink()
        except OSError:
            pass
        if old is not None and old.is_dir() and not final.exists():  # failed between the renames
            try:
                os.replace(old, final)
            except OSError:
                pass
        raise
    _fsync_dir(root)
    for aside in root.glob(".step_*.old-*"):  # this one, and any a killed run left
        shutil.rmtree(aside, ignore_errors=True)
    _prune(root, keep_last, keep=final)
    return final


def save_checkpoint(out_dir: str | Path, step: int, state: dict, config: dict, keep_last: int) -> Path:
    tmp = begin_checkpoint(out_dir, step)
    write_state(tmp, state, config)
    return commit_checkpoint(out_dir, step, tmp, keep_last)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete step_* folders (with state.pt) under a checkpoints/ folder, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def _remove_checkpoint(p: Path) -> None:
    """state.pt first: a removal killed halfway leaves an incomplete folder (which clean_debris
    removes), never one that looks complete but lacks config.yaml or DeepSpeed's shards."""
    try:
        (p / STATE_FILE).unlink()
    except OSError:
        pass
    shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints, `keep` (the one just committed, which `latest`
    names) always among them: after a rollback (--resume .../step_X) newer step folders of the old
    timeline sort after it, and must not push it out."""
    if keep_last <= 0:
        return
    done = complete_checkpoints(root)
    if keep is not None and any(p.name == keep.name for p in done):
        others = [p for p in done if p.name != keep.name]
        n = keep_last - 1
    else:
        others, n = done, keep_last
    for p in others[: max(len(others) - n, 0)]:
        _remove_checkpoint(p)


def clean_debris(out_dir: str | Path, keep_suffixes=()) -> list[Path]:
    """Remove what a killed checkpoint write or prune left under <out_dir>/checkpoints: temp folders
    (.step_*.tmp-*, whatever their state.pt), folders set aside (.step_*.old-*), `latest` temps
    (.latest.tmp-*) and step_* folders without state.pt. Never a complete checkpoint, never the folder
    `latest` names; when a run died between the two renames of a re-saved step (`latest` names a step
    folder that is gone and its set-aside copy is complete), the copy is renamed back instead.
    Temp folders / files whose suffix is in `keep_suffixes` are kept. Call it with the run lock held,
    on one rank only, before resolving the checkpoint. -> the paths removed (one info line logs them
    and the space freed)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    keep = {str(s) for s in keep_suffixes}
    named = _latest_name(root)
    if named is not None and not (root / named).exists():  # died between commit_checkpoint's renames
        for aside in sorted(root.glob(f".{named}.old-*")):
            if aside.is_dir() and (aside / STATE_FILE).is_file():
                try:
                    os.replace(aside, root / named)
                except OSError as e:
                    log.warning(f"could not put {aside} back as {root / named}: {e}")
                    break
                log.info(f"{root}: put back {named} (set aside as {aside.name} when a run was killed "
                         f"while replacing it; `latest` names it)")
                break
    removed, freed = [], 0
    for p in sorted(root.iterdir()):
        m = _TMP.match(p.name) or _OLD.match(p.name) or _LATEST_TMP.match(p.name)
        if m:
            if m.groups()[-1] in keep:
                continue
        elif not (_STEP.match(p.name) and p.name != named and p.is_dir() and not p.is_symlink()
                  and not (p / STATE_FILE).is_file()):
            continue
        size = _tree_bytes(p)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            log.warning(f"could not remove {p} (left by an interrupted checkpoint write): {e}")
            continue
        removed.append(p)
        freed += size
    if removed:
        names = [p.name for p in removed]
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        log.info(f"{root}: removed what an interrupted checkpoint write or prune left: {shown} "
                 f"({_mb(freed)} freed)")
    _fsync_dir(root)
    return removed


def check_writable(out_dir: str | Path) -> Path:
    """Create out_dir if needed and probe that it (and its checkpoints/ folder, if there) takes a file;
    raise CheckpointWriteError naming the folder when it is read-only, not writable, not a folder, its
    parent cannot be created, or the disk is full. -> out_dir."""
    out = Path(out_dir)

    def fail(folder: Path, e: OSError, what: str) -> CheckpointWriteError:
        code = e.errno
        if code in _DISK_FULL:
            return CheckpointWriteError(f"disk full: cannot {what} ({_mb(_free_bytes(folder))} free); free "
                                        f"space or set train.out_dir to another disk", code, folder)
        if code == errno.ENOTDIR or isinstance(e, (NotADirectoryError, FileExistsError)):
            bad = folder
            while bad != bad.parent and not bad.exists():
                bad = bad.parent
            return CheckpointWriteError(f"{bad} is not a folder: cannot {what}; set train.out_dir to a "
                                        f"folder path", code, bad)
        bad = _nearest_existing(folder)
        return CheckpointWriteError(f"{bad} is read-only / not writable ({e.strerror or e}): cannot {what}; "
                                    f"make it writable or set train.out_dir to a writable folder", code, bad)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(out, e, f"create the run folder {out}") from e
    if not out.is_dir():
        raise fail(out, NotADirectoryError(errno.ENOTDIR, "not a folder"), f"use {out} as the run folder")
    for folder in (out, checkpoint_root(out)):
        if not folder.is_dir():
            continue
        probe = folder / f".d2v-write-test-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"d2v")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise fail(folder, e, f"write in {folder}") from e
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    return out


def _temp_folder_error(p: Path) -> CheckpointError:
    kind = ("the temporary folder of an unfinished checkpoint write" if _TMP.match(p.name)
            else "a checkpoint set aside while it was being replaced")
    return CheckpointError(f"{p} is {kind}, not a checkpoint (the next run in that folder deletes it); "
                           f"{_instead(p.parent, None)}")


def _instead(root: Path, exclude: Path | None) -> str:
    other = _last_complete(root, exclude)
    return f"resume from {other} instead" if other else f"{root} holds no other complete checkpoint"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a checkpoints/ folder or a run folder; return the checkpoint folder:
    the one `latest` names, or, when `latest` is missing or names no complete checkpoint (a run killed
    while replacing it), the newest complete step_* folder, with a warning. A temp folder
    (.step_*.tmp-*, .step_*.old-*) is refused with a CheckpointError naming the one to use instead."""
    p = Path(path)
    if _TMP.match(p.name) or _OLD.match(p.name):
        raise _temp_folder_error(p)
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


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(path: str | Path) -> tuple[dict, dict, Path]:
    """-> (state, config dict, checkpoint folder). A truncated or unreadable state.pt or config.yaml
    raises CheckpointError naming the folder and the newest complete checkpoint to use instead."""
    ck = resolve_checkpoint(path)
    try:
        state = torch.load(ck / STATE_FILE, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # corrupt or truncated file: say which, and what to resume instead
        damaged = isinstance(e, (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError))
        how = f"{STATE_FILE} is incomplete or corrupt" if damaged else f"loading {STATE_FILE} failed"
        raise CheckpointError(f"cannot read checkpoint {ck}: {how} ({type(e).__name__}: {_first_line(e)}); "
                              f"{_instead(ck.parent, ck)}") from e
    try:
        config = yaml.safe_load((ck / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"cannot read checkpoint {ck}: it has no {CONFIG_FILE} (incomplete); "
                              f"{_instead(ck.parent, ck)}") from e
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read checkpoint {ck}: {CONFIG_FILE} is corrupt ({_first_line(e)}); "
                              f"{_instead(ck.parent, ck)}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read checkpoint {ck}: {CONFIG_FILE} is corrupt (not a mapping); "
                              f"{_instead(ck.parent, ck)}")
    return state, config, ck
