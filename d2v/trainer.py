"""Single-process pretraining loop: AdamW, linear warmup + cosine, clipping, optional bf16 autocast,
EMA teacher update after every optimizer step, atomic checkpoints and exact resume.

Exact resume: the model, teacher, optimizer, step and RNG states are checkpointed; augmentation and
masks are a pure function of (seed, epoch, sample index) and the batch sampler restarts at the saved
step, so a resumed run sees the same batches and noise as an uninterrupted one.

No host sync in the hot loop: batches arrive with their mask indices (built in the loader
workers), in pinned memory on CUDA, and are copied asynchronously; device values are read only on
log steps (the DeepSpeed engine adds one finiteness flag per optimizer step; tests/test_no_host_sync.py
holds both trainers to that).

References: fairseq trainer.py / cosine_lr_scheduler.py; torchtitan trainer.py (no host sync in the
hot loop: metrics are read only on log steps).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from d2v import ops
from d2v.checkpoint import (
    check_writable,
    checkpoint_root,
    clean_debris,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from d2v.config import Config, ConfigError, EngineConfig, check_resume_config
from d2v.ema import EMATeacher
from d2v.log import add_run_log, get_logger, remove_run_log
from d2v.metrics import MetricsLogger, plot_loss_curve, read_metrics
from d2v.model import STAT_KEYS
from d2v.preempt import StopRequest
from d2v.registry import build_model
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


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer update number `step` (0-based): linear warmup from 0, cosine to min_lr."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * step / o.warmup_steps
    span = max(total - o.warmup_steps, 1)
    progress = min((step - o.warmup_steps) / span, 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def shutdown_workers(it) -> None:
    """Stop a DataLoader iterator's worker processes now. They ignore SIGTERM (d2v/preempt.py), so they
    must be told to exit: left to interpreter exit, multiprocessing would SIGTERM them and wait forever."""
    stop = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator; absent without workers
    if stop is not None:
        stop()


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
    msg = (f"train.max_steps {old_max} -> {cfg.train.max_steps} changes the learning rate at the resume step "
           f"{step} from {old:.3g} to {new:.3g} (the cosine decays to optim.min_lr over train.max_steps, so a "
           f"new length re-stretches it: the lr jumps {'up' if new > old else 'down'}, then follows the new "
           f"cosine)")
    if not cfg.train.allow_schedule_change:
        raise ConfigError(f"cannot resume from {ck}: {msg}; pass train.allow_schedule_change=true to accept "
                          f"that, or start a new train.out_dir with the longer schedule")
    log.warning(msg)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_1d: bool) -> list[dict]:
    """No weight decay on biases and 1-D params (norms) unless decay_1d (spec §4.5, §6.1); like the
    reference, the CLS token (1, E, D) is decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias")
        (no_decay if skip and not decay_1d else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def compile_model(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """`model` under torch.compile (train.compile): its forward is the whole step's computation
    (student, EMA teacher, targets, loss) and its backward is compiled with it (AOTAutograd); the
    d2v.ops custom ops trace as opaque nodes (fake implementations). The model itself is unchanged
    (the returned wrapper shares its parameters; state dicts keep their keys).

    Random ops (decoder noise, dropout) stay on torch's own generator (inductor's fallback_random), so
    a compiled step draws the same noise as an eager one: losses agree up to float reassociation, and
    a checkpoint's RNG state resumes the same stream with compile on or off.

    The optimizer step, gradient clipping and the EMA update stay outside: the EMA is one fused op
    already (nothing to fuse it with), and writing the teacher's parameters inside the graph that reads
    them would only add functionalization copies."""
    import torch._inductor

    options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
    return torch.compile(model, options=options)


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


# engine.* keys that only the DeepSpeed engine (d2v/engine.py) implements
DEEPSPEED_ONLY_KEYS = ("zero_stage", "grad_accum_steps", "activation_checkpointing", "offload_optimizer",
                       "optimizer", "ds_config")


def refuse_deepspeed_only_keys(cfg: Config) -> None:
    """The single-process trainer would ignore these keys: refuse them instead, naming each."""
    default = EngineConfig()
    set_ = [f"engine.{k}={getattr(cfg.engine, k)!r}" for k in DEEPSPEED_ONLY_KEYS
            if getattr(cfg.engine, k) != getattr(default, k)]
    if set_:
        raise ConfigError(f"{', '.join(set_)}: only the DeepSpeed engine implements "
                          f"{'this key' if len(set_) == 1 else 'these keys'}; set engine.name=deepspeed (one "
                          f"process works too) or launch with deepspeed/torchrun (engine.name=auto)")


_HELD_HERE: dict = {}  # run folder -> the RunLock a trainer of this process holds there


class Trainer:
    rank, world_size = 0, 1
    deepspeed = False  # DeepSpeedTrainer: True

    def __init__(self, cfg: Config, resume: str | bool | None = None, progress: bool = True,
                 device: str | None = None, config_path: str | None = None):
        self.cfg, self.config_path = cfg, config_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._init_world()
        self.progress = progress and self.is_main
        self.out_dir = Path(cfg.train.out_dir)
        if cfg.train.precision == "fp16":
            raise ValueError("train.precision: fp16 needs the DeepSpeed engine (engine.name=deepspeed); the "
                             "single-process trainer supports fp32 and bf16")
        if not self.deepspeed:
            refuse_deepspeed_only_keys(cfg)
        created = not self.out_dir.exists()
        self._claim_run_folder()
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.release()
            if created and self.is_main and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # a run that failed to start leaves no empty folder behind
            raise

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
        self._barrier()

    def _barrier(self) -> None:
        """All ranks wait here (one process: nothing to wait for)."""

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

        seed_everything(cfg.train.seed)
        self.model = build_model(cfg).to(self.device)  # same seed -> same init as the probe's baseline
        self._build_engine()
        if self.rank > 0:  # per-rank decoder noise / layerdrop draws; rank 0 matches a single process
            seed_everything(cfg.train.seed + 1_000_003 * self.rank)
        self.step = 0
        self.resumed_from = None
        if resume is True and existing is not None:  # --resume: continue the run in out_dir, if any
            self._restore(existing)
        elif resume_dir is not None:  # --resume DIR: that checkpoint, which must exist
            self._restore(resume_dir)
        self._build_data()

    def _build_data(self) -> None:
        """The pretraining dataset and a loader that starts at this run's data position."""
        from d2v.data.build import SOURCE_KEY, build_pretrain_data

        self.source_key = SOURCE_KEY[self.cfg.model.modality]
        self.dataset, self.loader = build_pretrain_data(self.cfg, start_step=self.data_position(),
                                                        rank=self.rank, world_size=self.world_size,
                                                        pin_memory=self.device.type == "cuda",
                                                        resumed=self.resumed_from is not None)
        self.bad_files = {p for p, _ in getattr(self.dataset, "bad_files", [])}

    # --------------------------------------------------------------------------------- engine hooks
    micro_steps = 1  # loader batches per optimizer step
    skipped_steps = 0  # optimizer steps skipped for a non-finite loss (their batches were consumed)

    def data_position(self) -> int:
        """Loader batches consumed so far on each rank (where a resumed run's sampler starts)."""
        return (self.step + self.skipped_steps) * self.micro_steps

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _init_world(self) -> None:
        """Single process: rank 0 of 1 (the DeepSpeed engine joins a process group here)."""

    def _build_engine(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self.teacher = EMATeacher(self.model, cfg.ema.ema_start, cfg.ema.ema_end, cfg.ema.anneal_end_step)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay, o.decay_1d),
                                           lr=o.lr, betas=o.betas, eps=o.eps)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")
        # what the step calls: the model, or the model under torch.compile (train.compile)
        self.forward = compile_model(self.model, cfg.train.compile_mode) if cfg.train.compile else self.model

    def _next_batch(self, it) -> tuple[torch.Tensor, "object"]:
        """The next batch on the device: source (B, ...) and its MaskInfo over B*M rows. The mask
        indices come with the batch (built in the loader workers); on CUDA both are in pinned memory,
        so these copies are asynchronous (no host stall)."""
        batch = next(it)
        self.bad_files.update(batch.get("bad", []))
        if "maskinfo" not in batch:
            raise ValueError("pretraining batch without 'maskinfo': build the loader with "
                             "d2v.data.build.build_pretrain_data (its collate adds the mask indices)")
        mask = batch["maskinfo"].to(self.device, non_blocking=True)
        return batch[self.source_key].to(self.device, non_blocking=True), mask

    def _train_step(self, it) -> tuple[dict, torch.Tensor | None, float, int]:
        """One optimizer step -> (model outputs, grad norm or None, lr, samples on this rank); outputs
        None when the step was skipped."""
        cfg = self.cfg
        source, mask = self._next_batch(it)
        with self.autocast:
            out = self.forward(source, mask)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = (torch.nn.utils.clip_grad_norm_(self._params, cfg.optim.clip_norm)
                 if cfg.optim.clip_norm > 0 else None)
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return out, gnorm, lr, source.shape[0]

    def _reduce_stats(self, stats: dict) -> dict:
        """Logged metrics: this rank's (the DeepSpeed engine averages them over ranks)."""
        return stats

    # --------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_state()}

    def save(self) -> Path:
        return save_checkpoint(self.out_dir, self.step, self._state(), self.cfg.to_dict(),
                               self.cfg.train.keep_last)

    def _restore(self, path) -> None:
        state, saved_cfg, ck = load_checkpoint(path)
        if state.get("engine") == "deepspeed":
            stage, ranks = state.get("zero_stage"), state.get("world_size")
            raise ValueError(f"{ck} was saved by the DeepSpeed engine (ZeRO-{stage}, {ranks} rank(s)): "
                             f"resume it with engine.name=deepspeed (as many ranks; ZeRO-0 on any number), "
                             f"or run `d2v export --checkpoint {ck} --out FILE.pt` for plain torch weights")
        check_resume_config(saved_cfg, self.cfg.to_dict(), ck)
        check_schedule_change(saved_cfg, self.cfg, int(state["step"]), ck)
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
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
        return "\n".join(lines)

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
        finally:
            remove_run_log(run_log)
            self.release()

    def _loop(self) -> dict:
        cfg = self.cfg
        logger = (MetricsLogger(self.out_dir, resume_step=self.step, tensorboard=cfg.train.tensorboard)
                  if self.is_main else None)
        start_step, t_start = self.step, time.time()
        t_log, n_log = time.time(), 0
        last, ckpt, stopped_by = {}, None, None
        saved_step = self.step if self.resumed_from is not None else None
        self._last_ckpt_t = time.monotonic()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.progress, mininterval=1.0,
                   desc="pretrain", unit="step", dynamic_ncols=True)
        it = iter(self.loader)
        self.model.train()
        try:
            while self.step < cfg.train.max_steps:
                out, gnorm, lr, n = self._train_step(it)
                stop_now, time_due = self._requests()
                periodic = False
                if out is not None:  # None: skipped (non-finite loss): no update, no EMA step, no log
                    self.step += 1
                    decay = self.teacher.update(self.step)
                    n_log += n
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                        # sync point: the only host reads of device values in the loop
                        last = self._reduce_stats({k: float(out[k].detach()) for k in STAT_KEYS})
                        if not math.isfinite(last["loss"]):
                            raise FloatingPointError(f"non-finite loss {last['loss']} at step {self.step}; "
                                                     f"last checkpoint: {ckpt or 'none'}")
                        now = time.time()
                        last.update(step=self.step, lr=lr, ema_decay=decay,
                                    grad_norm=float(gnorm) if gnorm is not None else None,
                                    samples_per_s=n_log / max(now - t_log, 1e-9), elapsed_s=now - t_start)
                        t_log, n_log = now, 0
                        if logger is not None:
                            logger.log(last)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tvar=f"{last['target_var']:.2f}",
                                        smp_s=f"{last['samples_per_s']:.0f}")
                        self._collapse_guard(last)
                    periodic = self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.max_steps
                if (periodic or time_due or stop_now) and self.step != saved_step:
                    ckpt, saved_step = self.save(), self.step
                    self._last_ckpt_t = time.monotonic()
                    if time_due and not periodic and self.is_main:
                        log.debug(f"checkpoint at step {self.step}: train.ckpt_every_minutes="
                                  f"{cfg.train.ckpt_every_minutes} passed")
                if stop_now:
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

    # --------------------------------------------------------------------------------- stop requests
    _stop: StopRequest | None = None
    _last_ckpt_t = 0.0

    def _local_requests(self) -> tuple[bool, bool]:
        """(a stop signal arrived here, train.ckpt_every_minutes passed since the last checkpoint)."""
        minutes = self.cfg.train.ckpt_every_minutes
        due = minutes > 0 and time.monotonic() - self._last_ckpt_t >= 60.0 * minutes
        return self._stop is not None and self._stop.requested, due

    def _requests(self) -> tuple[bool, bool]:
        """(stop, checkpoint now) after a step, the same on every rank; one process: its own."""
        return self._local_requests()

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
