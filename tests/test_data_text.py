"""Tests for the text pipeline: strict reading, scan, byte-level BPE tokenizer, token blocks +
masks, labelled lines, collates, resumable loader, embedded fortunes corpus.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_data_text.py
"""
from __future__ import annotations

import argparse
import json
import pickle
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from d2v.data import embedded_text
from d2v.data.embedded_text import FORTUNE_CATEGORIES, fortune_files, prepare_fortunes
from d2v.data.sampler import build_loader
from d2v.data.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TextBlockDataset,
    TextFileError,
    TextLineDataset,
    TextMaskFn,
    collate_text,
    collate_text_eval,
    load_tokenizer,
    read_text_file,
    resolve_tokenizer,
    scan_text_source,
    train_tokenizer,
)

VOCAB = 300

# Real English prose available in every Python install (stdlib module docstrings) plus a few
# fixed sentences, so the tests need no corpus on disk.
ENGLISH = "\n".join([
    argparse.__doc__, textwrap.__doc__, json.__doc__, pickle.__doc__, warnings.__doc__,
    "The quick brown fox jumps over the lazy dog while the committee reviews the budget.",
    "A scientist measured the temperature of the water twice before writing the report.",
])


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    paras = [p for p in ENGLISH.split("\n\n") if p.strip()]
    k = len(paras) // 3
    return [_write(d / f"doc{j}.txt", "\n\n".join(paras[j * k : (j + 1) * k]))
            for j in range(3)]


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return train_tokenizer(corpus, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ---- reading --------------------------------------------------------------------------------


def test_read_text_invalid_utf8_names_path_and_offset(tmp_path):
    p = _write(tmp_path / "latin1.txt", "caf".encode() + b"\xe9 ok")
    with pytest.raises(TextFileError) as err:
        read_text_file(p)
    msg = str(err.value)
    assert str(p) in msg and "UTF-8" in msg and "offset 3" in msg and "0xe9" in msg
    assert isinstance(err.value, ValueError) and err.value.path == str(p)
    e2 = pickle.loads(pickle.dumps(err.value))
    assert str(e2) == msg and e2.reason == err.value.reason
    # the offset counts the BOM bytes of the file
    q = _write(tmp_path / "bom_bad.txt", b"\xef\xbb\xbfab\xff")
    with pytest.raises(TextFileError, match="offset 5"):
        read_text_file(q)


def test_read_text_empty_whitespace_nul(tmp_path):
    with pytest.raises(TextFileError, match="empty") as err:
        read_text_file(_write(tmp_path / "e.txt", ""))
    assert "e.txt" in str(err.value)
    with pytest.raises(TextFileError, match="only whitespace"):
        read_text_file(_write(tmp_path / "w.txt", " \n\t\r\n  "))
    with pytest.raises(TextFileError, match="only whitespace"):
        read_text_file(_write(tmp_path / "bomw.txt", b"\xef\xbb\xbf \n"))
    with pytest.raises(TextFileError, match="NUL byte at byte offset 1"):  # UTF-16LE "hi"
        read_text_file(_write(tmp_path / "u16.txt", "hi".encode("utf-16-le")))


def test_read_text_bom_stripped_newlines_normalized(tmp_path):
    p = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfHello\r\nw\xc3\xb6rld\rend\n")
    assert read_text_file(p) == "Hello\nwörld\nend\n"
    with pytest.raises(FileNotFoundError):
        read_text_file(tmp_path / "missing.txt")


# ---- scan -----------------------------------------------------------------------------------


def test_scan_single_file_any_extension(tmp_path):
    p = _write(tmp_path / "data.csv", "a,b\n")
    assert scan_text_source(p) == [(p, None)]
    assert scan_text_source(str(p)) == [(p, None)]


def test_scan_flat_folder_filters_and_sorts(tmp_path):
    for name in ("b.txt", "a.MD", "c.text", "NOEXT", "x.py", "y.json", ".hidden.txt", ".hid"):
        _write(tmp_path / name, "some text\n")
    _write(tmp_path / ".git" / "deep.txt", "hidden dir")  # hidden dir only: not a class
    got = scan_text_source(tmp_path)
    assert [(p.name, y) for p, y in got] == [
        ("NOEXT", None), ("a.MD", None), ("b.txt", None), ("c.text", None)]


def test_scan_class_subfolders_recursive(tmp_path, d2v_log):
    _write(tmp_path / "zoo" / "z.txt", "z")
    _write(tmp_path / "art" / "deep" / "er" / "b.txt", "b")
    _write(tmp_path / "art" / "a.txt", "a")
    _write(tmp_path / "art" / ".hidden" / "h.txt", "h")
    _write(tmp_path / "art" / ".h.txt", "h")
    _write(tmp_path / "art" / "img.png", "x")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "loose.txt", "loose")
    got = scan_text_source(tmp_path)
    assert scan_text_source(tmp_path) == got
    warned = d2v_log.messages()
    assert len(warned) == 1 and "loose.txt" in warned[0]  # once, though scanned twice
    rel = [(str(p.relative_to(tmp_path)), y) for p, y in got]
    assert rel == [("art/a.txt", "art"), ("art/deep/er/b.txt", "art"), ("zoo/z.txt", "zoo")]


