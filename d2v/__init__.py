"""d2v: fast data2vec 2.0 self-supervised pretraining.

Public API: `d2v.ops` (fused ops), `d2v.masking` (mask generators), `Config`/`load_config`,
`build_model`, `load_encoder` (a frozen pretrained encoder), `d2v.trainer.Trainer` / `make_trainer`
(the loop; the backend engine.name selects runs the step: d2v.backends), `d2v.weights.load_weights`.
CLI: `d2v pretrain | probe | export | import | config` (also `python -m d2v`).

`import d2v` stays light (no model, ops or kernels): `build_model` is imported on first use.
"""
__version__ = "0.1.0"

from d2v.config import Config, ConfigError, load_config  # noqa: E402
from d2v.registry import list_flavors  # noqa: E402


def __getattr__(name: str):
    if name == "build_model":  # d2v.model imports torch, the ops and the kernels: only when asked for
        from d2v.model import build_model

        return build_model
    if name == "load_encoder":  # a frozen pretrained encoder for other projects (d2v/encoder.py)
        from d2v.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'd2v' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_encoder", "list_flavors",
           "__version__"]
