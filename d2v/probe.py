"""Linear probe: logistic regression on frozen, unmasked encoder features, for the pretrained student,
its EMA teacher and a randomly initialized encoder of the same shape (the same seed as the run's
step-0 init), each on the full labelled train split and on a few-shot subset.

Features are standardized with train statistics; the L2 strength is chosen by stratified
cross-validation on the training features only; accuracy is measured on the held-out split.

References: ../shared/spec/probe_feasibility.md (10-shot digits probe as the target signal).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from d2v.checkpoint import load_checkpoint
from d2v.config import Config
from d2v.data.build import build_probe_splits
from d2v.registry import build_model
from d2v.trainer import seed_everything

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@torch.no_grad()
def extract_features(model, dataset, pool: str, device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """-> features (N, D) float32 and labels (N,) int64, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=_collate_eval)
    feats, labels = [], []
    for img, lab in loader:
        feats.append(model.extract_features(img.to(device), pool=pool).cpu())
        labels.append(lab)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _collate_eval(items):
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` examples per class (all of a class if it has fewer), fixed by seed."""
    rng = np.random.RandomState(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def logreg_accuracy(x_tr, y_tr, x_te, y_te, seed: int = 0) -> float:
    """Held-out accuracy (%) of multinomial logistic regression, C chosen by stratified CV."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    counts = np.bincount(y_tr)
    folds = int(min(5, counts[counts > 0].min()))  # stratified CV needs >= folds examples per class
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny, separable folds
        if folds >= 2:
            clf = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=1000, random_state=seed)
        else:
            clf = LogisticRegression(C=1.0, max_iter=1000)
        clf.fit(x_tr, y_tr)
    return float((clf.predict(x_te) == y_te).mean() * 100.0)


def _split(ds_all, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds_all))
    labels = np.asarray(ds_all.labels)
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    sub = torch.utils.data.Subset
    return sub(ds_all, tr.tolist()), sub(ds_all, te.tolist())


def probe_encoders(cfg: Config, encoders: dict, pool: str, shots: int, seed: int, device) -> dict:
    """Probe each named encoder -> {name: {"full": acc, f"{shots}shot": acc}}."""
    ds_train, ds_test = build_probe_splits(cfg)
    labels = np.asarray(ds_train.labels)
    if (labels < 0).any():
        raise ValueError(f"the probe needs labelled images: {ds_train.root} has images outside class "
                         f"subfolders (put each class in its own subfolder)")
    if ds_test is None:
        ds_train, ds_test = _split(ds_train, seed)
    results = {}
    for name, model in encoders.items():
        x_tr, y_tr = extract_features(model, ds_train, pool, device)
        x_te, y_te = extract_features(model, ds_test, pool, device)
        few = few_shot_indices(y_tr, shots, seed)
        results[name] = {"full": logreg_accuracy(x_tr, y_tr, x_te, y_te, seed),
                         f"{shots}shot": logreg_accuracy(x_tr[few], y_tr[few], x_te, y_te, seed)}
    results["n_train"], results["n_test"] = len(ds_train), len(ds_test)
    return results


def run_probe(checkpoint: str | Path, pool: str | None = None, shots: int | None = None,
              device: str | None = None) -> dict:
    """Probe a checkpoint's student and teacher against a random init of the same shape and seed."""
    state, cfg_dict, ck = load_checkpoint(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    pool, shots = pool or cfg.probe.pool, shots or cfg.probe.shots
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.train.seed)
    random_init = build_model(cfg).to(dev)  # identical to the run's step-0 student
    student = build_model(cfg).to(dev)
    student.load_state_dict(state["model"])
    teacher = build_model(cfg).to(dev)
    missing, unexpected = teacher.load_state_dict(state["teacher"], strict=False)
    if unexpected or any(".decoder." not in k for k in missing):
        raise RuntimeError(f"{ck}: teacher state does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    encoders = {"pretrained": student, "teacher": teacher, "random_init": random_init}
    res = probe_encoders(cfg, encoders, pool, shots, cfg.probe.seed, dev)
    res.update(checkpoint=str(ck), step=int(state["step"]), pool=pool, shots=shots)
    key = f"{shots}shot"
    res["gain_full"] = res["pretrained"]["full"] - res["random_init"]["full"]
    res[f"gain_{key}"] = res["pretrained"][key] - res["random_init"][key]
    out = ck.parent.parent / "probe.json"
    if ck.parent.name == "checkpoints":
        out.write_text(json.dumps(res, indent=2))
        res["probe_json"] = str(out)
    return res


def format_probe(res: dict) -> str:
    key = f"{res['shots']}shot"
    lines = [f"linear probe ({res['pool']}-pooled features, step {res['step']}, "
             f"{res['n_train']} train / {res['n_test']} held-out images)",
             f"  {'encoder':<12} {'full':>7} {key:>8}"]
    for name in ("pretrained", "teacher", "random_init"):
        lines.append(f"  {name:<12} {res[name]['full']:>6.1f}% {res[name][key]:>7.1f}%")
    lines.append(f"  gain over random init: full {res['gain_full']:+.1f} pts, {key} {res['gain_' + key]:+.1f} pts")
    return "\n".join(lines)
