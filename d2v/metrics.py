"""Run metrics: an append-only metrics.csv (optionally TensorBoard too) and the loss-curve PNG.

On resume, rows past the resumed step are dropped first so the CSV reads like one continuous run.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from d2v._optional import optional
from d2v.objective import STAT_KEYS

COLUMNS = ("step", *STAT_KEYS, "ema_decay", "lr", "grad_norm", "samples_per_s", "elapsed_s")
MARKER_MAX_POINTS = 20  # loss-curve lines with this few logged rows get markers
LR_COLOR, EMA_COLOR = "tab:blue", "tab:red"


class MetricsLogger:
    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.exists() and resume_step > 0 else []
        rows = [r for r in rows if r["step"] <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from e
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
            out[-1]["step"] = int(out[-1]["step"])
    return out


def _values(rows: list[dict], key: str) -> list[float]:
    """A column as floats, NaN where a row has no value (a gap in the line)."""
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def _has_data(vals: list[float]) -> bool:
    return any(math.isfinite(v) for v in vals)


def _positive(vals: list[float]) -> list[float]:
    """Non-positive values masked (NaN) for a log axis, which cannot show them."""
    return [v if v > 0 else float("nan") for v in vals]


def _run_config(run_dir: Path) -> dict:
    """The run's config, as saved with its checkpoints (the one `latest` names, else the newest); {}
    when there is none or it cannot be read."""
    import yaml

    root = run_dir / "checkpoints"
    candidates = []
    latest = root / "latest"
    try:
        if latest.is_file():
            candidates.append(root / latest.read_text().strip())
        candidates += sorted(root.glob("step_*"), reverse=True)
        for ck in candidates:
            if (ck / "config.yaml").is_file():
                cfg = yaml.safe_load((ck / "config.yaml").read_text())
                return cfg if isinstance(cfg, dict) else {}
    except (OSError, yaml.YAMLError):
        pass
    return {}


def run_title(run_dir: str | Path) -> str:
    """The run folder's name, with modality/flavor from its saved config when there is one."""
    run_dir = Path(run_dir)
    model = _run_config(run_dir).get("model")
    model = model if isinstance(model, dict) else {}
    kind = "/".join(str(model[k]) for k in ("modality", "flavor") if model.get(k))
    name = run_dir.resolve().name
    return f"{name} ({kind})" if kind else name


def loss_curve_figure(rows: list[dict], title: str | None = None):
    """The loss-curve figure (a matplotlib Figure, not shown or saved) of metrics.csv rows:
    [loss and its parts (log scale)] [target_var, pred_var] [lr and EMA decay]."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    few = len(rows) <= MARKER_MAX_POINTS  # a short run: markers, so one or two points still show
    style = {"marker": "o", "markersize": 3} if few else {}
    fig = Figure(figsize=(14, 4.0))
    ax_loss, ax_var, ax_lr = fig.subplots(1, 3)

    # loss = loss_reg + loss_cls. loss_cls is 0 without a CLS term (audio, text): nothing to draw on a
    # log axis, so no line and no legend entry; loss then equals loss_reg and is drawn once.
    loss, reg, cls = (_values(rows, k) for k in ("loss", "loss_reg", "loss_cls"))
    cls_zero = not any(v > 0 for v in cls if math.isfinite(v))
    same = _has_data(loss) and all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(loss, reg))
    wide, dashed = {"linewidth": 2.5}, {"linestyle": "--", "linewidth": 1.5}  # loss_reg close to loss
    series = []
    if same:
        series.append(("loss = loss_reg" + (" (loss_cls = 0)" if cls_zero else ""), loss, {}))
    else:  # a small loss_cls puts loss_reg just under loss: dashed over wide, both visible
        series += [("loss", loss, wide), ("loss_reg", reg, dashed)]
    series.append(("loss_cls", cls, {}))
    log_scale = any(v > 0 for _, vals, _ in series for v in vals if math.isfinite(v))
    for label, vals, kw in series:
        vals = _positive(vals) if log_scale else vals
        if _has_data(vals):
            ax_loss.plot(steps, vals, label=label, **kw, **style)
    if log_scale:
        ax_loss.set_yscale("log")
    ax_loss.set_title("loss = loss_reg + loss_cls")
    ax_loss.set_ylabel("loss (log scale)" if log_scale else "loss")

    # objective.py: target_var / pred_var = sqrt(variance + 1e-6) over all masked tokens of the batch
    # (every clone's masked positions), per feature dimension, averaged over the dimensions: a std,
    # despite the name (the reference's compute_var).
    for key, what in (("target_var", "teacher targets"), ("pred_var", "student predictions")):
        vals = _values(rows, key)
        if _has_data(vals):
            ax_var.plot(steps, vals, label=f"{key}: {what}", **style)
    ax_var.set_title("target_var, pred_var: std over masked tokens")
    ax_var.set_ylabel("std over masked tokens\n(mean over feature dims)")

    # lr and EMA decay on their own y axes. In a short run both are often straight lines (all warm-up, a
    # linear EMA ramp) that autoscaling lays exactly on top of each other: the EMA axis gets wider
    # margins (its line spans a narrower band) and is dashed over a wider solid lr line.
    lr, ema = _values(rows, "lr"), _values(rows, "ema_decay")
    ax_ema = ax_lr.twinx()
    handles = []
    if _has_data(lr):
        handles += ax_lr.plot(steps, lr, color=LR_COLOR, linewidth=2.5, label="lr (left axis)", **style)
    if _has_data(ema):
        handles += ax_ema.plot(steps, ema, color=EMA_COLOR, linestyle="--", linewidth=1.5,
                               label="EMA decay (right axis)", **style)
    ax_lr.set_ylabel("learning rate", color=LR_COLOR)
    ax_lr.tick_params(axis="y", colors=LR_COLOR)
    if _has_data(ema):
        ax_ema.set_ylabel("EMA decay", color=EMA_COLOR)
        ax_ema.tick_params(axis="y", colors=EMA_COLOR)
        ax_ema.ticklabel_format(axis="y", useOffset=False)
        ax_ema.margins(y=0.25)
    else:
        ax_ema.remove()
    ax_lr.set_title("lr (solid, left) and EMA decay (dashed, right)")
    if handles:
        ax_lr.legend(handles=handles, loc="best", fontsize=8)

    for ax in (ax_loss, ax_var, ax_lr):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.5 in a short run
        if ax is not ax_lr and ax.get_lines():
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_curve(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (and its parts), target_var/pred_var and lr/EMA decay against step, as one PNG titled with
    the run folder (the CSV's folder) and its modality/flavor; None when there is nothing to plot or
    matplotlib is not installed (warned once)."""
    rows = read_metrics(csv_path)
    if not rows:
        return None
    if optional("matplotlib", "the loss-curve PNG") is None:  # the numbers are in metrics.csv: a
        return None  # missing plot must not fail the run
    fig = loss_curve_figure(rows, run_title(Path(csv_path).parent))
    fig.savefig(png_path, dpi=110)
    return Path(png_path)