def test_scan_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_text_source(tmp_path / "nope")
    _write(tmp_path / "only.py", "x")
    with pytest.raises(ValueError, match=r"no text files under .*\.txt"):
        scan_text_source(tmp_path)


# ---- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_roundtrip_specials_and_determinism(corpus, tok, tmp_path):
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.get_vocab_size() == VOCAB
    sentence = "The committee measured the water, twice! Ünïcödé & émojis 🙂 survive."
    ids = _ids(tok, sentence)
    assert all(i >= 4 for i in ids)  # no special token inside ordinary text
    assert tok.decode(ids) == sentence
    assert len(_ids(tok, "the committee")) < len("the committee")  # merges were learned
    path = tmp_path / "sub" / "t.json"
    t1 = train_tokenizer(corpus, VOCAB, path)
    # no temp file left behind; the sidecar records what it was trained from
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.json", "t.meta.json"]
    meta = json.loads((path.parent / "t.meta.json").read_text())
    assert meta["vocab_size"] == VOCAB and meta["entries"] == VOCAB and meta["min_frequency"] == 2
    assert meta["corpus"]["files"] == len(corpus) and len(meta["corpus"]["fingerprint"]) == 64
    loaded = load_tokenizer(path)
    assert loaded.to_str() == t1.to_str() and _ids(loaded, sentence) == ids
    t2 = train_tokenizer(corpus, VOCAB, tmp_path / "t2.json")
    assert (tmp_path / "t2.json").read_bytes() == path.read_bytes()
    assert t2.get_vocab() == t1.get_vocab()
    # a different corpus gives a different vocabulary (the comparison above can fail)
    t3 = train_tokenizer(corpus[:1], VOCAB, tmp_path / "t3.json")
    assert t3.get_vocab() != t1.get_vocab()


def test_tokenizer_errors(corpus, tmp_path, d2v_log):
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        train_tokenizer(corpus, 100, tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_tokenizer(tmp_path / "absent.json")
    bad = _write(tmp_path / "corrupt.json", '{"not": "a tokenizer"')
    with pytest.raises(ValueError, match="corrupt.json"):
        load_tokenizer(bad)
    # a valid tokenizer without our special ids is refused
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator([ENGLISH], trainers.BpeTrainer(vocab_size=270,
                                                             special_tokens=["<pad>", "<s>"]))
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="ids 0, 1, 2, 3"):
        load_tokenizer(tmp_path / "other.json")
    empty = _write(tmp_path / "empty.txt", "   ")
    with pytest.raises(ValueError, match="no usable"):
        train_tokenizer([empty], VOCAB, tmp_path / "y.json")
    assert any("empty.txt" in m for m in d2v_log.messages())


