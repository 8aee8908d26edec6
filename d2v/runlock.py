"""One run per output folder: `RunLock(out_dir)` holds <out_dir>/.d2v.lock for the run's lifetime.

Two runs writing one folder would overwrite each other's checkpoints, `latest` and metrics.csv, so the
second is refused with a `RunLockedError` naming the first (PID, host, start time, command).

The lock file holds JSON {pid, host, started, argv, cmd} and is created atomically (O_CREAT|O_EXCL); the
holder also keeps an exclusive `flock` on it, on an fd open until release, so the kernel drops the lock
when the holder dies however it dies (kill -9, OOM killer, a node reboot). A lock file nobody holds the
flock of is left over from such a run: the next run takes it over with a warning naming the dead one.
The takeover keeps the same file (inode): whoever holds the flock of the inode the path names owns it.

Where flock is not supported (some network filesystems report ENOLCK/EOPNOTSUPP), a lock file is stale
only when it names a process on this host that no longer exists; one from another host cannot be
checked, so it is refused with a message saying to delete the file if that run is gone. The same
refusal covers a lock left on a shared filesystem by a run on another host even where flock works
(flock may be local to each host there). A lock from this host whose flock is free belongs to a dead
process, whatever its PID now names, and is taken over.

Multi-rank runs: only rank 0 takes the lock (the caller decides; this module knows nothing of ranks).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from d2v.log import get_logger

log = get_logger(__name__)

LOCK_FILE = ".d2v.lock"

# flock is not there on this filesystem (NFS without lockd, some FUSE filesystems)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class RunLockedError(FileExistsError):
    """Another run holds (or may hold) the output folder's lock; the message says which and what to do."""


def lock_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOCK_FILE


def read_lock(out_dir: str | Path) -> dict | None:
    """The lock file's JSON ({pid, host, started, argv, cmd}), {} when unreadable or empty, None when
    there is no lock file."""
    try:
        return _parse(lock_path(out_dir).read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        return {}


def _parse(data: bytes) -> dict:
    try:
        info = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def describe(info: dict | None) -> str:
    """'PID 123 on host h, started 2025-..., command: d2v pretrain ...' from a lock file's JSON."""
    if not info:
        return "an unknown process (the lock file is empty or unreadable: a run may be starting right now)"
    cmd = info.get("cmd") or (shlex.join(map(str, info["argv"])) if isinstance(info.get("argv"), list)
                              else "unknown")
    return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"started {info.get('started', '?')}, command: {cmd}")


