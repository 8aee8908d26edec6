"""d2v's messages go through the standard `logging` module, under the "d2v" logger.

The CLI calls `setup_logging` once: info and up to stderr as plain lines (warnings prefixed
"warning: "), `--quiet` keeps warnings and errors only. `add_run_log(out_dir)` adds the run folder's
`train.log` (timestamps, debug and up) for the run's lifetime. A library user who never calls
`setup_logging` gets Python's defaults (warnings and errors on stderr).

`warn_once(logger, key, msg)` warns once per process per key: a bad file is named once, not once per
dataset that scans the same folder (pretraining, the tokenizer, the probe's splits).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = "d2v"
RUN_LOG = "train.log"

_warned: set = set()


def get_logger(name: str) -> logging.Logger:
    """The logger of a d2v module (`get_logger(__name__)`), a child of the "d2v" logger."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes through tqdm when a progress bar is on screen, so a message does not tear the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(self.format(record), file=self.stream)
                self.flush()
                return
        except Exception:  # noqa: BLE001 - fall back to a plain write
            pass
        super().emit(record)


def setup_logging(quiet: bool = False, verbose: bool = False) -> logging.Logger:
    """Configure the "d2v" logger for the command line (idempotent): info to stderr, warnings only
    with `quiet`, debug with `verbose`. Python warnings from d2v's dependencies are routed through
    logging too (one line, no source echo)."""
    log = logging.getLogger(ROOT)
    for h in list(log.handlers):
        if getattr(h, "_d2v_console", False):
            log.removeHandler(h)
    h = _TqdmSafeHandler(sys.stderr)
    h._d2v_console = True
    h.setFormatter(_ConsoleFormatter())
    h.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log


def add_run_log(out_dir: str | Path) -> logging.Handler:
    """Append d2v's messages (timestamped; debug and up under `setup_logging`) to <out_dir>/train.log;
    returns the handler (remove it with `remove_run_log`)."""
    path = Path(out_dir) / RUN_LOG
    h = logging.FileHandler(path, mode="a", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.DEBUG)
    logging.getLogger(ROOT).addHandler(h)  # the logger's own level stays the caller's choice
    return h


def remove_run_log(h: logging.Handler | None) -> None:
    if h is not None:
        logging.getLogger(ROOT).removeHandler(h)
        h.close()


def warn_once(logger: logging.Logger, key, msg: str) -> bool:
    """logger.warning(msg) the first time `key` is seen in this process; True when it warned."""
    if key in _warned:
        return False
    _warned.add(key)
    logger.warning(msg)
    return True
