"""Backends: how the optimizer step runs (d2v/backends/base.py says what a backend does).

- `single`: one process, torch AdamW, optional bf16 autocast and torch.compile (single.py);
- `ddp`: torch DistributedDataParallel, one process per rank (ddp.py);
- `fsdp2`: torch's fully_shard (FSDP2): parameters, gradients, optimizer state and the EMA teacher
  sharded over the ranks (fsdp2.py);
- `deepspeed`: a DeepSpeed ZeRO 0-3 engine (deepspeed/).

`engine.name=auto` picks deepspeed under a launcher (torchrun, the deepspeed launcher: WORLD_SIZE or
LOCAL_RANK set), else single. The table below is the only place a backend is registered (config.ENGINES
lists the names users may set); modules are imported on first use, so a backend's optional dependency
is needed only by runs that choose it.
"""
from __future__ import annotations

import importlib

from d2v.backends.dist import launched_distributed

BACKENDS = {  # engine.name -> "module:class"
    "single": "d2v.backends.single:SingleBackend",
    "ddp": "d2v.backends.ddp:DDPBackend",
    "fsdp2": "d2v.backends.fsdp2:FSDP2Backend",
    "deepspeed": "d2v.backends.deepspeed.backend:DeepSpeedBackend",
}
REQUIRES = {"deepspeed": "deepspeed"}  # engine.name -> the optional package it needs


def backend_name(cfg) -> str:
    """engine.name, with auto resolved: deepspeed under a launcher, else single."""
    name = cfg.engine.name
    if name == "auto":
        return "deepspeed" if launched_distributed() else "single"
    return name


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise ValueError(f"engine.name: unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def refuse_unsupported_keys(cfg, name: str) -> None:
    """engine.* keys backend `name` does not implement, set to a non-default value: one ConfigError
    naming each and the backends that implement them (before any process group is joined)."""
    from d2v.backends.base import BACKEND_KEYS
    from d2v.config import ConfigError, EngineConfig

    default, mine = EngineConfig(), backend_class(name).engine_keys
    bad = [k for k in BACKEND_KEYS if k not in mine and getattr(cfg.engine, k) != getattr(default, k)]
    if not bad:
        return
    owners = [n for n in BACKENDS if all(k in backend_class(n).engine_keys for k in bad)]
    one, set_ = len(bad) == 1, ", ".join(f"engine.{k}={getattr(cfg.engine, k)!r}" for k in bad)
    raise ConfigError(f"{set_}: the {name} backend does not implement {'this key' if one else 'these keys'}; "
                      f"set engine.name to {' or '.join(owners)} (one process works too) or leave "
                      f"{'it' if one else 'them'} at the default")


def make_backend(cfg, device: str | None = None):
    """The backend engine.name selects, joined to its process group (distributed backends)."""
    name = backend_name(cfg)
    refuse_unsupported_keys(cfg, name)
    if name in REQUIRES:
        from d2v._optional import require

        require(REQUIRES[name], f"the {name} backend (engine.name={name}, or auto under a launcher)")
    return backend_class(name)(cfg, device=device)


__all__ = ["BACKENDS", "backend_name", "backend_class", "make_backend", "refuse_unsupported_keys",
           "launched_distributed"]