class RunLock:
    """`with RunLock(out_dir): ...` or `lock = RunLock(out_dir).acquire()` ... `lock.release()`.

    acquire() creates out_dir if needed and raises RunLockedError (a FileExistsError) when a live run
    holds the lock. argv defaults to sys.argv; cmd (a display string) to argv shell-joined."""

    def __init__(self, out_dir: str | Path, argv: list[str] | None = None, cmd: str | None = None):
        self.out_dir = Path(out_dir)
        self.path = lock_path(out_dir)
        self.argv = [str(a) for a in (sys.argv if argv is None else argv)]
        self.cmd = cmd if cmd is not None else shlex.join(self.argv)
        self.info: dict | None = None  # what this process wrote, while it holds the lock
        self.took_over: dict | None = None  # the dead holder's info, when acquire() took a stale lock over
        self._fd: int | None = None
        self._owner_pid: int | None = None
        self._ino: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner_pid == os.getpid()

    # ------------------------------------------------------------------------------------ acquire
    def acquire(self) -> "RunLock":
        if self.held:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # a lock released or replaced between our open and our flock: look again
            created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                got = self._try_flock(fd)
                if got is None:  # flock unsupported here: decide from the file's contents
                    if self._acquire_without_flock(fd, created):
                        return self
                    os.close(fd)
                    continue
                if not got:
                    raise self._refusal(_parse(_read_fd(fd)))
                if not self._same_file(fd):  # it was released (unlinked) or replaced before our flock
                    os.close(fd)
                    continue
                previous = None if created else _parse(_read_fd(fd))
                if previous is not None:
                    if previous and previous.get("host") not in (None, socket.gethostname()):
                        # flock may be local to each host on a shared filesystem: cannot tell it is dead
                        raise self._refusal(previous, other_host=True)
                    self._warn_stale(previous)
                self._own(fd)
                return self
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise
        raise RunLockedError(f"{self.out_dir}: could not take the run lock {self.path} (it keeps changing "
                             f"hands); is another run starting there?")

    def _try_flock(self, fd: int) -> bool | None:
        """True: we hold it; False: another process does; None: flock is not supported here."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in _NO_FLOCK:
                return None
            raise
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _acquire_without_flock(self, fd: int, created: bool) -> bool:
        """No flock: the O_EXCL create decides; an existing file is stale only when it names a process
        of this host that is gone. True when we now own the lock; False to look again."""
        if created:
            self._own(fd)
            return True
        previous = _parse(_read_fd(fd))
        if not previous:
            raise self._refusal(previous, no_flock=True)
        if previous.get("host") != socket.gethostname():
            raise self._refusal(previous, other_host=True)
        if _pid_alive(previous.get("pid")):
            raise self._refusal(previous, no_flock=True)
        # stale: remove that file (if it is still the one we read) and create ours with O_EXCL
        if self._same_file(fd) and _parse(_read_fd(fd)) == previous:
            self._warn_stale(previous)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        return False

    def _warn_stale(self, previous: dict) -> None:
        self.took_over = previous
        log.warning(f"{self.out_dir}: taking over the run lock {self.path} left by a run that is gone "
                    f"({describe(previous)}); it was killed or crashed")

    def _own(self, fd: int) -> None:
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                     "argv": self.argv, "cmd": self.cmd}
        data = (json.dumps(self.info, indent=1) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            os.fsync(fd)
        except OSError:
            pass
        st = os.fstat(fd)
        self._fd, self._owner_pid, self._ino = fd, os.getpid(), (st.st_dev, st.st_ino)

    def _refusal(self, info: dict, other_host: bool = False, no_flock: bool = False) -> RunLockedError:
        who = describe(info)
        if other_host:
            what = (f"{self.out_dir} is locked by a run on another host ({who}); d2v cannot tell from here "
                    f"whether it is still running. If that run is gone, delete {self.path} and start "
                    f"again; otherwise wait for it or set train.out_dir to another folder")
        elif no_flock:
            what = (f"{self.out_dir} is locked by another run ({who}; lock file {self.path}, on a "
                    f"filesystem without flock). Wait for it to finish or stop it, or set train.out_dir "
                    f"to another folder; if no run is using this folder, delete {self.path}")
        elif info and info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
            # the holder is dead but a process it forked (a data loader worker) still has the lock open
            what = (f"{self.out_dir} is locked by a run that is gone ({who}), but a process it started "
                    f"still holds the lock file {self.path} open (a data loader worker exits within "
                    f"seconds of its parent): wait and start again, or stop what `fuser {self.path}` "
                    f"lists")
        else:
            what = (f"{self.out_dir} is in use by another d2v run ({who}; lock file {self.path}). Wait "
                    f"for it to finish or stop it, or set train.out_dir to another folder: two runs in "
                    f"one folder would overwrite each other's checkpoints")
        return RunLockedError(what)

    # ------------------------------------------------------------------------------------ release
    def release(self) -> None:
        """Remove the lock file if it is still ours, then drop the flock. A no-op when not held, and in
        a forked child of the holder (a data loader worker): only the holder releases."""
        fd = self._fd
        if fd is None or self._owner_pid != os.getpid():
            return
        try:
            try:
                st = os.stat(self.path)
                ours = (st.st_dev, st.st_ino) == self._ino and _parse(_read_fd(fd)).get("pid") == os.getpid()
            except FileNotFoundError:
                ours = False
            if ours:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                log.warning(f"{self.path} is no longer this run's lock (deleted or replaced); left as it is")
        finally:
            self._fd = self._owner_pid = self._ino = None
            self.info = None
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.out_dir)!r}, held={self.held})"


def _read_fd(fd: int, limit: int = 1 << 16) -> bytes:
    try:
        return os.pread(fd, limit, 0)
    except OSError:
        return b""
