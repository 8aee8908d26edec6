"""Test helpers shared by several test modules (test modules import from here, never from each other
or from conftest): verbose closeness assertions, float64 references and the error budgets of the fused
ops; the captured records of the "d2v" logger; the small-config overrides of quick training runs; the
sources and scratch venvs of the install and packaging tests.

Error budgets (the build_targets and ema_update_ tolerances of tests/kernels come from here, not from
tuning):
- u = 2**-24 is the fp32 unit roundoff (half an ulp of 1.0). Inputs are read exactly (bf16/fp16 -> fp32
  is exact), so every difference from a float64 reference on the same inputs is fp32 rounding.
- An n-term fp32 sum, in any order, errs by at most gamma(n) * sum|terms| with gamma(n) = n * u (Higham,
  "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2). For n > 64 the tests use the
  probabilistic bound 8 * sqrt(n) * u instead (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019: with
  independent rounding errors it holds with probability >= 1 - 2n * exp(-32), about 1 - 1e-10 at
  n = 4096). No assumption on the summation order: the kernels may tile, split or reorder freely.
- Gather / scatter / per-clone targets move values without arithmetic: bit-exact (torch.equal).

Run: (imported by tests)
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent  # the checkout
U32 = 2.0**-24  # fp32 unit roundoff
EXT_REQUIRED = os.environ.get("D2V_SKIP_EXT") != "1"  # setup.py builds d2v._C unless told not to


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float | torch.Tensor,
                         rtol: float = 0.0, what: str = "") -> None:
    """Like torch.testing.assert_close, but reports the mismatch count, first indices and max/mean diff.
    `atol` may be a tensor broadcastable to `expected` (an element-wise error bound)."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    at = atol.double().to(e.device) if isinstance(atol, torch.Tensor) else atol
    diff = (a - e).abs()
    bad = ~(diff <= at + rtol * e.abs())
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        at_s = f"{float(at.max()):.3g} (max of an element-wise bound)" if isinstance(at, torch.Tensor) else at
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={at_s}, rtol={rtol}; "
            f"first at {idx}; max |diff| {float(diff.nan_to_num().max()):.3g}, "
            f"mean |diff| {float(diff.nan_to_num().mean()):.3g}"
        )


def rand_ids(R: int, T: int, K: int, g: torch.Generator | None = None) -> torch.Tensor:
    """(R, K) int64: K distinct, unsorted positions in [0, T) per row."""
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(R)])


# ------------------------------------------------------------------------------------ logging


class LogRecords:
    """What the `d2v_log` fixture yields: the records logged under the "d2v" logger during a test.

    A handler on the "d2v" logger itself (at DEBUG, the logger's level set to DEBUG for the test), so it
    sees every record whether or not the CLI's `setup_logging` turned propagation off.
    - `records`: the LogRecords, in order (a list: `records.clear()` forgets those so far);
    - iterating yields the records, `len()` counts them;
    - `messages(level=logging.WARNING)`: the messages (`getMessage()`) of the records at exactly `level`;
    - `text`: one line per record, "LEVEL logger.name: message";
    - `clear()`: forget the records so far."""

    def __init__(self):
        self.records: list[logging.LogRecord] = []
        self.handler = _Keep(self.records)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    @property
    def text(self) -> str:
        return "".join(f"{r.levelname} {r.name}: {r.getMessage()}\n" for r in self.records)

    def clear(self) -> None:
        self.records.clear()


