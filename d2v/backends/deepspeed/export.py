"""Export of a DeepSpeed d2v checkpoint: consolidated fp32 student and teacher state dicts, in one
process, without a process group (what `d2v export` and `d2v probe` read)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from d2v._optional import require
from d2v.backends.deepspeed.config import DS_TAG
from d2v.checkpoint import CONFIG_FILE
from d2v.config import Config
from d2v.optim import param_groups


def _param_group_names(ck: Path) -> list[list[str]]:
    """Parameter names of d2v's optimizer param groups (d2v.optim.param_groups) for the model in
    ck's config.yaml, in DeepSpeed's order (it drops empty groups); built on the meta device."""
    from d2v.model import build_model

    cfg = Config.from_dict(yaml.safe_load((ck / CONFIG_FILE).read_text()))
    with torch.device("meta"):
        model = build_model(cfg)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_1d)
    return [[name[id(p)] for p in g["params"]] for g in groups if g["params"]]


def _zero0_student(ck: Path) -> dict:
    """ZeRO-0 (zero_to_fp32 does not read it, DeepSpeed #6699): the module is saved whole, and with
    bf16/fp16 it holds the low-precision copies; the fp32 master weights are in the optimizer state
    of DeepSpeed's wrapper: `fp32_groups` (FP16_UnfusedOptimizer, torch optimizers: one tensor per
    parameter) or `fp32_groups_flat` (FP16_Optimizer, fused Adam: one flat tensor per group), in the
    order of d2v's param groups. Buffers and frozen parameters come from the module (as trained)."""
    files = sorted((ck / DS_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ck / DS_TAG}: no mp_rank_*_model_states.pt")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    student = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    opt = saved.get("optimizer") or {}
    if "fp32_groups" in opt:
        masters = [list(g) for g in opt["fp32_groups"]]
    elif "fp32_groups_flat" in opt:
        masters = None  # split below, once the names (and so the shapes) are known
    else:  # fp32 training: the module weights are the masters
        return student
    names = _param_group_names(ck)
    if masters is None:
        flat = opt["fp32_groups_flat"]  # per group: (sum of its parameters' numel,)
        if [f.numel() for f in flat] != [sum(student[n].numel() for n in g) for g in names]:
            raise ValueError(f"{files[0]}: fp32_groups_flat sizes {[f.numel() for f in flat]} do not match "
                             f"the param groups of the model in {ck / CONFIG_FILE}")
        masters = [list(f.split([student[n].numel() for n in g])) for f, g in zip(flat, names)]
    if [len(g) for g in masters] != [len(g) for g in names]:
        raise ValueError(f"{files[0]}: fp32 master groups of {[len(g) for g in masters]} tensors, the model "
                         f"in {ck / CONFIG_FILE} has param groups of {[len(g) for g in names]}")
    for group_names, group in zip(names, masters):
        for n, w in zip(group_names, group):
            if w.numel() != student[n].numel():
                raise ValueError(f"{files[0]}: the fp32 master for {n} has {w.numel()} elements, the module "
                                 f"weight {student[n].numel()}")
            student[n] = w.float().reshape(student[n].shape).clone()
    return student


def consolidate(state: dict, ck: Path) -> tuple[dict, dict]:
    """A DeepSpeed d2v checkpoint -> (student, teacher) consolidated fp32 state dicts, on CPU, in one
    process (no process group): the student's fp32 master weights through DeepSpeed's zero_to_fp32
    (ZeRO 1-3) or from the saved whole module and its optimizer state (ZeRO-0), the teacher from
    state.pt (ZeRO 0-2) or from the per-rank shards (ZeRO-3: each parameter's flat, padded slices
    concatenated in rank order)."""
    stage = state["zero_stage"]
    if stage == 0:
        student = _zero0_student(ck)
    else:
        require("deepspeed", "exporting a ZeRO-1/2/3 checkpoint")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        student = dict(get_fp32_state_dict_from_zero_checkpoint(str(ck), tag=DS_TAG))
    if "teacher" in state:
        return student, state["teacher"]
    ranks = [torch.load(ck / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)["teacher_shards"]
             for r in range(state["world_size"])]
    teacher = {}
    for name, shard in ranks[0].items():
        if name.startswith("buffer:"):
            teacher[name[len("buffer:"):]] = shard
            continue
        ref = student[name]  # the teacher's parameters are a subset of the student's, same shapes
        teacher[name] = torch.cat([r[name].reshape(-1) for r in ranks])[: ref.numel()].view(ref.shape).clone()
    return student, teacher
