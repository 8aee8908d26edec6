"""The pretraining loop, for every backend: data, the optimizer step through the backend, the EMA
teacher update, logging, the collapse guard, the non-finite policy, checkpoint cadence, stop signals and
exact resume. How the step runs (one process, DDP, DeepSpeed ZeRO) is the backend's (d2v/backends/).

Exact resume: the model, teacher, optimizer, step and RNG states are checkpointed; augmentation and
masks are a pure function of (seed, epoch, sample index) and the batch sampler restarts at the saved
step, so a resumed run sees the same batches and noise as an uninterrupted one.

No host sync in the hot loop: batches arrive with their mask indices (built in the loader workers), in
pinned memory on CUDA, and are copied asynchronously; device values are read only on log steps (the
distributed backends add one flag per optimizer step; tests/test_no_host_sync.py holds them to that).

References: fairseq trainer.py; torchtitan trainer.py (no host sync in the hot loop: metrics are read
only on log steps).
"""
from __future__ import annotations

import math
import time
import weakref
from pathlib import Path

import torch
from tqdm import tqdm

from d2v import ops
from d2v.backends import make_backend
from d2v.backends.base import Backend, StepOutput
from d2v.checkpoint import (
    WEIGHTS_ONLY,
    check_writable,
    checkpoint_root,
    clean_debris,
    load_checkpoint,
    resolve_checkpoint,
)
from d2v.config import Config, check_resume_config, check_weights_config
from d2v.log import add_run_log, get_logger, remove_run_log
from d2v.metrics import MetricsLogger, plot_loss_curve, read_metrics
from d2v.model import build_model
from d2v.objective import STAT_KEYS
from d2v.optim import check_schedule_change, lr_at
from d2v.preempt import StopRequest
from d2v.registry import get_modality
from d2v.rng import rank_seed, seed_everything
from d2v.runlock import RunLock

log = get_logger(__name__)


def _latest_or_none(out_dir: Path):
    """The run's checkpoint to resume (resolve_checkpoint), or None when out_dir holds no run. Never
    None when step_* folders exist but none is complete: starting over would overwrite them."""
    try:
        return resolve_checkpoint(out_dir)
    except FileNotFoundError as e:
        root = checkpoint_root(out_dir)
        found = sorted(p.name for p in root.glob("step_*"))
        if found:
            raise FileNotFoundError(
                f"{root} holds {', '.join(found)} but no complete checkpoint ({e}); refusing to start over "
                f"there (it would overwrite them): resume an intact checkpoint with --resume DIR, or set "
                f"train.out_dir to a new folder") from None
        return None


class CollapseError(RuntimeError):
    """Target or prediction variance fell below the configured floor (representation collapse)."""


def shutdown_workers(it) -> None:
    """Stop a DataLoader iterator's worker processes now. They ignore SIGTERM (d2v/preempt.py), so they
    must be told to exit: left to interpreter exit, multiprocessing would SIGTERM them and wait forever."""
    stop = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator; absent without workers
    if stop is not None:
        stop()


def step_mode(cfg) -> str:
    """How the step computes (the data2vec 2.0 default or the benchmark / 1.0 modes), for the banner."""
    m = cfg.model
    if m.skip_masked:
        student = "student encodes kept tokens only"
    else:
        student = "full-length student + mask embedding"
    head = "linear head (data2vec 1.0)" if m.head == "linear" else "conv decoder"
    compiled = f", torch.compile ({cfg.train.compile_mode})" if cfg.train.compile else ""
    return (f"{student}, {head}, {m.attention} attention, {cfg.masking.clone_batch} mask(s) per sample"
            f"{compiled}")


_HELD_HERE: dict = {}  # run folder -> the RunLock a trainer of this process holds there


