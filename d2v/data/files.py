"""Finding data files: one recursive walker shared by the image, audio and text pipelines."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def walk_files(top: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Files under `top` that `accept`, recursively, sorted by path. Symlinked directories are followed
    once (a loop or a directory linked twice is read once); hidden directories (leading '.') are skipped."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop or the same dir linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if accept(p))
    return sorted(found)
