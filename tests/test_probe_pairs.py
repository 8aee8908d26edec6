"""The word-order probe's minimal pairs: folds, few-shot subsets and held-out splits keep the two
versions of a line together, and accuracy is per pair (which version the classifier rates as written).

Run: .venv/bin/python -m pytest -q tests/test_probe_pairs.py
"""
import numpy as np
import pytest
import torch

from d2v.probe import _n_correct, _split_pairs, few_shot_pairs, logreg_accuracy


def _pairs(n_pairs: int, signal: float, content: float, seed: int, dim: int = 16):
    """Features of n_pairs minimal pairs (N = 2 * n_pairs, D): a per-line content vector shared by the
    two versions (scale `content`) plus +-signal/2 along dimension 0 for written/shuffled and unit
    noise; labels 1, 0, 1, 0, ..."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, content, (n_pairs, 1, dim)).repeat(2, 1)  # (P, 2, D)
    c[:, 0, 0] += signal / 2
    c[:, 1, 0] -= signal / 2
    x = (c + rng.normal(0, 1, c.shape)).reshape(-1, dim).astype(np.float32)
    return x, np.tile([1, 0], n_pairs)


def test_pair_scoring_compares_the_two_versions_of_a_line():
    # per item, class 1 wins for both items of pair 0 (argmax says 1 right of 2); as a pair, the
    # written version has the larger margin: correct. Pair 1: the shuffled version has it: wrong.
    logits = torch.tensor([[0.0, 3.0], [0.0, 1.0], [0.0, -1.0], [0.0, 2.0]])
    y = torch.tensor([1, 0, 1, 0])
    assert _n_correct(logits, y, paired=False) == 1  # items 0 (right), 1, 2, 3 (wrong)
    assert _n_correct(logits, y, paired=True) == 1  # pair 0 right, pair 1 wrong


def test_paired_accuracy_finds_a_small_order_signal_under_large_content():
    # the order signal (2 units) is small next to the content shared by a pair (scale 5): item by
    # item, content swamps it; pair by pair, the content cancels
    x_tr, y_tr = _pairs(400, 2.0, 5.0, seed=0)
    x_te, y_te = _pairs(300, 2.0, 5.0, seed=1)
    paired = logreg_accuracy(x_tr, y_tr, x_te, y_te, seed=0, paired=True)
    single = logreg_accuracy(x_tr, y_tr, x_te, y_te, seed=0, paired=False)
    # pair margin difference ~ N(2 w, 2 w^2): P(correct) = Phi(2 / sqrt(2)) = 92%, minus fit error
    assert paired > 85.0
    assert single < paired - 10.0


def test_paired_accuracy_is_chance_without_an_order_signal():
    accs = [logreg_accuracy(*_pairs(200, 0.0, 3.0, seed=2 * s), *_pairs(400, 0.0, 3.0, seed=2 * s + 1),
                            seed=s, paired=True) for s in range(4)]
    se = 100 * np.sqrt(0.25 / 400 / 4)  # the mean of 4 runs over 400 pairs each
    assert abs(np.mean(accs) - 50.0) < 3 * se


def test_few_shot_and_held_out_splits_keep_pairs_whole():
    items = few_shot_pairs(50, 10, seed=0)
    assert len(items) == 20 and (items[0::2] % 2 == 0).all() and (items[1::2] == items[0::2] + 1).all()
    assert len(set(items[0::2] // 2)) == 10
    assert np.array_equal(items, few_shot_pairs(50, 10, seed=0))

    class Paired(torch.utils.data.Dataset):
        paired, labels = True, [1, 0] * 25

        def __len__(self):
            return 50

    tr, te = _split_pairs(Paired(), seed=0)
    assert len(tr) == 40 and len(te) == 10
    for sub in (tr, te):
        idx = np.asarray(sub.indices)
        assert (idx[0::2] % 2 == 0).all() and (idx[1::2] == idx[0::2] + 1).all()
    assert not set(tr.indices) & set(te.indices)


def test_paired_probe_refuses_items_out_of_pair_order():
    x, y = _pairs(20, 1.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="pairs"):
        logreg_accuracy(x, y[::-1].copy(), x, y, paired=True)