class _Keep(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ------------------------------------------------------------------------------------ training runs


# ------------------------------------------------------------------------------------ ranks
class Crash(RuntimeError):
    """A simulated crash, raised inside a run."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> None:
    """Make this process rank `rank` of `world` on 127.0.0.1:`port` (the torch.distributed variables, which
    the launchers set), plus `extra` variables."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra)


def crash_after_update(tr, at_step: int) -> None:
    """Make the trainer raise Crash right after its EMA update of optimizer step `at_step`."""
    update = tr.teacher.update

    def crash(step):
        d = update(step)
        if step == at_step:
            raise Crash("simulated crash")
        return d

    tr.teacher.update = crash


def poison_loss(tr, when) -> None:
    """Make the trainer's loss NaN on the forward calls `when(call_index, rank)` selects (1-based)."""
    fwd, calls = tr.model.forward, [0]

    def forward(*a, **kw):
        out = fwd(*a, **kw)
        calls[0] += 1
        if when(calls[0], tr.rank):
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    tr.model.forward = forward


def micro_overrides(out_dir, steps=6, **extra):
    """key=value overrides shrinking the tiny image recipe to a seconds-long run."""
    d = {
        "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
        "model.decoder.dim": 32, "model.decoder.layers": 1, "model.decoder.groups": 4,
        "objective.average_top_k_layers": 2, "masking.clone_batch": 2,
        "train.batch_size": 8, "train.max_steps": steps, "train.log_every": 1, "train.ckpt_every": 3,
        "train.out_dir": str(out_dir), "train.probe_after": False, "optim.warmup_steps": 2,
        "ema.anneal_end_step": steps, "data.num_workers": 0,
    }
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]


# ------------------------------------------------------------------------------------ installs


