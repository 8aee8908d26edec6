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

References: fairseq TokenBlockDataset (break mode none) and RoBERTa GPT-2 byte-level BPE
(HuggingFace `tokenizers` ByteLevel pre-tokenizer/decoder + BPE trainer).
"""
from __future__ import annotations

import operator
import os
import tempfile
import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from d2v._optional import require
from d2v.data.files import walk_files
from d2v.data.seed import derive_seed
from d2v.masking import random_mask

require("tokenizers", "text data")  # importing this module is asking for text (the imports below are lazy)

__all__ = [
    "BOS", "PAD", "EOS", "UNK", "BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID", "SPECIAL_TOKENS",
    "MIN_VOCAB_SIZE", "TEXT_EXTENSIONS", "TextFileError",
    "read_text_file", "scan_text_source",
    "train_tokenizer", "load_tokenizer", "resolve_tokenizer", "encode_text",
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
_WARN_FIRST = 5  # bad paths named in the init warning
_PROGRESS_FROM = 50  # files: show a tokenization progress bar above this many
_ENCODE_LINES = 8192  # lines per encode_batch call (bounds the Encoding objects alive at once)


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


def _walk_text(top: Path, seen: set | None = None) -> list[Path]:
    """All text files under `top` (hidden files skipped), sorted by path."""
    return walk_files(top, lambda p: _is_text_name(p.name) and p.is_file(), seen)


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
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # one walk over all classes, links followed once by real path: a link loop or a link into another
    # class's folder lists nothing twice
    seen = {os.path.realpath(root)} | {os.path.realpath(d) for d in subdirs}
    per_class = [(d.name, _walk_text(d, seen)) for d in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_text_name(p.name))
    if per_class:
        if loose:
            warnings.warn(f"{root}: ignoring {len(loose)} text file(s) directly in the folder "
                          f"because class subfolders exist, e.g. {loose[0]}", stacklevel=2)
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


def _read_usable(files: Sequence[Path], what: str, root: Path
                 ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Read every file; -> ([(path, text)], bad [(path, reason)]) with one warning for the bad."""
    good: list[tuple[Path, str]] = []
    bad: list[tuple[str, str]] = []
    for f in files:
        try:
            good.append((Path(f), read_text_file(f)))
        except TextFileError as e:
            bad.append((e.path, e.reason))
        except OSError as e:
            bad.append((str(f), f"{type(e).__name__}: {e.strerror or e}"))
    if bad:
        first = "; ".join(f"{p} ({why})" for p, why in bad[:_WARN_FIRST])
        more = f" and {len(bad) - _WARN_FIRST} more" if len(bad) > _WARN_FIRST else ""
        warnings.warn(f"{what} {root}: skipping {len(bad)} unusable text file(s): {first}{more}",
                      stacklevel=3)
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


def _atomic_write_text(path: Path, text: str) -> None:
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


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_path: str | Path, *,
                    min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2/RoBERTa style) on `files`, save it atomically as
    JSON to `out_path` and return it.

    Special tokens <s>, <pad>, </s>, <unk> get ids 0..3, then the 256 byte symbols, then merges up
    to `vocab_size` entries (fewer if the text runs out of pairs seen >= min_frequency times).
    Files are read with `read_text_file`; unusable ones are skipped with one warning.
    Deterministic: the same texts give the same file byte for byte."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {MIN_VOCAB_SIZE} (4 special "
                         f"tokens + 256 byte symbols), got {vocab_size}")
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("train_tokenizer: no files given")
    good, _ = _read_usable(paths, "tokenizer training", _common_root(paths))
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (chunk for _, text in good for chunk in _chunks_of_lines(text))
    tok.train_from_iterator((line for chunk in texts for line in chunk), trainer=trainer)
    _check_specials(tok, "after training")
    _atomic_write_text(Path(out_path), tok.to_str(pretty=True))
    return tok


def load_tokenizer(path: str | Path):
    """Load a tokenizer JSON; FileNotFoundError / ValueError naming `path` if missing, corrupt, or
    without the special tokens at ids 0..3."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: "
                         f"{e}") from None
    _check_specials(tok, f"file {path}")
    return tok


def resolve_tokenizer(tokenizer_path: str | Path | None, run_dir: str | Path,
                      files: Sequence[str | Path], vocab_size: int):
    """-> (tokenizer, path it lives at). Precedence: an explicit `tokenizer_path` is loaded; else
    `run_dir/tokenizer.json` if it exists (a resumed run reuses it); else a new tokenizer is
    trained on `files` with `vocab_size` entries and saved there.

    Raises ValueError if the tokenizer has more entries than `vocab_size` (the model's embedding
    table, config key model.vocab_size). Training is deterministic and the save atomic, so ranks
    that race here all end up with the same file."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        tok = load_tokenizer(path)
    else:
        path = Path(run_dir) / "tokenizer.json"
        tok = load_tokenizer(path) if path.is_file() else train_tokenizer(files, vocab_size, path)
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer {path} has {n} entries but model.vocab_size is {vocab_size}: "
                         f"the embedding table must hold every token id; set model.vocab_size >= "
                         f"{n} or use a smaller tokenizer")
    return tok, path


# ---- pretraining dataset ------------------------------------------------------------------

MaskFn = Callable[[torch.Generator], torch.Tensor]


