"""Time to quality: linear-probe accuracy against training wall time, data2vec 2.0 (d2v's default step)
vs the data2vec 1.0-style step (full-length student with a mask embedding, one mask per image, a linear
head), on the embedded data: the paper's headline is equal quality in much less time.

Each run is a real `d2v pretrain` in its own process, checkpointing every `--ckpt-every` steps (all
kept). Afterwards every checkpoint is probed (d2v.probe's logistic regression on frozen features, full
and few-shot, the student and, unless --no-teacher, the EMA teacher; the same-seed random init once, as
the point at 0 s; --task limits the tasks) and placed at the training wall time `elapsed_s` that
metrics.csv logged at its step. Probing is not timed. Run the benchmark on an otherwise idle machine:
the curves are wall-clock.

Results: one row per (run, checkpoint) appended to benchmarks/results/time_to_quality.csv, a markdown
table per run appended to time_to_quality.md (with the headline: each run's best few-shot accuracy, when
each first reached the other's best, and the probe's noise), and the plot
time_to_quality_<modality>_<device>.png (+-1 standard error shaded).

Run (CPU, ~15 min: two ~6 min runs + probes):
    .venv/bin/python benchmarks/bench_time_to_quality.py
Other recipes: --runs d2v2=configs/tiny_image.yaml d2v1=configs/tiny_image_d2v1.yaml (NAME=RECIPE ...)
The speech race (~20 min):
    .venv/bin/python benchmarks/bench_time_to_quality.py --runs d2v2=configs/tiny_audio.yaml \
        d2v1=configs/tiny_audio_d2v1.yaml --task word --no-teacher --ckpt-every 125
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_csv, append_markdown, device_slug, md_table, results_dir, stamp  # noqa: E402

FIELDS = ["date", "git_sha", "device", "threads", "torch", "python", "run", "config", "step", "max_steps",
          "train_s", "task", "shots", "n_test", "student_full", "student_fewshot", "teacher_full",
          "teacher_fewshot", "random_full", "random_fewshot", "note"]
DEFAULT_RUNS = ["d2v2=configs/tiny_image.yaml", "d2v1=configs/tiny_image_d2v1.yaml"]
QUICK = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder.dim=32",
         "model.decoder.layers=1", "model.decoder.groups=4", "objective.average_top_k_layers=2",
         "train.batch_size=8", "optim.warmup_steps=1", "data.num_workers=0"]


def train(name: str, config: str, out: Path, overrides: list[str]) -> float:
    """One pretraining run in a fresh process -> its wall seconds (start-up included)."""
    cmd = [sys.executable, "-m", "d2v", "pretrain", "--config", config, *overrides,
           f"train.out_dir={out}", "train.keep_last=1000", "--no-probe", "--no-progress"]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr)[-3000:]
        raise RuntimeError(f"[{name}] pretraining failed (exit {res.returncode}):\n{tail}")
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "", flush=True)
    return time.time() - t0


def probe_run(name: str, config: str, out: Path, tasks: list[str] | None = None,
              teacher: bool = True) -> list[dict]:
    """Probe every checkpoint of a run -> rows (one per checkpoint and task, plus step 0: the random
    init, probed once with the first checkpoint)."""
    from d2v.metrics import read_metrics
    from d2v.probe import run_probe

    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in read_metrics(out / "metrics.csv")}
    cks = sorted((out / "checkpoints").glob("step_*"))
    if not cks:
        raise RuntimeError(f"[{name}] no checkpoints in {out / 'checkpoints'}")
    rows, random_acc = [], {}
    for i, ck in enumerate(cks):
        step = int(ck.name.split("_")[1])
        if step not in elapsed:
            raise RuntimeError(f"[{name}] metrics.csv has no row for step {step}: make --ckpt-every a "
                               f"multiple of train.log_every")
        t0 = time.time()
        res = run_probe(ck, tasks=tasks, teacher=teacher, random_init=i == 0)
        k = f"{res['shots']}shot"
        for task, r in res["tasks"].items():
            if i == 0:
                random_acc[task] = (f"{r['random_init']['full']:.2f}", f"{r['random_init'][k]:.2f}")
            base = {"run": name, "config": config, "task": task, "shots": res["shots"],
                    "n_test": r["n_test"], "random_full": random_acc[task][0],
                    "random_fewshot": random_acc[task][1]}
            if i == 0:  # the random init is the step-0 point of the curve
                rows.append({**base, "step": 0, "train_s": "0.0", "student_full": base["random_full"],
                             "student_fewshot": base["random_fewshot"], "teacher_full": base["random_full"],
                             "teacher_fewshot": base["random_fewshot"], "note": "random init"})
            tch = r.get("teacher", {})
            rows.append({**base, "step": step, "train_s": f"{elapsed[step]:.3f}",
                         "student_full": f"{r['pretrained']['full']:.2f}",
                         "student_fewshot": f"{r['pretrained'][k]:.2f}",
                         "teacher_full": f"{tch['full']:.2f}" if tch else "",
                         "teacher_fewshot": f"{tch[k]:.2f}" if tch else "",
                         "note": ""})
        accs = ", ".join(f"{t} full {r['pretrained']['full']:.1f}% / {k} {r['pretrained'][k]:.1f}%"
                         for t, r in res["tasks"].items())
        print(f"[{name}] step {step:>6d} at {elapsed[step]:7.1f} s: {accs} (probe {time.time() - t0:.0f} s)",
              flush=True)
    return rows


def _first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def _se(acc_pct: float, n: int) -> float:
    p = acc_pct / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def headline(rows: list[dict], fast: str, slow: str) -> str:
    """The race on the first task's few-shot accuracy: each run's best, and when each first reached
    the other's best (a run that never did says so), with the probe's sampling noise (one binomial
    standard error at the test-set size) and whether the two bests differ by more than 2 SE."""
    task = rows[0]["task"]

    def curve(run):
        return [(float(r["train_s"]), float(r["student_fewshot"])) for r in rows
                if r["run"] == run and r["task"] == task]

    f, s = curve(fast), curve(slow)
    if not f or not s:
        return ""
    shots = rows[0]["shots"]
    n = int(rows[0].get("n_test") or 0)
    best_f, best_s = max(a for _, a in f), max(a for _, a in s)
    se_f, se_s = _se(best_f, n), _se(best_s, n)
    gap = best_f - best_s
    verdict = "tie (within 2 SE)" if abs(gap) < 2 * math.hypot(se_f, se_s) else "differ by more than 2 SE"

    def reach(run, curve_, target):
        t = _first_reach(curve_, target)
        if t is None:
            return f"{run} never (its best: {max(a for _, a in curve_):.1f}%)"
        return f"{run} at {t:.0f} s"

    parts = [f"{shots}-shot {task}: best {best_f:.1f}% ±{se_f:.1f} ({fast}) vs {best_s:.1f}% ±{se_s:.1f} "
             f"({slow}): {verdict}",
             f"{slow}'s best ({best_s:.1f}%) reached by {reach(fast, f, best_s)}, {reach(slow, s, best_s)}",
             f"{fast}'s best ({best_f:.1f}%) reached by {reach(fast, f, best_f)}, {reach(slow, s, best_f)}"]
    t_f, t_s = _first_reach(f, best_s), _first_reach(s, best_s)
    if t_f is not None and t_s is not None and t_f > 0:
        parts.append(f"{fast} needs {t_s / t_f:.1f}x less time to reach {slow}'s best")
    if n:
        parts.append(f"probe noise: 1 SE = {_se(50.0, n):.1f} pts at most, {n} held-out examples")
    return " | ".join(parts)


def plot(rows: list[dict], png: Path, st: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
            rs = [r for r in rows if r["run"] == run and r["task"] == task]
            t = [float(r["train_s"]) for r in rs]
            c = f"C{i}"
            few = [float(r["student_fewshot"]) for r in rs]
            n = int(rs[0].get("n_test") or 0)
            ax.plot(t, few, "o-", color=c, label=f"{run} {rs[0]['shots']}-shot")
            if n:  # the probe's sampling noise: +-1 binomial SE over the held-out examples
                se = [_se(a, n) for a in few]
                ax.fill_between(t, [a - e for a, e in zip(few, se)], [a + e for a, e in zip(few, se)],
                                color=c, alpha=0.15, lw=0, label=f"{run} ±1 SE")
            ax.plot(t, [float(r["student_full"]) for r in rs], "s--", color=c, alpha=0.6, label=f"{run} full")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(f"linear probe accuracy, {task} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"time to quality, {st['device']} ({st['date']}, git {st['git_sha']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="NAME=RECIPE",
                    help="runs to compare; the first is the fast one in the headline, the last the baseline")
    ap.add_argument("--ckpt-every", type=int, default=250, help="steps between probed checkpoints")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="override every recipe's train.max_steps (0: keep)")
    ap.add_argument("--out-root", default="", help="where the runs go (default runs/time_to_quality_<time>)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument("--task", nargs="*", default=None, metavar="TASK",
                    help="probe only these tasks (default: all of the modality's; the first is the headline)")
    ap.add_argument("--no-teacher", action="store_true", help="probe the student only, not the EMA teacher")
    ap.add_argument("--quick", action="store_true", help="smoke run: micro model, 2 steps, one checkpoint")
    ap.add_argument("--no-write", action="store_true", help="print only, do not append results")
    a = ap.parse_args(argv)

    runs = []
    for item in a.runs:
        name, eq, config = item.partition("=")
        if not eq or not (ROOT / config).exists() and not Path(config).exists():
            raise SystemExit(f"--runs item {item!r}: expected NAME=RECIPE with an existing recipe file")
        runs.append((name, config))
    over = list(a.set)
    ckpt_every, max_steps = a.ckpt_every, a.max_steps
    if a.quick:
        over = QUICK + over
        ckpt_every, max_steps = 2, 2
    if max_steps:
        over += [f"train.max_steps={max_steps}", f"ema.anneal_end_step={max_steps}"]
    over += [f"train.ckpt_every={ckpt_every}", f"train.log_every={min(ckpt_every, 25)}"]
    stamp_time = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    root = Path(a.out_root or ROOT / "runs" / f"time_to_quality_{stamp_time}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    st = stamp(dev)
    st.pop("triton", None)

    rows = []
    for name, config in runs:
        out = root / name
        if (out / "checkpoints").exists():
            raise SystemExit(f"{out} already holds a run: pass a new --out-root")
        wall = train(name, config, out, over)
        from d2v.config import load_config

        total = load_config(config, over).train.max_steps
        run_rows = probe_run(name, config, out, a.task, teacher=not a.no_teacher)
        for r in run_rows:
            r.update(st, max_steps=total)
            r["note"] = (r["note"] + "; " if r["note"] else "") + f"process wall {wall:.0f} s" + \
                (" | quick smoke run" if a.quick else "")
        rows += run_rows
    line = headline(rows, runs[0][0], runs[-1][0]) if len(runs) > 1 else ""
    if line:
        print(line)
    out_dir = None if a.no_write else results_dir(quick=a.quick)  # --quick: only into D2V_BENCH_RESULTS
    if out_dir is not None:
        csv_path, md_path = out_dir / "time_to_quality.csv", out_dir / "time_to_quality.md"
        append_csv(csv_path, FIELDS, rows)
        cols = ["run", "step", "train_s", "task", "student_fewshot", "student_full", "teacher_fewshot",
                "teacher_full", "random_fewshot", "random_full"]
        threads = f"{st['threads']} threads | " if st["threads"] != "" else ""
        lines = [f"\n## {st['date']} {st['device']} | torch {st['torch']} | Python {st['python']} | {threads}"
                 f"git {st['git_sha']} | "
                 f"runs {', '.join(f'{n}={c}' for n, c in runs)} | overrides {' '.join(over) or 'none'}\n"]
        if line:
            lines.append(f"**{line}**\n")
        append_markdown(md_path, lines + md_table(cols, rows),
                        "# Time to quality (append-only; rows also in time_to_quality.csv)")
        from d2v.config import load_config

        modality = load_config(runs[0][1], over).model.modality  # one plot per modality and device
        png = plot(rows, out_dir / f"time_to_quality_{modality}_{device_slug(st['device'])}.png", st)
        for p in (csv_path, md_path, png):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
