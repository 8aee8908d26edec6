"""Optional Triton: import it lazily, say why it is unusable, and run kernels only where they can run.

Kernels are defined lazily (first call of each module's `_kernels()`), so `TRITON_INTERPRET=1` set by a
test's conftest.py or a benchmark before the first launch is honoured: Triton reads it when a
`@triton.jit` function is defined.

"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def status() -> tuple[bool, str]:
    """(usable, why): whether `import triton` works here; never raises."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules
        found = False
    if not found:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a broken install must not break `import d2v`
        return False, f"import triton failed: {type(e).__name__}: {e}"
    return True, f"triton {triton.__version__}"


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on these tensors."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"{op}: the Triton path was requested but {why}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"{op}: the tensors are on different devices {sorted(map(str, devices))}")
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"{op}: Triton kernels run on CUDA tensors (got a {t.device.type} tensor); on CPU set "
            f"TRITON_INTERPRET=1 before the first kernel launch to use Triton's interpreter, or set "
            f"D2V_OPS_IMPL=torch"
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def on_device(t: torch.Tensor):
    """Context for a launch on t's device: Triton launches on the *current* CUDA device, so tensors on
    cuda:1 while cuda:0 is current would be read from the wrong device without this guard."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