def test_resolve_tokenizer_precedence_and_vocab_check(corpus, tok, tmp_path):
    run = tmp_path / "run"
    # 1. nothing there: train on files, save to run/tokenizer.json
    t, p = resolve_tokenizer(None, run, corpus, VOCAB)
    assert p == run / "tokenizer.json" and p.is_file() and t.get_vocab_size() == VOCAB
    # 2. run/tokenizer.json exists: a resumed run reuses it (same corpus and vocab size)
    mtime = p.stat().st_mtime_ns
    t2, p2 = resolve_tokenizer(None, run, corpus, VOCAB, resumed=True)
    assert p2 == p and p.stat().st_mtime_ns == mtime and t2.to_str() == t.to_str()
    # 3. an explicit path wins over run/tokenizer.json
    explicit = tmp_path / "explicit.json"
    t_exp = train_tokenizer(corpus[:1], 280, explicit)
    t3, p3 = resolve_tokenizer(str(explicit), run, corpus, VOCAB)
    assert p3 == explicit and t3.to_str() == t_exp.to_str() != t.to_str()
    # the tokenizer must fit the embedding table
    with pytest.raises(ValueError, match=r"300 entries.*model\.vocab_size is 290"):
        resolve_tokenizer(str(p), run, corpus, 290)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        resolve_tokenizer(str(tmp_path / "nothere.json"), run, corpus, VOCAB)


# ---- pretraining blocks ---------------------------------------------------------------------


def test_blocks_exact_size_bos_and_stream_order(tmp_path, tok):
    docs = ["first document about the water.\nSecond line.\n",
            "The committee reviews the budget.", "  a third one, indented\n\n\nwith gaps "]
    files = [_write(tmp_path / f"{k}.txt", d) for k, d in enumerate(docs)]
    bs = 6
    ds = TextBlockDataset(files, tok, block_size=bs)
    expect = [i for d in docs for i in _ids(tok, d) + [EOS_ID]]
    assert ds.num_tokens == len(expect) and ds.num_documents == 3
    assert len(ds) == len(expect) // (bs - 1) and ds.bad_files == []
    assert ds.root == tmp_path
    got = []
    for i in range(len(ds)):
        t = ds[i]["tokens"]
        assert t.shape == (bs,) and t.dtype == torch.int64 and t[0] == BOS_ID
        got += t[1:].tolist()
    assert got == expect[: len(got)]  # file order, EOS after each document, tail dropped
    assert len(expect) - len(got) < bs - 1
    assert tok.decode(expect, skip_special_tokens=False) == "</s>".join(docs) + "</s>"
    n = len(ds)
    assert torch.equal(ds[2 * n + 1]["tokens"], ds[1]["tokens"])  # virtual index wraps
    assert ds[2 * n + 1]["index"] == 2 * n + 1 and ds[0]["bad"] == [] and "mask" not in ds[0]
    with pytest.raises(IndexError):
        ds[-1]


def test_blocks_from_folder_source(tmp_path, tok):
    _write(tmp_path / "src" / "b" / "2.txt", "world " * 10)
    _write(tmp_path / "src" / "a" / "1.txt", "hello " * 10)
    ds = TextBlockDataset(tmp_path / "src", tok, block_size=4)
    assert ds.root == tmp_path / "src" and [p.name for p in ds.files] == ["1.txt", "2.txt"]
    assert ds[0]["tokens"][1:].tolist() == _ids(tok, "hello " * 10)[:3]


