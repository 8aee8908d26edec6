"""What the image, audio and text pipelines share: the class-folder scan, the start-up header check,
decode with fallback, virtual indices and per-item masks, collate helpers, the prepare-once cache
folders of the embedded datasets, atomic file writes, and what the builders return (the pretraining
collate's mask indices, ProbeTask).

Legend: B batch, M masks (clones) per sample, T mask positions (patches, frames or tokens),
L_b the length of item b (samples or tokens), Lmax the longest in a batch.

The messages stay each pipeline's own: a helper that warns takes the module's logger (its records keep
the module's name) and the words that differ between modalities.
"""
from __future__ import annotations

import json
import logging
import operator
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from d2v.data.files import DataDecodeError, walk_files
from d2v.log import warn_once
from d2v.masking import make_maskinfo

T = TypeVar("T")

WARN_FIRST = 5  # bad paths named in a start-up warning
MAX_DECODE_TRIES = 10  # files tried for one item before __getitem__ gives up
REASONS_SHOWN = 3  # failure reasons quoted in a DataDecodeError
READY = "READY"  # the marker of a complete cache folder, written last

# a per-item mask maker: the item's generator -> bool (M, T), True = masked
MaskFn = Callable[[torch.Generator], torch.Tensor]


# ---- scanning -----------------------------------------------------------------------------------