def load_setup():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("d2v_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_sources(dst: Path) -> Path:
    """Copy what pip builds d2v from (setup.py, pyproject.toml, README.md, d2v/, kernels/) into the new
    folder `dst`, without built extensions, caches or build records (the checkout stays untouched)."""
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("d2v", "kernels"):
        shutil.copytree(ROOT / name, dst / name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.json"))
    return dst


def scratch_venv(path: Path) -> tuple[Path, str]:
    """A new venv at `path` (without pip: install into it with `pip --python`) that sees this
    environment's packages (torch) as a plain path, so this environment's editable d2v (a .pth hook)
    stays invisible -> (its python, its site-packages folder)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


# ------------------------------------------------------------------------------------ build_targets


def _inorm64(y, eps):
    if y.shape[1] == 1:  # F.instance_norm refuses a single time step; its value is (y - y) / sqrt(eps) = 0
        return torch.zeros_like(y)
    return F.instance_norm(y.transpose(1, 2), eps=eps).transpose(1, 2)


def targets_fp64(layers, instance_norm, final_norm, eps=1e-5):
    """The data2vec 2.0 targets in float64: per-layer instance norm over T (as the reference, through
    F.instance_norm on the transposed (B, D, T) tensor), average, final norm."""
    ys = []
    for y in layers:
        y = y.double()
        if instance_norm:
            y = _inorm64(y, eps)
        ys.append(y)
    y = sum(ys) / len(ys)
    if final_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], eps=eps)
    elif final_norm == "instance":
        y = _inorm64(y, eps)
    return y


def gamma(n: int) -> float:
    """Relative error bound of an n-term fp32 sum (see the module docstring)."""
    return min(n, 8.0 * math.sqrt(n)) * U32


def _norm_budget(y: torch.Tensor, dim: int, eps: float):
    """Normalizing float64 values y over `dim` in fp32 -> (rounding bound per group, keepdim; normalized
    y; its sd; max |normalized| per group).

    z = (y - m) * rsqrt(var + eps). The mean errs by |dm| <= gamma(n + 1) * mean|y| (sum, then / n); the
    centred variance relatively by gamma(n + 2) plus the mean's error (|dm| * 2 mean|y - m| / var <=
    2 |dm| / sd), halved through the square root; var + eps, rsqrt (<= 2 ulps in PTX's approximate
    rsqrt) and the products add <= 7u relative. So |dz| <= |dm| / sd * (1 + |z|) + |z| * (gamma(n + 2) / 2
    + 7u), with rho = mean|y| / sd the per-group conditioning."""
    n = y.shape[dim]
    m = y.mean(dim, keepdim=True)
    sd = (y.var(dim, unbiased=False, keepdim=True) + eps).sqrt()
    z = (y - m) / sd
    rho = y.abs().mean(dim, keepdim=True) / sd
    zmax = z.abs().amax(dim, keepdim=True)
    own = gamma(n + 1) * rho * (1 + zmax) + zmax * (gamma(n + 2) / 2 + 7 * U32)
    return own, z, sd, zmax


def targets_atol(layers, instance_norm: bool, final_norm: str, eps: float = 1e-5) -> torch.Tensor:
    """Element-wise bound (broadcastable to (B, T, D)) on |fp32 build_targets - targets_fp64|.

    1. per layer, if instance_norm: the normalization over T of each (sample, channel), `_norm_budget`;
    2. the average of K layers: its own sum errs by gamma(K + 1) * max_i |z_i|, plus the largest layer error;
    3. final_norm over T ("instance") or D ("layer") divides by the average's sd s_a (< 1 when layers
       disagree: about 1 / sqrt(K) for independent ones), so the error e of step 2 reaches the output as
       e * (2 + |out|) / s_a (the mean and the sd of a perturbed group move by at most e), plus the
       final normalization's own rounding (`_norm_budget` over its group).
    Twice the sum, for margin. Computed in float64 from the inputs, so it follows their conditioning
    (an offset channel, mean >> sd, gets a proportionally larger budget, as its fp32 mean has).
    Being a worst-case bound it is loose: at the test shapes (T = 3 to 196, D up to 768, K up to 10) the
    Triton (interpreted) and torch fp32 errors stay below 4% of it; an intermediate rounded to bf16
    (2**-9 relative) exceeds it on most elements."""
    eps = float(eps)
    ys = [y.double() for y in layers]
    if instance_norm:
        budgets = [_norm_budget(y, 1, eps) for y in ys]
        zs = [b[1] for b in budgets]
        err = torch.stack([b[0] for b in budgets]).amax(0)  # (B, 1, D)
    else:
        zs, err = ys, torch.zeros(1, 1, 1, dtype=torch.float64, device=ys[0].device)
    zmax = torch.stack([z.abs() for z in zs]).amax(0)  # (B, T, D)
    err = err + gamma(len(zs) + 1) * zmax
    if final_norm != "none":
        a = sum(zs) / len(zs)
        dim = 1 if final_norm == "instance" else 2
        own, _, sd, out_max = _norm_budget(a, dim, eps)
        err = err.amax(dim, keepdim=True) * (2 + out_max) / sd + own
    return 2 * err


# ------------------------------------------------------------------------------------ ema_update_


def ema_case(shapes, pdtypes, device="cpu"):
    """fp32 ema tensors and params of the given shapes, param dtypes cycling through `pdtypes`."""
    ema = [torch.randn(s, device=device) for s in shapes]
    par = [torch.randn(s, device=device).to(pdtypes[i % len(pdtypes)]) for i, s in enumerate(shapes)]
    return ema, par


def check_ema(ema, ema0, par, d, low=None, what=""):
    """Every ema tensor equals decay * ema0 + (1 - decay) * param within the fp32 budget, and every
    low-precision copy is the new ema rounded to nearest even (torch's .to), bit for bit.

    Budget: the fused paths compute ema + w * (p - ema), w = fl32(1 - d) (torch's lerp takes
    p - (1 - w) * (p - ema) when w >= 0.5): three roundings of terms <= w * |p - ema0| plus w's own, and
    one of the result: u * (|new| + 4 w |p - ema0|). The per-parameter reference loop rounds d * ema0,
    w * p and the sum: u * (|new| + 2 d |ema0| + 2 w |p|). Twice the sum of both, for margin."""
    w = 1.0 - d
    for i, (e, e0, p) in enumerate(zip(ema, ema0, par)):
        e0d, pd = e0.double(), p.double()
        expect = e0d * d + pd * w
        tol = 2 * U32 * (expect.abs() + 4 * w * (pd - e0d).abs() + 2 * d * e0d.abs() + 2 * w * pd.abs())
        assert_close_verbose(e, expect, atol=tol, what=f"{what} tensor {i}")
        if low is not None:
            assert torch.equal(low[i], e.to(low[i].dtype)), f"{what}: low-precision copy {i}"
