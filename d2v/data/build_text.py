"""The text modality's data: the run's tokenizer, the pretraining stream (blocks of
data.tokens_per_sample tokens, M random masks per block) and the probes (word order; the topic or
class when the files sit in class folders), from a text file or folder or the embedded fortunes.

Legend: B blocks, M masks per block, T tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from d2v.data.common import EmbedSource, ProbeTask, WithMaskInfo, has_split, pad_right, user_path
from d2v.data.embedded_text import prepare_fortunes
from d2v.data.sampler import build_loader
from d2v.data.text import (
    BOS_ID,
    PAD_ID,
    TextBlockDataset,
    TextLineDataset,
    TextMaskFn,
    WordOrderDataset,
    collate_text,
    collate_text_eval,
    read_text_file,
    resolve_tokenizer,
    scan_text_source,
)
from d2v.masking import random_mask


def _text_root(cfg) -> Path:
    root = user_path(cfg)
    if root is None:
        root = prepare_fortunes()
    return root


def _text_files(root: Path):
    return scan_text_source(root / "train" if has_split(root) else root)


def text_tokenizer(cfg, run_dir: Path, *, resumed: bool = False, probe: bool = False):
    """The run's tokenizer (d2v.data.text.resolve_tokenizer): data.tokenizer if set, loaded as is;
    else run_dir/tokenizer.json, which belongs to the run's corpus and model.vocab_size.

    `resumed` (a run continued from its checkpoint): the file is reused after checking the record of
    what it was trained from against the corpus and model.vocab_size (a mismatch is a ValueError
    saying what to do). Not resumed (a fresh run): an existing file is debris of an attempt that
    never checkpointed; a new tokenizer is trained on the pretraining files and replaces it (unless
    its record shows it was trained on exactly this corpus and settings). `probe`: the probe reads
    an existing run, so the file is always reused, a mismatch with the data being a warning."""
    files = [p for p, _ in _text_files(_text_root(cfg))]
    return resolve_tokenizer(cfg.data.tokenizer, Path(run_dir), files, cfg.model.vocab_size,
                             resumed=resumed or probe, strict=not probe, data_path=cfg.data.path)[0]


def _tokens_per_sample(cfg) -> int:
    return cfg.data.tokens_per_sample or cfg.model.max_positions


def pretrain_data(cfg, start_step: int, rank: int, world_size: int, pin_memory: bool,
                  resumed: bool = False):
    T = _tokens_per_sample(cfg)
    tok = text_tokenizer(cfg, Path(cfg.train.out_dir), resumed=resumed)
    mask_fn = TextMaskFn(T, cfg.masking.clone_batch, cfg.masking.mask_prob)
    files = [p for p, _ in _text_files(_text_root(cfg))]
    ds = TextBlockDataset(files, tok, block_size=T, seed=cfg.train.seed, mask_fn=mask_fn)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate_text), pin_memory=pin_memory)
    return ds, loader


def probe_tasks(cfg, run_dir: Path | None) -> list[ProbeTask]:
    """Two tasks: word order (every line as written or token-shuffled; needs no labels) and, when the
    files are in class subfolders, the class (embedded fortunes: the topic)."""
    root = _text_root(cfg)
    tok = text_tokenizer(cfg, Path(run_dir or cfg.train.out_dir), probe=True)
    T = _tokens_per_sample(cfg)
    if has_split(root):
        tr_files, te_files = scan_text_source(root / "train"), scan_text_source(root / "test")
    else:
        tr_files, te_files = scan_text_source(root), None
    classes = sorted({lab for _, lab in tr_files if lab is not None})
    tr = TextLineDataset(tr_files, tok, max_len=T, classes=classes)
    te = TextLineDataset(te_files, tok, max_len=T, classes=classes) if te_files else None
    seed = cfg.probe.seed
    tasks = [ProbeTask("word_order", WordOrderDataset(tr, seed=seed),
                       WordOrderDataset(te, seed=seed + 1) if te is not None else None,
                       collate_text_eval, "tokens")]
    if classes:
        name = "topic" if cfg.data.path is None else "class"
        tasks.append(ProbeTask(name, tr, te, collate_text_eval, "tokens"))
    return tasks


def synthetic_batch(cfg, seed: int = 0) -> tuple[dict, int, float]:
    """One random batch of the recipe's shapes (benchmarks) -> ({"x": (B, T) token ids, "mask": (B*M, T)},
    tokens per view, tokens per sample)."""
    g = torch.Generator().manual_seed(seed)
    B, M, mk, m = cfg.train.batch_size, cfg.masking.clone_batch, cfg.masking, cfg.model
    T = _tokens_per_sample(cfg)
    src = torch.randint(4, m.vocab_size, (B, T), generator=g)
    src[:, 0] = 0  # <s>
    return {"x": src, "mask": random_mask(B * M, T, mask_prob=mk.mask_prob, generator=g)}, T, float(T)


def embed_source(cfg, path: Path, run_dir: Path | None = None, tokenizer=None) -> EmbedSource:
    """One item per non-empty line of the text file `path` (or of every text file under it), named
    "file:line", encoded as the probe does: <s> + the run's tokens, cut at model.max_positions."""
    tok = tokenizer or text_tokenizer(cfg, Path(run_dir or cfg.train.out_dir), probe=True)
    files = [(path, None)] if path.is_file() else scan_text_source(path)
    names, ids, skipped = [], [], []
    for f, _ in files:
        try:
            text = read_text_file(f)
        except (ValueError, OSError) as e:
            skipped.append((str(f), str(e)))
            continue
        numbered = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        encoded = tok.encode_batch([s for _, s in numbered], add_special_tokens=False)
        for (n, _), enc in zip(numbered, encoded):
            names.append(f"{f}:{n}")
            ids.append(np.asarray(enc.ids[: cfg.model.max_positions - 1], dtype=np.int64))
    if not names:
        raise ValueError(f"--data {path}: no non-empty lines of text")

    def load(i: int) -> torch.Tensor:
        return torch.cat([torch.tensor([BOS_ID]), torch.from_numpy(ids[i]).long()])  # (T,)

    def collate(xs: list) -> tuple:
        return pad_right(xs, PAD_ID, torch.int64)  # (B, Tmax), padding mask (B, Tmax)

    return EmbedSource(names, load, collate, skipped)
