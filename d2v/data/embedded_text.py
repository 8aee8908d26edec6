"""The embedded default text corpus: Debian's `fortunes` collection (BSD licence), offline.

The Debian package `fortunes` (scripts/setup.sh installs it; `apt-get install fortunes`) puts
one file per category in /usr/share/games/fortunes, entries separated by lines holding only "%".
On first use `prepare_fortunes` turns eight topical categories into a labelled, split corpus:

    <cache>/fortunes/READY                    json: version, per-category counts, characters
    <cache>/fortunes/train/<category>/<category>.txt   ~80% of each category's entries, one per line
    <cache>/fortunes/test/<category>/<category>.txt    the other ~20% (class subfolders: the generic
                                                       labelled-folder layout of d2v.data.text)

Categories (FORTUNE_CATEGORIES), with the entries left after filtering (fortunes 1:1.99.1-7.3):
computers 1024, law 203, men-women 579, politics 697, science 618, songs-poems 716, startrek 225,
work 628. They are the categories with >= ~200 entries whose topics are distinct from each other;
left out: `people`, `definitions`, `wisdom`, `cookie`, `miscellaneous`, `platitudes`, `zippy`,
`art`, `literature` (general aphorisms/humour that overlap every topic), `linux` and `perl`
(overlap `computers`), `education`, `food`, `drugs`, `sports`, `medicine` (<= ~200 entries,
fewer than 75 for medicine). Attribution lines ("-- Kirk, stardate ...") are kept: they are part
of the real text.

Entry processing: split at "%" lines; internal whitespace (newlines, tabs, the indentation of
attribution lines) collapsed to single spaces; entries shorter than 20 characters dropped;
duplicates inside a category and entries found in two chosen categories dropped. Per category
`numpy.random.RandomState(FORTUNES_SPLIT_SEED).permutation(n)` picks at most 600 entries
(FORTUNES_MAX_PER_CATEGORY: the largest class is then 3x the smallest instead of 5x); the last
k - round(0.2 * k) picked are train, the first round(0.2 * k) test; each split file lists its
entries in the source file's order. Result: 4,007 entries (3,205 train / 802 test), 833 k
characters. The train split is 229 k byte-level BPE tokens with a 2000-entry vocabulary trained on
it (448 blocks of 512), 200 k with 4000 entries (392 blocks).

Pretraining reads the train/ files (labels ignored, each file one document); the probe classifies
single held-out lines of test/ by topic, training the classifier on train/ lines
(`fortune_files(root, split)` gives [(path, category)] for `TextLineDataset`).

Preparation is atomic (temp dir next to the target, then `os.replace`), idempotent, and safe when
several processes race; a tree with an older FORTUNES_VERSION is replaced.

References: Debian package `fortunes` (fortune-mod data files).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2v.data.common import READY, build_then_rename, read_marker
from d2v.data.embedded import default_cache_dir

__all__ = [
    "FORTUNE_CATEGORIES",
    "FORTUNES_DIR",
    "FORTUNES_MAX_PER_CATEGORY",
    "FORTUNES_MIN_CHARS",
    "FORTUNES_VERSION",
    "fortune_files",
    "parse_fortune_file",
    "prepare_fortunes",
]

FORTUNE_CATEGORIES: tuple[str, ...] = (
    "computers", "law", "men-women", "politics", "science", "songs-poems", "startrek", "work",
)
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_DIRNAME = "fortunes"
FORTUNES_VERSION = 2  # bump when categories, filtering, cap or split change
FORTUNES_MIN_CHARS = 20  # entries shorter than this (after whitespace collapsing) are dropped
FORTUNES_MAX_PER_CATEGORY = 600
FORTUNES_TEST_FRACTION = 0.2
FORTUNES_SPLIT_SEED = 0  # numpy RandomState seed of the per-category selection/split permutation


def parse_fortune_file(path: str | Path) -> list[str]:
    """Entries of a fortune file (strfile format, "%" lines between entries), whitespace collapsed
    to single spaces, entries shorter than FORTUNES_MIN_CHARS dropped, in file order."""
    text = Path(path).read_bytes().decode("utf-8")
    entries, cur = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            entries.append(" ".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append(" ".join(cur))
    entries = [" ".join(e.split()) for e in entries]
    return [e for e in entries if len(e) >= FORTUNES_MIN_CHARS]


def _missing_message(src: Path, what: Path) -> str:
    return (f"the embedded text corpus needs the Debian `fortunes` package: {what} not found. "
            f"Install it (`apt-get install fortunes`; scripts/setup.sh does this), or set "
            f"data.path to a folder of your own text (source dir checked: {src})")


def _load_categories(src: Path) -> dict[str, list[str]]:
    """Category -> deduplicated entries (entries shared by two categories dropped)."""
    per_cat: dict[str, list[str]] = {}
    for cat in FORTUNE_CATEGORIES:
        f = src / cat
        if not f.is_file():
            raise RuntimeError(_missing_message(src, f))
        per_cat[cat] = list(dict.fromkeys(parse_fortune_file(f)))  # dedupe, keep order
    owner: dict[str, set[str]] = {}
    for cat, entries in per_cat.items():
        for e in entries:
            owner.setdefault(e, set()).add(cat)
    return {cat: [e for e in entries if len(owner[e]) == 1] for cat, entries in per_cat.items()}


def _write_split_tree(tmp_root: Path, src: Path) -> dict:
    """Write train/ and test/ files under `tmp_root`; return the READY record."""
    per_cat = _load_categories(src)
    record: dict = {"version": FORTUNES_VERSION, "categories": {}, "train": 0, "test": 0,
                    "chars": 0}
    for split in ("train", "test"):
        (tmp_root / split).mkdir(parents=True)
    for cat, entries in per_cat.items():
        n = len(entries)
        perm = np.random.RandomState(FORTUNES_SPLIT_SEED).permutation(n)
        chosen = perm[: min(n, FORTUNES_MAX_PER_CATEGORY)]
        n_test = int(round(FORTUNES_TEST_FRACTION * len(chosen)))
        rows = {"train": np.sort(chosen[n_test:]), "test": np.sort(chosen[:n_test])}
        counts = {}
        for split, idx in rows.items():
            lines = [entries[k] for k in idx.tolist()]
            (tmp_root / split / cat).mkdir(parents=True, exist_ok=True)
            (tmp_root / split / cat / f"{cat}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = len(lines)
            record[split] += len(lines)
            record["chars"] += sum(len(s) for s in lines)
        counts["available"] = n
        record["categories"][cat] = counts
    return record


def _ready_version(root: Path) -> int | None:
    try:
        return int(read_marker(root)["version"])
    except (ValueError, KeyError, TypeError):  # no marker (None), no "version", or not a number
        return None


def prepare_fortunes(cache_dir: str | Path | None = None, *,
                     source_dir: str | Path | None = None) -> Path:
    """Build `<cache_dir>/fortunes` once (see module docstring) and return that root.

    `cache_dir` defaults to `default_cache_dir()` ($D2V_CACHE or ~/.cache/d2v); `source_dir` to
    /usr/share/games/fortunes. Returns at once when a READY marker of this FORTUNES_VERSION exists.
    RuntimeError naming what to install when the fortunes files are missing."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    src = Path(source_dir) if source_dir is not None else FORTUNES_DIR
    final = cache / FORTUNES_DIRNAME
    version = _ready_version(final)
    if version == FORTUNES_VERSION:
        return final
    if final.exists() and version is None:
        raise RuntimeError(f"embedded_text.py: {final} exists but has no valid {READY} marker "
                           f"(not written by prepare_fortunes, or damaged); delete it and call "
                           f"prepare_fortunes again")
    if not src.is_dir():
        raise RuntimeError(_missing_message(src, src))
    # a tree of an older version is replaced
    build_then_rename(final, lambda tmp: _write_split_tree(tmp, src),
                      is_complete=lambda root: _ready_version(root) == FORTUNES_VERSION)
    return final


def fortune_files(root: str | Path, split: str) -> list[tuple[Path, str]]:
    """[(file, category)] of a prepared split ("train" or "test"), in FORTUNE_CATEGORIES order
    (which is sorted), for `TextLineDataset`; the paths alone serve `TextBlockDataset`."""
    if split not in ("train", "test"):
        raise ValueError(f"fortune_files: split must be 'train' or 'test', got {split!r}")
    d = Path(root) / split
    out = [(d / cat / f"{cat}.txt", cat) for cat in FORTUNE_CATEGORIES]
    missing = [str(p) for p, _ in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"fortune_files: {len(missing)} file(s) missing, e.g. {missing[0]}"
                                f" (prepare the corpus with prepare_fortunes)")
    return out
