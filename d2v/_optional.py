"""Optional dependencies, imported only where a feature needs them.

Image pretraining, the fused ops and the kernels need none of soundfile (audio data), tokenizers (text
data), deepspeed (the ZeRO engine), matplotlib (the loss-curve PNG) or transformers (the HF export), so
an install without them (`pip install --no-deps .`, a minimal container) still works for those. When a
feature does need one, `require` fails with a message that names the package and the pip command,
instead of a bare ModuleNotFoundError deep inside a data loader.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package that the requested feature needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import and return `module`; if it is not installed, raise MissingDependency
    '<purpose> needs <module>: pip install <module>' (the optional packages' pip names are their
    import names)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{purpose} needs {module}: pip install {module}", name=module) from e


def optional(module: str, purpose: str) -> ModuleType | None:
    """`module`, or None with a one-time warning that `purpose` is skipped without it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        _warn_once(module, purpose)
        return None


@functools.lru_cache(maxsize=None)
def _warn_once(module: str, purpose: str) -> None:
    warnings.warn(f"{module} is not installed: {purpose} is skipped (pip install {module})", stacklevel=3)
