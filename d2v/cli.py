"""The `d2v` command line: pretrain, probe, export, import, embed, config.

  d2v pretrain --config tiny_image [key=value ...] [--resume [DIR]] [--no-probe] [--quiet]
  d2v probe --checkpoint RUN_OR_CHECKPOINT_DIR [--pool mean|cls] [--shots N]
  d2v export --checkpoint RUN_OR_CHECKPOINT_DIR --out FILE.pt [--format d2v|fairseq|hf]
  d2v import --from fairseq CHECKPOINT.pt --out RUN_DIR [--dict dict.txt] [--tokenizer FILE | --gpt2-bpe DIR]
  d2v embed --checkpoint RUN_OR_FAIRSEQ.pt --data PATH --out FEATURES.npz [--pool mean|cls|none]
  d2v config --config tiny_image [key=value ...]      (prints the resolved config)
  d2v --version

Options and key=value overrides may come in any order. Results go to stdout; the banner, progress and
warnings go to stderr (and, for a run, to <out_dir>/train.log).

Exit codes: 0 done; 2 a usage, config, data or checkpoint error (one line naming what and where);
3 the loss diverged; 69 another rank died or hung (a collective failed or timed out after
engine.timeout_minutes; resume with --resume); 74 the run folder is not writable or the disk is full;
75 stopped by SIGTERM or SIGINT after writing a checkpoint (resume with --resume); 130 interrupted at
once (a second Ctrl-C, or Ctrl-C outside the training loop; the last complete checkpoint is kept).

On several processes (engine.name=deepspeed, ddp or fsdp2: d2v/backends/; auto = deepspeed):
  deepspeed --num_gpus N --module d2v pretrain --config ...   (add --hostfile FILE for several nodes)
  torchrun --nproc_per_node N -m d2v pretrain --config ...
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys

from d2v._optional import MissingDependency
from d2v.checkpoint import CheckpointWriteError
from d2v.config import ConfigError
from d2v.log import get_logger, setup_logging
from d2v.preempt import EXIT_STOPPED
from d2v.registry import get_modality

EXIT_USAGE, EXIT_DIVERGED, EXIT_PEER, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 69, 74, 130
# what gloo, NCCL and the TCP store say when a peer rank is gone or stopped answering
PEER_FAILURE = re.compile(r"timed out|timeout|connection (reset|closed) by peer|broken pipe|"
                          r"connection refused", re.IGNORECASE)
IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

log = get_logger("d2v.cli")


def _pretrain(args) -> int:
    from d2v.config import load_config
    from d2v.probe import UnlabelledData, format_probe, run_probe
    from d2v.trainer import make_trainer

    cfg = load_config(args.config, args.overrides)
    trainer = make_trainer(cfg, resume=args.resume, progress=not (args.no_progress or args.quiet),
                           config_path=args.config)
    summary = trainer.train()
    if summary.get("stopped_by"):
        if trainer.is_main:
            print(f"\nstopped by {summary['stopped_by']} at step {summary['steps']} after writing "
                  f"{summary['checkpoint']}: continue with the same command plus --resume")
        return EXIT_STOPPED
    if not trainer.is_main:  # rank 0 reports and probes
        return 0
    f = summary["final"]
    if summary["steps_this_run"] == 0:
        print(f"\nthe run in {cfg.train.out_dir} was already complete at step {summary['steps']} (a longer "
              f"train.max_steps continues it with a re-stretched cosine schedule: see "
              f"train.allow_schedule_change)")
    print(f"\ndone: {summary['steps']} steps ({summary['steps_this_run']} this run) "
          f"in {summary['wall_s']:.0f} s, "
          f"{summary['samples_per_s']:.1f} {get_modality(cfg.model.modality).sample_unit}/s | "
          f"loss {f.get('loss', float('nan')):.4f} "
          f"(reg {f.get('loss_reg', float('nan')):.4f}, cls {f.get('loss_cls', float('nan')):.4f}) | "
          f"target_var {f.get('target_var', float('nan')):.3f} "
          f"pred_var {f.get('pred_var', float('nan')):.3f}")
    curve = summary["loss_curve"] or "not drawn (no logged steps, or matplotlib is not installed)"
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics: {summary['metrics_csv']}\n"
          f"  loss curve: {curve}")
    if summary.get("skipped_steps"):
        print(f"  skipped {summary['skipped_steps']} step(s) with a non-finite loss")
    bad = summary["unreadable_files"]
    if bad:
        print(f"  skipped {len(bad)} unreadable file(s): "
              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if cfg.train.probe_after and not args.no_probe:
        log.info("\nprobing (frozen features, logistic regression) ...")
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

    from d2v.weights import load_weights

    parent = os.path.dirname(os.path.abspath(args.out))
    if args.format != "hf" and not os.path.isdir(parent):
        raise FileNotFoundError(f"--out {args.out}: the folder {parent} does not exist (create it first)")
    if args.format == "fairseq":
        from d2v.interop.fairseq import export_fairseq

        out, ck = export_fairseq(args.checkpoint, args.out)
        print(f"wrote {out}: a fairseq data2vec_multi checkpoint (student, EMA teacher under _ema, cfg) "
              f"from {ck}")
        return 0
    if args.format == "hf":
        from d2v.interop.hf import export_hf

        out, ck = export_hf(args.checkpoint, args.out)
        print(f"wrote {out}: a transformers model folder (config, weights, tokenizer) from {ck}")
        return 0
    state, cfg, ck = load_weights(args.checkpoint)
    torch.save({"student": state["model"], "teacher": state["teacher"], "config": cfg, "step": state["step"]},
               args.out)
    print(f"wrote {args.out}: student + teacher fp32 state dicts and config from {ck}")
    return 0


def _import(args) -> int:
    from d2v.interop.fairseq import import_fairseq

    res = import_fairseq(args.checkpoint, args.out, dict_path=args.dict, tokenizer=args.tokenizer,
                         gpt2_bpe=args.gpt2_bpe)
    c = res.config.model
    print(f"imported {args.checkpoint} -> {res.run_dir}\n  {c.modality}: D {c.embed_dim}, {c.depth} blocks "
          f"(+{c.prenet_depth} prenet), {c.num_heads} heads | step {res.step} | teacher: "
          f"{'the EMA teacher (_ema)' if res.has_teacher else 'a copy of the student (no _ema)'}\n"
          f"  checkpoint: {res.checkpoint}\n  config: {res.run_dir / 'config.yaml'}")
    for n in res.notes:
        print(f"  not represented: {n}")
    print(f"next: d2v probe --checkpoint {res.run_dir} | d2v export --checkpoint {res.run_dir} --format "
          f"fairseq --out FILE.pt | d2v pretrain --config {res.run_dir / 'config.yaml'} --resume "
          f"[data.path=...]")
    return 0


def _embed(args) -> int:
    from d2v.embed import embed

    res = embed(args.checkpoint, args.data, args.out, pool=args.pool, teacher=args.teacher,
                batch_size=args.batch_size, progress=not (args.no_progress or args.quiet),
                tokenizer=args.tokenizer)
    print(f"wrote {res['out']}: {res['items']} {res['modality']} item(s) x {res['dim']} "
          f"({res['pool']}-pooled), {len(res['skipped'])} skipped")
    return 0


def _config(args) -> int:
    import yaml

    from d2v.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        v = version("d2v")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a checkout on PYTHONPATH)
        from d2v import __version__ as v
    import platform

    import torch

    return f"d2v {v} (torch {torch.__version__}, python {platform.python_version()})"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (and "
                   "the results on stdout); no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages too")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="a recipe name (tiny_image, base_audio, ...) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 (keys: "
                   "`d2v config --config X` prints them all with their values)")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per command (parsed with parse_intermixed_args: options and overrides in any order)."""
    pt = argparse.ArgumentParser(prog="d2v pretrain", description="pretrain with data2vec 2.0 (then run the "
                                 "linear probe)")
    _overrides(pt)
    pt.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                    help="continue the run in train.out_dir from its latest checkpoint (or start it if "
                         "it has none), or resume from the checkpoint folder DIR")
    pt.add_argument("--no-probe", action="store_true", help="skip the linear probe at the end")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.set_defaults(fn=_pretrain)
    pr = argparse.ArgumentParser(prog="d2v probe",
                                 description="linear probe of a checkpoint vs a random init")
    pr.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    pr.add_argument("--pool", choices=("mean", "cls"), default=None,
                    help="pool the encoder's outputs by their mean or take the CLS token (default: the "
                         "run's probe.pool)")
    pr.add_argument("--shots", type=int, default=None, help="examples per class for the few-shot probe")
    pr.add_argument("--json", action="store_true", help="print the result as JSON")
    pr.set_defaults(fn=_probe)
    ex = argparse.ArgumentParser(prog="d2v export", description="write consolidated fp32 student + teacher "
                                 "weights and config to one .pt file (DeepSpeed checkpoints via "
                                 "zero_to_fp32; loads without it)")
    ex.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    ex.add_argument("--out", required=True, help="the .pt file to write (--format hf: a folder)")
    ex.add_argument("--format", choices=("d2v", "fairseq", "hf"), default="d2v",
                    help="d2v: student + teacher state dicts and config (default); fairseq: the reference's "
                         "data2vec_multi checkpoint layout; hf: a transformers model folder (text)")
    ex.set_defaults(fn=_export)
    im = argparse.ArgumentParser(prog="d2v import", description="turn a fairseq data2vec 2.0 checkpoint into "
                                 "a d2v run folder (probe, embed, export and continued pretraining read it)")
    im.add_argument("--from", dest="fmt", choices=("fairseq",), required=True, help="the checkpoint's format")
    im.add_argument("checkpoint", help="the checkpoint file (e.g. Meta's released .pt)")
    im.add_argument("--out", required=True, help="the run folder to create")
    im.add_argument("--dict", default=None, help="text: the fairseq dict.txt the token ids index (default: "
                    "dict.txt beside the checkpoint or in its task's data folder)")
    im.add_argument("--tokenizer", default=None, help="text: a tokenizers JSON file whose ids are the "
                    "dictionary's (e.g. roberta-base's tokenizer.json for Meta's text models)")
    im.add_argument("--gpt2-bpe", default=None, metavar="DIR", help="text: a folder with GPT-2's "
                    "encoder.json and vocab.bpe; the run's tokenizer is that BPE re-indexed by --dict")
    im.set_defaults(fn=_import)
    em = argparse.ArgumentParser(prog="d2v embed", description="features of every input under a folder (or "
                                 "file) from a pretrained encoder, written to one .npz/.pt file")
    em.add_argument("--checkpoint", required=True, help="a d2v run/checkpoint folder or a fairseq .pt file")
    em.add_argument("--data", required=True, help="images, audio files (or a .tsv manifest), or text "
                    "(one item per line): a file or a folder")
    em.add_argument("--out", required=True, help="the .npz or .pt file to write")
    em.add_argument("--pool", choices=("mean", "cls", "none"), default="mean",
                    help="mean of the tokens (padding excluded), the CLS token (images), or none: every "
                         "token")
    em.add_argument("--teacher", action="store_true",
                    help="the EMA teacher's weights instead of the student's")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument("--tokenizer", default=None, help="text: a tokenizers JSON instead of the run's")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.set_defaults(fn=_embed)
    co = argparse.ArgumentParser(prog="d2v config", description="print the resolved config (recipe, flavor "
                                 "preset and overrides applied) as YAML")
    _overrides(co)
    co.set_defaults(fn=_config)
    subs = {"pretrain": pt, "probe": pr, "export": ex, "import": im, "embed": em, "config": co}
    for p in subs.values():
        _common(p)
    return subs


