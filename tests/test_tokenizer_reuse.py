"""A run's tokenizer belongs to its corpus and settings: reuse of <run_dir>/tokenizer.json only on
resume (checked against the sidecar tokenizer.meta.json), debris of a failed fresh run replaced,
explicit data.tokenizer loaded as is; bad text files named once per process; progress lines.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_tokenizer_reuse.py
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import pickle
import shutil
import textwrap
from pathlib import Path

import pytest

from d2v.config import load_config
from d2v.data import text as text_mod
from d2v.data.build import build_pretrain_data
from d2v.data.build_text import text_tokenizer
from d2v.data.text import (
    TextBlockDataset,
    TextLineDataset,
    read_tokenizer_meta,
    resolve_tokenizer,
    scan_text_source,
    tokenizer_meta_path,
    train_tokenizer,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROSE = "\n\n".join([argparse.__doc__, textwrap.__doc__, json.__doc__, pickle.__doc__])


def _corpus(root: Path, text: str, n: int = 2) -> Path:
    """A folder of n text files splitting `text` by paragraphs."""
    root.mkdir(parents=True, exist_ok=True)
    paras = [p for p in text.split("\n\n") if p.strip()]
    k = max(1, len(paras) // n)
    for j in range(n):
        (root / f"doc{j}.txt").write_text("\n\n".join(paras[j * k : (j + 1) * k]) or "filler text\n",
                                          encoding="utf-8")
    return root


@pytest.fixture
def corpora(tmp_path):
    """X: a small corpus; Y: a different, larger one."""
    x = _corpus(tmp_path / "X", "the cat sat on the mat\n" * 20 + "\n\na dog ran in the fog\n" * 20)
    y = _corpus(tmp_path / "Y", PROSE, n=3)
    return x, y


def _cfg(out: Path, data: Path, vocab: int, **extra):
    over = {"train.out_dir": out, "data.path": data, "model.vocab_size": vocab,
            "data.num_workers": 0, "data.tokens_per_sample": 16, "model.max_positions": 16,
            "train.batch_size": 2, **extra}
    return load_config(CONFIGS / "tiny_text.yaml", [f"{k}={v}" for k, v in over.items()])


def _files(folder: Path) -> list[Path]:
    return [p for p, _ in scan_text_source(folder)]


# ---- the reported bug: a failed run's tokenizer reused by a fresh run on another corpus ----------


def test_fresh_run_retrains_a_leftover_tokenizer(tmp_path, corpora, d2v_log):
    """Before: a fresh run on Y silently reused the 261-entry tokenizer trained on X."""
    x, y = corpora
    run = tmp_path / "A"
    small = text_tokenizer(_cfg(run, x, 261), run)  # a run on X that died before any checkpoint
    assert small.get_vocab_size() == 261
    d2v_log.records.clear()
    tok = text_tokenizer(_cfg(run, y, 400), run)  # fresh run (not resumed) on Y, same folder
    assert tok.get_vocab_size() == 400
    saved = text_mod.load_tokenizer(run / "tokenizer.json")
    assert saved.to_str() == tok.to_str()  # replaced on disk too
    meta = read_tokenizer_meta(run / "tokenizer.json")
    assert meta["vocab_size"] == 400 and meta["corpus"]["data_path"] == str(y)
    infos = d2v_log.messages(logging.INFO)
    said = [m for m in infos if "never checkpointed" in m]
    assert len(said) == 1 and str(run / "tokenizer.json") in said[0]
    assert "model.vocab_size was 261" in said[0] and "corpus differs" in said[0]
    assert not d2v_log.messages()  # no warning: replacing debris is expected
    # no temp files left by the two atomic writes
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer.json", "tokenizer.meta.json"]


def test_build_pretrain_data_passes_resumed(tmp_path, corpora):
    x, y = corpora
    sig = inspect.signature(build_pretrain_data)
    assert list(sig.parameters) == ["cfg", "start_step", "rank", "world_size", "pin_memory", "resumed"]
    assert sig.parameters["resumed"].default is False
    run = tmp_path / "A"
    text_tokenizer(_cfg(run, x, 261), run)
    with pytest.raises(ValueError, match="corpus differs"):
        build_pretrain_data(_cfg(run, y, 261), resumed=True)
    ds, _ = build_pretrain_data(_cfg(run, y, 400))  # fresh: retrained on Y
    assert text_mod.load_tokenizer(run / "tokenizer.json").get_vocab_size() == 400
    assert ds.num_documents == 3


# ---- resume ----------------------------------------------------------------------------------


def test_resume_reuses_a_matching_tokenizer_untouched(tmp_path, corpora, d2v_log):
    x, _ = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run)
    stamp = (run / "tokenizer.json").stat().st_mtime_ns
    d2v_log.records.clear()
    again = text_tokenizer(_cfg(run, x, 300), run, resumed=True)
    assert again.to_str() == tok.to_str() and (run / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not d2v_log.messages() and not any("training" in m for m in d2v_log.messages(logging.INFO))


def test_resume_with_another_corpus_or_vocab_fails_clearly(tmp_path, corpora):
    x, y = corpora
    run = tmp_path / "A"
    text_tokenizer(_cfg(run, x, 300), run)
    path = str(run / "tokenizer.json")
    with pytest.raises(ValueError) as err:
        text_tokenizer(_cfg(run, y, 300), run, resumed=True)
    msg = str(err.value)
    assert path in msg and "corpus differs" in msg and str(x) in msg and str(y) in msg
    assert "original data" in msg and f"data.tokenizer={path}" in msg
    with pytest.raises(ValueError, match=r"model\.vocab_size was 300 when it was trained, 320 now"):
        text_tokenizer(_cfg(run, x, 320), run, resumed=True)
    # an edited file (same folder, new content) is a different corpus too
    (x / "doc0.txt").write_text("completely different words now\n" * 5, encoding="utf-8")
    with pytest.raises(ValueError, match="corpus differs"):
        text_tokenizer(_cfg(run, x, 300), run, resumed=True)


def test_resume_accepts_the_same_corpus_moved_and_touched(tmp_path, corpora):
    """The listing fingerprint (paths, sizes, mtimes) differs, the content does not: no error."""
    x, _ = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run)
    moved = tmp_path / "elsewhere" / "X"
    shutil.copytree(x, moved)
    for f in moved.iterdir():
        os.utime(f, ns=(1, 1))
    assert text_tokenizer(_cfg(run, moved, 300), run, resumed=True).to_str() == tok.to_str()


def test_resume_without_sidecar_reuses_with_one_warning(tmp_path, corpora, d2v_log):
    x, y = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run)
    tokenizer_meta_path(run / "tokenizer.json").unlink()  # a run from before the sidecar
    for _ in range(2):
        assert text_tokenizer(_cfg(run, y, 300), run, resumed=True).to_str() == tok.to_str()
    warned = d2v_log.messages()
    assert len(warned) == 1 and "no record" in warned[0] and str(run / "tokenizer.json") in warned[0]


def test_torn_save_is_unrecorded(tmp_path, corpora, d2v_log):
    """A sidecar naming another tokenizer (the save stopped between the two writes) is no record: a
    fresh run retrains, a resumed one reuses with a warning."""
    x, y = corpora
    run = tmp_path / "A"
    first = text_tokenizer(_cfg(run, x, 300), run)
    meta = tokenizer_meta_path(run / "tokenizer.json").read_text()
    other = train_tokenizer(_files(y), 280, tmp_path / "other.json")
    shutil.copy(tmp_path / "other.json", run / "tokenizer.json")  # new tokenizer, old sidecar
    tokenizer_meta_path(run / "tokenizer.json").write_text(meta)
    got = text_tokenizer(_cfg(run, x, 300), run, resumed=True)
    assert got.to_str() == other.to_str() and any("no record" in m for m in d2v_log.messages())
    fresh = text_tokenizer(_cfg(run, x, 300), run)
    assert fresh.to_str() == first.to_str() != other.to_str()
    assert any("no record of what it was trained on" in m for m in d2v_log.messages(logging.INFO))
    assert read_tokenizer_meta(run / "tokenizer.json")["tokenizer_sha256"] == \
        text_mod._sha256((run / "tokenizer.json").read_bytes())


def test_resumed_run_missing_tokenizer_trains_with_warning(tmp_path, corpora, d2v_log):
    x, _ = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run, resumed=True)
    assert 261 < tok.get_vocab_size() <= 300 and (run / "tokenizer.json").is_file()
    assert any("is missing" in m for m in d2v_log.messages())


# ---- fresh run, probe, explicit tokenizer -----------------------------------------------------


def test_fresh_run_reuses_identical_leftover(tmp_path, corpora, d2v_log):
    """Retraining on the same corpus and settings would write the same bytes: the leftover stays
    (this is also what a rank racing another rank's save sees)."""
    x, _ = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run)
    stamp = (run / "tokenizer.json").stat().st_mtime_ns
    d2v_log.records.clear()
    assert text_tokenizer(_cfg(run, x, 300), run).to_str() == tok.to_str()
    assert (run / "tokenizer.json").stat().st_mtime_ns == stamp
    assert any(m.startswith("reusing") for m in d2v_log.messages(logging.INFO))