class TextBlockDataset(torch.utils.data.Dataset):
    """Fixed token blocks of a concatenated corpus (see module docstring) with optional masks.

    `files`: paths (documents, in order) or a str/Path text source for `scan_text_source`.
    Attributes: root (common folder of the files), files (usable ones), bad_files
    [(path, reason)], num_documents, num_tokens (stream length incl. one EOS per document, before
    the incomplete tail block is dropped), block_size. len() = number of blocks.
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
        bar = tqdm(good, desc=f"tokenizing {self.root.name}", unit="file", mininterval=1.0,
                   disable=len(good) <= _PROGRESS_FROM, leave=False)
        for _, text in bar:
            parts.append(encode_text(tokenizer, text))
            parts.append(eos)
        del good
        stream = np.concatenate(parts)  # (N,) int32: doc tokens, EOS, doc tokens, EOS, ...
        self.num_tokens = int(stream.shape[0])
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
        return torch.Generator().manual_seed(derive_seed("text-item", self.seed, epoch, index))

    def __getitem__(self, v: int) -> dict[str, Any]:
        v = operator.index(v)
        if v < 0:
            raise IndexError(f"TextBlockDataset: index must be >= 0 (virtual index "
                             f"epoch * {self._n_blocks} + i), got {v}")
        epoch, i = divmod(v, self._n_blocks)
        item: dict[str, Any] = {"tokens": self.block(i), "index": v, "bad": []}
        if self.mask_fn is not None:
            mask = self.mask_fn(self.item_generator(epoch, i))  # (M, T)
            if mask.dim() != 2 or mask.dtype != torch.bool:
                raise TypeError(f"TextBlockDataset: mask_fn must return a bool (M, T) tensor, "
                                f"got {mask.dtype} {tuple(mask.shape)}")
            item["mask"] = mask
        return item


class TextMaskFn:
    """Picklable per-item mask maker: generator -> bool (clone_batch, length), True = masked;
    every row masks exactly length - int(length * (1 - mask_prob)) tokens (spec §3.5)."""

    def __init__(self, length: int, clone_batch: int, mask_prob: float) -> None:
        if length < 1 or clone_batch < 1:
            raise ValueError(f"TextMaskFn: length and clone_batch must be >= 1, got "
                             f"length={length} clone_batch={clone_batch}")
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"TextMaskFn: mask_prob must be in [0, 1), got {mask_prob}")
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
    whole example has at most `max_len` tokens. Unusable files go to `bad_files` (one warning).
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
    """A word-order probe built from labelled lines: each example of `base` with at least
    `min_tokens` tokens appears once, either as written (label 1) or with its tokens after <s> and
    the first token randomly permuted (label 0), 50/50 by a fixed seed. Both classes have exactly the same bag of
    tokens, so features that ignore order (a bag of embeddings) score chance; above-chance accuracy
    measures what the encoder learned about English word order from context."""

    classes = ["shuffled", "original"]

    def __init__(self, base: TextLineDataset, *, seed: int = 0, min_tokens: int = 8):
        self.base, self.root, self.seed = base, base.root, int(seed)
        self.indices = [i for i in range(len(base)) if int(base._offsets[i + 1] - base._offsets[i]) > min_tokens]
        if not self.indices:
            raise ValueError(f"WordOrderDataset: no line of {base.root} has more than {min_tokens} tokens")
        g = torch.Generator().manual_seed(derive_seed("word-order", self.seed))
        self.labels: list[int] = torch.randint(0, 2, (len(self.indices),), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tokens = self.base[self.indices[i]]["tokens"]
        if self.labels[i] == 0:
            g = torch.Generator().manual_seed(derive_seed("word-order-item", self.seed, i))
            # <s> and the first token stay: the first word is the one BPE token without a leading
            # space, so moving it would mark shuffled lines by position alone
            body = tokens[2:]
            perm = torch.randperm(body.numel(), generator=g)
            while body.numel() > 1 and torch.equal(body[perm], body):  # never "shuffled" into itself
                perm = torch.randperm(body.numel(), generator=g)
            tokens = torch.cat([tokens[:2], body[perm]])
        return {"tokens": tokens, "label": self.labels[i]}


# ---- collates -----------------------------------------------------------------------------


def collate_text(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pretraining batch: tokens int64 (B, T); mask bool (B*M, T) sample-major (rows b*M ..
    b*M+M-1 belong to sample b), present when the items have masks; index int64 (B,) virtual
    indices; bad = flat list of failed paths (always empty for text)."""
    if not items:
        raise ValueError("collate_text: got an empty list of items")
    lengths = {int(it["tokens"].shape[0]) for it in items}
    if len(lengths) != 1:
        raise ValueError(f"collate_text: items have different lengths {sorted(lengths)}")
    out: dict[str, Any] = {
        "tokens": torch.stack([it["tokens"] for it in items]),  # (B, T)
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),  # (B,)
        "bad": [p for it in items for p in it.get("bad", [])],
    }
    has_mask = ["mask" in it for it in items]
    if any(has_mask):
        if not all(has_mask):
            raise ValueError("collate_text: some items have a 'mask' and some do not")
        out["mask"] = torch.cat([it["mask"] for it in items], dim=0)  # (B*M, T)
    return out


def collate_text_eval(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Probe batch: tokens int64 (B, Lmax) right-padded with PAD_ID, padding_mask bool (B, Lmax)
    True = padding, label int64 (B,)."""
    if not items:
        raise ValueError("collate_text_eval: got an empty list of items")
    B = len(items)
    L = max(int(it["tokens"].shape[0]) for it in items)
    tokens = torch.full((B, L), PAD_ID, dtype=torch.int64)  # (B, Lmax)
    padding = torch.ones(B, L, dtype=torch.bool)  # (B, Lmax)
    for b, it in enumerate(items):
        n = int(it["tokens"].shape[0])
        tokens[b, :n] = it["tokens"]
        padding[b, :n] = False
    return {"tokens": tokens, "padding_mask": padding,
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64)}