def test_blocks_bad_files_skipped_and_reported(tmp_path, tok, d2v_log):
    good = _write(tmp_path / "good.txt", "plenty of good English text " * 5)
    bads = [_write(tmp_path / "bad0.txt", b"\xff\xfe\x00"), _write(tmp_path / "bad1.txt", ""),
            _write(tmp_path / "bad2.txt", "\n \n")]
    bads += [_write(tmp_path / f"e{k}.txt", "") for k in range(4)]
    ds = TextBlockDataset([*bads[:2], good, *bads[2:]], tok, block_size=8)
    msgs = d2v_log.messages()
    assert len(msgs) == 1 and "7 unusable" in msgs[0] and "and 2 more" in msgs[0]
    assert "bad0.txt" in msgs[0] and "UTF-8" in msgs[0] and "e2.txt" not in msgs[0]
    assert [p for p, _ in ds.bad_files] == [str(b) for b in bads]
    assert "empty" in ds.bad_files[1][1] and ds.files == [good] and ds.num_documents == 1
    assert ds.num_tokens == len(_ids(tok, good.read_text())) + 1


def test_blocks_nothing_usable_or_too_little(tmp_path, tok, d2v_log):
    bad = _write(tmp_path / "bad.txt", b"\x80")
    with pytest.raises(ValueError, match="no usable text files") as err:
        TextBlockDataset([bad], tok, block_size=8)
    assert any("bad.txt" in m for m in d2v_log.messages())
    assert str(tmp_path) in str(err.value)
    short = _write(tmp_path / "short.txt", "hi")
    n = len(_ids(tok, "hi")) + 1
    with pytest.raises(ValueError, match=rf"holds {n} tokens.*the 63 needed.*block_size 64"):
        TextBlockDataset([short], tok, block_size=64)
    with pytest.raises(ValueError, match="no text files given"):
        TextBlockDataset([], tok, block_size=8)


# ---- masks ----------------------------------------------------------------------------------


def test_masks_shape_count_determinism(corpus, tok):
    T, M, p = 32, 3, 0.48
    mask_fn = TextMaskFn(T, M, p)
    ds = TextBlockDataset(corpus, tok, block_size=T, seed=5, mask_fn=mask_fn)
    twin = TextBlockDataset(corpus, tok, block_size=T, seed=5,
                            mask_fn=pickle.loads(pickle.dumps(mask_fn)))
    n = len(ds)
    assert n > 10
    for v in (0, 7, n + 7, 3 * n):
        m = ds[v]["mask"]
        assert m.shape == (M, T) and m.dtype == torch.bool
        assert (m.sum(1) == T - int(T * (1 - p))).all()  # 16 of 32 masked per row
        assert torch.equal(m, twin[v]["mask"])
    assert not torch.equal(ds[7]["mask"], ds[n + 7]["mask"])  # new epoch, new masks
    assert torch.equal(ds[7]["tokens"], ds[n + 7]["tokens"])  # same block
    assert not torch.equal(ds[7]["mask"], ds[8]["mask"])
    assert not torch.equal(ds[0]["mask"][0], ds[0]["mask"][1])  # clones differ
    other = TextBlockDataset(corpus, tok, block_size=T, seed=6, mask_fn=mask_fn)
    assert not torch.equal(other[7]["mask"], ds[7]["mask"])
    with pytest.raises(ValueError, match="mask_prob"):  # the config rejects it first (masking.mask_prob)
        TextMaskFn(T, M, 1.0)(torch.Generator())


# ---- labelled lines -------------------------------------------------------------------------