def test_probe_always_reuses_and_warns_on_mismatch(tmp_path, corpora, d2v_log):
    x, y = corpora
    run = tmp_path / "A"
    tok = text_tokenizer(_cfg(run, x, 300), run)
    got = text_tokenizer(_cfg(run, y, 300), run, probe=True)
    assert got.to_str() == tok.to_str()
    warned = d2v_log.messages()
    assert len(warned) == 1 and "probe uses the run's tokenizer" in warned[0]


def test_explicit_tokenizer_is_loaded_without_corpus_check(tmp_path, corpora):
    x, y = corpora
    run = tmp_path / "A"
    first = text_tokenizer(_cfg(run, x, 300), run)
    explicit = run / "tokenizer.json"
    for resumed in (False, True):  # another corpus: no fingerprint check, no retraining
        tok = text_tokenizer(_cfg(tmp_path / "B", y, 300, **{"data.tokenizer": explicit}),
                             tmp_path / "B", resumed=resumed)
        assert tok.to_str() == first.to_str() and not (tmp_path / "B").exists()
    n = first.get_vocab_size()
    with pytest.raises(ValueError, match=rf"{n} entries but model\.vocab_size is {n - 1}"):
        text_tokenizer(_cfg(tmp_path / "B", y, n - 1, **{"data.tokenizer": explicit}), tmp_path / "B")


