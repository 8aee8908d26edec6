"""DeepSpeed ZeRO stages on d2v's image recipes: per-rank step time, the model-state bytes each rank
holds (student params, fp32 master + optimizer states, teacher) and the per-rank peak memory
(CUDA: max allocated; CPU: peak RSS of the process, which includes Python, torch and the data).

Each (config, world size, stage) runs in fresh processes (torch.multiprocessing, gloo on CPU, NCCL
on GPU): `--warmup` steps, then `--steps` timed optimizer steps through the same `Trainer.train_step` the
trainer runs (no checkpoints, no logging). Rows go to benchmarks/results/zero.csv and one markdown
table per run to benchmarks/results/zero.md, each with device, date, versions and git sha.

Per row: `threads` is each rank's torch thread count (on CPU the cores split over the ranks); a step
takes as long as its slowest rank, so step i's time is the max over ranks of rank r's step i, and
`ms_median` / `ms_min` are the median / min of those per-step maxima (both the same reduction);
`peak_mib` is the max over ranks.

Run (CPU): .venv/bin/python benchmarks/bench_zero.py --configs tiny base --worlds 1 2
     (GPU, 1 device): python benchmarks/bench_zero.py --configs base --worlds 1 --batch 16 --clones 16
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_csv, append_markdown, md_table, results_dir, stamp  # noqa: E402

CSV_NAME, MD_NAME = "zero.csv", "zero.md"  # in results_dir()
FIELDS = ["date", "git_sha", "device", "threads", "torch", "python", "deepspeed", "config", "world", "stage",
          "precision", "batch", "clones", "params_m", "ms_median", "ms_min", "steps", "param_mib",
          "optim_mib", "teacher_mib", "peak_mib", "peak_kind"]
ROOT = Path(__file__).resolve().parent.parent
COLS = FIELDS[7:9] + ["threads"] + FIELDS[9:]  # printed and markdown columns: config, world, threads, ...


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _state_bytes(tr) -> tuple[int, int, int]:
    """(student params, optimizer: fp32 masters + states, teacher) bytes held by this rank."""
    params = [getattr(p, "ds_tensor", p) for p in tr.model.parameters()]
    opt = getattr(tr.optimizer, "optimizer", tr.optimizer)  # the torch optimizer inside ZeRO's wrapper
    masters = [p for g in opt.param_groups for p in g["params"]]
    states = [t for st in opt.state.values() for t in st.values()]
    same = {id(p) for p in params}
    optim = _bytes([m for m in masters if id(m) not in same]) + _bytes(states)
    teacher = _bytes([getattr(p, "ds_tensor", p) for p in tr.teacher.module.parameters()])
    return _bytes(params), optim, teacher


def _worker(rank, world, port, args, config, stage, out_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), D2V_DEEPSPEED_SHM="0")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from d2v.config import load_config
    from d2v.trainer import Trainer

    over = ["engine.name=deepspeed", f"engine.zero_stage={stage}", f"train.batch_size={args.batch}",
            f"masking.clone_batch={args.clones}", f"train.precision={args.precision}", "data.num_workers=0",
            f"train.out_dir={tempfile.mkdtemp()}", "train.probe_after=false",
            f"data.path={args.data_path or 'null'}"]  # null: the embedded digits, resized to the recipe
    tr = Trainer(load_config(ROOT / "configs" / f"{config}_image.yaml", over), progress=False)
    tr.model.train()
    it = iter(tr.loader)
    dev = tr.device
    times = []
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.train_step([next(it) for _ in range(tr.micro_steps)])  # the optimizer step + the EMA update
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    p, o, t = _state_bytes(tr)
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in tr.model.parameters())
    row = {"config": config, "world": world, "stage": stage, "precision": args.precision, "batch": args.batch,
           "clones": args.clones, "params_m": round(n / 1e6, 2), "threads": torch.get_num_threads(),
           "times": times, "steps": args.steps, "param_mib": round(p / 2**20, 2),
           "optim_mib": round(o / 2**20, 2), "teacher_mib": round(t / 2**20, 2),
           "peak_mib": round(peak / 2**20, 1), "peak_kind": kind}
    torch.save(row, f"{out_file}.{rank}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny"], choices=["tiny", "base", "large"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=4, help="images per rank per step")
    ap.add_argument("--clones", type=int, default=4, help="masked clones per image")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data-path", default=None, help="image folder (default: the embedded digits)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()
    import deepspeed
    import torch.multiprocessing as mp

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = stamp(dev)
    env.pop("triton", None)
    env["deepspeed"] = deepspeed.__version__
    rows = []
    for config in args.configs:
        for world in args.worlds:
            for stage in args.stages:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                out = Path(tempfile.mkdtemp()) / "row"
                mp.spawn(_worker, args=(world, port, args, config, stage, str(out)), nprocs=world)
                per_rank = [torch.load(f"{out}.{r}") for r in range(world)]
                times = [r.pop("times") for r in per_rank]  # (world, steps) ms
                row = dict(env, **per_rank[0])  # rank 0's state bytes: ranks hold equal shares
                step_ms = [max(ts) for ts in zip(*times)]  # a step lasts as long as its slowest rank
                row.update(ms_median=round(statistics.median(step_ms), 1), ms_min=round(min(step_ms), 1),
                           peak_mib=max(r["peak_mib"] for r in per_rank))
                rows.append(row)
                print(" | ".join(f"{k}={row[k]}" for k in COLS), flush=True)
    if args.no_save:
        return
    out_dir = results_dir()
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MD_NAME
    append_csv(csv_path, FIELDS, rows)
    threads = "/".join(sorted({str(r["threads"]) for r in rows}))
    head = (f"\n## {env['date']} {env['device']} | torch {env['torch']} | Python {env['python']} | "
            f"deepspeed {env['deepspeed']} | git {env['git_sha']} | {threads} thread(s) per rank | "
            f"{args.warmup} warmup + {args.steps} timed steps; ms = per-step max over ranks\n")
    append_markdown(md_path, [head, *md_table(COLS, rows)])
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
