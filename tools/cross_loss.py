"""Is a rising pretraining loss a worse student or harder targets? Evaluate every (student, teacher)
pair of a run's checkpoints on the same batches, masks and decoder noise.

The data2vec loss compares the student's predictions with targets the EMA teacher makes, and the teacher
changes as it trains. Row s, column t of the table is the loss of checkpoint s's student against
checkpoint t's teacher: down a column (a fixed teacher), a better student scores lower; along a row (a
fixed student), harder targets score higher. Each loss is also given as a fraction of the targets' own
variance (loss / (scale x D x target_var^2), target_var the mean over dims of the targets' std over
masked tokens: about 1.0 is what predicting their mean scores).

Run: .venv/bin/python tools/cross_loss.py runs/tiny_text [--batches 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2v.checkpoint import checkpoint_root, complete_checkpoints  # noqa: E402
from d2v.config import Config  # noqa: E402
from d2v.data.build import build_pretrain_data  # noqa: E402
from d2v.ema import EMATeacher  # noqa: E402
from d2v.model import build_model  # noqa: E402
from d2v.registry import get_modality  # noqa: E402
from d2v.weights import load_weights  # noqa: E402


@torch.no_grad()
def cross_loss(run: Path, batches: int = 8, seed: int = 0) -> dict:
    cks = complete_checkpoints(checkpoint_root(run))
    if len(cks) < 2:
        raise SystemExit(f"{run}: needs at least two complete checkpoints, found {len(cks)}")
    states = {}
    for ck in cks:
        state, cfg_dict, _ = load_weights(ck)
        states[int(state["step"])] = state
    cfg = Config.from_dict(cfg_dict)
    _, loader = build_pretrain_data(cfg, start_step=0, resumed=True)
    it = iter(loader)
    data = [next(it) for _ in range(batches)]
    key = get_modality(cfg.model.modality).source_key
    steps = sorted(states)
    d = cfg.model.embed_dim
    scale = cfg.objective.loss_scale if cfg.objective.loss_scale is not None else d ** -0.5
    table = {}
    for s in steps:
        model = build_model(cfg)
        teacher = EMATeacher(model, 0.0, 0.0, 0)
        model.load_state_dict(states[s]["model"])
        model.eval()  # no dropout: the same computation for every pair
        for t in steps:
            teacher.load_state_dict(states[t]["teacher"])
            torch.manual_seed(seed)  # the same decoder noise for every pair
            loss = frac = 0.0
            for b in data:
                out = model(b[key], b["maskinfo"], teacher)
                loss += float(out["loss_reg"])
                # what predicting the targets' mean scores: scale x D x (their std over masked tokens)^2
                frac += float(out["loss_reg"]) / (scale * d * float(out["target_var"]) ** 2)
            table[(s, t)] = (loss / len(data), frac / len(data))
    return {"steps": steps, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (train.out_dir) with two or more checkpoints")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    res = cross_loss(args.run, args.batches)
    steps = res["steps"]
    print("loss (fraction of target variance) | rows: student at step, columns: teacher at step")
    print("| student \\ teacher | " + " | ".join(str(t) for t in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for s in steps:
        cells = [f"{res['table'][(s, t)][0]:.2f} ({res['table'][(s, t)][1]:.2f})" for t in steps]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