def test_line_dataset_labels_truncation_bad_files(tmp_path, tok, d2v_log):
    _write(tmp_path / "tr" / "zeta" / "z.txt", "zeta one\n\n   \nzeta two is here\n")
    _write(tmp_path / "tr" / "alpha" / "a.txt", "alpha line\n")
    _write(tmp_path / "tr" / "alpha" / "bad.txt", b"\xc3\x28 broken")
    ds = TextLineDataset(tmp_path / "tr", tok, max_len=64)
    assert any("bad.txt" in m for m in d2v_log.messages())
    assert ds.classes == ["alpha", "zeta"] and ds.labels == [0, 1, 1]
    assert ds.root == tmp_path / "tr" and ds.bad_files[0][0].endswith("bad.txt")
    it = ds[2]
    assert it["label"] == 1 and it["tokens"].dtype == torch.int64
    assert it["tokens"].tolist() == [BOS_ID] + _ids(tok, "zeta two is here")
    # explicit classes (from a train split): ids follow them, not the files present
    pairs = [(tmp_path / "tr" / "zeta" / "z.txt", "zeta")]
    te = TextLineDataset(pairs, tok, max_len=64, classes=["alpha", "beta", "zeta"])
    assert te.labels == [2, 2] and te.classes == ["alpha", "beta", "zeta"]
    with pytest.raises(ValueError, match=r"\['zeta'\] are not in classes"):
        TextLineDataset(pairs, tok, max_len=64, classes=["alpha"])
    # truncation: the whole example (BOS included) has at most max_len tokens
    long_line = "the committee reviews the budget " * 20
    lp = _write(tmp_path / "long.txt", long_line + "\nshort\n")
    tr = TextLineDataset([(lp, None)], tok, max_len=5)
    assert tr.labels == [-1, -1] and tr.classes == []
    assert tr[0]["tokens"].tolist() == [BOS_ID] + _ids(tok, long_line.strip())[:4]
    assert tr[1]["tokens"].tolist() == [BOS_ID] + _ids(tok, "short")
    assert tr[-1]["tokens"].tolist() == tr[1]["tokens"].tolist()
    with pytest.raises(IndexError):
        tr[2]


# ---- collates and loader --------------------------------------------------------------------


def test_collate_text_sample_major(corpus, tok):
    T, M = 16, 4
    ds = TextBlockDataset(corpus, tok, block_size=T, mask_fn=TextMaskFn(T, M, 0.5))
    items = [ds[v] for v in (3, 0, 9)]
    batch = collate_text(items)
    assert batch["tokens"].shape == (3, T) and batch["tokens"].dtype == torch.int64
    assert batch["mask"].shape == (3 * M, T) and batch["mask"].dtype == torch.bool
    for b, it in enumerate(items):
        assert torch.equal(batch["mask"][b * M : (b + 1) * M], it["mask"])
        assert torch.equal(batch["tokens"][b], it["tokens"])
    assert batch["index"].tolist() == [3, 0, 9] and batch["bad"] == []
    no_mask = TextBlockDataset(corpus, tok, block_size=T)
    assert "mask" not in collate_text([no_mask[0], no_mask[1]])


def test_collate_text_eval_padding():
    items = [{"tokens": torch.tensor([0, 5, 6]), "label": 2},
             {"tokens": torch.tensor([0, 7]), "label": 0},
             {"tokens": torch.tensor([0, 8, 9, 10, 11]), "label": 1}]
    out = collate_text_eval(items)
    assert out["tokens"].tolist() == [[0, 5, 6, PAD_ID, PAD_ID], [0, 7, PAD_ID, PAD_ID, PAD_ID],
                                      [0, 8, 9, 10, 11]]
    assert out["padding_mask"].tolist() == [[False] * 3 + [True] * 2, [False] * 2 + [True] * 3,
                                            [False] * 5]
    assert out["label"].tolist() == [2, 0, 1] and out["label"].dtype == torch.int64


