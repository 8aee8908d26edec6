"""Run lock: one run per output folder. A second run is refused while the first lives (naming its PID,
host, start time and command); a lock left by a run killed with SIGKILL is taken over with a warning;
release removes the file only when it is still ours; without flock (network filesystems) a dead PID
of this host is stale and another host's lock is refused with what to do.

Run: .venv/bin/python -m pytest -q tests/test_runlock.py
"""
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2v import runlock
from d2v.runlock import LOCK_FILE, RunLock, RunLockedError, read_lock

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import os, sys, time
from d2v.runlock import RunLock
lock = RunLock(sys.argv[1], argv=["d2v", "pretrain", "--config", "holder.yaml"]).acquire()
child = os.fork() if len(sys.argv) > 2 else -1  # a data loader worker: inherits the locked fd
if child == 0:
    time.sleep(120)
    os._exit(0)
print("ready", child, flush=True)
time.sleep(120)
"""


def _start_holder(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), *extra], stdout=subprocess.PIPE,
                            cwd=REPO, env=env, text=True)
    word, child = proc.stdout.readline().split()
    assert word == "ready"
    return proc, int(child)


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def holder(tmp_path):
    """Another process that takes the lock of tmp_path/run and sleeps."""
    out = tmp_path / "run"
    proc, _ = _start_holder(out)
    try:
        yield out, proc
    finally:
        _stop(proc)


def _dead_pid() -> int:
    """The PID of a process that has exited (reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock_json(pid, host=None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(),
                       "started": "2025-01-01T00:00:00+00:00", "argv": ["d2v", "pretrain", "old"],
                       "cmd": "d2v pretrain old"})


def test_live_holder_refused_then_taken_over_after_sigkill(holder, d2v_log):
    out, proc = holder
    info = read_lock(out)
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    assert info["argv"] == ["d2v", "pretrain", "--config", "holder.yaml"] and "started" in info

    with pytest.raises(RunLockedError) as err:
        RunLock(out, argv=["d2v", "pretrain", "second"]).acquire()
    msg = str(err.value)
    assert isinstance(err.value, FileExistsError) and "\n" not in msg
    assert f"PID {proc.pid} on host {socket.gethostname()}" in msg and str(out) in msg
    assert "d2v pretrain --config holder.yaml" in msg and info["started"] in msg
    assert "train.out_dir" in msg  # says what to do
    assert read_lock(out)["pid"] == proc.pid  # the refused run changed nothing

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(out, argv=["d2v", "pretrain", "third"]) as lock:
        assert lock.held and lock.took_over["pid"] == proc.pid
        assert read_lock(out)["pid"] == os.getpid() and read_lock(out)["cmd"] == "d2v pretrain third"
        warned = [r.getMessage() for r in d2v_log if r.levelno == logging.WARNING]
        assert any(f"PID {proc.pid}" in m and "taking over" in m for m in warned), warned
    assert not (out / LOCK_FILE).exists()


def test_release_removes_the_file_only_when_still_ours(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    assert (out / LOCK_FILE).is_file() and lock.held
    with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):  # a second lock, even in-process
        RunLock(out).acquire()
    lock.release()
    assert not (out / LOCK_FILE).exists() and not lock.held
    lock.release()  # idempotent

    lock = RunLock(out).acquire()
    (out / LOCK_FILE).unlink()  # someone deleted it and another run took the folder
    (out / LOCK_FILE).write_text(_lock_json(12345, "elsewhere"))
    lock.release()
    assert json.loads((out / LOCK_FILE).read_text())["host"] == "elsewhere"  # not ours: left alone


def test_dead_pid_of_this_host_without_flock_holder_is_taken_over(tmp_path, d2v_log):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(_lock_json(dead))
    with RunLock(out) as lock:
        assert lock.took_over["pid"] == dead and read_lock(out)["pid"] == os.getpid()
    assert any(f"PID {dead}" in r.getMessage() for r in d2v_log if r.levelno == logging.WARNING)
    assert not (out / LOCK_FILE).exists()


def test_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    """flock may be local to each host on a shared filesystem: another host's lock is never taken."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(_lock_json(4242, "node-17"))
    with pytest.raises(RunLockedError) as err:
        RunLock(out).acquire()
    msg = str(err.value)
    assert "another host (PID 4242 on host node-17" in msg and "d2v pretrain old" in msg, msg
    assert f"If that run is gone, delete {out / LOCK_FILE}" in msg, msg
    assert read_lock(out)["host"] == "node-17"


def test_without_flock_decides_by_pid_and_host(tmp_path, monkeypatch, d2v_log):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    with RunLock(out) as lock:  # no lock file: the O_EXCL create decides
        assert lock.held and read_lock(out)["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}.*without flock"):  # we are alive
            RunLock(out).acquire()
    assert not (out / LOCK_FILE).exists()

    dead = _dead_pid()
    (out / LOCK_FILE).write_text(_lock_json(dead))
    with RunLock(out) as lock:
        assert lock.took_over["pid"] == dead and read_lock(out)["pid"] == os.getpid()
    assert any(f"PID {dead}" in r.getMessage() for r in d2v_log if r.levelno == logging.WARNING)

    (out / LOCK_FILE).write_text(_lock_json(dead, "node-17"))
    with pytest.raises(RunLockedError, match=rf"node-17.*delete {out / LOCK_FILE}"):
        RunLock(out).acquire()


def test_a_forked_worker_of_a_killed_holder_keeps_the_lock_until_it_exits(tmp_path):
    out = tmp_path / "run"
    proc, child = _start_holder(out, "fork")
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with pytest.raises(RunLockedError, match=rf"locked by a run that is gone \(PID {proc.pid} .*still "
                                                 rf"holds the lock file .* open"):
            RunLock(out).acquire()
    finally:
        os.kill(child, signal.SIGKILL)  # reaped by init: the parent is gone
        _stop(proc)
    lock = RunLock(out)
    for _ in range(200):  # the kernel drops the flock once the killed child's fds are closed
        try:
            lock.acquire()
            break
        except RunLockedError:
            time.sleep(0.05)
    assert lock.held and lock.took_over["pid"] == proc.pid
    lock.release()
