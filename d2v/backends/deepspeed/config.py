"""The DeepSpeed config d2v derives from its typed config (`deepspeed_config`): one source of truth.
A user JSON (`engine.ds_config`) may add or override any key d2v does not own, and is refused where it
contradicts a key d2v derives (the message names the d2v key to set instead).

Reference: DeepSpeed docs, config-json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from d2v.config import Config, ConfigError, deep_merge, flatten

DS_TAG = "ds"  # DeepSpeed's own checkpoint inside each d2v checkpoint folder: <step>/ds/

# DeepSpeed keys d2v derives from its own config -> the d2v key that sets them
OWNED = {
    "train_batch_size": "train.batch_size x engine.grad_accum_steps x world size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "engine.grad_accum_steps",
    "gradient_clipping": "optim.clip_norm",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.offload_optimizer",
    "optimizer": "engine.optimizer and optim.*",
    "scheduler": "optim.lr / warmup_steps / min_lr",
}


def deepspeed_config(cfg: Config, world_size: int, user: dict | None = None) -> dict:
    """The DeepSpeed config for `cfg` on `world_size` data-parallel ranks, with the user's JSON
    (`user`, else the file `engine.ds_config` when set) merged over it."""
    e, t = cfg.engine, cfg.train
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": t.batch_size * e.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "gradient_clipping": cfg.optim.clip_norm,
        "bf16": {"enabled": t.precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling; overflowing steps are skipped by DeepSpeed
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # d2v builds the optimizer (engine.optimizer); allow the torch one with an offloaded state
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # d2v logs (rank 0, metrics.csv)
        "wall_clock_breakdown": False,
    }
    if e.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False,
                                          "contiguous_memory_optimization": False}
    if user is None and e.ds_config:
        p = Path(e.ds_config).expanduser()
        if not p.is_file():
            raise ConfigError(f"engine.ds_config: file not found: {p}")
        try:
            user = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"engine.ds_config: {p} is not valid JSON: {err}") from None
    if user:
        derived = flatten(ds)
        for key, value in flatten(user).items():
            owner = next((o for k, o in OWNED.items() if key == k or key.startswith(k + ".")), None)
            if owner is not None and derived.get(key, object()) != value:
                raise ConfigError(f"engine.ds_config sets {key}={value!r}, which d2v derives from {owner} "
                                  f"(= {derived.get(key)!r}); set {owner} instead")
            if key.startswith("activation_checkpointing.") and not e.activation_checkpointing:
                raise ConfigError(f"engine.ds_config sets {key}={value!r}, but d2v checkpoints activations "
                                  f"only with engine.activation_checkpointing=true (it is false): set it, or "
                                  f"drop the key")
        ds = deep_merge(ds, user)
    return ds
