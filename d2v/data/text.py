"""Text pipeline: strict UTF-8 reading, folder scan, byte-level BPE tokenizer, token-block
pretraining dataset with per-item random masks, labelled line dataset for the probe, collates.

Legend: T = block_size tokens per pretraining item (BOS + block_size - 1 stream tokens),
M masks (clones) per sample, B batch, L tokens of one probe example (<= max_len).

Pretraining data (data2vec 2.0 text, fairseq `sample_break_mode none`): every usable file is one
document; its tokens followed by EOS are appended to one stream, in file order; the stream is cut
into blocks of block_size - 1 tokens and each block is prefixed with BOS (fairseq: 511 + BOS = 512).
The final incomplete block is dropped. No padding is ever needed.

Determinism contract (same as the image pipeline): `TextBlockDataset.__getitem__` takes a virtual
index v = epoch * len(dataset) + i (what `ResumableBatchSampler` yields); the masks of item i in
epoch `epoch` come from one `torch.Generator` seeded with
`derive_seed("text-item", seed, epoch, i)`.
The tokens of a block do not depend on the epoch (blocks are fixed; the sampler reshuffles them).

Special tokens use fairseq's dictionary order: <s>=0, <pad>=1, </s>=2, <unk>=3. The tokenizer adds
no special tokens by itself (no post-processor); the datasets insert BOS/EOS explicitly.

Tokenizer determinism: `tokenizers` 0.23 BPE training breaks count ties by the pair itself, so the
same texts give the same vocabulary and merges with any thread count (checked with 1 and several
rayon threads and by tests/test_data_text.py); no environment variable is needed. Encoding uses the
library's own thread pool in the main process only (datasets hold token tensors, not tokenizers, so
DataLoader workers never touch it).

A run's tokenizer belongs to its corpus and settings: `train_tokenizer` writes a sidecar
(tokenizer.meta.json) recording what it was trained from, and `resolve_tokenizer` reuses a run
folder's tokenizer.json only for a resumed run (or the probe), after checking that record; on a
fresh run an existing one is debris of an attempt that never checkpointed and is replaced.

Messages go through the "d2v" logger: an unusable file is named in one warning per process, however
many datasets (tokenizer, pretraining blocks, probe lines) read it.

References: fairseq TokenBlockDataset (break mode none) and RoBERTa GPT-2 byte-level BPE
(HuggingFace `tokenizers` ByteLevel pre-tokenizer/decoder + BPE trainer).
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import time
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from d2v._optional import require
from d2v.data.common import (
    WARN_FIRST,
    MaskFn,
    atomic_write_text,
    cat_masks,
    check_items,
    draw_mask,
    failed_paths,
    int64_column,
    name_files,
    pad_right,
    scan_class_folders,
    split_virtual_index,
)
from d2v.data.seed import seeded_generator
from d2v.log import get_logger, warn_once
from d2v.masking import random_mask

require("tokenizers", "text data")  # importing this module is asking for text (the imports below are lazy)

log = get_logger(__name__)

__all__ = [
    "BOS", "PAD", "EOS", "UNK", "BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID", "SPECIAL_TOKENS",
    "MIN_VOCAB_SIZE", "TEXT_EXTENSIONS", "TextFileError",
    "read_text_file", "scan_text_source",
    "train_tokenizer", "load_tokenizer", "resolve_tokenizer", "encode_text",
    "corpus_fingerprint", "tokenizer_meta_path", "read_tokenizer_meta",
    "TextBlockDataset", "TextMaskFn", "TextLineDataset", "collate_text", "collate_text_eval",
]

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, EOS, UNK)  # ids 0..3 in this order
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols of byte-level BPE

# Folder scan: these extensions (case-insensitive) and files without any extension (e.g. the
# Debian fortunes files, README-like plain text). Other files (.py, .json, .dat, ...) are ignored,
# so a corpus folder may hold indexes or metadata beside the text. A single file named explicitly
# is read whatever its extension.
TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".text", ".md")

_BOM = b"\xef\xbb\xbf"
_PROGRESS_FROM = 50  # files: show a tokenization progress bar above this many
_ENCODE_LINES = 8192  # lines per encode_batch call (bounds the Encoding objects alive at once)
_ANNOUNCE_BYTES = 16 << 20  # corpus size from which tokenization without a bar says it is starting
_META_FORMAT = 1  # version of the tokenizer sidecar (tokenizer.meta.json)


# ---- reading and scanning -----------------------------------------------------------------


class TextFileError(ValueError):
    """A text file that cannot be used: not UTF-8, binary (NUL bytes), empty or whitespace-only.
    `str(err)` is "<path>: <reason>"; `.path` and `.reason` hold the parts."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def read_text_file(path: str | Path) -> str:
    """Read `path` as strict UTF-8 and return its text with line endings normalized to "\\n".

    A leading UTF-8 BOM is stripped. Raises `TextFileError` (a ValueError) naming the path for
    invalid UTF-8 (with the byte offset in the file), NUL bytes (binary or UTF-16 data), and empty
    or whitespace-only files. OSError (missing, unreadable) propagates unchanged."""
    data = Path(path).read_bytes()
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[skip:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        off = skip + e.start
        raise TextFileError(
            path, f"not valid UTF-8: byte 0x{data[off]:02x} at byte offset {off} ({e.reason})"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        off = skip + len(text[:nul].encode("utf-8"))
        raise TextFileError(path, f"contains a NUL byte at byte offset {off} (binary or UTF-16 "
                                  f"file?)")
    if not text:
        raise TextFileError(path, "empty file")
    if not text.strip():
        raise TextFileError(path, "contains only whitespace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _is_text_name(name: str) -> bool:
    if name.startswith("."):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return suffix == "" or suffix in TEXT_EXTENSIONS


def _is_text_file(path: Path) -> bool:
    return _is_text_name(path.name) and path.is_file()


def scan_text_source(path: str | Path) -> list[tuple[Path, str | None]]:
    """Text files of `path` as [(file, label)], sorted and stable.

    - `path` is a file: [(path, None)] (any extension).
    - `path` is a folder whose top-level subfolders hold text files (searched recursively): each
      such subfolder is a class, label = its name; files directly in `path` are then ignored with
      a warning.
    - otherwise: the text files directly in `path`, label None.
    Text files: extensions .txt/.text/.md (case-insensitive) or no extension; hidden files and
    folders (leading '.') are skipped. Raises FileNotFoundError / ValueError naming the path."""
    root = Path(path).expanduser()
    if root.is_file():
        return [(root, None)]
    if not root.is_dir():
        raise FileNotFoundError(f"text source {root} does not exist")
    per_class, loose = scan_class_folders(root, _is_text_file, log=log, warn_key="text-loose-files",
                                          noun="text file(s)", place="the folder")
    if per_class:
        return [(p, name) for name, files in per_class for p in files]
    if not loose:
        raise ValueError(f"no text files under {root} (accepted: extensions "
                         f"{', '.join(TEXT_EXTENSIONS)} or no extension; hidden files skipped)")
    return [(p, None) for p in loose]


def _as_files(source: Any) -> list[Path]:
    """A str/Path source (file or folder) or a sequence of paths / (path, label) pairs -> paths."""
    if isinstance(source, (str, os.PathLike)):
        return [p for p, _ in scan_text_source(source)]
    return [Path(f[0] if isinstance(f, tuple) else f) for f in source]


def _common_root(files: Sequence[Path]) -> Path:
    if not files:
        return Path(".")
    try:
        return Path(os.path.commonpath([str(Path(f).absolute()) for f in files]))
    except ValueError:  # different drives (Windows)
        return Path(files[0]).parent


_named_bad: set[str] = set()  # real paths of unusable files already named in a warning (process)


def _report_bad(bad: Sequence[tuple[str, str]], what: str, root: Path) -> None:
    """Warn once per process about each unusable file: the tokenizer, the pretraining blocks and the
    probe's lines read the same folder, and a bad file is named the first time only (every time at
    debug level)."""
    new = []
    for p, why in bad:
        log.debug("%s %s: skipping unusable text file %s (%s)", what, root, p, why)
        key = os.path.realpath(p)
        if key not in _named_bad:
            _named_bad.add(key)
            new.append((p, why))
    if not new:
        return
    more = f" and {len(new) - WARN_FIRST} more" if len(new) > WARN_FIRST else ""
    warn_once(log, ("text-unusable-files", frozenset(os.path.realpath(p) for p, _ in new)),
              f"{root}: skipping {len(new)} unusable text file(s): {name_files(new)}{more}")


def _read_usable(files: Sequence[Path], what: str, root: Path
                 ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Read every file; -> ([(path, text)], bad [(path, reason)]). Bad files are named in a warning
    once per process (`_report_bad`)."""
    good: list[tuple[Path, str]] = []
    bad: list[tuple[str, str]] = []
    for f in files:
        try:
            good.append((Path(f), read_text_file(f)))
        except TextFileError as e:
            bad.append((e.path, e.reason))
        except OSError as e:
            bad.append((str(f), f"{type(e).__name__}: {e.strerror or e}"))
    _report_bad(bad, what, root)
    if not good:
        detail = f": {len(bad)} files failed, e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise ValueError(f"{what}: no usable text files in {root}{detail}")
    return good, bad


# ---- tokenizer ----------------------------------------------------------------------------


def _new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _check_specials(tok, where: str) -> None:
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [BOS_ID, PAD_ID, EOS_ID, UNK_ID]:
        raise ValueError(f"tokenizer {where}: special tokens {list(SPECIAL_TOKENS)} must have ids "
                         f"0, 1, 2, 3 (fairseq order), got {got}")


def _chunks_of_lines(text: str, n: int = _ENCODE_LINES) -> Iterator[list[str]]:
    lines = text.splitlines(keepends=True)
    for k in range(0, len(lines), n):
        yield lines[k : k + n]


def encode_text(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` (no special tokens) as int32 (N,). Encoded line by line (newlines kept)
    in batches, which gives the same ids as encoding the whole text except that a whitespace run
    spanning a line break is split at the break."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    parts = []
    for lines in _chunks_of_lines(text):
        encs = encode(lines, add_special_tokens=False)
        ids = list(chain.from_iterable(e.ids for e in encs))
        parts.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---- what a tokenizer was trained from (sidecar) -------------------------------------------


def tokenizer_meta_path(path: str | Path) -> Path:
    """The sidecar recording what the tokenizer at `path` was trained from: tokenizer.json ->
    tokenizer.meta.json (same folder)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.meta.json")


def _stats(files: Sequence[str | Path]) -> list[tuple[str, int, int]]:
    """Sorted (real path, size, mtime_ns) of `files`; (-1, -1) for a file that cannot be stat'ed."""
    out = []
    for f in files:
        real = os.path.realpath(f)
        try:
            st = os.stat(real)
            out.append((real, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((real, -1, -1))
    return sorted(out)


def corpus_fingerprint(files: Sequence[str | Path]) -> str:
    """sha256 (hex) of the corpus listing: the sorted real paths of `files` with their sizes and
    modification times. Cheap (one stat per file); any change of the file set, a size or an mtime
    changes it."""
    h = hashlib.sha256()
    for real, size, mtime in _stats(files):
        h.update(f"{real}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _content_digest(files: Sequence[str | Path]) -> str:
    """sha256 (hex) of the corpus content: each file's path relative to the files' common folder and
    the sha256 of its bytes, sorted by that relative path. Unlike `corpus_fingerprint` it does not
    change when the corpus is moved, copied or touched; it reads every byte."""
    reals = sorted(os.path.realpath(f) for f in files)
    if not reals:
        return hashlib.sha256(b"").hexdigest()
    try:
        root = os.path.commonpath([os.path.dirname(r) for r in reals])
    except ValueError:  # different drives (Windows)
        root = ""
    rows = []
    for real in reals:
        fh = hashlib.sha256()
        try:
            with open(real, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    fh.update(chunk)
            digest = fh.hexdigest()
        except OSError:
            digest = "unreadable"
        rel = os.path.relpath(real, root) if root else real
        rows.append((Path(rel).as_posix(), digest))
    h = hashlib.sha256()
    for rel, digest in sorted(rows):
        h.update(f"{rel}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _corpus_record(files: Sequence[str | Path], data_path: str | None) -> dict[str, Any]:
    stats = _stats(files)
    return {"data_path": None if data_path is None else str(data_path),
            "root": str(_common_root([Path(r) for r, _, _ in stats])),
            "files": len(stats), "bytes": sum(max(size, 0) for _, size, _ in stats),
            "fingerprint": corpus_fingerprint(files), "content": _content_digest(files)}


def _human_size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _describe_corpus(rec: dict[str, Any]) -> str:
    where = f"data.path={rec['data_path']!r}, " if rec.get("data_path") is not None else ""
    return (f"{rec.get('files', '?')} file(s), {_human_size(rec.get('bytes', 0))} "
            f"({where}under {rec.get('root', '?')})")


def read_tokenizer_meta(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of the tokenizer at `path` as a dict, or None when it is missing or unreadable
    (a tokenizer from an older d2v, or a save interrupted between the tokenizer and its sidecar)."""
    try:
        meta = json.loads(tokenizer_meta_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        return None
    return meta


def _tokenizers_version() -> str:
    import tokenizers

    return str(getattr(tokenizers, "__version__", "?"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _differences(meta: dict[str, Any], files: Sequence[str | Path], vocab_size: int,
                 min_frequency: int, data_path: str | None) -> list[str]:
    """What differs between the sidecar `meta` and the current corpus and settings (empty: nothing).
    The corpus is compared by its cheap fingerprint first, by content when the listing differs (a
    moved, copied or touched corpus with the same files is the same corpus)."""
    diffs = []
    if meta.get("vocab_size") != int(vocab_size):
        diffs.append(f"model.vocab_size was {meta.get('vocab_size')} when it was trained, "
                     f"{vocab_size} now")
    if meta.get("min_frequency") != int(min_frequency):
        diffs.append(f"min_frequency was {meta.get('min_frequency')} when it was trained, "
                     f"{min_frequency} now")
    corpus = meta.get("corpus") or {}
    if corpus.get("fingerprint") != corpus_fingerprint(files) \
            and corpus.get("content") != _content_digest(files):
        stats = _stats(files)
        now = {"data_path": data_path, "files": len(stats),
               "bytes": sum(max(size, 0) for _, size, _ in stats),
               "root": str(_common_root([Path(r) for r, _, _ in stats]))}
        diffs.append(f"the corpus differs: it was trained on {_describe_corpus(corpus)}, this run "
                     f"reads {_describe_corpus(now)}")
    return diffs


# ---- training and loading -----------------------------------------------------------------


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_path: str | Path, *,
                    min_frequency: int = 2, data_path: str | None = None):
    """Train a byte-level BPE tokenizer (GPT-2/RoBERTa style) on `files`, save it atomically as
    JSON to `out_path`, then its sidecar `tokenizer_meta_path(out_path)`, and return it.

    Special tokens <s>, <pad>, </s>, <unk> get ids 0..3, then the 256 byte symbols, then merges up
    to `vocab_size` entries (fewer if the text runs out of pairs seen >= min_frequency times).
    Files are read with `read_text_file`; unusable ones are skipped (named once per process).
    Deterministic: the same texts give the same file byte for byte.

    The sidecar (JSON, written atomically after the tokenizer) records what it was trained from:
    vocab_size and min_frequency as asked, the corpus (`data_path` as given, the files' common
    folder, count, bytes, `corpus_fingerprint` and a content digest), the sha256 of the tokenizer
    file it describes, and the `tokenizers` version. `resolve_tokenizer` reads it before reusing a
    run's tokenizer. Logs an info line before training and one after (entries, seconds, path)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {MIN_VOCAB_SIZE} (4 special "
                         f"tokens + 256 byte symbols), got {vocab_size}")
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("train_tokenizer: no files given")
    out_path = Path(out_path)
    corpus = _corpus_record(paths, data_path)  # before reading: a file edited meanwhile mismatches
    good, _ = _read_usable(paths, "tokenizer training", _common_root(paths))
    size = _human_size(sum(_size(f) for f, _ in good))
    log.info("training a byte-level BPE tokenizer (vocab %d) on %d file(s), %s of text ...",
             vocab_size, len(good), size)
    t0 = time.perf_counter()
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (chunk for _, text in good for chunk in _chunks_of_lines(text))
    tok.train_from_iterator((line for chunk in texts for line in chunk), trainer=trainer)
    del good, texts
    _check_specials(tok, "after training")
    text = tok.to_str(pretty=True)
    meta = {"format": _META_FORMAT, "tokenizer_sha256": _sha256(text.encode("utf-8")),
            "entries": tok.get_vocab_size(), "vocab_size": int(vocab_size),
            "min_frequency": int(min_frequency), "tokenizers": _tokenizers_version(),
            "corpus": corpus}
    # tokenizer first, sidecar last: a sidecar always describes a complete tokenizer file, and a
    # tokenizer whose sidecar is missing or names another sha256 is known to be unrecorded
    atomic_write_text(out_path, text)
    atomic_write_text(tokenizer_meta_path(out_path), json.dumps(meta, indent=1) + "\n")
    log.info("tokenizer: %d entries, trained in %.1f s, saved to %s", tok.get_vocab_size(),
             time.perf_counter() - t0, out_path)
    return tok


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_tokenizer(path: Path):
    """-> (tokenizer, sha256 of the file's bytes); errors as in `load_tokenizer`."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (data.tokenizer; a text model "
                                f"imported without --tokenizer or --gpt2-bpe has none: import it again "
                                f"with one)")
    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: "
                         f"{e}") from None
    _check_specials(tok, f"file {path}")
    return tok, _sha256(data)


def load_tokenizer(path: str | Path):
    """Load a tokenizer JSON; FileNotFoundError / ValueError naming `path` if missing, corrupt, or
    without the special tokens at ids 0..3."""
    return _read_tokenizer(Path(path).expanduser())[0]


def resolve_tokenizer(tokenizer_path: str | Path | None, run_dir: str | Path,
                      files: Sequence[str | Path], vocab_size: int, *, resumed: bool = False,
                      strict: bool = True, data_path: str | None = None, min_frequency: int = 2):
    """-> (tokenizer, path it lives at).

    - An explicit `tokenizer_path` (config data.tokenizer) is loaded as is (no corpus check).
    - Else the run's own `run_dir/tokenizer.json`, which belongs to the run's corpus and settings:
      * `resumed` (a run continued from its checkpoint; the probe of a run): it is reused after
        checking its sidecar (`train_tokenizer`) against `files`, `vocab_size` and `min_frequency`.
        A mismatch is a ValueError naming the file, what differs and what to do; with
        `strict=False` (the probe, which must use the tokenizer the model was trained with) it is a
        warning. Without a sidecar describing this file (an older d2v) it is reused unchecked with
        a warning (debug only when not strict). Missing: trained again, with a warning.
      * not resumed (a fresh run): an existing file is debris of an attempt that never
        checkpointed (the trainer refuses a fresh run into a folder with checkpoints). When its
        sidecar describes it and matches this corpus, these settings and the installed
        `tokenizers`, retraining would write the same bytes, so it is reused (info line); else a new
        tokenizer is trained on `files` and atomically replaces it (info line saying so).
      * no file: a new tokenizer is trained on `files` and saved there with its sidecar
        (`data_path`, config data.path, is recorded in it).

    Raises ValueError if the tokenizer has more entries than `vocab_size` (the model's embedding
    table, config key model.vocab_size). Several ranks may race here: training is deterministic
    and both writes atomic, tokenizer first and sidecar last, and the sidecar is read before the
    tokenizer and must name its sha256, so every rank ends up with the same, consistent files."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        tok = load_tokenizer(path)
    else:
        path = Path(run_dir) / "tokenizer.json"
        tok = _run_tokenizer(path, files, vocab_size, resumed=resumed, strict=strict,
                             data_path=data_path, min_frequency=min_frequency)
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer {path} has {n} entries but model.vocab_size is {vocab_size}: "
                         f"the embedding table must hold every token id; set model.vocab_size >= "
                         f"{n} or use a smaller tokenizer")
    return tok, path


def _run_tokenizer(path: Path, files: Sequence[str | Path], vocab_size: int, *, resumed: bool,
                   strict: bool, data_path: str | None, min_frequency: int):
    """The run folder's tokenizer (see `resolve_tokenizer`)."""
    def train():
        return train_tokenizer(files, vocab_size, path, min_frequency=min_frequency,
                               data_path=data_path)

    if not path.is_file():
        if resumed:
            log.warning("%s is missing: training the tokenizer again on the corpus (the same corpus "
                        "and settings give the same tokenizer)", path)
        return train()
    meta = read_tokenizer_meta(path)  # before the tokenizer: it is written last
    tok, sha = _read_tokenizer(path)
    if meta is not None and meta.get("tokenizer_sha256") != sha:
        meta = None  # the sidecar describes another tokenizer (a save cut short between the two)
    key = os.path.realpath(path)
    if resumed:
        if meta is None:
            msg = (f"{path} has no record of the corpus it was trained on "
                   f"({tokenizer_meta_path(path).name} is missing or describes another file: a run "
                   f"from an older d2v?); reusing it unchecked")
            if strict:
                warn_once(log, ("tokenizer-unrecorded", key), msg)
            else:
                log.debug(msg)
            return tok
        diffs = _differences(meta, files, vocab_size, min_frequency, data_path)
        if diffs:
            what = "; ".join(diffs)
            if not strict:
                warn_once(log, ("tokenizer-mismatch", key, what),
                          f"the probe uses the run's tokenizer {path} although it no longer matches "
                          f"the data: {what}")
                return tok
            raise ValueError(
                f"tokenizer {path} does not match the resumed run: {what}. The corpus or settings "
                f"changed since the tokenizer was trained: resume with the original data "
                f"(data.path) and model.vocab_size, or name a tokenizer with "
                f"data.tokenizer=PATH (data.tokenizer={path} uses this one as is)")
        return tok
    # a fresh run: the file is debris of an attempt that never checkpointed
    if meta is None:
        why = "it has no record of what it was trained on"
    else:
        diffs = _differences(meta, files, vocab_size, min_frequency, data_path)
        if meta.get("tokenizers") != _tokenizers_version():
            diffs.append(f"it was trained with tokenizers {meta.get('tokenizers')}, "
                         f"{_tokenizers_version()} is installed")
        if not diffs:
            log.info("reusing %s, left by an earlier attempt that never checkpointed: it was trained "
                     "on this same corpus with the same settings", path)
            return tok
        why = "; ".join(diffs)
    log.info("%s is left from a run that never checkpointed (%s): training a new tokenizer to "
             "replace it", path, why)
    return train()


# ---- pretraining dataset ------------------------------------------------------------------


class TextBlockDataset(torch.utils.data.Dataset):
    """Fixed token blocks of a concatenated corpus (see module docstring) with optional masks.

    `files`: paths (documents, in order) or a str/Path text source for `scan_text_source`.
    Attributes: root (common folder of the files), files (usable ones), bad_files
    [(path, reason)] (named in a warning once per process), num_documents, num_tokens (stream
    length incl. one EOS per document, before the incomplete tail block is dropped), block_size.
    len() = number of blocks.
    Item: {"tokens": int64 (block_size,) starting with BOS, "index": the virtual index v,
           "bad": [], "mask": bool (M, T) from mask_fn(generator), only when mask_fn is given}."""

    def __init__(self, files: Sequence[str | Path] | str | Path, tokenizer, *, block_size: int,
                 seed: int = 0, mask_fn: MaskFn | None = None) -> None:
        if block_size < 2:
            raise ValueError(f"TextBlockDataset: block_size must be >= 2 (BOS + tokens), "
                             f"got {block_size}")
        paths = _as_files(files)
        self.root = Path(files).expanduser() if isinstance(files, (str, os.PathLike)) \
            else _common_root(paths)
        if not paths:
            raise ValueError(f"TextBlockDataset: no text files given (source {self.root})")
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.mask_fn = mask_fn
        good, self.bad_files = _read_usable(paths, "TextBlockDataset", self.root)
        self.files = [p for p, _ in good]
        self.num_documents = len(good)

        parts: list[np.ndarray] = []
        eos = np.array([EOS_ID], dtype=np.int32)
        t0 = time.perf_counter()
        with_bar = len(good) > _PROGRESS_FROM
        nbytes = sum(_size(f) for f, _ in good)
        if not with_bar and nbytes >= _ANNOUNCE_BYTES:  # a few big files: no bar, say it started
            log.info("tokenizing %d file(s) of %s, %s ...", len(good), self.root, _human_size(nbytes))
        bar = tqdm(good, desc=f"tokenizing {self.root.name}", unit="file", mininterval=1.0,
                   disable=not with_bar, leave=False)
        for _, text in bar:
            parts.append(encode_text(tokenizer, text))
            parts.append(eos)
        del good
        stream = np.concatenate(parts)  # (N,) int32: doc tokens, EOS, doc tokens, EOS, ...
        self.num_tokens = int(stream.shape[0])
        log.info("tokenized %s: %d document(s), %s, %d tokens in %.1f s", self.root,
                 self.num_documents, _human_size(nbytes), self.num_tokens, time.perf_counter() - t0)
        per_block = self.block_size - 1
        n_blocks = self.num_tokens // per_block
        if n_blocks == 0:
            raise ValueError(
                f"TextBlockDataset: {self.root} holds {self.num_tokens} tokens "
                f"({self.num_documents} document(s), EOS included), fewer than the {per_block} "
                f"needed for one block of block_size {self.block_size} (BOS + {per_block} tokens); "
                f"add text or lower the block size"
            )
        self._stream = torch.from_numpy(stream[: n_blocks * per_block].copy())  # int32
        self._n_blocks = n_blocks

    def __len__(self) -> int:
        return self._n_blocks

    def block(self, i: int) -> torch.Tensor:
        """Block i (0 <= i < len) as int64 (block_size,), BOS first."""
        per_block = self.block_size - 1
        out = torch.empty(self.block_size, dtype=torch.int64)
        out[0] = BOS_ID
        out[1:] = self._stream[i * per_block : (i + 1) * per_block]
        return out

    def item_generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator that drives the masks of block `index` in `epoch`."""
        return seeded_generator("text-item", self.seed, epoch, index)

    def __getitem__(self, v: int) -> dict[str, Any]:
        epoch, i = split_virtual_index(v, self._n_blocks, "TextBlockDataset")
        item: dict[str, Any] = {"tokens": self.block(i), "index": epoch * self._n_blocks + i, "bad": []}
        if self.mask_fn is not None:
            g = self.item_generator(epoch, i)
            item["mask"] = draw_mask(self.mask_fn, g, "TextBlockDataset")  # (M, T)
        return item


class TextMaskFn:
    """Picklable per-item mask maker: generator -> bool (clone_batch, length), True = masked;
    every row masks exactly length - int(length * (1 - mask_prob)) tokens (spec §3.5). Its settings
    are the config's (data.tokens_per_sample or model.max_positions, masking.*), validated there:
    length >= 2, clone_batch >= 1, 0 < mask_prob < 1; random_mask checks mask_prob when called."""

    def __init__(self, length: int, clone_batch: int, mask_prob: float) -> None:
        self.length = int(length)
        self.clone_batch = int(clone_batch)
        self.mask_prob = float(mask_prob)

    def __call__(self, g: torch.Generator) -> torch.Tensor:
        return random_mask(self.clone_batch, self.length, mask_prob=self.mask_prob, generator=g)

    def __repr__(self) -> str:
        return (f"TextMaskFn(length={self.length}, clone_batch={self.clone_batch}, "
                f"mask_prob={self.mask_prob})")


# ---- labelled line dataset (probe) --------------------------------------------------------


class TextLineDataset(torch.utils.data.Dataset):
    """One example per non-empty line of labelled text files (topic classification probe).

    `files_with_labels`: [(path, label name or None)] as from `scan_text_source`, or a str/Path
    source to scan. `classes`: sorted label names by default; pass the train split's list to the
    test split so label ids agree. Label = classes.index(name), -1 for files without a label.
    A line is stripped of surrounding whitespace and encoded as [BOS] + ids, truncated so the
    whole example has at most `max_len` tokens. Unusable files go to `bad_files` (each named in a
    warning once per process: the pretraining data and the tokenizer read the same files).
    Attributes: root, classes, labels (list[int], one per example), bad_files.
    Item: {"tokens": int64 (L,), "label": int}."""

    def __init__(self, files_with_labels: Sequence[tuple[str | Path, str | None]] | str | Path,
                 tokenizer, *, max_len: int, classes: Sequence[str] | None = None) -> None:
        if max_len < 2:
            raise ValueError(f"TextLineDataset: max_len must be >= 2 (BOS + tokens), got {max_len}")
        if isinstance(files_with_labels, (str, os.PathLike)):
            self.root = Path(files_with_labels).expanduser()
            pairs = scan_text_source(self.root)
        else:
            pairs = [(Path(p), lab) for p, lab in files_with_labels]
            self.root = _common_root([p for p, _ in pairs])
        if not pairs:
            raise ValueError(f"TextLineDataset: no text files given (source {self.root})")
        if classes is None:
            classes = sorted({lab for _, lab in pairs if lab is not None})
        self.classes = list(classes)
        index = {name: k for k, name in enumerate(self.classes)}
        unknown = sorted({lab for _, lab in pairs if lab is not None and lab not in index})
        if unknown:
            raise ValueError(f"TextLineDataset {self.root}: label(s) {unknown} are not in "
                             f"classes {self.classes}")
        self.max_len = int(max_len)
        label_of = {p: lab for p, lab in pairs}
        good, self.bad_files = _read_usable([p for p, _ in pairs], "TextLineDataset", self.root)

        encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        lengths: list[int] = []
        ids_all: list[int] = []
        self.labels: list[int] = []
        for path, text in good:
            lab = label_of[path]
            y = -1 if lab is None else index[lab]
            lines = [s for s in (ln.strip() for ln in text.split("\n")) if s]
            for k in range(0, len(lines), _ENCODE_LINES):
                for enc in encode(lines[k : k + _ENCODE_LINES], add_special_tokens=False):
                    ids = enc.ids[: self.max_len - 1]
                    ids_all.append(BOS_ID)
                    ids_all.extend(ids)
                    lengths.append(1 + len(ids))
                    self.labels.append(y)
        if not lengths:  # unreachable with read_text_file's checks, kept for safety
            raise ValueError(f"TextLineDataset: no non-empty lines in {self.root}")
        self._tokens = torch.tensor(ids_all, dtype=torch.int32)  # all examples back to back
        ends = np.cumsum(lengths)
        self._offsets = torch.from_numpy(np.concatenate([[0], ends]).astype(np.int64))  # (N+1,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        n = len(self.labels)
        if not -n <= i < n:
            raise IndexError(f"TextLineDataset: index {i} out of range for {n} examples")
        i %= n
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return {"tokens": self._tokens[lo:hi].to(torch.int64), "label": self.labels[i]}


class WordOrderDataset(torch.utils.data.Dataset):
    """A word-order probe in minimal pairs, built from lines: each line of `base` with more than
    `min_tokens` tokens appears twice, as written (item 2k, label 1) and with its tokens after <s> and
    the first token randomly permuted (item 2k + 1, label 0; the permutation fixed by `seed`).

    The two items of a pair hold exactly the same tokens, so features that ignore order (a bag of
    embeddings) cannot tell them apart, and the topic or length of a line says nothing about its label
    (each line is in both classes). The probe scores it pair by pair (`paired`): the classifier picks,
    of the two versions of a held-out line, the one it rates more likely as written; chance is 50%."""

    classes = ["shuffled", "original"]
    paired = True  # items 2k, 2k + 1 are one line as written and shuffled (d2v.probe scores pairs)

    def __init__(self, base: TextLineDataset, *, seed: int = 0, min_tokens: int = 8):
        self.base, self.root, self.seed = base, base.root, int(seed)
        lengths = base._offsets[1:] - base._offsets[:-1]  # (N,) tokens per example
        self.indices = [i for i in range(len(base)) if int(lengths[i]) > min_tokens]
        if not self.indices:
            raise ValueError(f"WordOrderDataset: no line of {base.root} has more than {min_tokens} tokens")
        self.labels: list[int] = [1, 0] * len(self.indices)

    def __len__(self) -> int:
        return 2 * len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"WordOrderDataset: index {i} out of range for {len(self)} items")
        line, shuffled = divmod(i % len(self), 2)
        tokens = self.base[self.indices[line]]["tokens"]
        if shuffled:
            g = seeded_generator("word-order-item", self.seed, line)
            # <s> and the first token stay: the first word is the one BPE token without a leading
            # space, so moving it would mark shuffled lines by position alone
            body = tokens[2:]
            perm = torch.randperm(body.numel(), generator=g)
            while body.numel() > 1 and torch.equal(body[perm], body):  # never "shuffled" into itself
                perm = torch.randperm(body.numel(), generator=g)
            tokens = torch.cat([tokens[:2], body[perm]])
        return {"tokens": tokens, "label": 1 - shuffled}


# ---- collates -----------------------------------------------------------------------------


def collate_text(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pretraining batch: tokens int64 (B, T); mask bool (B*M, T) sample-major (rows b*M ..
    b*M+M-1 belong to sample b), present when the items have masks; index int64 (B,) virtual
    indices; bad = flat list of failed paths (always empty for text)."""
    check_items(items, "collate_text")
    lengths = {int(it["tokens"].shape[0]) for it in items}
    if len(lengths) != 1:
        raise ValueError(f"collate_text: items have different lengths {sorted(lengths)}")
    out: dict[str, Any] = {
        "tokens": torch.stack([it["tokens"] for it in items]),  # (B, T)
        "index": int64_column(items, "index"),  # (B,)
        "bad": failed_paths(items),
    }
    mask = cat_masks(items, "collate_text")  # (B*M, T) or None
    if mask is not None:
        out["mask"] = mask
    return out


def collate_text_eval(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Probe batch: tokens int64 (B, Lmax) right-padded with PAD_ID, padding_mask bool (B, Lmax)
    True = padding, label int64 (B,)."""
    check_items(items, "collate_text_eval")
    tokens, padding = pad_right([it["tokens"] for it in items], PAD_ID, torch.int64)  # (B, Lmax) x 2
    return {"tokens": tokens, "padding_mask": padding, "label": int64_column(items, "label")}