# ---- bad files named once, progress ----------------------------------------------------------


def test_bad_files_named_once_across_datasets(tmp_path, d2v_log):
    """Before: tokenizer training, the pretraining blocks and the probe's lines each warned."""
    data = _corpus(tmp_path / "data", PROSE, n=2)
    bad = data / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    files = _files(data)
    tok, _ = resolve_tokenizer(None, tmp_path / "run", files, 300)
    blocks = TextBlockDataset(files, tok, block_size=8)
    lines = TextLineDataset(data, tok, max_len=16)
    lines2 = TextLineDataset(scan_text_source(data), tok, max_len=16)
    warned = [m for m in d2v_log.messages() if "latin1.txt" in m]
    assert len(warned) == 1 and "skipping 1 unusable" in warned[0]
    for ds in (blocks, lines, lines2):  # every dataset still lists it
        assert [p for p, _ in ds.bad_files] == [str(bad)]
    # a second bad file found later is named then (and only it)
    (data / "empty.txt").write_text("")
    TextBlockDataset(data, tok, block_size=8)
    warned = d2v_log.messages()
    assert len(warned) == 2 and "empty.txt" in warned[1] and "latin1.txt" not in warned[1]


def test_progress_lines(tmp_path, monkeypatch, d2v_log):
    data = _corpus(tmp_path / "data", PROSE, n=1)
    path = tmp_path / "tok.json"
    tok = train_tokenizer(_files(data), 300, path)
    infos = d2v_log.messages(logging.INFO)
    assert any(m.startswith("training a byte-level BPE tokenizer (vocab 300) on 1 file(s)")
               and "B of text" in m for m in infos)
    assert any("300 entries" in m and str(path) in m and " s, " in m for m in infos)
    d2v_log.records.clear()
    monkeypatch.setattr(text_mod, "_ANNOUNCE_BYTES", 0)  # a single big file: no bar, but lines
    ds = TextBlockDataset(data, tok, block_size=8)
    infos = d2v_log.messages(logging.INFO)
    assert infos[0].startswith("tokenizing 1 file(s)")
    assert f"{ds.num_tokens} tokens in" in infos[-1] and infos[-1].endswith(" s")