def scan_class_folders(root: Path, accept: Callable[[Path], bool], *, log: logging.Logger, warn_key: str,
                       noun: str, place: str = "the root") -> tuple[list[tuple[str, list[Path]]], list[Path]]:
    """(classes, loose) of the folder `root`:
    - classes [(name, files)]: the top-level subfolders (hidden ones skipped) whose trees hold files
      that `accept`, sorted by name, with those files (`walk_files`, sorted). One walk over all
      classes: links are followed once by real path, so a link loop or a link into another class's
      folder (or into `root`) lists nothing twice;
    - loose: the files directly in `root` that `accept`, sorted.
    With class subfolders the loose files are ignored: named in a warning on `log` ("<root>: ignoring
    <n> <noun> directly in <place> because class subfolders exist, ...") once per root per process."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # the root and every class folder belong to themselves: a walk reaching them by a link stops
    seen = {os.path.realpath(root)} | {os.path.realpath(d) for d in subdirs}
    classes = [(d.name, walk_files(d, accept, seen)) for d in subdirs]
    classes = [(name, files) for name, files in classes if files]
    loose = sorted(p for p in root.iterdir() if p.is_file() and accept(p))
    if classes and loose:
        warn_once(log, (warn_key, os.path.realpath(root)),
                  f"{root}: ignoring {len(loose)} {noun} directly in {place} because class subfolders "
                  f"exist, e.g. {loose[0]}")
    return classes, loose


# ---- start-up header check ----------------------------------------------------------------------


class HeaderCheck(NamedTuple):
    kept: list[int]  # positions of the usable files, in order
    info: list[Any]  # what the check said about each kept file (audio: its length)
    bad: list[tuple[str, str]]  # (path, reason) of the others


def check_headers(paths: Sequence[Path], check: Callable[[Path], tuple[Any, str | None]], *, root: Path,
                  progress_from: int) -> HeaderCheck:
    """Run `check(path) -> (info, reason or None)` on every file: reason None = usable. The header
    checks of a large folder take a while: a progress bar ("checking <root name>") is shown from
    `progress_from` files."""
    out = HeaderCheck([], [], [])
    bar = tqdm(paths, desc=f"checking {root.name}", unit="file", mininterval=1.0,
               disable=len(paths) < progress_from, leave=False)
    for k, path in enumerate(bar):
        info, reason = check(path)
        if reason is None:
            out.kept.append(k)
            out.info.append(info)
        else:
            out.bad.append((str(path), reason))
    return out


def name_files(bad: Sequence[tuple[str, str]]) -> str:
    """"path (reason); path (reason); ..." for the first WARN_FIRST of `bad`."""
    return "; ".join(f"{p} ({why})" for p, why in bad[:WARN_FIRST])


def warn_skipped(log: logging.Logger, warn_key: str, root: Path, bad: Sequence[tuple[str, str]],
                 noun: str) -> None:
    """One warning per root per process naming the files the header check excluded (none: nothing)."""
    if bad:
        warn_once(log, (warn_key, os.path.realpath(root)),
                  f"{root}: skipping {len(bad)} {noun}: {name_files(bad)}")


# ---- items --------------------------------------------------------------------------------------


def split_virtual_index(v: int, n: int, owner: str) -> tuple[int, int]:
    """Virtual index v = epoch * n + i (what the samplers yield) -> (epoch, i); IndexError if v < 0."""
    v = operator.index(v)
    if v < 0:
        raise IndexError(f"{owner}: index must be >= 0 (virtual index epoch * {n} + i), got {v}")
    return divmod(v, n)


def draw_mask(mask_fn: MaskFn, g: torch.Generator, owner: str) -> torch.Tensor:
    """mask_fn(g): bool (M, T); TypeError naming `owner` if mask_fn returns anything else."""
    mask = mask_fn(g)
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise TypeError(f"{owner}: mask_fn must return a bool (M, T) tensor, got {mask.dtype} "
                        f"{tuple(mask.shape)}")
    return mask


class DecodeFailed(Exception):
    """Raised by a `decode_with_fallback` decoder: entry `path` failed. `what` opens its warning
    ("<what>; falling back to index <next>"), `reason` is quoted if every try fails."""

    def __init__(self, path: str, what: str, reason: str) -> None:
        super().__init__(what)
        self.path, self.what, self.reason = path, what, reason


def decode_with_fallback(n: int, i: int, decode: Callable[[int], T], *, log: logging.Logger, warn_key: str,
                         give_up: Callable[[int, str], str]) -> tuple[int, T, list[str]]:
    """Entry i of n decoded, or the next one that decodes: i, i+1, ... (mod n), each entry once, at
    most MAX_DECODE_TRIES. -> (j, decode(j), paths that failed before j: the item's "bad" list).

    `decode(j)` raises DecodeFailed for an entry that cannot be used; that file is named in a warning
    on `log` once per process (key (warn_key, path)). When every try fails: DataDecodeError with the
    message give_up(tries, "<the first REASONS_SHOWN reasons>[ (and k more)]")."""
    bad: list[str] = []
    reasons: list[str] = []
    tries = min(MAX_DECODE_TRIES, n)
    for k in range(tries):
        j = (i + k) % n
        try:
            return j, decode(j), bad
        except DecodeFailed as e:
            warn_once(log, (warn_key, e.path), f"{e.what}; falling back to index {(j + 1) % n}")
            bad.append(e.path)
            reasons.append(e.reason)
    shown = "; ".join(r.replace("\n", " ") for r in reasons[:REASONS_SHOWN])
    more = f" (and {len(reasons) - REASONS_SHOWN} more)" if len(reasons) > REASONS_SHOWN else ""
    raise DataDecodeError(give_up(tries, shown + more))


# ---- collate ------------------------------------------------------------------------------------


def check_items(items: Sequence[dict[str, Any]], owner: str) -> None:
    if not items:
        raise ValueError(f"{owner}: got an empty list of items")


def int64_column(items: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    """int64 (B,): items[b][key]."""
    return torch.tensor([it[key] for it in items], dtype=torch.int64)


def failed_paths(items: Sequence[dict[str, Any]]) -> list[str]:
    """The items' "bad" lists (files that failed to decode), flattened in batch order."""
    return [p for it in items for p in it.get("bad", [])]


def cat_masks(items: Sequence[dict[str, Any]], owner: str) -> torch.Tensor | None:
    """bool (B*M, T): the items' (M, T) masks sample-major (rows b*M .. b*M+M-1 belong to sample b);
    None when no item has a mask, ValueError when only some do."""
    has_mask = ["mask" in it for it in items]
    if not any(has_mask):
        return None
    if not all(has_mask):
        raise ValueError(f"{owner}: some items have a 'mask' and some do not")
    return torch.cat([it["mask"] for it in items], dim=0)  # (B*M, T)


def pad_right(seqs: Sequence[torch.Tensor], value: float, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """B sequences (L_b,) -> (padded `dtype` (B, Lmax) filled with `value` past each end,
    padding_mask bool (B, Lmax) True = padding)."""
    lens = [int(x.shape[0]) for x in seqs]
    B, Lmax = len(seqs), max(lens)
    out = torch.full((B, Lmax), value, dtype=dtype)  # (B, Lmax)
    padding = torch.ones(B, Lmax, dtype=torch.bool)  # (B, Lmax)
    for b, (x, n) in enumerate(zip(seqs, lens)):
        out[b, :n] = x
        padding[b, :n] = False
    return out, padding


# ---- prepare-once cache folders -----------------------------------------------------------------


def read_marker(root: Path) -> dict[str, Any] | None:
    """The JSON object in root/READY, or None when it is missing, unreadable or not an object."""
    try:
        rec = json.loads((root / READY).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def build_then_rename(final: Path, build: Callable[[Path], dict[str, Any]], *,
                      is_complete: Callable[[Path], bool], indent: int | None = 1) -> None:
    """Build the folder `final` atomically: `build(tmp)` fills a temp folder next to it and returns
    the record written to tmp/READY (JSON, last), then tmp is renamed to `final`.

    A complete folder of an older recipe in the way (it has a READY marker, `is_complete` says no) is
    moved aside and deleted; anything else there is never deleted (the rename fails). If another
    process put a complete `final` there first, ours is discarded. The temp folders are removed
    whatever happens."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old: Path | None = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0o700; the final tree should be readable like any dir
        record = build(tmp)
        (tmp / READY).write_text(json.dumps(record, indent=indent) + "\n")
        if (final / READY).is_file() and not is_complete(final):  # an older recipe: move it aside
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            try:
                os.replace(final, old / final.name)
            except OSError:
                pass  # another process moved or replaced it meanwhile
        try:
            os.replace(tmp, final)  # atomic; fails if another process already put `final` there
        except OSError:
            if not is_complete(final):
                raise
    finally:
        for d in (tmp, old):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)


# ---- files --------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file in its folder and a rename: a reader sees
    the old file or the whole new one, never a part. Mode 0o644; the folder is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------ builders
def has_split(root: Path) -> bool:
    """A data folder with train/ and test/ parts: pretrain on train, probe train -> test."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def user_path(cfg) -> Path | None:
    """data.path, or None for the modality's embedded default."""
    return Path(cfg.data.path).expanduser() if cfg.data.path else None


class WithMaskInfo:
    """Pretraining collate: the modality's collate, then the gather/restore indices of its masks,
    batch["maskinfo"] = make_maskinfo(batch["mask"]) (a MaskInfo of (B*M, ...) CPU tensors).

    Built here, in the DataLoader worker, because make_maskinfo is a host argsort plus host reads:
    in the trainer's process they would stall the step (and, on a GPU, wait for the queued work).
    The indices are a pure function of the mask, so training is bitwise the same as computing them in
    the step. Picklable (DataLoader workers)."""

    def __init__(self, collate: Callable[[list], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> dict[str, Any]:
        batch = self.collate(items)
        batch["maskinfo"] = make_maskinfo(batch["mask"])
        return batch

    def __repr__(self) -> str:
        return f"WithMaskInfo({self.collate!r})"


@dataclass
class ProbeTask:
    """A labelled probe: train split, test split (None = split train 80/20), eval collate."""

    name: str
    train: Dataset
    test: Dataset | None
    collate: Callable[[list], dict[str, Any]]
    source_key: str


@dataclass
class EmbedSource:
    """The inputs of `d2v embed`: one item per name (a file; text: a line of a file).

    `load(i)` -> the model input of item i as a tensor (an image (C, S, S), a waveform (L,), token ids
    (T,)), raising for an unusable file (the item is then skipped and named); `collate(tensors)` ->
    (source (B, ...), padding_mask (B, L) True = padding, or None)."""

    names: list[str]
    load: Callable[[int], torch.Tensor]
    collate: Callable[[list], tuple]
    skipped: list[tuple[str, str]]  # (name, reason) of files refused before loading
