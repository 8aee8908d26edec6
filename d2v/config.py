"""One typed config tree for d2v, loaded from YAML recipes (the packaged ones in d2v/configs/, named
like `tiny_image`, or any YAML file) with key=value overrides.

Every field has a default and a one-line meaning; unknown keys and values of the wrong type are
rejected with a message naming the dotted key. `model.flavor` selects an architecture preset from
`d2v.registry` that the other `model.*` keys then override.

The defaults follow the data2vec 2.0 reference's per-modality settings (docs/ lists them).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from d2v.registry import flavor_defaults, get_modality, modality_defaults, modality_names

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "check_resume_config"]


class ConfigError(ValueError):
    """One or more config keys or values are invalid; each message names its dotted key.

    `errors` holds one message per bad key; with several, str() lists them one per line."""

    def __init__(self, *errors: str, where: str = ""):
        self.errors = list(errors)
        if len(errors) == 1:
            text = f"{where}{errors[0]}"
        else:
            text = f"{where}{len(errors)} invalid config values:" + "".join(f"\n  {e}" for e in errors)
        super().__init__(text)


class _Check:
    """Collects one message per bad key; each method returns whether its value is valid."""

    def __init__(self):
        self.errors: list[str] = []

    def fail(self, msg: str) -> bool:
        self.errors.append(msg)
        return False

    def choice(self, key: str, value: Any, choices: tuple) -> bool:
        return value in choices or self.fail(f"{key}: expected one of {list(choices)}, got {value!r}")

    def at_least(self, key: str, value: Any, lo: int | float, null_ok: bool = False) -> bool:
        if value is None and null_ok:
            return True
        return value >= lo or self.fail(
            f"{key} must be >= {lo}{' or null' if null_ok else ''}, got {value!r}")

    def positive(self, key: str, value: Any, null_ok: bool = False) -> bool:
        if value is None and null_ok:
            return True
        return value > 0 or self.fail(f"{key} must be > 0{' or null' if null_ok else ''}, got {value!r}")

    def range(self, key: str, value: float, lo: float, hi: float, lo_open: bool = False,
              hi_open: bool = False) -> bool:
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        return ok or self.fail(f"{key}: expected a value in {'(' if lo_open else '['}{lo}, {hi}"
                               f"{')' if hi_open else ']'}, got {value!r}")

    def divisible(self, key: str, value: int, by_key: str, by: int) -> bool:
        return value % by == 0 or self.fail(f"{key} ({value}) must be divisible by {by_key} ({by})")


@dataclass(kw_only=True)
class DecoderConfig:
    dim: int = 128  # conv channels
    kernel: int = 3  # conv kernel size (odd)
    layers: int = 3  # conv layers
    groups: int = 8  # conv groups
    residual: bool = True  # residual after each layer whose channels are unchanged
    input_dropout: float = 0.0  # dropout on encoder outputs before mask-noise insertion
    projection_layers: int = 1  # final projection: 1 = Linear(dim, D); 2 = Linear -> GELU -> Linear (text)
    projection_ratio: float = 2.0  # hidden width of the 2-layer projection, as a multiple of dim

    def validate(self, p: str, c: _Check) -> None:
        for k in ("dim", "layers", "groups"):
            c.at_least(f"{p}.{k}", getattr(self, k), 1)
        if c.at_least(f"{p}.kernel", self.kernel, 1) and self.kernel % 2 != 1:
            c.fail(f"{p}.kernel: must be odd ('same' padding), got {self.kernel}")
        if self.dim >= 1 and self.groups >= 1:
            c.divisible(f"{p}.dim", self.dim, f"{p}.groups", self.groups)
        c.range(f"{p}.input_dropout", self.input_dropout, 0.0, 1.0, hi_open=True)
        c.choice(f"{p}.projection_layers", self.projection_layers, (1, 2))
        c.positive(f"{p}.projection_ratio", self.projection_ratio)
@dataclass(kw_only=True)
class ModelConfig:
    modality: str = "image"  # a registered modality (d2v.registry): "image" | "audio" | "text"
    flavor: str = "tiny"  # architecture preset from d2v.registry, overridden by the keys below
    # fields of one modality (its ModalitySpec.model_keys; setting one for another modality is an error)
    # image
    image_size: int = 32  # image: input side in pixels
    patch_size: int = 4  # image: patch side in pixels
    in_chans: int = 3  # image: input channels
    # audio
    conv_dim: int = 512  # audio: channels of the 7-layer waveform CNN (kernels/strides fixed, stride 320)
    conv_pos_depth: int = 5  # audio: layers of the convolutional positional encoder
    conv_pos_width: int = 95  # audio: positional conv kernel = max(3, conv_pos_width // conv_pos_depth)
    conv_pos_groups: int = 16  # audio: groups of the positional convs
    use_alibi: bool = False  # ALiBi attention bias with a learned per-head scale (audio)
    # text
    vocab_size: int = 50265  # text: embedding rows (the tokenizer must fit)
    max_positions: int = 512  # text: learned positions (longest sequence)
    # shared transformer
    embed_dim: int = 128  # D
    depth: int = 4  # main blocks; targets come from their FFN outputs
    prenet_depth: int = 0  # modality-specific blocks before the main blocks (never targets)
    num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    encoder_dropout: float = 0.0  # attention out-proj dropout
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the MLP
    post_mlp_dropout: float = 0.0  # on the FFN branch before the residual add
    prenet_dropout: float = 0.0  # after the input LayerNorm, before the prenet blocks
    layerdrop: float = 0.0  # whole-batch skip probability per main block (training only)
    num_extra_tokens: int = 1  # learned CLS tokens prepended after masking (image only; others: 0)
    # teacher sharing (spec §5): which student parts the EMA teacher copies
    ema_encoder_only: bool = False  # teacher = EMA main blocks only, fed the student's features (text)
    # teacher has its own EMA feature extractor (image) or reuses the student's (audio)
    ema_local_encoder: bool = True
    # how the step is computed (data2vec 2.0 defaults; the others are the ablation / data2vec 1.0 modes)
    # "sdpa" (fused scaled_dot_product_attention) | "eager" (softmax(q k^T) v, as the reference)
    attention: str = "sdpa"
    # student encodes kept tokens only; false: full length, masked tokens = learned embedding
    skip_masked: bool = True
    # "decoder" (2.0 conv decoder) | "linear" (data2vec 1.0: a Linear on the student's masked outputs)
    head: str = "decoder"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self, p: str, c: _Check) -> None:
        c.choice(f"{p}.modality", self.modality, modality_names())
        c.choice(f"{p}.attention", self.attention, ("sdpa", "eager"))
        c.choice(f"{p}.head", self.head, ("decoder", "linear"))
        if self.head == "linear" and self.skip_masked:
            c.fail(f"{p}.head: linear (data2vec 1.0) predicts from the full-length student's outputs: "
                   f"set {p}.skip_masked: false")
        # every key on its own first (the same bounds whatever the modality), then the keys it must fit
        ok = {k: c.at_least(f"{p}.{k}", getattr(self, k), 1)
              for k in ("image_size", "patch_size", "in_chans", "conv_dim", "conv_pos_width",
                        "conv_pos_groups", "embed_dim", "depth", "num_heads")}
        c.at_least(f"{p}.conv_pos_depth", self.conv_pos_depth, 0)
        c.at_least(f"{p}.vocab_size", self.vocab_size, 8)
        c.at_least(f"{p}.max_positions", self.max_positions, 2)
        c.at_least(f"{p}.prenet_depth", self.prenet_depth, 0)
        c.at_least(f"{p}.num_extra_tokens", self.num_extra_tokens, 0)
        c.positive(f"{p}.mlp_ratio", self.mlp_ratio)
        c.positive(f"{p}.norm_eps", self.norm_eps)
        for k in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout",
                  "prenet_dropout", "layerdrop"):
            c.range(f"{p}.{k}", getattr(self, k), 0.0, 1.0, hi_open=True)
        d = self.decoder
        d.validate(f"{p}.decoder", c)
        if ok["embed_dim"] and ok["num_heads"]:
            c.divisible(f"{p}.embed_dim", self.embed_dim, f"{p}.num_heads", self.num_heads)
        # the first decoder conv reads D channels
        if ok["embed_dim"] and self.head == "decoder" and d.groups >= 1:
            c.divisible(f"{p}.embed_dim", self.embed_dim, f"{p}.decoder.groups", d.groups)
    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(kw_only=True)
class MaskingConfig:
    mask_prob: float = 0.8  # fraction of tokens masked (inverse block masking keeps 1 - mask_prob)
    mask_length: int = 3  # block side
    mask_prob_adjust: float = 0.07  # inflates the number of block centres only
    clone_batch: int = 16  # M: masked copies per sample sharing one teacher pass

    def validate(self, p: str, c: _Check) -> None:
        # 0 masks nothing (no loss, NaN target statistics); the image check against the patch count is in
        # Config.validate
        c.range(f"{p}.mask_prob", self.mask_prob, 0.0, 1.0, lo_open=True, hi_open=True)
        c.at_least(f"{p}.mask_length", self.mask_length, 1)
        c.at_least(f"{p}.clone_batch", self.clone_batch, 1)
        c.range(f"{p}.mask_prob_adjust", self.mask_prob_adjust, 0.0, 1.0)
@dataclass(kw_only=True)
class ObjectiveConfig:
    average_top_k_layers: Optional[int] = None  # K: targets average the last K main blocks (null = all)
    instance_norm_target_layer: bool = True  # instance-norm each layer over tokens before averaging
    final_norm: str = "layer"  # norm of the average: "none" | "layer" | "instance"
    loss_beta: float = 0.0  # 0 = L2, > 0 = smooth L1 with this beta
    loss_scale: Optional[float] = None  # None = 1/sqrt(D)
    cls_loss: float = 0.01  # weight of the CLS regression onto the mean target
    decoder_noise_std: float = 0.01  # masked slots enter the decoder as N(0, std^2)
    min_target_var: float = 0.0  # collapse guard (0 = off): stop if target_var falls below
    min_pred_var: float = 0.0  # collapse guard (0 = off): stop if pred_var falls below
    collapse_check_after: int = 5000  # steps before the collapse guard is armed

    def validate(self, p: str, c: _Check) -> None:
        c.choice(f"{p}.final_norm", self.final_norm, ("none", "layer", "instance"))
        c.at_least(f"{p}.average_top_k_layers", self.average_top_k_layers, 1, null_ok=True)
        for k in ("loss_beta", "cls_loss", "decoder_noise_std", "min_target_var", "min_pred_var",
                  "collapse_check_after"):
            c.at_least(f"{p}.{k}", getattr(self, k), 0)
        c.positive(f"{p}.loss_scale", self.loss_scale, null_ok=True)
@dataclass(kw_only=True)
class EMAConfig:
    ema_start: float = 0.9998  # teacher decay at step 0
    ema_end: float = 0.99999  # decay reached at anneal_end_step (1.0 freezes the teacher)
    anneal_end_step: int = 100000  # linear ramp length in optimizer steps

    def validate(self, p: str, c: _Check) -> None:
        c.range(f"{p}.ema_start", self.ema_start, 0.0, 1.0)
        c.range(f"{p}.ema_end", self.ema_end, 0.0, 1.0)
        c.at_least(f"{p}.anneal_end_step", self.anneal_end_step, 0)
@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_1d: bool = False  # also decay biases and 1-D params (norms), as the reference audio base does
    warmup_steps: int = 50040  # linear warmup from 0, then cosine to min_lr
    min_lr: float = 0.0
    clip_norm: float = 4.0  # 0 = no clipping

    def validate(self, p: str, c: _Check) -> None:
        c.positive(f"{p}.lr", self.lr)
        for i, b in enumerate(self.betas):
            c.range(f"{p}.betas[{i}]", b, 0.0, 1.0, hi_open=True)
        c.positive(f"{p}.eps", self.eps)
        for k in ("weight_decay", "warmup_steps", "min_lr", "clip_norm"):
            c.at_least(f"{p}.{k}", getattr(self, k), 0)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 375300  # optimizer steps
    batch_size: int = 16  # samples per step (each expands to clone_batch masked views)
    seed: int = 0  # model init, data order, augmentation and masks
    precision: str = "fp32"  # "fp32" | "bf16" (targets, norms and losses stay fp32) | "fp16" (DeepSpeed, GPU)
    num_threads: int = 0  # torch intra-op threads (0 = torch default)
    out_dir: str = "runs/d2v"  # checkpoints, metrics.csv, loss-curve PNG
    log_every: int = 10  # steps between metric logs (the only host syncs)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)
    # also checkpoint once this many minutes passed since the last one (0 = off): bounds the work a
    # crash can lose when steps are slow; a SIGTERM/SIGINT always checkpoints before the run stops
    ckpt_every_minutes: float = 0.0
    # on --resume, accept a train.max_steps that moves the learning rate at the resume step (the cosine
    # schedule is a function of max_steps; without this such a resume is refused, naming the jump)
    allow_schedule_change: bool = False
    keep_last: int = 3  # checkpoints kept on disk
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    probe_after: bool = True  # run the linear probe when pretraining ends
    compile: bool = False  # torch.compile the step's forward + backward (single-process engine)
    compile_mode: str = "default"  # torch.compile mode: "default" | "max-autotune-no-cudagraphs"

    def validate(self, p: str, c: _Check) -> None:
        c.choice(f"{p}.precision", self.precision, ("fp32", "bf16", "fp16"))
        # CUDA-graph modes ("reduce-overhead", "max-autotune") are not offered: untested on a GPU, and
        # audio batches change length (a graph recorded per shape)
        c.choice(f"{p}.compile_mode", self.compile_mode, COMPILE_MODES)
        for k in ("max_steps", "batch_size", "log_every", "ckpt_every", "keep_last"):
            c.at_least(f"{p}.{k}", getattr(self, k), 1)
        c.at_least(f"{p}.seed", self.seed, 0)
        c.at_least(f"{p}.num_threads", self.num_threads, 0)
        c.at_least(f"{p}.ckpt_every_minutes", self.ckpt_every_minutes, 0)
@dataclass(kw_only=True)
class DataConfig:
    # image folder (class subfolders optional) | audio manifest (.tsv) or folder | text file or folder;
    # null = the modality's embedded default (digits / espeak-ng words / fortunes)
    path: Optional[str] = None
    crop_scale: tuple[float, float] = (0.2, 1.0)  # image: RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # image: RandomResizedCrop aspect range
    hflip: bool = True  # image: random horizontal flips
    # image: per-channel normalisation in 0..1 pixel units; null = the embedded data's own statistics
    # when data.path is null, else the ImageNet statistics (the reference's)
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    sample_rate: int = 16000  # audio: decode rate; files at other rates are resampled
    max_sample_size: Optional[int] = None  # audio: random crop of longer waveforms (samples); null = none
    min_sample_size: Optional[int] = None  # audio: skip shorter files (samples); null = one CNN frame (400)
    normalize: bool = True  # audio: per-utterance zero mean, unit variance
    tokenizer: Optional[str] = None  # text: tokenizer.json; null = the run's own (trained on data.path)
    # text: pretraining block length incl. <s>; null = model.max_positions
    tokens_per_sample: Optional[int] = None
    num_workers: int = 2  # DataLoader worker processes

    def validate(self, p: str, c: _Check) -> None:
        ok = [c.range(f"{p}.crop_scale[{i}]", v, 0.0, 1.0, lo_open=True)
              for i, v in enumerate(self.crop_scale)]
        if all(ok) and self.crop_scale[0] > self.crop_scale[1]:
            c.fail(f"{p}.crop_scale: expected 0 < lo <= hi <= 1, got {self.crop_scale}")
        ok = [c.positive(f"{p}.crop_ratio[{i}]", v) for i, v in enumerate(self.crop_ratio)]
        if all(ok) and self.crop_ratio[0] > self.crop_ratio[1]:
            c.fail(f"{p}.crop_ratio: expected 0 < lo <= hi, got {self.crop_ratio}")
        for i, v in enumerate(self.std or ()):
            c.positive(f"{p}.std[{i}]", v)
        c.at_least(f"{p}.num_workers", self.num_workers, 0)
        c.at_least(f"{p}.sample_rate", self.sample_rate, 1000)  # Hz
        c.at_least(f"{p}.max_sample_size", self.max_sample_size, 1, null_ok=True)
        c.at_least(f"{p}.min_sample_size", self.min_sample_size, 1, null_ok=True)
        c.at_least(f"{p}.tokens_per_sample", self.tokens_per_sample, 2, null_ok=True)
@dataclass(kw_only=True)
class ProbeConfig:
    pool: str = "mean"  # features: "mean" of final tokens (padding excluded) | "cls" output
    shots: int = 10  # labelled examples per class for the few-shot probe (the full probe also runs)
    seed: int = 0  # few-shot selection and validation split

    def validate(self, p: str, c: _Check) -> None:
        c.choice(f"{p}.pool", self.pool, ("mean", "cls"))
        c.at_least(f"{p}.shots", self.shots, 1)
        c.at_least(f"{p}.seed", self.seed, 0)
ENGINES = ("auto", "single", "deepspeed", "ddp", "fsdp2")
OPTIMIZERS = ("torch_adamw", "deepspeed_adam", "apex_fused_adam")


@dataclass(kw_only=True)
class EngineConfig:
    # "auto" = deepspeed when launched by the deepspeed launcher or torchrun (WORLD_SIZE/LOCAL_RANK set)
    name: str = "auto"  # "auto" | "single" | "deepspeed" | "ddp" | "fsdp2": the backend (d2v/backends/)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0 | 1 | 2 | 3
    grad_accum_steps: int = 1  # micro-batches of train.batch_size per rank per optimizer step
    activation_checkpointing: bool = False  # recompute each main block in the backward pass
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states and step on the CPU
    # "torch_adamw" (fused on GPU) | "deepspeed_adam" (fused/CPU) | "apex_fused_adam" (NVIDIA apex)
    optimizer: str = "torch_adamw"
    ds_config: Optional[str] = None  # DeepSpeed JSON: adds keys d2v does not derive (derived ones must agree)
    max_nonfinite_steps: int = 10  # stop after this many non-finite-loss steps in a row (each is skipped)
    # process-group timeout: a collective that waits this long for a dead or hung rank fails the run
    # (NCCL's async error handling is turned on, so this holds on GPUs too; it also bounds the wait for
    # all ranks to join at start-up); resume with --resume
    timeout_minutes: float = 10.0

    def validate(self, p: str, c: _Check) -> None:
        c.choice(f"{p}.name", self.name, ENGINES)
        c.choice(f"{p}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        c.choice(f"{p}.optimizer", self.optimizer, OPTIMIZERS)
        c.at_least(f"{p}.grad_accum_steps", self.grad_accum_steps, 1)
        c.at_least(f"{p}.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        c.positive(f"{p}.timeout_minutes", self.timeout_minutes)
        if self.offload_optimizer and self.zero_stage == 0:
            c.fail(f"{p}.offload_optimizer needs {p}.zero_stage >= 1 (DeepSpeed offloads "
                   f"only partitioned optimizer states)")
@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> "Config":
        """Check every key, then the keys that must fit each other; raise one ConfigError listing all."""
        c = _Check()
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name, c)
        if c.errors:  # the checks below assume each key is valid on its own
            raise ConfigError(*c.errors)
        m = self.model
        k = self.objective.average_top_k_layers
        if k is not None and k > m.depth:
            c.fail(f"objective.average_top_k_layers ({k}) exceeds model.depth ({m.depth})")
        if self.train.precision == "fp16" and self.engine.name in ("single", "ddp", "fsdp2"):
            c.fail(f"train.precision: fp16 (dynamic loss scaling) needs engine.name deepspeed or "
                   f"auto; the {self.engine.name} backend supports fp32 and bf16")
        if self.train.compile and self.engine.name in ("deepspeed", "ddp", "fsdp2"):
            label = "DeepSpeed engine" if self.engine.name == "deepspeed" else f"{self.engine.name} backend"
            c.fail(f"train.compile: the {label} does not compile the step (untested under its hooks); "
                   f"use engine.name=single or train.compile=false")
        if self.probe.pool == "cls" and m.num_extra_tokens == 0:
            c.fail("probe.pool: 'cls' needs a CLS token (model.num_extra_tokens >= 1, image "
                   "only); use probe.pool=mean")
        spec = get_modality(m.modality)
        self._refuse_foreign_keys(spec, c)
        if spec.check is not None:
            spec.check(self, c)
        if c.errors:
            raise ConfigError(*c.errors)
        return self

    def _refuse_foreign_keys(self, spec, c: _Check) -> None:
        """A key another modality owns, set away from its default, would be silently ignored: refuse it."""
        defaults = {"model": ModelConfig(), "data": DataConfig()}
        for other in map(get_modality, modality_names()):
            if other.name == spec.name:
                continue
            for sec, keys in (("model", other.model_keys), ("data", other.data_keys)):
                section = getattr(self, sec)
                for k in keys:
                    if getattr(section, k) != getattr(defaults[sec], k):
                        c.fail(f"{sec}.{k}: {getattr(section, k)!r} is set, but it is a {other.name} key and "
                               f"model.modality is {spec.name}, which ignores it; remove it")

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Defaults, then the modality's section defaults, then its flavor preset, then `d`."""
        d = dict(d or {})
        model = d.get("model")
        if model is not None and not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping of keys, got {model!r}")
        model = dict(model or {})
        modality = model.get("modality", ModelConfig().modality)
        if modality not in modality_names():
            raise ConfigError(f"model.modality: expected one of {list(modality_names())}, got {modality!r}")
        flavor = model.get("flavor", ModelConfig().flavor)
        d = deep_merge(modality_defaults(modality), d)
        try:
            preset = flavor_defaults(flavor, modality, key="model.flavor")
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        d["model"] = deep_merge(preset, model)
        errors: list[str] = []
        cfg = _build(cls, d, "", errors)
        if errors:  # unknown keys and wrong types, all of them, before the value checks
            raise ConfigError(*errors)
        return cfg.validate()


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        errors: list[str] = []
        out = _build(tp, value, key, errors)
        if errors:
            raise ConfigError(*errors)
        return out
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        x = _number(value)
        if isinstance(x, int):
            return x
        if isinstance(x, float) and x.is_integer():
            return int(x)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        x = _number(value)
        if x is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(x):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(x)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _number(value: Any) -> int | float | None:
    """An int or float from a YAML value, including strings such as '1e-3' (YAML 1.1 needs a dot in
    floats, so PyYAML reads 1e-3 as a string); None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _build(cls: type, d: dict, prefix: str, errors: list[str]) -> Any:
    """The dataclass `cls` from `d`; a bad key is added to `errors` and left at its default."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            where = f"'{prefix}'" if prefix else "the top level"
            errors.append(f"unknown config key '{key}'{hint}; valid keys in {where}: {', '.join(names)}")
            continue
        try:
            kwargs[k] = _coerce(hints[k], v, key)
        except ConfigError as e:
            errors.extend(e.errors)
    return cls(**kwargs)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, returning a new dict."""
    out = deep_merge({}, d or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


# keys that may differ between a checkpoint's config and the resuming run's (they change no numerics,
# except float rounding: train.num_threads and train.compile reorder reductions)
RESUME_MAY_CHANGE = {"train.max_steps", "train.log_every", "train.ckpt_every", "train.keep_last",
                     "train.ckpt_every_minutes", "train.allow_schedule_change", "engine.timeout_minutes",
                     "train.probe_after", "train.num_threads", "train.tensorboard", "train.out_dir",
                     "train.compile", "train.compile_mode",
                     "data.num_workers", "probe.pool", "probe.shots", "probe.seed",
                     "engine.ds_config", "engine.max_nonfinite_steps", "engine.activation_checkpointing",
                     "engine.name"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume_config(saved: dict, current: dict, ck) -> None:
    """Raise if `current` differs from the checkpoint's `saved` config in a key outside RESUME_MAY_CHANGE."""
    saved = {"engine": dataclasses.asdict(EngineConfig()), **saved}  # runs saved before engine.* existed
    a, b = flatten(saved), flatten(current)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUME_MAY_CHANGE)
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise ValueError(f"cannot resume from {ck}: the config differs in {shown}"
                         f"{' ...' if len(diff) > 5 else ''} (start a new train.out_dir instead)")


def check_weights_config(saved: dict, current: dict, ck) -> None:
    """Continued pretraining from a weights-only checkpoint (d2v import): the model section must be the
    checkpoint's (model.attention aside: a kernel choice); data, schedule and the rest are the run's."""
    a = {k: v for k, v in flatten(saved.get("model", {}), "model.").items() if k != "model.attention"}
    b = {k: v for k, v in flatten(current.get("model", {}), "model.").items() if k != "model.attention"}
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise ValueError(f"cannot continue from the weights in {ck}: the model differs in {shown}"
                         f"{' ...' if len(diff) > 5 else ''} (start from the config saved with them)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when path is None) and apply key=value overrides."""
    d: dict = {}
    if path is not None:
        from d2v.recipes import resolve_config_path

        try:
            p = resolve_config_path(str(path))  # a file, else a packaged recipe's name (tiny_image, ...)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    d = apply_overrides(d, overrides or [])
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise ConfigError(*e.errors, where=f"{path}: " if path is not None else "") from None
