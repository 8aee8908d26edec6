"""The optimizer side of pretraining, shared by every backend: AdamW param groups (no decay on biases
and norms), the optimizer named by engine.optimizer, the learning-rate schedule (linear warmup, then
cosine to optim.min_lr) and the resume check that a new train.max_steps would not move it.

References: fairseq cosine_lr_scheduler.py; the data2vec 2.0 recipes' optimizer groups.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from d2v.config import Config, ConfigError
from d2v.log import get_logger

log = get_logger(__name__)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer update number `step` (0-based): linear warmup from 0, cosine to min_lr."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * step / o.warmup_steps
    span = max(total - o.warmup_steps, 1)
    progress = min((step - o.warmup_steps) / span, 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float, decay_1d: bool) -> list[dict]:
    """No weight decay on biases and 1-D params (norms) unless decay_1d; like the reference, the CLS
    token (1, E, D) is decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias")
        (no_decay if skip and not decay_1d else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, groups: list[dict], fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer named by engine.optimizer over `groups`. torch_adamw is torch's AdamW (`fused`
    passed through: None lets torch pick its implementation); the others are DeepSpeed's and apex's
    fused Adam."""
    o, name = cfg.optim, cfg.engine.optimizer
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    on_gpu = torch.cuda.is_available()
    if name == "torch_adamw":
        return torch.optim.AdamW(groups, fused=fused, **kw)
    if name == "deepspeed_adam":  # JIT-builds DeepSpeed's op on first use (~1 min on CPU)
        if cfg.engine.offload_optimizer or not on_gpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam
    except ImportError:
        raise ConfigError("engine.optimizer: apex_fused_adam needs NVIDIA apex (built from source, "
                          "github.com/NVIDIA/apex; the PyPI 'apex' is another package); use torch_adamw "
                          "or deepspeed_adam") from None
    return ApexFusedAdam(groups, adam_w_mode=True, **kw)


def check_schedule_change(saved_cfg: dict, cfg: Config, step: int, ck) -> None:
    """On resume: refuse (or, with train.allow_schedule_change, warn about) a train.max_steps that moves
    the learning rate at the resume step. lr_at is a function of max_steps, so a longer run re-stretches
    the cosine: resuming a finished 20-step run at max_steps=40 jumps from the cosine's floor back to
    about half the peak."""
    old_max = int(saved_cfg.get("train", {}).get("max_steps", cfg.train.max_steps))
    if old_max == cfg.train.max_steps:
        return
    old_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=old_max))
    old, new = lr_at(step, old_cfg), lr_at(step, cfg)
    if math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-15):  # e.g. still in the warmup
        return
    msg = (f"train.max_steps {old_max} -> {cfg.train.max_steps} changes the learning rate at the resume "
           f"step {step} from {old:.3g} to {new:.3g} (the cosine decays to optim.min_lr over "
           f"train.max_steps, so a new length re-stretches it: the lr jumps {'up' if new > old else 'down'}, "
           f"then follows the new cosine)")
    if not cfg.train.allow_schedule_change:
        raise ConfigError(f"cannot resume from {ck}: {msg}; pass train.allow_schedule_change=true to accept "
                          f"that, or start a new train.out_dir with the longer schedule")
    log.warning(msg)