def test_loader_resume_reproduces_batches(corpus, tok):
    T, M, bs = 16, 2, 4
    ds = TextBlockDataset(corpus, tok, block_size=T, seed=3, mask_fn=TextMaskFn(T, M, 0.48))
    steps_per_epoch = len(ds) // bs
    k = steps_per_epoch + 2  # resume inside the second epoch
    n_steps = k + 3

    def take(start, count):
        it = iter(build_loader(ds, batch_size=bs, seed=9, start_step=start, num_workers=0,
                               collate_fn=collate_text))
        return [next(it) for _ in range(count)]

    full = take(0, n_steps)
    resumed = take(k, n_steps - k)
    for a, b in zip(full[k:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["index"], b["index"])
    assert full[0]["tokens"].shape == (bs, T) and full[0]["mask"].shape == (bs * M, T)
    # second-epoch batches carry epoch-1 virtual indices and fresh masks
    assert (full[k]["index"] >= len(ds)).all()
    other = take(0, 1)
    assert torch.equal(other[0]["tokens"], full[0]["tokens"])


# ---- embedded fortunes ----------------------------------------------------------------------

needs_fortunes = pytest.mark.skipif(
    not all((embedded_text.FORTUNES_DIR / c).is_file() for c in FORTUNE_CATEGORIES),
    reason="Debian fortunes package not installed (apt-get install fortunes)")


@needs_fortunes
def test_prepare_fortunes_layout_split_idempotent(tmp_path):
    root = prepare_fortunes(tmp_path)
    assert root == tmp_path / "fortunes"
    ready = json.loads((root / "READY").read_text())
    assert ready["version"] == embedded_text.FORTUNES_VERSION
    assert list(ready["categories"]) == list(FORTUNE_CATEGORIES)
    for split in ("train", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(FORTUNE_CATEGORIES)
        assert all((root / split / c / f"{c}.txt").is_file() for c in FORTUNE_CATEGORIES)
    n_train = n_test = 0
    for (ptr, cat), (pte, cat2) in zip(fortune_files(root, "train"), fortune_files(root, "test")):
        assert cat == cat2
        tr = ptr.read_text().splitlines()
        te = pte.read_text().splitlines()
        assert not set(tr) & set(te)  # disjoint
        assert 150 <= len(tr) <= 480 and 0.15 < len(te) / (len(tr) + len(te)) < 0.25
        assert all(len(s) >= 20 and s == " ".join(s.split()) for s in tr + te)
        assert ready["categories"][cat] == {**ready["categories"][cat], "train": len(tr),
                                            "test": len(te)}
        n_train, n_test = n_train + len(tr), n_test + len(te)
    assert (ready["train"], ready["test"]) == (n_train, n_test) and n_train > 2500
    # lines are unique across categories too
    all_lines = [s for p, _ in fortune_files(root, "train") + fortune_files(root, "test")
                 for s in p.read_text().splitlines()]
    assert len(all_lines) == len(set(all_lines))
    # idempotent: second call returns the same tree untouched, no temp dirs left
    probe = root / "train" / "science" / "science.txt"
    mtime = probe.stat().st_mtime_ns
    assert prepare_fortunes(tmp_path) == root
    assert probe.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["fortunes"]
    # deterministic: an independent preparation writes identical files
    again = prepare_fortunes(tmp_path / "again")
    law = Path("test") / "law" / "law.txt"
    assert (again / law).read_bytes() == (root / law).read_bytes()


@needs_fortunes
def test_fortunes_pipeline_end_to_end(tmp_path):
    root = prepare_fortunes(tmp_path)
    files = [p for p, _ in fortune_files(root, "train")]
    tok, _ = resolve_tokenizer(None, tmp_path / "run", files, 512)
    ds = TextBlockDataset(root / "train", tok, block_size=128, mask_fn=TextMaskFn(128, 2, 0.48))
    assert ds.num_documents == len(FORTUNE_CATEGORIES) and len(ds) > 500
    tr = TextLineDataset(fortune_files(root, "train"), tok, max_len=64)
    te = TextLineDataset(fortune_files(root, "test"), tok, max_len=64, classes=tr.classes)
    assert tr.classes == list(FORTUNE_CATEGORIES) and set(te.labels) == set(range(8))
    batch = collate_text_eval([te[i] for i in range(4)])
    assert batch["tokens"].shape[1] <= 64 and batch["label"].tolist() == [0, 0, 0, 0]


def test_prepare_fortunes_missing_source(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_text, "FORTUNES_DIR", tmp_path / "no_fortunes")
    with pytest.raises(RuntimeError, match=r"apt-get install fortunes.*data\.path"):
        prepare_fortunes(tmp_path / "cache")
    src = tmp_path / "partial"
    _write(src / "computers", "A computer entry that is long enough.\n%\n")
    with pytest.raises(RuntimeError, match="law"):  # first missing category is named
        prepare_fortunes(tmp_path / "cache", source_dir=src)
    assert not (tmp_path / "cache" / "fortunes").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no temp dir left behind


def test_prepare_fortunes_from_fake_source(tmp_path, monkeypatch):
    """Parsing, filtering, cap and split on a synthetic source (runs without the package)."""
    cap = 14
    monkeypatch.setattr(embedded_text, "FORTUNES_MAX_PER_CATEGORY", cap)
    src = tmp_path / "src"
    for k, cat in enumerate(FORTUNE_CATEGORIES):
        entries = [f"{cat} entry number {j}\n\twith  an indented\n   -- attribution line"
                   for j in range(10 + k)] + ["too short", f"{cat} entry number 0\n\twith  an "
                                               f"indented\n   -- attribution line", "shared entry "
                                               "appearing in every category"]
        _write(src / cat, "\n%\n".join(entries) + "\n%\n")
    root = prepare_fortunes(tmp_path / "cache", source_dir=src)
    ready = json.loads((root / "READY").read_text())
    for k, cat in enumerate(FORTUNE_CATEGORIES):
        tr = (root / "train" / cat / f"{cat}.txt").read_text().splitlines()
        te = (root / "test" / cat / f"{cat}.txt").read_text().splitlines()
        n = 10 + k  # duplicate, short and shared entries dropped
        assert ready["categories"][cat]["available"] == n
        k_sel = min(n, cap)
        assert len(te) == round(0.2 * k_sel) and len(tr) + len(te) == k_sel
        assert set(tr + te) <= {f"{cat} entry number {j} with an indented -- attribution line"
                                for j in range(n)}
        order = [int(s.split()[3]) for s in tr]
        assert order == sorted(order)  # source order kept


def test_word_order_dataset_is_minimal_pairs(tmp_path):
    from d2v.data.text import WordOrderDataset

    lines = [" ".join(f"word{(7 * i + j) % 50} and more text here" for j in range(3)) for i in range(40)]
    (tmp_path / "c" / "x").mkdir(parents=True)
    (tmp_path / "c" / "x" / "a.txt").write_text("\n".join(lines) + "\nshort\n")
    tok = train_tokenizer([tmp_path / "c" / "x" / "a.txt"], 300, tmp_path / "tok.json")
    base = TextLineDataset(scan_text_source(tmp_path / "c"), tok, max_len=64)
    ds = WordOrderDataset(base, seed=3, min_tokens=8)
    assert len(ds) == 80 and ds.paired  # the 1-word line is too short to shuffle; each other one twice
    assert ds.labels == [1, 0] * 40
    other_seed = WordOrderDataset(base, seed=4, min_tokens=8)
    for k in range(40):
        orig = base[ds.indices[k]]["tokens"]
        written, shuffled = ds[2 * k], ds[2 * k + 1]
        assert (written["label"], shuffled["label"]) == (1, 0)
        assert torch.equal(written["tokens"], orig)
        got = shuffled["tokens"]
        assert got[0] == orig[0] == BOS_ID and got[1] == orig[1]  # <s> and the first token stay
        assert sorted(got.tolist()) == sorted(orig.tolist()) and not torch.equal(got, orig)
        assert torch.equal(got, ds[2 * k + 1]["tokens"])  # deterministic
    assert any(not torch.equal(ds[2 * k + 1]["tokens"], other_seed[2 * k + 1]["tokens"]) for k in range(40))
    assert torch.equal(ds[-1]["tokens"], ds[79]["tokens"])
    with pytest.raises(IndexError, match="out of range for 80"):
        ds[80]


def test_scan_symlink_loop_lists_each_file_once(tmp_path):
    """A link loop (a/loop -> ..) lists no file twice under the wrong class (before: b/b.txt appeared
    again under a)."""
    import os

    from d2v.data.text import scan_text_source

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / f"{c}.txt").write_text("hello world\n")
    os.symlink("..", tmp_path / "a" / "loop")
    found = sorted((p.name, label) for p, label in scan_text_source(tmp_path))
    assert found == [("a.txt", "a"), ("b.txt", "b")]
