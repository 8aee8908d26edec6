"""Linear probe: logistic regression on frozen, unmasked encoder features, for the pretrained student,
its EMA teacher and a randomly initialized encoder of the same shape (the same seed as the run's
step-0 init), each on the full labelled train split and on a few-shot subset, for every probe task of
the modality (images: the class; speech: the spoken word and the speaker; text: word order, then the
topic).

The teacher is probed as the encoder it is during training: the student's modules with the teacher's
EMA parameters laid over them (audio/text teachers share the student's feature extractor).

Features are standardized with train statistics; the classifier is multinomial logistic regression
fit by full-batch L-BFGS in torch (a second per fit, where sklearn's CV took a minute on 80 classes);
its L2 strength is chosen by stratified cross-validation on the training features only; accuracy is
measured on the held-out split.

References: ../shared/spec/probe_feasibility.md (10-shot digits probe as the target signal).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2v.checkpoint import load_weights
from d2v.config import Config
from d2v.data.build import ProbeTask, build_probe_tasks
from d2v.registry import build_model
from d2v.trainer import seed_everything

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # on the mean cross-entropy scale


@torch.no_grad()
def extract_features(model, dataset, task: ProbeTask, pool: str, device,
                     batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """-> features (N, D) float32 and labels (N,) int64, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=task.collate)
    feats, labels = [], []
    for batch in loader:
        pad = batch.get("padding_mask")
        feats.append(model.extract_features(batch[task.source_key].to(device), pool=pool,
                                            padding_mask=None if pad is None else pad.to(device)).cpu())
        labels.append(batch["label"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` examples per class (all of a class if it has fewer), fixed by seed."""
    rng = np.random.RandomState(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


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


def logreg_accuracy(x_tr, y_tr, x_te, y_te, seed: int = 0) -> float:
    """Held-out accuracy (%) of multinomial logistic regression on standardized features; the L2
    strength is chosen from L2_GRID by stratified k-fold CV on the training features only (k = 5,
    fewer when a class has fewer examples), then the model is refit on all of them."""
    from sklearn.model_selection import StratifiedKFold

    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy((x_tr - mu) / sd).double()
    xe = torch.from_numpy((x_te - mu) / sd).double()
    classes, yt = np.unique(y_tr, return_inverse=True)  # labels -> 0..C-1
    yt = torch.from_numpy(yt)
    C = len(classes)
    counts = np.bincount(yt.numpy())
    folds = int(min(5, counts.min()))
    best = L2_GRID[len(L2_GRID) // 2]
    if folds >= 2 and C > 1:
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(xt.numpy(), yt.numpy()))
        scores = []
        for l2 in L2_GRID:
            correct = 0
            for tr, va in splits:
                W, b = fit_logreg(xt[tr], yt[tr], C, l2)
                correct += int(((xt[va] @ W + b).argmax(1) == yt[va]).sum())
            scores.append(correct)
        best = L2_GRID[int(np.argmax(scores))]  # ties -> the weaker penalty listed first
    W, b = fit_logreg(xt, yt, C, best)
    pred = classes[(xe @ W + b).argmax(1).numpy()]
    return float((pred == y_te).mean() * 100.0)


def _split(ds_all, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds_all))
    labels = np.asarray(ds_all.labels)
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    sub = torch.utils.data.Subset
    return sub(ds_all, tr.tolist()), sub(ds_all, te.tolist())


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


def probe_encoders(cfg: Config, encoders: dict, pool: str, shots: int, seed: int, device,
                   run_dir: Path | None = None) -> dict:
    """Probe each named encoder on every task -> {task: {name: {"full": acc, f"{shots}shot": acc},
    "n_train": .., "n_test": .., "classes": ..}}."""
    results, unlabelled = {}, []
    for task in build_probe_tasks(cfg, run_dir):
        ds_train, ds_test = task.train, task.test
        labels = np.asarray(ds_train.labels)
        if (labels < 0).any():  # a task without labels is skipped; the probe fails only if all are
            unlabelled.append(f"the {task.name} probe needs labelled data: {ds_train.root} has unlabelled "
                              f"examples (put each class in its own subfolder, or give a label column)")
            continue
        if ds_test is None:
            ds_train, ds_test = _split(ds_train, seed)
        to_train = _test_to_train_labels(ds_train, ds_test)  # None: both splits number classes alike
        res = {}
        for name, model in encoders.items():
            x_tr, y_tr = extract_features(model, ds_train, task, pool, device)
            x_te, y_te = extract_features(model, ds_test, task, pool, device)
            if to_train is not None:
                y_te = np.where(y_te >= 0, to_train[np.maximum(y_te, 0)], y_te)
            few = few_shot_indices(y_tr, shots, seed)
            res[name] = {"full": logreg_accuracy(x_tr, y_tr, x_te, y_te, seed),
                         f"{shots}shot": logreg_accuracy(x_tr[few], y_tr[few], x_te, y_te, seed)}
        key = f"{shots}shot"
        res.update(n_train=len(ds_train), n_test=len(ds_test), classes=len(np.unique(labels)),
                   gain_full=res["pretrained"]["full"] - res["random_init"]["full"],
                   **{f"gain_{key}": res["pretrained"][key] - res["random_init"][key]})
        results[task.name] = res
    if not results:
        raise UnlabelledData("; ".join(unlabelled))
    for msg in unlabelled:
        warnings.warn(f"skipped: {msg}")
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
              device: str | None = None) -> dict:
    """Probe a checkpoint's student and teacher against a random init of the same shape and seed."""
    state, cfg_dict, ck = load_weights(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    pool, shots = pool or cfg.probe.pool, shots or cfg.probe.shots
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.train.seed)
    random_init = build_model(cfg).to(dev)  # identical to the run's step-0 student
    student = build_model(cfg).to(dev)
    student.load_state_dict(state["model"])
    teacher = teacher_encoder(student, state["teacher"], ck)
    encoders = {"pretrained": student, "teacher": teacher, "random_init": random_init}
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    res = {"tasks": probe_encoders(cfg, encoders, pool, shots, cfg.probe.seed, dev, run_dir)}
    res.update(checkpoint=str(ck), step=int(state["step"]), pool=pool, shots=shots,
               modality=cfg.model.modality)
    first = next(iter(res["tasks"].values()))  # headline numbers: the first task
    key = f"{shots}shot"
    for name in ("pretrained", "teacher", "random_init", "gain_full", f"gain_{key}", "n_train", "n_test"):
        res[name] = first[name]
    out = ck.parent.parent / "probe.json"
    if ck.parent.name == "checkpoints":
        out.write_text(json.dumps(res, indent=2))
        res["probe_json"] = str(out)
    return res


def format_probe(res: dict) -> str:
    key = f"{res['shots']}shot"
    lines = []
    for task, r in res["tasks"].items():
        lines += [f"linear probe: {task} ({r['classes']} classes, {res['pool']}-pooled features, step "
                  f"{res['step']}, {r['n_train']} train / {r['n_test']} held-out examples)",
                  f"  {'encoder':<12} {'full':>7} {key:>8}"]
        for name in ("pretrained", "teacher", "random_init"):
            lines.append(f"  {name:<12} {r[name]['full']:>6.1f}% {r[name][key]:>7.1f}%")
        lines.append(f"  gain over random init: full {r['gain_full']:+.1f} pts, {key} {r['gain_' + key]:+.1f} pts")
    return "\n".join(lines)
