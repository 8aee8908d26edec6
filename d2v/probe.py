"""Linear probe: logistic regression on frozen, unmasked encoder features, for the pretrained student,
its EMA teacher and a randomly initialized encoder of the same shape (the same seed as the run's
step-0 init), each on the full labelled train split and on a few-shot subset, for every probe task of
the modality (images: the class; speech: the spoken word and the speaker; text: word order, then the
topic).

The teacher is probed as the encoder it is during training: the student's modules with the teacher's
EMA parameters laid over them (audio/text teachers share the student's feature extractor).

Features are standardized with train statistics; the classifier is multinomial logistic regression
fit by full-batch L-BFGS in torch (a second per fit, where sklearn's CV took a minute on 80 classes);
its L2 strength is chosen by stratified k-fold cross-validation on the training features only (so every
class needs at least MIN_CV_FOLDS training examples); accuracy is measured on the held-out split.

Text word order is a task in minimal pairs (d2v.data.text.WordOrderDataset: each line as written and
token-shuffled): its folds, few-shot subsets and held-out split keep a line's two versions together, and
it is scored per pair (did the classifier rate the version as written above the shuffled one; chance
50%), so a line's content, present in both classes, cannot decide it.

The few-shot probe is the more telling number on easy data: on the embedded digits a random encoder
already comes close to the pretrained one with every label, while with 10 labels per class the gain
from pretraining is much larger.

Progress (per task and encoder: feature extraction, the fits) goes to the "d2v.probe" logger; the
results are only returned (`format_probe` renders them).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2v.config import Config
from d2v.data.build import build_probe_tasks
from d2v.data.common import ProbeTask
from d2v.log import get_logger
from d2v.model import build_model
from d2v.rng import seed_everything
from d2v.weights import load_weights

log = get_logger(__name__)

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # on the mean cross-entropy scale
MAX_CV_FOLDS = 5  # the L2 strength's stratified k-fold CV: k = min(5, examples of the smallest class)
MIN_CV_FOLDS = 2  # ... and k-fold needs k >= 2: the least examples per class the train split may have
HELD_OUT = 0.2  # the held-out fraction when the data has no test split
# A held-out set this small makes the accuracy noisy: below 20 examples one example is worth more than
# 5 points and the binomial standard error of an accuracy near 50% exceeds 11 points, the size of the
# gains the probe reports; a class with a single held-out example is scored all or nothing.
NOISY_HELD_OUT_TOTAL = 20
NOISY_HELD_OUT_PER_CLASS = 2
PROGRESS_MIN_BATCHES = 4  # feature extraction shows a bar (on a terminal) from this many batches


def _console_shows_info() -> bool:
    """Whether an info message of this module reaches a console handler (`setup_logging` without
    --quiet): the progress bar is shown only then, and only on a terminal."""
    if not log.isEnabledFor(logging.INFO):
        return False
    lg = log
    while lg is not None:
        for h in lg.handlers:
            if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                    and h.level <= logging.INFO):
                return True
        lg = lg.parent if lg.propagate else None
    return False


@torch.no_grad()
def extract_features(model, dataset, task: ProbeTask, pool: str, device,
                     batch_size: int = 256, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> features (N, D) float32 and labels (N,) int64, in dataset order. With `desc`, a progress bar
    over the batches on stderr when there are many and stderr is a terminal showing info messages."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=task.collate)
    feats, labels = [], []
    batches = loader
    if desc is not None and len(loader) >= PROGRESS_MIN_BATCHES and _console_shows_info() \
            and sys.stderr.isatty():
        from tqdm import tqdm

        batches = tqdm(loader, desc=desc, unit="batch", leave=False, file=sys.stderr, mininterval=0.5)
    for batch in batches:
        pad = batch.get("padding_mask")
        feats.append(model.extract_features(batch[task.source_key].to(device), pool=pool,
                                            padding_mask=None if pad is None else pad.to(device)).cpu())
        labels.append(batch["label"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def accuracy_se(acc_pct: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy measured on n held-out examples: the binomial
    sqrt(p (1 - p) / n). The SE of a gain between two encoders is given as the root sum of squares of
    theirs (as if independent; the two share the held-out set, so this errs on the large side)."""
    p = acc_pct / 100.0
    return 100.0 * float(np.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1)))


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` examples per class (all of a class if it has fewer), fixed by seed."""
    rng = np.random.RandomState(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def pair_items(pairs: np.ndarray) -> np.ndarray:
    """Pair indices (P,) of a paired task -> the indices of their items (2P,): 2p, 2p + 1 for each p."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)


def few_shot_pairs(n_pairs: int, shots: int, seed: int) -> np.ndarray:
    """The items of `shots` pairs (2p and 2p + 1, in order) of a paired task, fixed by seed."""
    return pair_items(np.sort(np.random.RandomState(seed).permutation(n_pairs)[:shots]))


def _check_pairs(y: np.ndarray, where: str) -> None:
    """A paired task's labels: 1 (as written) at even items, 0 at odd ones."""
    if len(y) % 2 or not ((y[0::2] == 1).all() and (y[1::2] == 0).all()):
        raise ValueError(f"{where}: a paired probe task needs items in pairs (label 1, then label 0)")


def _n_correct(logits: torch.Tensor, y: torch.Tensor, paired: bool) -> int:
    """Correct decisions: per item, the argmax class; paired, per pair (items 2p, 2p + 1), whether the
    item labelled 1 gets the larger class-1-minus-class-0 logit margin than its twin."""
    if not paired:
        return int((logits.argmax(1) == y).sum())
    margin = (logits[:, 1] - logits[:, 0]).view(-1, 2)  # (P, 2): the label-1 item, the label-0 item
    return int((margin[:, 0] > margin[:, 1]).sum())


def fit_logreg(x_ND: torch.Tensor, y_N: torch.Tensor, num_classes: int, l2: float,
               max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS in float64: minimizes
    mean cross-entropy + l2/2 * ||W||^2 -> (W (D, C), b (C,))."""
    W = torch.zeros(x_ND.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_ND @ W + b, y_N) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def logreg_accuracy(x_tr, y_tr, x_te, y_te, seed: int = 0, paired: bool = False) -> float:
    """Held-out accuracy (%) of multinomial logistic regression on standardized features; the L2
    strength is chosen from L2_GRID by stratified k-fold CV on the training features only (k =
    MAX_CV_FOLDS, fewer when a class has fewer examples; no CV, the grid's middle value, when a class
    has a single one, as in a 1-shot subset), then the model is refit on all of them.

    `paired`: both splits are minimal pairs (items 2p, 2p + 1 labelled 1 and 0, see
    d2v.data.text.WordOrderDataset); the folds keep pairs together and the accuracy is per pair: the
    share of held-out pairs whose label-1 item the classifier rates the more likely of the two."""
    from sklearn.model_selection import KFold, StratifiedKFold

    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy((x_tr - mu) / sd).double()
    xe = torch.from_numpy((x_te - mu) / sd).double()
    classes, yt = np.unique(y_tr, return_inverse=True)  # labels -> 0..C-1
    if paired:
        _check_pairs(y_tr, "probe train split")
        _check_pairs(np.asarray(y_te), "probe held-out split")
    yt = torch.from_numpy(yt)
    C = len(classes)
    counts = np.bincount(yt.numpy())
    folds = int(min(MAX_CV_FOLDS, len(yt) // 2 if paired else counts.min()))
    best = L2_GRID[len(L2_GRID) // 2]
    if folds >= MIN_CV_FOLDS and C > 1:
        if paired:  # split pairs, not items: a line must not sit in both the fit and the validation
            pairs = KFold(folds, shuffle=True, random_state=seed).split(np.arange(len(yt) // 2))
            splits = [(pair_items(tr), pair_items(va)) for tr, va in pairs]
        else:
            skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
            splits = list(skf.split(xt.numpy(), yt.numpy()))
        scores = []
        for l2 in L2_GRID:
            correct = 0
            for tr, va in splits:
                W, b = fit_logreg(xt[tr], yt[tr], C, l2)
                correct += _n_correct(xt[va] @ W + b, yt[va], paired)
            scores.append(correct)
        best = L2_GRID[int(np.argmax(scores))]  # ties -> the weaker penalty listed first
    W, b = fit_logreg(xt, yt, C, best)
    logits = xe @ W + b
    if paired:
        return 100.0 * _n_correct(logits, torch.from_numpy(np.asarray(y_te)), True) / (len(y_te) // 2)
    pred = classes[logits.argmax(1).numpy()]
    return float((pred == y_te).mean() * 100.0)


def _split(ds_all, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds_all))
    labels = np.asarray(ds_all.labels)
    tr, te = train_test_split(idx, test_size=HELD_OUT, random_state=seed, stratify=labels)
    sub = torch.utils.data.Subset
    return sub(ds_all, tr.tolist()), sub(ds_all, te.tolist())


def _split_pairs(ds_all, seed: int):
    """The held-out split of a paired task without a test split: HELD_OUT of its pairs, whole."""
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(ds_all) // 2), test_size=HELD_OUT, random_state=seed)
    sub = torch.utils.data.Subset
    return sub(ds_all, pair_items(np.sort(tr)).tolist()), sub(ds_all, pair_items(np.sort(te)).tolist())


def _test_to_train_labels(ds_train, ds_test) -> np.ndarray | None:
    """Test label -> train label, matched by class name, or None when the two already agree.

    Labels are positions in a split's own class list: a test split built without the train split's
    list and lacking a class numbers the rest differently (train [a, b, c] -> 0, 1, 2; test [a, c] ->
    0, 1), and the probe would then score c as b. A test class the train split lacks cannot be
    scored at all, so it is an error naming the class and the test folder."""
    tr, te = getattr(ds_train, "classes", None), getattr(ds_test, "classes", None)
    if not tr or not te or list(tr) == list(te):
        return None
    index = {name: k for k, name in enumerate(tr)}
    extra = [name for name in te if name not in index]
    if extra:
        where = getattr(ds_test, "root", "the test split")
        raise ValueError(f"{where}: test class(es) {extra} not in the train split's classes {list(tr)} "
                         f"({getattr(ds_train, 'root', 'train split')}); the probe can only score classes "
                         f"it was trained on: add them to train or remove them from test")
    return np.array([index[name] for name in te])


class UnlabelledData(ValueError):
    """The probe's data has no labels (`d2v pretrain` then skips the probe with a note)."""


def _labels_of(ds) -> np.ndarray:
    """A probe dataset's labels (one per example), also through a Subset."""
    if isinstance(ds, torch.utils.data.Subset):
        return _labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    return np.asarray(ds.labels)


def _class_name(ds, label: int) -> str:
    """A label as its class (folder / label column) name, quoted; the number when there is no name."""
    classes = getattr(ds, "classes", None)
    if classes is not None and 0 <= label < len(classes):
        return repr(str(classes[label]))
    return f"label {label}"


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}{'es' if word.endswith('s') else 's'}"


def check_train_split(ds_train, labels: np.ndarray, holds_out: bool) -> None:
    """Raise a one-line ValueError, naming the classes by name, when the train split is too small for
    the probe: each class needs MIN_CV_FOLDS examples for the L2 strength's k-fold cross-validation,
    one more when the probe holds out its own test examples (no test split); the held-out share must
    also have at least one example per class (a stratified split cannot do with fewer)."""
    where = getattr(ds_train, "root", None) or "the probe's train split"
    need = MIN_CV_FOLDS + (1 if holds_out else 0)
    classes, counts = np.unique(labels, return_counts=True)
    few = sorted((int(n), int(c)) for c, n in zip(classes, counts) if n < need)
    if few:
        if len(few) == 1:
            named = f"class {_class_name(ds_train, few[0][1])} has {_n(few[0][0], 'example')}"
        else:
            named = "classes " + ", ".join(f"{_class_name(ds_train, c)} ({_n(n, 'example')})"
                                           for n, c in few[:5])
            named += f" and {len(few) - 5} more have fewer than {need}" if len(few) > 5 else " have too few"
        why = f"{MIN_CV_FOLDS} to pick its L2 strength by k-fold cross-validation, k >= {MIN_CV_FOLDS}"
        if holds_out:
            why += (f", and 1 to hold out: there is no test split, so the probe holds out {HELD_OUT:.0%} "
                    f"of these")
        raise ValueError(f"{where}: {named}; the linear probe needs at least {need} examples per "
                         f"class ({why}): add examples or remove the class")
    if holds_out:
        n_test = math.ceil(HELD_OUT * len(labels))  # as sklearn's train_test_split counts it
        if n_test < len(classes):
            total = len(labels)
            while math.ceil(HELD_OUT * total) < len(classes):
                total += 1
            raise ValueError(f"{where}: {_n(len(labels), 'example')} in {len(classes)} classes; with no "
                             f"test split the probe holds out {HELD_OUT:.0%} of them ({n_test}), fewer than "
                             f"one per class: it needs at least {total} examples here, or separate train and "
                             f"test splits")


def _warn_if_noisy(task: str, ds_test) -> None:
    """A warning when the held-out set is too small for a steady accuracy (see NOISY_HELD_OUT_*)."""
    y = _labels_of(ds_test)
    y = y[y >= 0]
    counts = np.unique(y, return_counts=True)[1]
    fewest = int(counts.min()) if counts.size else 0
    if len(y) < NOISY_HELD_OUT_TOTAL or fewest < NOISY_HELD_OUT_PER_CLASS:
        point = 100.0 / max(len(y), 1)
        log.warning(f"probe {task}: only {_n(len(y), 'held-out example')} (fewest in a class: {fewest}): its "
                    f"accuracies are noisy at this size (one example is {point:.1f} points); "
                    f"at least {NOISY_HELD_OUT_TOTAL} held-out examples and {NOISY_HELD_OUT_PER_CLASS} per "
                    f"class give steadier numbers")


def probe_encoders(cfg: Config, encoders: dict, pool: str, shots: int, seed: int, device,
                   run_dir: Path | None = None, tasks: list[str] | None = None) -> dict:
    """Probe each named encoder on every task (or on the named `tasks` only) -> {task: {name: {"full":
    acc, f"{shots}shot": acc, ..._se}, "n_train": .., "n_test": .., "classes": .., "chance": .., and the
    gains of "pretrained" over "random_init" when both are among the encoders}}."""
    results, unlabelled = {}, []
    all_tasks = build_probe_tasks(cfg, run_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.name for t in all_tasks})
        if unknown:
            raise ValueError(f"probe task(s) {unknown} unknown for {cfg.model.modality}: the tasks here are "
                             f"{[t.name for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t.name in tasks]
    for task in all_tasks:
        ds_train, ds_test = task.train, task.test
        labels = np.asarray(ds_train.labels)
        if (labels < 0).any():  # a task without labels is skipped; the probe fails only if all are
            unlabelled.append(f"the {task.name} probe needs labelled data: {ds_train.root} has unlabelled "
                              f"examples (put each class in its own subfolder, or give a label column)")
            continue
        check_train_split(ds_train, labels, holds_out=ds_test is None)
        paired = bool(getattr(ds_train, "paired", False))  # minimal pairs, scored pair by pair
        if ds_test is None:
            ds_train, ds_test = (_split_pairs if paired else _split)(ds_train, seed)
        to_train = _test_to_train_labels(ds_train, ds_test)  # None: both splits number classes alike
        tag = f"probe {task.name}:"
        sizes = (f"{len(ds_train) // 2} train / {len(ds_test) // 2} held-out pairs" if paired
                 else f"{len(ds_train)} train / {len(ds_test)} held-out examples")
        log.info(f"{tag} {sizes}, {_n(len(np.unique(labels)), 'class')}, {_n(len(encoders), 'encoder')}")
        _warn_if_noisy(task.name, ds_test)
        res = {}
        for name, model in encoders.items():
            t0 = time.perf_counter()
            x_tr, y_tr = extract_features(model, ds_train, task, pool, device, desc=f"{tag} {name} train")
            x_te, y_te = extract_features(model, ds_test, task, pool, device, desc=f"{tag} {name} held-out")
            t1 = time.perf_counter()
            log.info(f"{tag} {name} features {len(x_tr)}/{len(x_te)} (train/held-out) in {t1 - t0:.1f} s")
            if to_train is not None:
                y_te = np.where(y_te >= 0, to_train[np.maximum(y_te, 0)], y_te)
            few = (few_shot_pairs(len(y_tr) // 2, shots, seed) if paired
                   else few_shot_indices(y_tr, shots, seed))
            full = logreg_accuracy(x_tr, y_tr, x_te, y_te, seed, paired)
            t2 = time.perf_counter()
            res[name] = {"full": full,
                         f"{shots}shot": logreg_accuracy(x_tr[few], y_tr[few], x_te, y_te, seed, paired)}
            log.info(f"{tag} {name} logistic regression fit: full {t2 - t1:.1f} s, {shots}-shot "
                     f"{time.perf_counter() - t2:.1f} s")
        key = f"{shots}shot"
        n_test = len(ds_test) // 2 if paired else len(ds_test)  # scored decisions: pairs or examples
        for name in encoders:
            res[name].update({f"{k}_se": accuracy_se(res[name][k], n_test) for k in ("full", key)})
        held_out = np.asarray(y_te)  # the held-out labels as scored (the same for every encoder)
        res.update(n_train=len(ds_train) // 2 if paired else len(ds_train), n_test=n_test,
                   classes=len(np.unique(labels)), paired=paired,
                   chance=50.0 if paired else
                   100.0 * np.bincount(held_out[held_out >= 0]).max() / max((held_out >= 0).sum(), 1))
        if "pretrained" in res and "random_init" in res:
            pre, rnd = res["pretrained"], res["random_init"]
            for k in ("full", key):
                res[f"gain_{k}"] = pre[k] - rnd[k]
                res[f"gain_{k}_se"] = float(np.hypot(pre[f"{k}_se"], rnd[f"{k}_se"]))
        results[task.name] = res
    if not results:
        raise UnlabelledData("; ".join(unlabelled))
    for msg in unlabelled:
        log.warning(f"probe task skipped: {msg}")
    return results


def teacher_encoder(student, teacher_state: dict, ck) -> torch.nn.Module:
    """The student with the teacher's EMA parameters laid over it: exactly the encoder the teacher
    is during training (its own parts EMA, the parts it shares with the student the student's)."""
    teacher = copy.deepcopy(student)
    expected = set(copy.deepcopy(student).strip_to_teacher().state_dict())
    missing, unexpected = teacher.load_state_dict(teacher_state, strict=False)
    not_loaded = expected & set(missing)
    if unexpected or not_loaded:
        raise RuntimeError(f"{ck}: teacher state does not match the model (missing {sorted(not_loaded)[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return teacher


def run_probe(checkpoint: str | Path, pool: str | None = None, shots: int | None = None,
              device: str | None = None, tasks: list[str] | None = None, teacher: bool = True,
              random_init: bool = True) -> dict:
    """Probe a checkpoint's student and teacher against a random init of the same shape and seed.

    `tasks` (names), `teacher=False` and `random_init=False` narrow the probe (benchmarks probing many
    checkpoints); only a complete probe is written to the run's probe.json."""
    state, cfg_dict, ck = load_weights(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    pool, shots = pool or cfg.probe.pool, shots or cfg.probe.shots
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.train.seed)
    rnd = build_model(cfg).to(dev)  # identical to the run's step-0 student
    student = build_model(cfg).to(dev)
    student.load_state_dict(state["model"])
    encoders = {"pretrained": student}
    if teacher:
        encoders["teacher"] = teacher_encoder(student, state["teacher"], ck)
    if random_init:
        encoders["random_init"] = rnd
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    log.info(f"probe: {ck} (step {int(state['step'])}), {pool}-pooled features, on {dev}")
    res = {"tasks": probe_encoders(cfg, encoders, pool, shots, cfg.probe.seed, dev, run_dir, tasks)}
    res.update(checkpoint=str(ck), step=int(state["step"]), pool=pool, shots=shots,
               modality=cfg.model.modality)
    first = next(iter(res["tasks"].values()))  # headline numbers: the first task
    key = f"{shots}shot"
    for name in ("pretrained", "teacher", "random_init", "gain_full", f"gain_{key}", "n_train", "n_test"):
        if name in first:
            res[name] = first[name]
    out = ck.parent.parent / "probe.json"
    if ck.parent.name == "checkpoints" and tasks is None and teacher and random_init:
        out.write_text(json.dumps(res, indent=2))
        res["probe_json"] = str(out)
    return res


def format_probe(res: dict) -> str:
    key = f"{res['shots']}shot"
    lines = []
    for task, r in res["tasks"].items():
        unit = "pairs" if r.get("paired") else "examples"
        lines += [f"linear probe: {task} ({r['classes']} classes, {res['pool']}-pooled features, step "
                  f"{res['step']}, {r['n_train']} train / {r['n_test']} held-out {unit})",
                  f"  {'encoder':<12} {'full':>7}{'':5} {key:>8}"]
        for name in ("pretrained", "teacher", "random_init"):
            e = r[name]
            lines.append(f"  {name:<12} {e['full']:>6.1f}% ±{e.get('full_se', 0):.1f} "
                         f"{e[key]:>7.1f}% ±{e.get(key + '_se', 0):.1f}")
        if r.get("paired"):
            lines.append(f"  scored per pair: which of a line's two versions is as written (chance 50%; "
                         f"{res['shots']}-shot: {res['shots']} train pairs); ± is one standard error over "
                         f"the {r['n_test']} held-out pairs")
        elif "chance" in r:
            lines.append(f"  chance (always the most common held-out class): {r['chance']:.1f}%; ± is one "
                         f"standard error over the {r['n_test']} held-out examples")
        gains = []
        for k in ("full", key):
            g, se = r[f"gain_{k}"], r.get(f"gain_{k}_se", 0.0)
            gains.append(f"{k} {g:+.1f} ±{se:.1f} pts" + (f" ({g / se:+.1f} SE)" if se > 0 else ""))
        lines.append("  gain over random init: " + ", ".join(gains))
    return "\n".join(lines)
