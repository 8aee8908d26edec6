"""The loss-curve PNG (d2v/metrics.py): panel titles and legends that say what the CSV columns are, no
legend entry without a drawn line, one line when loss equals loss_reg, the run named in the title,
and an lr line that stays visible in a short run. The figure is inspected, not the pixels.

Run: cd /work/main && .venv/bin/python -m pytest -x -q tests/test_plot.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from d2v.metrics import MetricsLogger, loss_curve_figure, plot_loss_curve, read_metrics, run_title

pytest.importorskip("matplotlib")


def _write_run(run_dir, steps, cls_loss: bool, modality=None, flavor=None):
    """metrics.csv like a run's: audio/text log loss_cls = 0 (no CLS term), image a small positive one;
    lr in linear warm-up and a linear EMA ramp (a short run: both straight lines)."""
    log = MetricsLogger(run_dir)
    for s in range(1, steps + 1):
        reg = 5.0 / s
        cls = 0.01 / s if cls_loss else 0.0
        log.log({"step": s, "loss": reg + cls, "loss_reg": reg, "loss_cls": cls, "target_var": 0.5 + 0.01 * s,
                 "pred_var": 0.3 + 0.01 * s, "ema_decay": 0.99 + 0.001 * s, "lr": 1e-4 * s, "grad_norm": 1.0,
                 "samples_per_s": 10.0, "elapsed_s": float(s)})
    log.close()
    if modality:
        ck = run_dir / "checkpoints" / f"step_{steps:08d}"
        ck.mkdir(parents=True)
        (ck / "config.yaml").write_text(f"model:\n  modality: {modality}\n  flavor: {flavor}\n")
        (run_dir / "checkpoints" / "latest").write_text(ck.name + "\n")
    return run_dir / "metrics.csv"


def _legend_labels(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _drawn(line) -> bool:
    return any(math.isfinite(v) for v in np.asarray(line.get_ydata(), dtype=float))


def _panels(fig):
    loss, var, lr = fig.axes[:3]
    return loss, var, lr, fig.axes[3:]


def test_audio_run_draws_one_loss_line_and_no_empty_legend_entry(tmp_path):
    csv = _write_run(tmp_path / "run", steps=6, cls_loss=False)
    fig = loss_curve_figure(read_metrics(csv), "run")
    ax_loss, _, _, _ = _panels(fig)
    assert ax_loss.get_yscale() == "log"
    lines = ax_loss.get_lines()
    assert len(lines) == 1 and all(_drawn(ln) for ln in lines)
    labels = _legend_labels(ax_loss)
    assert labels == ["loss = loss_reg (loss_cls = 0)"]
    # every legend entry of every panel names a line with something drawn on it (the lr panel's legend
    # also names the line on its twin axis)
    drawn = {ln.get_label() for ax in fig.axes for ln in ax.get_lines() if _drawn(ln)}
    for ax in fig.axes:
        assert set(_legend_labels(ax)) <= drawn, ax.get_title()


def test_image_run_draws_loss_parts_separately(tmp_path):
    csv = _write_run(tmp_path / "run", steps=30, cls_loss=True)
    ax_loss = _panels(loss_curve_figure(read_metrics(csv)))[0]
    assert _legend_labels(ax_loss) == ["loss", "loss_reg", "loss_cls"]
    loss, reg, _ = ax_loss.get_lines()
    assert reg.get_linestyle() != loss.get_linestyle()  # loss_reg just under loss: both visible


def test_var_panel_says_what_target_var_and_pred_var_are(tmp_path):
    # d2v/objective.py: std_over_tokens = std over the masked tokens per feature dim, mean over dims
    csv = _write_run(tmp_path / "run", steps=6, cls_loss=False)
    ax_var = _panels(loss_curve_figure(read_metrics(csv)))[1]
    title = ax_var.get_title()
    assert "target_var" in title and "pred_var" in title and "std over masked tokens" in title
    assert "std" in ax_var.get_ylabel() and "mean over feature dims" in ax_var.get_ylabel()
    labels = _legend_labels(ax_var)
    assert labels == ["target_var: teacher targets", "pred_var: student predictions"]


def test_every_panel_has_a_y_label(tmp_path):
    csv = _write_run(tmp_path / "run", steps=6, cls_loss=False)
    fig = loss_curve_figure(read_metrics(csv))
    for ax in fig.axes:
        assert ax.get_ylabel(), ax.get_title()
        if ax in fig.axes[:3]:
            assert ax.get_xlabel() == "step"


def test_lr_line_stays_visible_in_a_short_run(tmp_path):
    # warm-up lr and a linear EMA ramp are both straight lines: autoscaled on twin axes they would lie
    # exactly on top of each other
    csv = _write_run(tmp_path / "run", steps=4, cls_loss=False)
    fig = loss_curve_figure(read_metrics(csv))
    ax_lr, twins = _panels(fig)[2:]
    (lr,) = ax_lr.get_lines()
    (ema,) = twins[0].get_lines()
    assert lr.get_label().startswith("lr") and ema.get_label().startswith("EMA decay")
    assert lr.get_color() != ema.get_color() and lr.get_linestyle() != ema.get_linestyle()
    assert lr.get_marker() not in (None, "", "None")  # a few points: markers
    fig.canvas.draw()
    lr_px = ax_lr.transData.transform(np.column_stack([lr.get_xdata(), lr.get_ydata()]))
    ema_px = twins[0].transData.transform(np.column_stack([ema.get_xdata(), ema.get_ydata()]))
    assert np.abs(lr_px - ema_px).max() > 10  # not drawn on the same pixels
    assert set(_legend_labels(ax_lr)) == {lr.get_label(), ema.get_label()}


def test_single_logged_row_still_shows(tmp_path):
    csv = _write_run(tmp_path / "run", steps=1, cls_loss=False)
    fig = loss_curve_figure(read_metrics(csv))
    for ax in fig.axes:
        for ln in ax.get_lines():
            assert ln.get_marker() not in (None, "", "None"), ln.get_label()


def test_missing_columns_draw_nothing_for_them(tmp_path):
    log = MetricsLogger(tmp_path / "run")
    log.log({"step": 1, "loss": 1.0, "lr": 1e-3})
    log.log({"step": 2, "loss": 0.5, "lr": 2e-3})
    log.close()
    fig = loss_curve_figure(read_metrics(log.path))
    ax_loss, ax_var, ax_lr, twins = _panels(fig)
    assert _legend_labels(ax_loss) == ["loss"]
    assert ax_var.get_lines() == [] and ax_var.get_legend() is None
    assert [ln.get_label() for ln in ax_lr.get_lines()] == ["lr (left axis)"] and not twins


def test_suptitle_names_the_run_and_its_modality(tmp_path):
    csv = _write_run(tmp_path / "tiny_audio", steps=6, cls_loss=False, modality="audio", flavor="tiny")
    assert run_title(tmp_path / "tiny_audio") == "tiny_audio (audio/tiny)"
    assert run_title(tmp_path) == tmp_path.name  # no checkpoints: the folder name alone
    png = plot_loss_curve(csv, tmp_path / "loss.png")
    assert png.is_file() and png.stat().st_size > 10_000
    fig = loss_curve_figure(read_metrics(csv), run_title(csv.parent))
    assert fig._suptitle.get_text() == "tiny_audio (audio/tiny)"