def build_parser() -> argparse.ArgumentParser:
    """The top level: global options, then a command whose own arguments (`args`) its parser reads."""
    p = argparse.ArgumentParser(prog="d2v", description="data2vec 2.0 pretraining. Commands: pretrain, "
                                "probe, export, import, embed, config (`d2v COMMAND --help` for each).")
    p.add_argument("--version", action="version", version="%(prog)s")  # replaced in main (imports torch)
    # the `deepspeed` launcher passes --local_rank=N before the command (rank and world come from the
    # environment it also sets: d2v reads those)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    _common(p)
    p.add_argument("command", choices=sorted(subparsers()), help="what to do")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--version" in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]:
        print(_version())
        raise SystemExit(0)
    top = build_parser().parse_args(argv)
    args = subparsers()[top.command].parse_intermixed_args(top.args)
    args.command = top.command
    args.quiet, args.verbose = args.quiet or top.quiet, args.verbose or top.verbose
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        args.overrides.append(resume)  # `--resume key=value`: an override, not a folder
        args.resume = True
    return args


def peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung: torch's distributed errors, or a
    RuntimeError from a collective that timed out or lost its peer, while a process group is up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or bool(PEER_FAILURE.search(str(e)))


def _error(args, e) -> None:
    """One line on stderr: `d2v COMMAND: error: ...` (a multi-line ConfigError lists one key per line)."""
    print(f"d2v {args.command}: error: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(quiet=args.quiet or int(os.environ.get("RANK", "0")) > 0, verbose=args.verbose)
    try:
        return args.fn(args)
    except (ConfigError, MissingDependency, FileNotFoundError, FileExistsError, ValueError) as e:
        _error(args, e)
        return EXIT_USAGE
    except FloatingPointError as e:  # the loss diverged: the last complete checkpoint is kept
        _error(args, e)
        return EXIT_DIVERGED
    except CheckpointWriteError as e:  # disk full, read-only or not a folder: the message names it
        _error(args, e)
        return EXIT_IO
    except OSError as e:
        if e.errno not in IO_ERRNOS:
            raise
        what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "not writable"
        _error(args, f"{what}: {e}")
        return EXIT_IO
    except KeyboardInterrupt:
        _error(args, "interrupted: resume with --resume (the last complete checkpoint is kept)")
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        if not peer_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the traceback is in train.log
        _error(args, f"another rank died or stopped answering ({first}); its own log says why. Resume "
                     f"with --resume: the last complete checkpoint is kept (engine.timeout_minutes bounds "
                     f"the wait)")
        return EXIT_PEER


if __name__ == "__main__":
    sys.exit(main())
