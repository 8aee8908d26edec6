"""Finding data files: one recursive walker shared by the image, audio and text pipelines."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def walk_files(top: Path, accept: Callable[[Path], bool], seen: set[str] | None = None) -> list[Path]:
    """Files under `top` that `accept`, recursively, sorted by path; hidden directories (leading '.')
    are skipped.

    Symlinks are followed once, by real path: a directory or file reached a second time (a loop such
    as `loop -> ..`, or the same target linked twice) is skipped, so every file is listed once, under
    the first path the walk reaches it by. `seen` holds the real paths already taken; pass one set to
    several calls to make them one walk (the image scan walks each class folder with a shared set, so
    a link from one class into another, or into the root, does not relabel those files). `top` itself
    is always walked."""
    seen = set() if seen is None else seen
    seen.add(os.path.realpath(top))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not accept(p):
                continue
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                found.append(p)
    return sorted(found)


class DataDecodeError(ValueError):
    """Every file tried for one item failed to decode although it passed the start-up header check
    (typically a folder of corrupt data behind valid headers: all-NaN audio, truncated images).

    A ValueError, so the command line prints the message as one line and exits 2. A DataLoader worker
    re-raises an exception in the main process as `type(exc)(<"Caught ... Original Traceback ...">)`;
    the constructor keeps only the original message from such a text, so the error still reads as
    one line there."""

    def __init__(self, msg: str = "") -> None:
        super().__init__(_original_message(str(msg), type(self).__name__))


def _original_message(msg: str, name: str) -> str:
    """The message of the `name` exception at the end of a DataLoader worker's traceback text, or
    `msg` itself when it is not one."""
    if not msg.startswith(f"Caught {name} ") or "Traceback" not in msg:
        return msg
    tail = msg.rstrip().rsplit(f"{name}: ", 1)
    return tail[1].strip() if len(tail) == 2 else msg
