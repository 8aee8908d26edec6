"""No host read of a device value in the training loop outside log steps (a design rule: `.item()` only on
log steps), in the single backend and in the DeepSpeed engine (there: one per optimizer step, the
finiteness flag that decides whether the update is applied, never one per micro-batch); the mask
indices arrive with the batch from the loader (built in its workers), and the loader pins memory only
for CUDA training.

CPU tensors cannot show a host/device stall (torch.cuda.set_sync_debug_mode needs CUDA), so the check
counts the Python-level host reads (Tensor.item, tolist, cpu, numpy; bool/float/int/index of a tensor)
that d2v's own code makes (the caller's file is in d2v/ or kernels/), by phase: every loop iteration
is "step" (the step, the EMA update, the loop body), except what follows `train_step` in an iteration
that logs ("log"). The loader's own work (its collate reads the CPU masks by design) is not counted.

Run: .venv/bin/python -m pytest -q tests/test_no_host_sync.py
"""
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

from d2v.config import load_config
from tests.utils import free_port, micro_overrides, rank_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_image.yaml"
D2V_CODE = (str(ROOT / "d2v") + os.sep, str(ROOT / "kernels") + os.sep)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class Phase:
    now = "setup"
    in_loader = 0


@contextlib.contextmanager
def host_reads_recorded(records: list, phase: Phase):
    """Inside: every host read by d2v code on a tensor appends (phase, read, function, file:line)."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, orig):
        def read(self, *args, **kwargs):
            f = sys._getframe(1)
            if not phase.in_loader and f.f_code.co_filename.startswith(D2V_CODE):
                records.append((phase.now, name, f.f_code.co_name,
                                f"{Path(f.f_code.co_filename).name}:{f.f_lineno}"))
            return orig(self, *args, **kwargs)

        return read

    for name, orig in saved.items():
        setattr(torch.Tensor, name, wrap(name, orig))
    try:
        yield
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


class QuietLoader:
    """The trainer's loader, with host reads made while it produces a batch not counted."""

    def __init__(self, loader, phase: Phase):
        self.loader, self.phase = loader, phase

    def __iter__(self):
        it = iter(self.loader)
        while True:
            self.phase.in_loader += 1
            try:
                batch = next(it)
            finally:
                self.phase.in_loader -= 1
            yield batch


def instrument(tr, phase: Phase) -> None:
    """Mark the phases on the trainer: each loop iteration is "step" from train_step (optimizer step and
    EMA update) on; once train_step returned, the rest of the iteration (the log block) is "log" when the
    step it completes is logged, else still "step"."""
    step, cfg = tr.train_step, tr.cfg.train

    def train_step(batches):
        phase.now = "step"
        res = step(batches)  # the optimizer step and the EMA update
        done = tr.step  # counted by train_step
        if res.out is not None and (done % cfg.log_every == 0 or done == cfg.max_steps):
            phase.now = "log"
        return res

    tr.train_step = train_step
    tr.loader = QuietLoader(tr.loader, phase)


def _overrides(out, **extra):
    # 4 optimizer steps, logged at 2 and 4, one checkpoint at the end (a log step)
    return micro_overrides(out, 4, **{"train.log_every": 2, "train.ckpt_every": 4, **extra})


def test_single_trainer_reads_device_values_on_log_steps_only(tmp_path):
    from d2v.trainer import Trainer

    records, phase = [], Phase()
    tr = Trainer(load_config(TINY, _overrides(tmp_path)), progress=False)
    instrument(tr, phase)
    with host_reads_recorded(records, phase):
        tr.train()
    assert tr.step == 4
    in_step = [r for r in records if r[0] == "step"]
    assert in_step == [], in_step
    # the counter sees the log steps' reads (float of each logged metric), so an empty list means something
    assert sum(r[0] == "log" and r[1] == "__float__" for r in records) >= 2 * 5, records


def _deepspeed_worker(rank, port, root):
    rank_env(0, 1, port, D2V_DEEPSPEED_SHM="0")
    torch.set_num_threads(1)
    from d2v.trainer import Trainer

    out = {}
    for stage in (0, 3):  # ZeRO-3: the teacher's gathered forward and sharded EMA update count too
        records, phase = [], Phase()
        cfg = load_config(TINY, _overrides(Path(root) / f"z{stage}", **{
            "engine.name": "deepspeed", "engine.zero_stage": stage, "engine.grad_accum_steps": 2}))
        tr = Trainer(cfg, progress=False)
        instrument(tr, phase)
        with host_reads_recorded(records, phase):
            tr.train()
        out[stage] = {"records": records, "steps": tr.step}
    torch.save(out, Path(root) / "reads.pt")


def test_deepspeed_reads_one_flag_per_optimizer_step(tmp_path):
    """grad_accum_steps=2 over 4 optimizer steps (8 micro-batches): outside log steps the only host read is
    the all-ranks finiteness flag, once per optimizer step."""
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    mp.spawn(_deepspeed_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    for stage, rec in torch.load(tmp_path / "reads.pt").items():
        assert rec["steps"] == 4
        in_step = [r for r in rec["records"] if r[0] == "step"]
        assert [r[1:3] for r in in_step] == [("tolist", "agree")] * 4, (stage, in_step)
        assert sum(r[0] == "log" for r in rec["records"]) >= 2, (stage, rec["records"])


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_batches_carry_their_mask_indices_and_pin_only_for_cuda(tmp_path):
    """The pretraining collate (in a worker process here) adds MaskInfo equal to make_maskinfo of the
    batch's masks; pin_memory reaches the DataLoader, and the trainer asks for it on CUDA only."""
    from d2v.data.build import build_pretrain_data
    from d2v.masking import make_maskinfo
    from d2v.trainer import Trainer

    cfg = load_config(TINY, _overrides(tmp_path, **{"data.num_workers": 1}))
    _, loader = build_pretrain_data(cfg, start_step=3, pin_memory=True)
    assert loader.pin_memory
    batch = next(iter(loader))
    want = make_maskinfo(batch["mask"])
    assert all(torch.equal(a, b) for a, b in zip(batch["maskinfo"], want))
    assert batch["maskinfo"].ids_keep.shape == (cfg.train.batch_size * cfg.masking.clone_batch,
                                                int(cfg.model.grid**2 * (1 - cfg.masking.mask_prob)))
    tr = Trainer(load_config(TINY, _overrides(tmp_path / "run")), progress=False, device="cpu")
    assert not tr.loader.pin_memory
