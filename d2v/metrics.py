"""Run metrics: an append-only metrics.csv (optionally TensorBoard too) and the loss-curve PNG.

On resume, rows past the resumed step are dropped first so the CSV reads like one continuous run.
"""
from __future__ import annotations

import csv
from pathlib import Path

from d2v._optional import optional

COLUMNS = ("step", "loss", "loss_reg", "loss_cls", "target_var", "pred_var", "ema_decay", "lr",
           "grad_norm", "samples_per_s", "elapsed_s")


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


def plot_loss_curve(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (and its parts), target/pred std and lr against step, as one PNG; None when there is nothing
    to plot or matplotlib is not installed (warned once)."""
    rows = read_metrics(csv_path)
    if not rows:
        return None
    matplotlib = optional("matplotlib", "the loss-curve PNG")
    if matplotlib is None:  # the run's numbers are in metrics.csv; a missing plot must not fail it
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k in ("loss", "loss_reg", "loss_cls"):
        axes[0].plot(steps, [r[k] for r in rows], label=k)
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    for k in ("target_var", "pred_var"):
        axes[1].plot(steps, [r[k] for r in rows], label=k)
    axes[1].set_title("std across masked tokens")
    axes[2].plot(steps, [r["lr"] for r in rows], label="lr")
    ax2 = axes[2].twinx()
    ax2.plot(steps, [r["ema_decay"] for r in rows], color="tab:red", label="ema_decay")
    ax2.legend(loc="lower right", fontsize=8)
    axes[2].set_title("lr (left) and EMA decay (right)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(loc="upper right" if ax is axes[2] else "best", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
