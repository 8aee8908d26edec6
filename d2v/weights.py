"""Weights out of a checkpoint of any backend: plain fp32 state dicts of the student and the teacher.

Above the backends (a DeepSpeed checkpoint is consolidated by its backend's export), below the CLI and
the probe, so d2v/checkpoint.py stays a file-format module that knows no backend.
"""
from __future__ import annotations

from pathlib import Path

from d2v.checkpoint import load_checkpoint


def load_weights(path: str | Path) -> tuple[dict, dict, Path]:
    """Like load_checkpoint, for every backend: state["model"] and state["teacher"] are consolidated fp32
    state dicts (a DeepSpeed checkpoint is consolidated with zero_to_fp32: d2v.backends.deepspeed.export)."""
    state, config, ck = load_checkpoint(path)
    if state.get("engine") == "deepspeed":
        from d2v.backends.deepspeed.export import consolidate

        state = dict(state)
        state["model"], state["teacher"] = consolidate(state, ck)
    elif state.get("engine") == "fsdp2":
        from d2v.backends.fsdp2 import consolidate as consolidate_dcp

        state = dict(state)
        state["model"], state["teacher"] = consolidate_dcp(ck)
    return state, config, ck
