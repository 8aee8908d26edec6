"""Tests for d2v.data: embedded digits, folder scan, decode/augment/mask pipeline, sampler, loader.

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest -q tests/test_data.py
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.data import (
    DIGITS32_MEAN,
    DIGITS32_STD,
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    ResumableBatchSampler,
    build_loader,
    collate_images,
    default_cache_dir,
    embedded,
    make_inverse_block_mask_fn,
    prepare_digits,
    scan_image_folder,
)
from d2v.data.files import DataDecodeError

# ---- helpers -------------------------------------------------------------------------------


def _write_png(path: Path, size: tuple[int, int] = (20, 16), seed: int = 0) -> Path:
    """Random RGB noise PNG of size (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _make_folder(root: Path, n_per_class: int = 4, classes=("a", "b", "c")) -> Path:
    k = 0
    for c in classes:
        for j in range(n_per_class):
            _write_png(root / c / f"{j:02d}.png", seed=k)
            k += 1
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """Prepare the embedded digits once per module under a tmp $D2V_CACHE."""
    cache = tmp_path_factory.mktemp("d2v_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("D2V_CACHE", str(cache))
        root = prepare_digits()
    assert root == cache / "digits32"
    return root


# ---- embedded digits ------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    """$D2V_CACHE wins; otherwise ~/.cache/d2v."""
    monkeypatch.setenv("D2V_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("D2V_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "d2v"


def test_digits_counts_classes_and_decodable(digits_root):
    """1000 train / 797 test PNGs, 10 class folders, 32x32 decodable images, READY counts."""
    train = sorted((digits_root / "train").rglob("*.png"))
    test = sorted((digits_root / "test").rglob("*.png"))
    assert (len(train), len(test)) == (1000, 797)
    for split in ("train", "test"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == [str(i) for i in range(10)]
    ready = json.loads((digits_root / "READY").read_text())
    assert ready["train"] == 1000 and ready["test"] == 797
    for p in train[::97] + test[::97]:
        with Image.open(p) as im:
            im.load()
            assert im.size == (32, 32)
    samples, classes = scan_image_folder(digits_root / "train")
    assert classes == [str(i) for i in range(10)] and len(samples) == 1000


def test_digits_fixed_split_and_labels(digits_root):
    """File names are load_digits rows; train = perm[:1000] of RandomState(0); labels match."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    perm = np.random.RandomState(0).permutation(1797)
    for split, rows in (("train", perm[:1000]), ("test", perm[1000:])):
        files = list((digits_root / split).rglob("*.png"))
        assert sorted(int(p.stem) for p in files) == sorted(rows.tolist())
        assert all(int(p.parent.name) == target[int(p.stem)] for p in files)


def test_digits_pixels_match_source(digits_root):
    """A PNG is the 0..16 digit scaled to 0..255 and bilinearly upscaled (dark/bright agree)."""
    from sklearn.datasets import load_digits

    src = load_digits().images  # (1797, 8, 8)
    p = next((digits_root / "train" / "0").iterdir())
    png = np.asarray(Image.open(p), dtype=np.float64)  # (32, 32)
    down = png.reshape(8, 4, 8, 4).mean((1, 3))  # back to (8, 8)
    assert np.corrcoef(down.ravel(), src[int(p.stem)].ravel())[0, 1] > 0.9
    assert png.max() > 150


def test_digits_idempotent(digits_root):
    """A second call returns the same root without rewriting files and leaves no temp dirs."""
    probe = next((digits_root / "train" / "3").iterdir())
    mtime = probe.stat().st_mtime_ns
    assert prepare_digits(digits_root.parent) == digits_root
    assert probe.stat().st_mtime_ns == mtime
    assert [p.name for p in digits_root.parent.iterdir()] == ["digits32"]


def test_digits_stats_constant(digits_root):
    """DIGITS32_MEAN/STD equal per-channel mean/std (ddof=0) of the train PNGs in [0, 1]."""
    files = sorted((digits_root / "train").rglob("*.png"))
    pix = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in files])
    pix = pix.reshape(-1, 3)  # (N*32*32, 3)
    np.testing.assert_allclose(pix.mean(0), DIGITS32_MEAN, atol=1e-3)
    np.testing.assert_allclose(pix.std(0), DIGITS32_STD, atol=1e-3)


def test_prepare_race_loser_discards_its_copy(tmp_path, monkeypatch):
    """If another process finishes digits32 while we build, ours is discarded and theirs kept."""
    final = tmp_path / "digits32"

    def fake_write(tmp_root: Path) -> dict[str, int]:
        (tmp_root / "train").mkdir()
        (tmp_root / "train" / "ours").write_text("ours")
        final.mkdir()  # the "other process" wins the race meanwhile
        (final / "theirs").write_text("theirs")
        (final / "READY").write_text("{}")
        return {"train": 1, "test": 0}

    monkeypatch.setattr(embedded, "_write_split_tree", fake_write)
    assert prepare_digits(tmp_path) == final
    assert (final / "theirs").exists() and not (final / "train").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits32"]


def test_prepare_failure_leaves_no_partial_tree(tmp_path, monkeypatch):
    """A crash mid-build leaves neither digits32 nor the temp dir behind."""

    def boom(tmp_root: Path) -> dict[str, int]:
        (tmp_root / "train").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "_write_split_tree", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare_digits(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_foreign_dir(tmp_path):
    """A digits32 dir without READY is not silently used or overwritten."""
    (tmp_path / "digits32").mkdir()
    (tmp_path / "digits32" / "junk").write_text("x")
    with pytest.raises(RuntimeError, match="READY"):
        prepare_digits(tmp_path)


# ---- scanning -------------------------------------------------------------------------------


def test_scan_with_class_subfolders(tmp_path):
    """Top-level dirs are sorted classes, searched recursively; other files and hidden dirs skipped."""
    _write_png(tmp_path / "zebra" / "x.PNG")
    _write_png(tmp_path / "apple" / "deep" / "er" / "b.jpg")
    _write_png(tmp_path / "apple" / "a.png")
    _write_png(tmp_path / "apple" / ".hidden" / "h.png")
    (tmp_path / "apple" / "notes.txt").write_text("no")
    (tmp_path / "empty").mkdir()
    samples, classes = scan_image_folder(tmp_path)
    assert classes == ["apple", "zebra"]
    rel = [(str(p.relative_to(tmp_path)), y) for p, y in samples]
    assert rel == [("apple/a.png", 0), ("apple/deep/er/b.jpg", 0), ("zebra/x.PNG", 1)]


def test_scan_without_class_subfolders(tmp_path):
    """Loose images in root get label -1 and no classes."""
    for name in ("b.png", "a.JPEG", "c.webp"):
        _write_png(tmp_path / name)
    samples, classes = scan_image_folder(tmp_path)
    assert classes == []
    assert [(p.name, y) for p, y in samples] == [("a.JPEG", -1), ("b.png", -1), ("c.webp", -1)]


def test_scan_missing_and_empty(tmp_path):
    """Missing root -> FileNotFoundError with the path; no images -> ValueError with extensions."""
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        scan_image_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value)
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"} == set(
        IMAGE_EXTENSIONS
    )


# ---- bad files ------------------------------------------------------------------------------


def test_corrupt_file_reported_and_skipped(tmp_path, d2v_log):
    """Garbage bytes in bad.png: dropped at init, listed in bad_files, named in one warning."""
    root = _make_folder(tmp_path / "ds", n_per_class=2, classes=("a",))
    bad = root / "a" / "bad.png"
    bad.write_bytes(b"this is not an image" * 10)
    ds = ImageFolderDataset(root, image_size=8)
    msgs = d2v_log.messages()
    assert len(msgs) == 1 and "unreadable" in msgs[0] and "bad.png" in msgs[0]
    assert len(ds) == 2 and all(p != bad for p, _ in ds.samples)
    assert [p for p, _ in ds.bad_files] == [str(bad)]
    assert ds.bad_files[0][1]  # a reason is recorded


def test_only_bad_files_raises(tmp_path):
    """A folder of only unreadable files raises ValueError naming the folder and the count."""
    root = tmp_path / "allbad"
    root.mkdir()
    for k in range(3):
        (root / f"x{k}.png").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="no readable images under") as err:
        ImageFolderDataset(root, image_size=8)
    assert str(root) in str(err.value) and "3 files failed" in str(err.value)


def test_truncated_png_falls_back_and_is_reported(tmp_path, d2v_log):
    """A truncated PNG passes the header check, then __getitem__ falls back to index i+1."""
    root = _make_folder(tmp_path / "ds", n_per_class=3, classes=("a",))
    trunc = _write_png(root / "a" / "00z.png", size=(64, 64), seed=9)  # sorts as index 1
    _truncate(trunc)
    ds = ImageFolderDataset(root, image_size=8)
    assert ds.bad_files == [] and len(ds) == 4
    assert ds.samples[1][0] == trunc
    item = ds[1]
    (msg,) = d2v_log.messages()
    assert "00z.png: failed to decode" in msg and "falling back to index 2" in msg
    assert item["bad"] == [str(trunc)] and item["index"] == 2
    assert ds[0]["bad"] == []
    batch = collate_images([ds[0], item])
    assert batch["bad"] == [str(trunc)]


def test_header_check_shows_progress_from_2000_files(tmp_path, capsys):
    """The start-up header check shows a bar once it may take a couple of seconds (2000 images:
    ~0.1 ms each warm, ~1 ms on a cold cache); not for a handful of files."""
    one = _write_png(tmp_path / "one.png", size=(4, 4)).read_bytes()
    many = tmp_path / "many"
    many.mkdir()
    for k in range(2000):
        (many / f"{k:04d}.png").write_bytes(one)
    capsys.readouterr()
    assert len(ImageFolderDataset(many, image_size=8)) == 2000
    assert "checking many" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for k in range(3):
        (few / f"{k}.png").write_bytes(one)
    ImageFolderDataset(few, image_size=8)
    assert "checking" not in capsys.readouterr().err


def test_all_truncated_raises_data_decode_error(tmp_path):
    """When every file tried fails to decode, __getitem__ raises DataDecodeError (a ValueError)
    naming the paths."""
    root = tmp_path / "ds"
    for k in range(2):
        _truncate(_write_png(root / f"t{k}.png", size=(64, 64), seed=k))
    ds = ImageFolderDataset(root, image_size=8)
    with pytest.raises(DataDecodeError, match="t0.png"):
        ds[0]


# ---- augmentation ---------------------------------------------------------------------------


def test_train_item_shape_dtype_and_range(tmp_path):
    """Train items are float32 (3, S, S); with mean 0 / std 1 they lie in [0, 1]."""
    root = _make_folder(tmp_path / "ds")
    ds = ImageFolderDataset(root, image_size=12, mean=(0, 0, 0), std=(1, 1, 1))
    for v in range(len(ds)):
        item = ds[v]
        assert item["image"].shape == (3, 12, 12) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["label"] == ds.labels[v] and item["index"] == v and "mask" not in item
    assert ds.classes == ["a", "b", "c"] and ds.labels == [0] * 4 + [1] * 4 + [2] * 4


def test_eval_normalization_and_center_crop(tmp_path):
    """Eval: shorter side -> S then center crop; output = (x/255 - mean) / std."""
    arr = np.zeros((20, 60, 3), dtype=np.uint8)  # H=20, W=60: black sides
    # one color over the centered 20x20 square (cols 20..40) plus the 4-px bicubic support of a
    # 2x downscale on each side; a squash or off-center crop would pull in black
    arr[:, 16:44] = (200, 100, 50)
    Image.fromarray(arr).save(tmp_path / "img.png")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    ds = ImageFolderDataset(tmp_path, image_size=10, train=False, mean=mean, std=std)
    x = ds[0]["image"]  # (3, 10, 10)
    expect = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x, expect.view(3, 1, 1).expand(3, 10, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds[5]["image"], x)  # eval is deterministic across epochs


def test_full_crop_and_hflip(tmp_path):
    """scale=ratio=1 on a square image crops everything; hflip mirrors about half the items."""
    _write_png(tmp_path / "sq.png", size=(16, 16), seed=3)
    kw = dict(image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    ref = ImageFolderDataset(tmp_path, train=False, **kw)[0]["image"]
    ds = ImageFolderDataset(tmp_path, train=True, crop_scale=(1, 1), crop_ratio=(1, 1), **kw)
    flips = []
    for v in range(40):
        x = ds[v]["image"]
        if torch.allclose(x, ref, atol=1e-6):
            flips.append(False)
        else:
            torch.testing.assert_close(x, ref.flip(-1), atol=1e-6, rtol=0)
            flips.append(True)
    assert 5 < sum(flips) < 35
    no_flip = ImageFolderDataset(tmp_path, train=True, crop_scale=(1, 1), crop_ratio=(1, 1),
                                 hflip=False, **kw)
    assert all(torch.allclose(no_flip[v]["image"], ref, atol=1e-6) for v in range(10))


def test_random_crop_varies_and_stays_in_range(tmp_path):
    """Default crops differ between items of one image and keep normalized values bounded."""
    _write_png(tmp_path / "big.png", size=(48, 40), seed=5)
    ds = ImageFolderDataset(tmp_path, image_size=16, hflip=False)
    xs = torch.stack([ds[v]["image"] for v in range(8)])  # (8, 3, 16, 16), epochs 0..7
    assert len({tuple(x.flatten()[:20].tolist()) for x in xs}) == 8
    lo = (0 - ds.mean.flatten()) / ds.std.flatten()  # (3,)
    hi = (1 - ds.mean.flatten()) / ds.std.flatten()  # (3,)
    assert (xs.amin((0, 2, 3)) >= lo - 1e-5).all() and (xs.amax((0, 2, 3)) <= hi + 1e-5).all()


# ---- determinism and masks ------------------------------------------------------------------


def test_determinism_same_virtual_index(tmp_path):
    """Same (seed, virtual index) -> identical image and mask across instances; new epoch differs."""
    root = _make_folder(tmp_path / "ds")
    mask_fn = make_inverse_block_mask_fn(4, 3, 0.75, 2, 0.0)
    a = ImageFolderDataset(root, image_size=12, mask_fn=mask_fn)
    b = ImageFolderDataset(root, image_size=12, mask_fn=pickle.loads(pickle.dumps(mask_fn)))
    n = len(a)
    for v in (0, 5, n + 5, 7 * n + 1):
        torch.testing.assert_close(a[v]["image"], b[v]["image"], atol=0, rtol=0)
        assert torch.equal(a[v]["mask"], b[v]["mask"])
    e0, e1 = a[5], a[n + 5]  # same sample, epochs 0 and 1
    assert e0["index"] == e1["index"] == 5
    assert not torch.allclose(e0["image"], e1["image"])
    assert not torch.equal(e0["mask"], e1["mask"])
    other_seed = ImageFolderDataset(root, image_size=12, mask_fn=mask_fn, seed=1)
    assert not torch.allclose(other_seed[5]["image"], e0["image"])


def test_masks_collate_sample_major_exact_counts(tmp_path):
    """collate: mask (B*M, T), rows b*M..b*M+M-1 = item b's masks, exact masked count per row."""
    root = _make_folder(tmp_path / "ds")
    M, grid, p = 3, 4, 0.6
    mask_fn = make_inverse_block_mask_fn(grid, M, p, 2, 0.1)
    ds = ImageFolderDataset(root, image_size=8, mask_fn=mask_fn)
    items = [ds[v] for v in (0, 4, 9, 11)]
    batch = collate_images(items)
    T = grid * grid
    assert batch["mask"].shape == (4 * M, T) and batch["mask"].dtype == torch.bool
    for b, it in enumerate(items):
        assert it["mask"].shape == (M, T)
        assert torch.equal(batch["mask"][b * M : (b + 1) * M], it["mask"])
    assert (batch["mask"].sum(1) == T - int(T * (1 - p))).all()
    assert batch["image"].shape == (4, 3, 8, 8)
    assert batch["label"].tolist() == [0, 1, 2, 2] and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 4, 9, 11] and batch["index"].dtype == torch.int64


# ---- sampler --------------------------------------------------------------------------------


def _take(sampler: ResumableBatchSampler, k: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_sampler_resume_matches_uninterrupted():
    """Batches from start_step=k equal the tail of the stream from 0 (across epoch boundaries)."""
    n, bs = 50, 8  # 6 steps per epoch, 2 samples dropped per epoch
    full = _take(ResumableBatchSampler(n, bs, seed=3), 20)
    assert ResumableBatchSampler(n, bs).steps_per_epoch == 6
    for k in (1, 6, 7, 13):
        assert _take(ResumableBatchSampler(n, bs, seed=3, start_step=k), 20 - k) == full[k:]
    for step, batch in enumerate(full):
        epoch = step // 6
        assert len(batch) == bs and all(epoch * n <= v < (epoch + 1) * n for v in batch)
    epoch0 = [v for b in full[:6] for v in b]
    assert len(set(epoch0)) == 48  # no repeats inside an epoch
    assert [v % n for v in full[0]] != [v % n for v in full[6]]  # reshuffled per epoch
    assert _take(ResumableBatchSampler(n, bs, seed=4), 1) != full[:1]


def test_sampler_rank_sharding_disjoint():
    """Ranks see disjoint samples each step and epoch; together they cover the truncated perm."""
    n, bs, world = 40, 4, 3  # global batch 12 -> 3 steps per epoch, 4 samples dropped
    streams = [_take(ResumableBatchSampler(n, bs, seed=1, rank=r, world_size=world), 6)
               for r in range(world)]
    for step in range(6):
        seen = [set(streams[r][step]) for r in range(world)]
        assert all(len(s) == bs for s in seen)
        assert len(set.union(*seen)) == bs * world
    for e in range(2):
        epoch_all = [v for r in range(world) for b in streams[r][3 * e : 3 * e + 3] for v in b]
        assert len(epoch_all) == len(set(epoch_all)) == 36
        assert all(e * n <= v < (e + 1) * n for v in epoch_all)
    assert ResumableBatchSampler(n, bs, seed=1).steps_per_epoch == 10


def test_sampler_no_drop_last_covers_epoch():
    """drop_last=False: every sample appears in each epoch; only the last batch may be short."""
    s = ResumableBatchSampler(10, 4, drop_last=False)
    assert s.steps_per_epoch == 3
    batches = _take(s, 6)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(v for b in batches[:3] for v in b) == list(range(10))
    assert sorted(v for b in batches[3:] for v in b) == list(range(10, 20))


def test_sampler_too_small_dataset_and_bad_args():
    """Fewer samples than one global batch -> ValueError with the numbers; bad rank rejected."""
    with pytest.raises(ValueError, match=r"7 samples.*16.*8.*2"):
        ResumableBatchSampler(7, 8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(100, 8, rank=2, world_size=2)


# ---- loader ---------------------------------------------------------------------------------


def _batches(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def test_loader_workers_match_main_process_and_resume(tmp_path):
    """num_workers=2 yields the same batches as num_workers=0; start_step resumes exactly."""
    root = _make_folder(tmp_path / "ds", n_per_class=5)  # 15 images, bs 4 -> 3 steps/epoch
    mask_fn = make_inverse_block_mask_fn(2, 2, 0.5, 1, 0.0)
    ds = ImageFolderDataset(root, image_size=8, mask_fn=mask_fn)
    ref = _batches(build_loader(ds, batch_size=4, seed=7), 5)
    par_loader = build_loader(ds, batch_size=4, seed=7, num_workers=2)
    par = _batches(par_loader, 5)
    del par_loader
    resumed = _batches(build_loader(ds, batch_size=4, seed=7, start_step=3), 2)
    assert ref[0]["mask"].shape == (8, 4) and ref[0]["image"].shape == (4, 3, 8, 8)
    for a, b in zip(ref, par):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
    for a, b in zip(ref[3:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["index"], b["index"])


# ---- class lists shared between splits, symlinks, 16-bit images ------------------------------


def test_scan_test_split_uses_train_class_list(tmp_path):
    """A test split lacking class b numbers a and c as the train split does (0 and 2), not 0 and 1."""
    _make_folder(tmp_path / "train", n_per_class=1, classes=("a", "b", "c"))
    _make_folder(tmp_path / "test", n_per_class=1, classes=("a", "c"))
    tr = ImageFolderDataset(tmp_path / "train", image_size=8, train=False)
    te = ImageFolderDataset(tmp_path / "test", image_size=8, train=False, classes=tr.classes)
    assert te.classes == ["a", "b", "c"]
    assert [(p.parent.name, y) for p, y in te.samples] == [("a", 0), ("c", 2)]


def test_scan_class_missing_from_given_list_raises(tmp_path):
    """A test-only class is an error naming the class and its folder."""
    _make_folder(tmp_path, n_per_class=1, classes=("a", "zebra"))
    with pytest.raises(ValueError, match="zebra") as err:
        scan_image_folder(tmp_path, classes=["a", "b"])
    assert str(tmp_path / "zebra") in str(err.value)


def test_scan_symlink_loop_lists_each_file_once(tmp_path):
    """cats/loop -> .. must not list dogs/ or the loose root image again under cats; a directory
    linked from two classes is listed once, under the first class that reaches it."""
    _write_png(tmp_path / "cats" / "c.png")
    _write_png(tmp_path / "dogs" / "d.png")
    _write_png(tmp_path / "loose.png")
    _write_png(tmp_path.parent / f"{tmp_path.name}_ext" / "e.png")
    (tmp_path / "cats" / "loop").symlink_to("..")
    (tmp_path / "cats" / "dogs_link").symlink_to(tmp_path / "dogs")
    (tmp_path / "cats" / "ext").symlink_to(tmp_path.parent / f"{tmp_path.name}_ext")
    (tmp_path / "dogs" / "ext").symlink_to(tmp_path.parent / f"{tmp_path.name}_ext")
    samples, classes = scan_image_folder(tmp_path)  # the loose root image: ignored, with a log warning
    assert classes == ["cats", "dogs"]
    rel = [(str(p.relative_to(tmp_path)), y) for p, y in samples]
    assert rel == [("cats/c.png", 0), ("cats/ext/e.png", 0), ("dogs/d.png", 1)]


def test_16bit_png_scaled_to_8bit(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) decodes to value >> 8 in all three channels, not clipped to 255."""
    from d2v.data.images import _decode_rgb

    grad = (np.arange(64 * 256, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    path = tmp_path / "g16.png"
    Image.fromarray(grad).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(_decode_rgb(path))
    assert rgb.shape == (64, 256, 3) and rgb.dtype == np.uint8
    expected = (grad >> 8).astype(np.uint8)
    for ch in range(3):
        np.testing.assert_array_equal(rgb[..., ch], expected)
    assert (rgb == 255).mean() < 0.01
