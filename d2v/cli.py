"""The `d2v` command line: pretrain, probe, export.

  d2v pretrain --config configs/tiny_image.yaml [key=value ...] [--resume [DIR]] [--no-probe]
  d2v probe --checkpoint RUN_OR_CHECKPOINT_DIR [--pool mean|cls] [--shots N]
  d2v export --checkpoint RUN_OR_CHECKPOINT_DIR --out FILE.pt

On several processes (the DeepSpeed engine, d2v/engine.py):
  deepspeed --num_gpus N --module d2v pretrain --config ...   (add --hostfile FILE for several nodes)
  torchrun --nproc_per_node N -m d2v pretrain --config ...
"""
from __future__ import annotations

import argparse
import json
import sys

from d2v._optional import MissingDependency
from d2v.config import ConfigError

SAMPLE_UNIT = {"image": "images", "audio": "utterances", "text": "sequences"}


def _pretrain(args) -> int:
    from d2v.config import load_config
    from d2v.engine import make_trainer
    from d2v.probe import UnlabelledData, format_probe, run_probe

    cfg = load_config(args.config, args.overrides)
    trainer = make_trainer(cfg, resume=args.resume, progress=not args.no_progress, config_path=args.config)
    summary = trainer.train()
    if not trainer.is_main:  # rank 0 reports and probes
        return 0
    f = summary["final"]
    if summary["steps_this_run"] == 0:
        print(f"\nthe run in {cfg.train.out_dir} was already complete at step {summary['steps']} "
              f"(raise train.max_steps to continue it)")
    print(f"\ndone: {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['wall_s']:.0f} s, "
          f"{summary['samples_per_s']:.1f} {SAMPLE_UNIT[cfg.model.modality]}/s | loss {f.get('loss', float('nan')):.4f} "
          f"(reg {f.get('loss_reg', float('nan')):.4f}, cls {f.get('loss_cls', float('nan')):.4f}) | "
          f"target_var {f.get('target_var', float('nan')):.3f} pred_var {f.get('pred_var', float('nan')):.3f}")
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics: {summary['metrics_csv']}\n"
          f"  loss curve: {summary['loss_curve'] or 'not drawn (no logged steps, or matplotlib is not installed)'}")
    if summary.get("skipped_steps"):
        print(f"  skipped {summary['skipped_steps']} step(s) with a non-finite loss")
    bad = summary["unreadable_files"]
    if bad:
        print(f"  skipped {len(bad)} unreadable file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if cfg.train.probe_after and not args.no_probe:
        print("\nprobing (frozen features, logistic regression) ...", flush=True)
        try:
            print(format_probe(run_probe(summary["checkpoint"])))
        except UnlabelledData as e:  # pretraining on unlabelled data is fine: say why there is no probe
            print(f"probe skipped: {e}; pass --no-probe to skip it silently")
    return 0


def _probe(args) -> int:
    from d2v.probe import format_probe, run_probe

    res = run_probe(args.checkpoint, pool=args.pool, shots=args.shots)
    print(json.dumps(res, indent=2) if args.json else format_probe(res))
    return 0


def _export(args) -> int:
    import torch

    from d2v.checkpoint import load_weights

    state, cfg, ck = load_weights(args.checkpoint)
    torch.save({"student": state["model"], "teacher": state["teacher"], "config": cfg, "step": state["step"]},
               args.out)
    print(f"wrote {args.out}: student + teacher fp32 state dicts and config from {ck}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v", description="data2vec 2.0 pretraining")
    # the `deepspeed` launcher passes --local_rank=N before the command (rank and world come from the
    # environment it also sets: d2v reads those)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    pt = sub.add_parser("pretrain", help="pretrain with data2vec 2.0 (then run the linear probe)")
    pt.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny_image.yaml")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    pt.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                    help="continue the run in train.out_dir from its latest checkpoint (or start it if "
                         "it has none), or resume from the checkpoint folder DIR; DIR is optional, so put "
                         "--resume after the key=value overrides")
    pt.add_argument("--no-probe", action="store_true", help="skip the linear probe at the end")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.set_defaults(fn=_pretrain)
    pr = sub.add_parser("probe", help="linear probe of a checkpoint vs a random init")
    pr.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    pr.add_argument("--pool", choices=("mean", "cls"), default=None,
                    help="pool the encoder's outputs by their mean or take the CLS token (default: the "
                         "run's probe.pool)")
    pr.add_argument("--shots", type=int, default=None, help="examples per class for the few-shot probe")
    pr.add_argument("--json", action="store_true", help="print the result as JSON")
    pr.set_defaults(fn=_probe)
    ex = sub.add_parser("export", help="write consolidated fp32 student + teacher weights and config to one "
                                       ".pt file (DeepSpeed checkpoints via zero_to_fp32; loads without it)")
    ex.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    ex.add_argument("--out", required=True, help="the .pt file to write")
    ex.set_defaults(fn=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, MissingDependency, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"d2v {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged: the last complete checkpoint is kept
        print(f"d2v {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: resume with --resume (the last complete checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