class Trainer:
    """`Trainer(cfg).train()` pretrains to train.max_steps on the backend engine.name selects
    (`make_trainer` is the same thing under the name the CLI uses). `train_step(batches)` is one
    optimizer step plus the EMA update, for callers that drive their own loop (the benchmarks)."""

    def __init__(self, cfg: Config, resume: str | bool | None = None, progress: bool = True,
                 device: str | None = None, config_path: str | None = None):
        self.cfg, self.config_path = cfg, config_path
        self.backend: Backend = make_backend(cfg, device)
        self.progress = progress and self.is_main
        self.out_dir = Path(cfg.train.out_dir)
        created = not self.out_dir.exists()
        self._claim_run_folder()
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.release()
            if created and self.is_main and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # a run that failed to start leaves no empty folder behind
            raise

    # what the backend owns, under the names callers use
    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    @property
    def is_main(self) -> bool:
        return self.backend.rank == 0

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def micro_steps(self) -> int:
        """Loader batches per optimizer step (engine.grad_accum_steps where the backend implements it)."""
        return self.backend.micro_steps

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def teacher(self):
        return self.backend.teacher

    @property
    def optimizer(self):
        return self.backend.optimizer

    def _claim_run_folder(self) -> None:
        """Rank 0: the run folder is writable (else one line naming it), locked for this run (a second
        run there is refused with the holder's PID and host), and rid of what killed checkpoint writes
        left (temp and half-pruned folders), before anything resolves a checkpoint there."""
        self._lock = None
        if self.is_main:
            check_writable(self.out_dir)
            key = str(self.out_dir.resolve())
            older = _HELD_HERE.pop(key, None)
            if older is not None:  # an earlier trainer of this process on this folder (never trained, or
                older.release()    # done): one process runs one loop at a time, so the newer one takes over
            self._lock = _HELD_HERE[key] = RunLock(self.out_dir).acquire()
            weakref.finalize(self, self._lock.release)  # a trainer dropped without train() or release()
            try:
                clean_debris(self.out_dir)
            except BaseException:
                self.release()
                raise
        self.backend.barrier()  # rank 0 cleaned the run folder: now every rank may resolve there

    def release(self) -> None:
        """Give the run folder's lock back (train() does at its end; idempotent)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def _setup(self, cfg: Config, resume) -> None:
        resume_dir = resume if resume and resume is not True else None  # --resume DIR
        existing = _latest_or_none(self.out_dir) if resume_dir is None else None
        if not resume and existing is not None:  # checked before any model is built
            raise FileExistsError(
                f"{self.out_dir} already holds a run (latest checkpoint {existing.name}); pass --resume to "
                f"continue it, or set train.out_dir to a new folder (nothing was overwritten)")
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)

        # --resume: continue the run in out_dir, if any; --resume DIR: that checkpoint, which must exist
        source = existing if resume is True else resume_dir
        saved = load_checkpoint(source) if source is not None else None
        weights = saved if saved is not None and saved[0].get("engine") == WEIGHTS_ONLY else None

        seed_everything(cfg.train.seed)
        model = build_model(cfg)  # same seed -> same init as the probe's baseline
        if weights is not None:  # continued pretraining from weights (d2v import): no optimizer state
            check_weights_config(weights[1], cfg.to_dict(), weights[2])
            model.load_state_dict(weights[0]["model"])
        self.backend.setup(model, teacher_init=weights[0]["teacher"] if weights is not None else None)
        if self.rank > 0:  # per-rank decoder noise / layerdrop draws; rank 0 matches a single process
            seed_everything(rank_seed(cfg.train.seed, self.rank))
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped (non-finite loss, fp16 overflow); batches consumed
        self.nonfinite_in_a_row = 0
        self.resumed_from = None
        if weights is not None:
            self.step, self.resumed_from = int(weights[0]["step"]), weights[2]
            if self.is_main:
                log.info(f"continuing from the weights in {weights[2]} at step {self.step}: student and "
                         f"teacher loaded, a fresh optimizer")
        elif saved is not None:
            self._restore(*saved)
        self._build_data()

    def _build_data(self) -> None:
        """The pretraining dataset and a loader that starts at this run's data position."""
        from d2v.data.build import build_pretrain_data

        self.source_key = get_modality(self.cfg.model.modality).source_key
        self.dataset, self.loader = build_pretrain_data(self.cfg, start_step=self.data_position(),
                                                        rank=self.rank, world_size=self.world_size,
                                                        pin_memory=self.device.type == "cuda",
                                                        resumed=self.resumed_from is not None)
        self.bad_files = {p for p, _ in getattr(self.dataset, "bad_files", [])}

    def data_position(self) -> int:
        """Loader batches consumed so far on each rank (where a resumed run's sampler starts)."""
        return (self.step + self.skipped_steps) * self.micro_steps

    # --------------------------------------------------------------------------------- the step
    def _next_batch(self, it) -> tuple[torch.Tensor, object]:
        """The next batch on the device: source (B, ...) and its MaskInfo over B*M rows. The mask
        indices come with the batch (built in the loader workers); on CUDA both are in pinned memory,
        so these copies are asynchronous (no host stall)."""
        return self.to_device(next(it))

    def to_device(self, batch) -> tuple[torch.Tensor, object]:
        """A loader batch (dict) -> (source (B, ...), MaskInfo) on the device; a (source, mask) pair
        already there passes through."""
        if isinstance(batch, tuple):
            return batch
        self.bad_files.update(batch.get("bad", []))
        if "maskinfo" not in batch:
            raise ValueError("pretraining batch without 'maskinfo': build the loader with "
                             "d2v.data.build.build_pretrain_data (its collate adds the mask indices)")
        mask = batch["maskinfo"].to(self.device, non_blocking=True)
        return batch[self.source_key].to(self.device, non_blocking=True), mask

    def train_step(self, batches) -> StepOutput:
        """One optimizer step over `batches` (micro_steps loader batches, or (source, mask) pairs on the
        device; one batch may be passed bare), then the EMA update. self.step counts applied steps;
        a skipped step counts in self.skipped_steps (its batches were consumed)."""
        if not isinstance(batches, list):
            batches = [batches]
        if len(batches) != self.micro_steps:
            raise ValueError(f"train_step: {len(batches)} batch(es) given, the backend takes "
                             f"{self.micro_steps} per optimizer step (engine.grad_accum_steps)")
        res = self.backend.step([self.to_device(b) for b in batches], lr_at(self.step, self.cfg),
                                self._local_requests())
        if res.skipped is not None:
            self.skipped_steps += 1
            if res.skipped == "nonfinite":
                self._count_nonfinite(float(res.shown))  # host read on a skipped step only
            return res
        self.nonfinite_in_a_row = 0
        self.step += 1
        res.ema_decay = self.teacher.update(self.step)
        return res

    def _count_nonfinite(self, value: float) -> None:
        """After a step was skipped for a non-finite loss: warn, or stop past engine.max_nonfinite_steps."""
        self.nonfinite_in_a_row += 1
        limit = self.cfg.engine.max_nonfinite_steps
        if self.is_main:
            log.warning(f"non-finite loss ({value} on rank {self.rank}, or on another rank) at step "
                        f"{self.step + 1}: skipped ({self.nonfinite_in_a_row} in a row, limit "
                        f"engine.max_nonfinite_steps={limit})")
        if self.nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step + 1} "
                f"(engine.max_nonfinite_steps={limit}); {self.skipped_steps} steps skipped in all. "
                f"Lower optim.lr, raise optim.warmup_steps or use fp32; resume from the last checkpoint "
                f"with --resume")

    # --------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Checkpoint this step (collective on distributed backends)."""
        state = {"step": self.step, "skipped_steps": self.skipped_steps}
        return self.backend.save(self.out_dir, self.step, state, self.cfg.to_dict(), self.cfg.train.keep_last)

    def _restore(self, state: dict, saved_cfg: dict, ck: Path) -> None:
        self.backend.check_checkpoint(state, ck)
        check_resume_config(saved_cfg, self.cfg.to_dict(), ck)
        check_schedule_change(saved_cfg, self.cfg, int(state["step"]), ck)
        self.backend.load(state, ck)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = ck

    # --------------------------------------------------------------------------------- loop
    def banner(self) -> str:
        # ZeRO-3 partitions parameters in place (p.numel() is 0); ds_numel is the full size
        cfg, n = self.cfg, sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        table = ops.backend()
        ops_line = ", ".join(f"{k}={v['impl']}/{v['variant']}" for k, v in table.items())
        lines = [
            f"d2v pretrain | {cfg.model.modality}/{cfg.model.flavor} | {n / 1e6:.2f}M student params | "
            f"device {self.device} | precision {cfg.train.precision} | threads {torch.get_num_threads()}",
            f"  data: {len(self.dataset)} samples from {self.dataset_root()} "
            f"({len(self.bad_files)} unreadable skipped) | batch {cfg.train.batch_size} x "
            f"{cfg.masking.clone_batch} clones | steps {self.step}->{cfg.train.max_steps}",
            f"  step: {step_mode(cfg)}",
            f"  ops: {ops_line} (why: train.log, or d2v.ops.backend())",
            f"  out: {self.out_dir}" + (f" | resumed from {self.resumed_from}" if self.resumed_from else ""),
        ]
        extra = self.backend.banner()
        return "\n".join(lines + ([extra] if extra else []))

    def dataset_root(self) -> str:
        return str(getattr(self.dataset, "root", self.cfg.data.path))

    def train(self) -> dict:
        """Run to train.max_steps, or until a SIGTERM/SIGINT: then the current step finishes, a
        checkpoint is written and the summary's "stopped_by" names the signal."""
        run_log = add_run_log(self.out_dir) if self.is_main else None
        try:
            if self.is_main:
                log.info(self.banner())
                log.debug("ops: " + "; ".join(f"{k}: {v['reason']}" for k, v in ops.backend().items()))
            with StopRequest("the current step") as stop:
                self._stop = stop
                return self._loop()
        except BaseException as e:  # the CLI prints one line; the traceback goes to train.log
            log.debug(f"training stopped at step {self.step} by {type(e).__name__}", exc_info=True)
            raise
        finally:
            remove_run_log(run_log)
            self.release()

    def _loop(self) -> dict:
        cfg = self.cfg
        logger = (MetricsLogger(self.out_dir, resume_step=self.step, tensorboard=cfg.train.tensorboard)
                  if self.is_main else None)
        start_step, t_start = self.step, time.time()
        self._t_log, self._n_log = time.time(), 0
        last, ckpt, stopped_by = {}, None, None
        saved_step = self.step if self.resumed_from is not None else None
        self._last_ckpt_t = time.monotonic()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.progress, mininterval=1.0,
                   desc="pretrain", unit="step", dynamic_ncols=True)
        it = iter(self.loader)
        self.model.train()
        try:
            while self.step < cfg.train.max_steps:
                res = self.train_step([self._next_batch(it) for _ in range(self.micro_steps)])
                periodic = False
                if res.out is not None:  # None: skipped: no update, no EMA step, no log
                    self._n_log += res.samples
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                        last = self._log_step(res, t_start, logger, ckpt)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tvar=f"{last['target_var']:.2f}",
                                        smp_s=f"{last['samples_per_s']:.0f}")
                    periodic = self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.max_steps
                if (periodic or res.ckpt_due or res.stop) and self.step != saved_step:
                    ckpt, saved_step = self.save(), self.step
                    self._last_ckpt_t = time.monotonic()
                    if res.ckpt_due and not periodic and self.is_main:
                        log.debug(f"checkpoint at step {self.step}: train.ckpt_every_minutes="
                                  f"{cfg.train.ckpt_every_minutes} passed")
                if res.stop:
                    stopped_by = self._stop.signal_name or "a signal to another rank"
                    break
        finally:
            shutdown_workers(it)
        bar.close()
        wall = time.time() - t_start
        metrics_csv, png = self.out_dir / "metrics.csv", None
        if logger is not None:
            logger.close()
            metrics_csv = logger.path
            if not last:  # nothing ran (a finished run resumed): report its last logged metrics
                rows = read_metrics(logger.path)
                last = rows[-1] if rows else {}
            png = plot_loss_curve(logger.path, self.out_dir / "loss_curve.png")
        done = self.step - start_step
        samples = done * cfg.train.batch_size * self.micro_steps * self.world_size
        return {
            "steps": self.step, "steps_this_run": done, "wall_s": wall,
            "samples_per_s": samples / max(wall, 1e-9),
            "final": last, "checkpoint": str(ckpt or resolve_checkpoint(self.out_dir)),
            "metrics_csv": str(metrics_csv), "loss_curve": str(png) if png else None,
            "unreadable_files": sorted(self.bad_files),
            "skipped_steps": self.skipped_steps,
            "stopped_by": stopped_by,
        }

    def _log_step(self, res: StepOutput, t_start: float, logger, ckpt) -> dict:
        """A log step: the one place the loop reads device values (averaged over ranks), checks them and
        writes the metrics row."""
        # sync point: the only host reads of device values in the loop
        last = self.backend.reduce_stats({k: float(res.out[k].detach()) for k in STAT_KEYS})
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"non-finite loss {last['loss']} at step {self.step}; "
                                     f"last checkpoint: {ckpt or 'none'}")
        now = time.time()
        gnorm = res.grad_norm
        last.update(step=self.step, lr=res.lr, ema_decay=res.ema_decay,
                    grad_norm=float(gnorm) if gnorm is not None else None,
                    samples_per_s=self._n_log / max(now - self._t_log, 1e-9), elapsed_s=now - t_start)
        self._t_log, self._n_log = now, 0
        if logger is not None:
            logger.log(last)
        self._collapse_guard(last)
        return last

    # --------------------------------------------------------------------------------- stop requests
    _stop: StopRequest | None = None
    _last_ckpt_t = 0.0

    def _local_requests(self) -> tuple[bool, bool]:
        """(a stop signal arrived here, train.ckpt_every_minutes passed since the last checkpoint); the
        distributed backends agree on them in their step's all-reduce."""
        minutes = self.cfg.train.ckpt_every_minutes
        due = minutes > 0 and time.monotonic() - self._last_ckpt_t >= 60.0 * minutes
        return self._stop is not None and self._stop.requested, due

    def _collapse_guard(self, m: dict) -> None:
        o = self.cfg.objective
        if self.step < o.collapse_check_after:
            return
        if o.min_target_var > 0 and m["target_var"] < o.min_target_var:
            raise CollapseError(f"target_var {m['target_var']:.4f} < objective.min_target_var "
                                f"{o.min_target_var} at step {self.step}: the teacher collapsed; "
                                f"try a lower optim.lr or a slower EMA")
        if o.min_pred_var > 0 and m["pred_var"] < o.min_pred_var:
            raise CollapseError(f"pred_var {m['pred_var']:.4f} < objective.min_pred_var "
                                f"{o.min_pred_var} at step {self.step}: the student collapsed")


def make_trainer(cfg: Config, **kw) -> Trainer:
    """The trainer `d2v pretrain` runs, on the backend engine.name selects (auto: DeepSpeed under a
    launcher, else single)."""
    return Trainer(cfg, **kw)
