"""Train fairseq's own data2vec 2.0 (the reference) on d2v's tiny text recipe and log its loss curve.

Why: d2v's tiny text run (configs/tiny_text.yaml) logs a loss that falls to about 7 by step 150-250 and
then rises again. This script shows whether the reference's code does the same at the same settings,
starting from the same weights and seeing the same token blocks in the same order.

What it does
------------
1. d2v side (run in the project's venv, started by this script as a subprocess with --prep-only):
   loads the d2v config (--d2v-config, default configs/tiny_text.yaml), seeds as `d2v pretrain` does
   (d2v.rng.seed_everything(train.seed)), builds d2v's student and EMA teacher (step-0 weights) and
   exports them to the reference's keys (d2v.interop.fairseq_keys) with the reference config d2v's
   exporter writes for that config (d2v.interop.fairseq_config.config_to_fairseq: dropouts, decoder,
   mask_prob, clone_batch, top-K, EMA ramp, ...). It also takes the first --steps batches of d2v's own
   pretraining loader (d2v.data.build.build_pretrain_data: blocks of data.tokens_per_sample tokens, <s>
   first, fairseq's dictionary order <s>=0 <pad>=1 </s>=2 <unk>=3, so the ids index the reference's
   embedding as they are) and d2v's learning rate for each step (d2v.optim.lr_at: linear warmup from 0,
   cosine to optim.min_lr). All of it goes to one file (--prep, default <out>.d2v_prep.pt).
2. reference side (this process, the reference's venv): imports fairseq-fixed 0.12.3.1's data2vec 2.0
   through tools/make_reference_fixtures.py (fetch_reference, import_reference, strict_model_config),
   builds `Data2VecMultiModel` through fairseq's model registry for a `MaskedLMTask` whose dictionary has
   as many symbols as d2v's embedding (4 specials + symbols + <mask> last; d2v's tokens index it as they
   are) and loads d2v's step-0 weights strictly (--init reference: the reference's own initialisation of
   the same shapes instead).
3. trains it as fairseq's trainer would: per update k (0-based) `model.set_num_updates(k)` (the
   reference's own EMA step and decay ramp), fairseq's `ModelCriterion` on {"id", "net_input": {source,
   id, padding_mask}} (as the masked_lm task's d2v2_multi dataset gives it: the reference draws its own
   masks, clone_batch of them per block, seeded by (seed, update, ids)), backward of loss / sample_size
   (fairseq divides the gradients by sample_size before clipping), gradient clipping at optim.clip_norm,
   and torch AdamW with d2v's settings: betas, eps, weight decay on all but biases and 1-D parameters
   (norms) unless optim.decay_1d, and d2v's learning rate for step k.
4. every --log-every steps writes a CSV row (step, loss, target_var, pred_var, ema_decay, lr, grad_norm,
   sample_size, masked_pct, elapsed_s) and prints it. `loss` is the sum of the reference's loss terms
   divided by sample_size (the number of masked tokens): the squared error summed over the D dims,
   times loss_scale, averaged over masked tokens -- the scale of the `loss` column of d2v's
   metrics.csv (fairseq's own log would show it divided by ln 2). target_var / pred_var are the
   reference's (std over masked tokens per dim, averaged over dims). ema_decay is the decay the
   reference's EMA step before this update used (d2v's column: the decay of the step after it).
5. --plot PNG draws loss, target_var and pred_var of the reference and, with --d2v-metrics CSV, of a
   d2v run (its metrics.csv) on the same axes. The reference's venv has no matplotlib: the plot is then
   drawn by the project's venv (this script with --plot-only).

Schedules: d2v's lr cosine and EMA ramp end at --schedule-steps (default --steps): train.max_steps and
ema.anneal_end_step are set to it. To compare the first N steps of a d2v run of 1000 steps, pass
--steps N --schedule-steps 1000.

How to run (from the repository root; 1 thread by default, --threads to change)
    /work/ref_venv/bin/python tools/reference_text_loss.py --steps 500 --schedule-steps 1000 \\
        --d2v-config RUN/checkpoints/step_00000500/config.yaml --tokenizer RUN/tokenizer.json \\
        --out /tmp/ref_text_loss.csv \\
        --plot /tmp/ref_text_loss.png --d2v-metrics RUN/metrics.csv
    .venv/bin/python tools/reference_text_loss.py --plot-only --out /tmp/ref_text_loss.csv \\
        --plot /tmp/ref_text_loss.png --d2v-metrics RUN/metrics.csv          # redraw only
To mirror a given d2v run, pass its own config (any of its checkpoints' config.yaml: the recipe file may
have changed since) and its tokenizer.json. Without --tokenizer the d2v side trains the BPE tokenizer
the way `d2v pretrain` does (deterministic: the same file a run with data.tokenizer null writes), in a
temporary folder.

What it needs: the reference's venv as tools/make_reference_fixtures.py describes it (CPU torch 2.13,
omegaconf, hydra-core, timm, ...; the fairseq-fixed sdist is fetched into --cache on first use), and the
project's venv (--main-python, default .venv/bin/python) for the d2v side and the plot. The tiny recipe
takes about 1.2 s per step on one CPU thread (500 steps: ~10 min, plus ~25 s for the d2v side).

CI never runs this script: it needs the reference (fairseq) and its dependencies, which the project does
not install. Nothing in the project imports it.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
CSV_FIELDS = ("step", "loss", "target_var", "pred_var", "ema_decay", "lr", "grad_norm", "sample_size",
              "masked_pct", "elapsed_s")
EMBED_TOKENS = "modality_encoders.TEXT.local_encoder.embed_tokens.weight"


# --------------------------------------------------------------------------- d2v side (project venv)


def d2v_config(path: str, tokenizer: str | None, schedule_steps: int, out_dir: str):
    """The d2v Config of the run to mirror, with the schedule length and a loader without workers."""
    from d2v.config import load_config

    over = [f"train.max_steps={schedule_steps}", f"ema.anneal_end_step={schedule_steps}",
            "data.num_workers=0", f"train.out_dir={out_dir}"]
    if tokenizer:
        over.append(f"data.tokenizer={tokenizer}")
    return load_config(path, over)


def d2v_start_checkpoint(cfg) -> tuple[dict, int]:
    """d2v's step-0 student and teacher, built as `d2v pretrain` builds them, in the layout of a fairseq
    checkpoint (cfg, model with the teacher under "_ema", num_updates 0) -> (checkpoint, student params)."""
    from d2v.ema import EMATeacher
    from d2v.interop.fairseq_config import config_to_fairseq
    from d2v.interop.fairseq_keys import export_state, nest_ema
    from d2v.model import build_model
    from d2v.rng import seed_everything

    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    e, m, H = cfg.ema, cfg.model.modality, cfg.model.num_heads
    teacher = EMATeacher(model, e.ema_start, e.ema_end, e.anneal_end_step)  # a copy of the student
    student_sd = export_state(model.state_dict(), m, H)
    teacher_sd = export_state(teacher.state_dict(), m, H, teacher=True)
    ckpt = {"cfg": config_to_fairseq(cfg), "model": nest_ema(student_sd, teacher_sd),
            "optimizer_history": [{"num_updates": 0}]}
    return ckpt, sum(p.numel() for p in model.parameters())


def d2v_batches(cfg, steps: int) -> tuple:
    """The first `steps` batches of d2v's pretraining loader -> tokens int64 (S, B, T), block index int64
    (S, B) (within the dataset, as fairseq's IdDataset), number of blocks."""
    import torch

    from d2v.data.build import build_pretrain_data

    ds, loader = build_pretrain_data(cfg, start_step=0)
    it = iter(loader)
    tokens, index = [], []
    for _ in range(steps):
        b = next(it)
        tokens.append(b["tokens"])  # (B, T)
        index.append(b["index"] % len(ds))  # (B,)
    return torch.stack(tokens), torch.stack(index), len(ds)


def prepare(args) -> None:
    """--prep-only: write what the reference side needs to args.prep."""
    import torch

    from d2v.optim import lr_at

    torch.set_num_threads(args.threads)
    schedule = args.schedule_steps or args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = d2v_config(args.d2v_config, args.tokenizer, schedule, tmp)
        ckpt, n_params = d2v_start_checkpoint(cfg)
        tokens, index, n_blocks = d2v_batches(cfg, args.steps)
    lr = torch.tensor([lr_at(k, cfg) for k in range(args.steps)], dtype=torch.float64)  # (S,)
    vocab = ckpt["model"][EMBED_TOKENS].shape[0]
    assert int(tokens.max()) < vocab and bool((tokens[:, :, 0] == 0).all()), "ids out of range or no <s>"
    torch.save({"checkpoint": ckpt, "tokens": tokens, "index": index, "lr": lr, "n_blocks": n_blocks,
                "d2v_params": n_params, "d2v_config": cfg.to_dict()}, args.prep)
    print(f"d2v side: {n_params / 1e6:.2f}M student params, {tuple(tokens.shape)} token batches from "
          f"{n_blocks} blocks, lr {lr[0]:.3g} .. {lr.max():.3g} .. {lr[-1]:.3g} -> {args.prep}", flush=True)


# --------------------------------------------------------------------------- reference side (ref venv)


def run_in_main_venv(args, extra: list[str]) -> None:
    """Run this script in the project's venv (the d2v side, or the plot)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([args.main_python, str(Path(__file__).resolve()), *extra], check=True, env=env, cwd=REPO)


def reference_config(ref, mrf, cfg: dict):
    """The model section of the exported cfg merged strictly into the reference's Data2VecMultiConfig,
    parented to the whole cfg (interpolations resolve as fairseq's merge_with_parent makes them)."""
    OmegaConf = ref.OmegaConf
    root = OmegaConf.create(cfg, flags={"allow_objects": True})
    errors: list[str] = []
    model_cfg = mrf.strict_model_config(ref, cfg["model"], errors)
    if model_cfg is None or errors:
        raise SystemExit("the exported config does not fit the reference: " + "; ".join(errors))
    model_cfg.__dict__["_parent"] = root
    OmegaConf.set_struct(model_cfg, True)
    return root, model_cfg


def reference_task(ref, root, rows: int):
    """A MaskedLMTask whose dictionary has `rows` symbols: <s> <pad> </s> <unk>, placeholders, <mask>."""
    dictionary = ref.Dictionary()
    for i in range(rows - 5):
        dictionary.add_symbol(f"tok{i}")
    task_cfg = ref.merge_with_parent(ref.task_configs["text"](), root.task, remove_missing=True)
    task = ref.MaskedLMTask(task_cfg, dictionary=dictionary)  # appends <mask> as the last id
    assert len(task.source_dictionary) == rows
    return task


def load_start_weights(model, model_cfg, ckpt: dict) -> None:
    """d2v's step-0 weights into the reference, strictly (the teacher through the reference's own
    EMAModule.restore), then checked tensor by tensor."""
    import torch

    given = ckpt["model"]
    model.load_state_dict(dict(given), strict=True, model_cfg=model_cfg)  # "_ema" -> EMAModule.restore
    loaded, teacher = model.state_dict(), model.ema.model.state_dict()
    if set(teacher) != set(given["_ema"]):
        raise SystemExit(f"teacher keys differ: {sorted(set(teacher) ^ set(given['_ema']))[:6]}")
    for k, t in given.items():
        if k != "_ema":
            assert torch.equal(loaded[k], t.to(loaded[k].dtype)), f"student {k} not loaded"
    for k, t in given["_ema"].items():  # the teacher module and its fp32 copy
        assert torch.equal(teacher[k], t) and torch.equal(loaded["_ema"][k], t), f"teacher {k} not loaded"


def build_reference(ref, mrf, prep: dict, init: str, seed: int):
    """-> (model, criterion): the reference model of the exported cfg, with d2v's or its own init."""
    import torch

    ckpt = prep["checkpoint"]
    root, model_cfg = reference_config(ref, mrf, ckpt["cfg"])
    task = reference_task(ref, root, int(ckpt["model"][EMBED_TOKENS].shape[0]))
    torch.manual_seed(seed)
    model = ref.fairseq_models.build_model(model_cfg, task)
    assert isinstance(model, ref.data2vec2.Data2VecMultiModel) and model.ema is not None
    if init == "d2v":
        load_start_weights(model, model_cfg, ckpt)
    n = sum(p.numel() for p in model.parameters())
    if n != prep["d2v_params"]:
        raise SystemExit(f"the reference has {n} student params, d2v {prep['d2v_params']}")
    criterion = ref.ModelCriterion(task, loss_weights={}, log_keys=["pred_var", "target_var", "ema_decay",
                                                                    "masked_pct"])
    return model, model_cfg, criterion


def adamw(model, optim: dict):
    """torch AdamW with d2v's groups (d2v.optim.param_groups): no weight decay on biases and 1-D
    parameters unless decay_1d."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or name.endswith(".bias")
            (no_decay if skip and not optim["decay_1d"] else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])


def train_step(model, criterion, opt, tokens, index, lr: float, clip: float) -> dict:
    """One update as fairseq's trainer does it; tokens (B, T) int64, index (B,) int64."""
    import torch

    sample = {"id": index, "net_input": {"source": tokens, "id": index,
                                         "padding_mask": torch.zeros_like(tokens, dtype=torch.bool)}}
    loss_sum, sample_size, log = criterion(model, sample)  # loss_sum: the loss terms summed over elements
    loss = loss_sum / sample_size  # fairseq: grads * 1/sample_size before clipping
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.zeros(())
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return {"loss": float(loss.detach()), "target_var": log["target_var"], "pred_var": log["pred_var"],
            "ema_decay": log["ema_decay"] / 1000, "lr": lr, "grad_norm": float(gnorm),
            "sample_size": int(sample_size), "masked_pct": log["masked_pct"]}


def train(args, ref, mrf, prep: dict) -> None:
    import numpy as np
    import torch

    model, model_cfg, criterion = build_reference(ref, mrf, prep, args.init, args.seed)
    o = prep["d2v_config"]["optim"]
    opt = adamw(model, o)
    mc = model_cfg.modalities.text
    print(f"reference: data2vec_multi TEXT, D {model_cfg.embed_dim}, depth {model_cfg.depth}, "
          f"{model_cfg.num_heads} heads, vocab {prep['checkpoint']['model'][EMBED_TOKENS].shape[0]}, "
          f"max_source_positions {mc.max_source_positions}, mask_prob {mc.mask_prob}, clone_batch "
          f"{model_cfg.clone_batch}, top-K {model_cfg.average_top_k_layers}, EMA {model_cfg.ema_decay} -> "
          f"{model_cfg.ema_end_decay} over {model_cfg.ema_anneal_end_step}, dropout {mc.dropout}/"
          f"{model_cfg.encoder_dropout}/{model_cfg.attention_dropout}/{model_cfg.post_mlp_drop}, decoder "
          f"input_dropout {mc.decoder.input_dropout}, mask_noise_std {mc.mask_noise_std}, init {args.init}",
          flush=True)
    torch.manual_seed(args.seed)  # dropout and decoder noise
    np.random.seed(args.seed)
    tokens, index, lr = prep["tokens"], prep["index"], prep["lr"]  # (S, B, T), (S, B), (S,)
    t0 = time.time()
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for k in range(args.steps):
            model.train()
            model.set_num_updates(k)  # the reference's EMA step (from update 1 on), as fairseq's task does
            row = train_step(model, criterion, opt, tokens[k], index[k], float(lr[k]), o["clip_norm"])
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"non-finite loss at step {k + 1}")
            step = k + 1
            if step % args.log_every == 0 or step == args.steps:
                row.update(step=step, elapsed_s=time.time() - t0)
                w.writerow({k2: (f"{v:.6g}" if isinstance(v, float) else v) for k2, v in row.items()})
                f.flush()
                print(" ".join(f"{k2}={row[k2]:.6g}" if isinstance(row[k2], float) else f"{k2}={row[k2]}"
                               for k2 in CSV_FIELDS), flush=True)
    print(f"{args.steps} steps in {time.time() - t0:.0f} s -> {args.out}", flush=True)


# --------------------------------------------------------------------------- plot


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot(out_csv: str, png: str, d2v_csv: str | None) -> None:
    """loss, target_var, pred_var against step: the reference and (optionally) a d2v run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [("reference (fairseq data2vec 2.0)", read_rows(out_csv))]
    if d2v_csv:
        curves.append(("d2v", read_rows(d2v_csv)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in zip(axes, ("loss", "target_var", "pred_var")):
        for label, rows in curves:
            rows = [r for r in rows if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("tiny text recipe: reference vs d2v")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot -> {png}", flush=True)


def plot_here_or_in_main_venv(args) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the reference's venv: draw it with the project's
        extra = ["--plot-only", "--out", args.out, "--plot", args.plot]
        run_in_main_venv(args, extra + (["--d2v-metrics", args.d2v_metrics] if args.d2v_metrics else []))
        return
    plot(args.out, args.plot, args.d2v_metrics)


# --------------------------------------------------------------------------- main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="updates to run")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="where the lr cosine and the EMA ramp end (default: --steps)")
    ap.add_argument("--out", default="reference_text_loss.csv", help="the CSV written")
    ap.add_argument("--d2v-config", default=str(REPO / "configs" / "tiny_text.yaml"))
    ap.add_argument("--tokenizer", default=None, help="a d2v run's tokenizer.json (default: train it)")
    ap.add_argument("--init", choices=["d2v", "reference"], default="d2v",
                    help="start from d2v's step-0 weights (default) or the reference's own init")
    ap.add_argument("--seed", type=int, default=0, help="the reference's dropout / noise draws")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prep", default=None, help="the d2v side's file (default: <out>.d2v_prep.pt)")
    ap.add_argument("--plot", default=None, metavar="PNG")
    ap.add_argument("--d2v-metrics", default=None, metavar="CSV", help="a d2v run's metrics.csv to plot")
    ap.add_argument("--main-python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="the project's python (d2v side and plot)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/d2v-reference"))
    ap.add_argument("--prep-only", action="store_true", help="(project venv) write --prep and exit")
    ap.add_argument("--plot-only", action="store_true", help="plot --out (and --d2v-metrics) and exit")
    args = ap.parse_args()
    args.prep = args.prep or str(Path(args.out).with_suffix("")) + ".d2v_prep.pt"
    return args


def main() -> None:
    args = parse_args()
    if args.plot_only:
        plot(args.out, args.plot, args.d2v_metrics)
        return
    if args.prep_only:
        sys.path.insert(0, str(REPO))
        prepare(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    extra = ["--prep-only", "--prep", args.prep, "--steps", str(args.steps), "--d2v-config", args.d2v_config,
             "--threads", str(args.threads)]
    extra += ["--schedule-steps", str(args.schedule_steps)] if args.schedule_steps else []
    run_in_main_venv(args, extra + (["--tokenizer", args.tokenizer] if args.tokenizer else []))
    prep = torch.load(args.prep, weights_only=False)

    sys.path.insert(0, str(TOOLS))
    import make_reference_fixtures as mrf

    ref = mrf.import_reference(mrf.fetch_reference(Path(args.cache)))
    train(args, ref, mrf, prep)
    if args.plot:
        plot_here_or_in_main_venv(args)


if __name__ == "__main__":
    main()
