"""Make the reference fixtures: what fairseq's own data2vec 2.0 code computes for three tiny models.

What it builds
--------------
One tiny `Data2VecMultiModel` (fairseq `examples/data2vec/models/data2vec2.py`, config
`Data2VecMultiConfig`, the reference implementation of data2vec 2.0) per modality -- image, audio,
text -- with the released base recipes (`examples/data2vec/config/v2/base_{images,audio,text}_only_task.yaml`)
shrunk to embed_dim 32, 2 heads, depth 2, clone_batch 2, every dropout 0 and mask_noise_std 0.
Every floating parameter of the student is perturbed with noise (0.05 * N(0, 1)), and the EMA teacher
is set to a *different* perturbation of the student (student + 0.02 * N(0, 1)), so that a swapped or
mis-mapped key in an importer changes the numbers. The image encoder's frozen 2-D sin-cos table is
left as the reference makes it. Each model then runs one training forward (through fairseq's own
`ModelCriterion`, as fairseq's trainer does) and one backward on a fixed batch of 2 samples with a
fixed mask (passed as `precomputed_mask`, the path the reference's datasets use), and what the
reference computed is saved. The reference's code is run as it is: intermediate tensors are read with
forward hooks and by wrapping `make_targets` to record its return value; no math is changed.

CI never runs this script: it needs the reference (fairseq) and its dependencies, which the project
does not install. CI only reads the files it wrote (plain dicts of tensors; no fairseq or omegaconf
needed to load them).

Files written to --out (default tests/fixtures), per fixture m in image, audio, text, text_prenet
-----------------------------------------------------------------------------------------------
(text_prenet: the text model with one prenet block, whose input LayerNorm the released text config,
without a prenet, does not have)
reference_{m}_checkpoint.pt
    A dict shaped like the file fairseq's `checkpoint_utils.save_checkpoint` writes (trainer.state_dict()
    plus extra_state): "args" (None), "cfg" (the whole run config as a plain dict, as
    `OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)`; "cfg"["model"] is the model section
    with `modalities.<m>`), "model" (the student's `state_dict()`, an OrderedDict, with the EMA teacher's
    fp32 parameters under its "_ema" key, as the reference saves them), "criterion" (None),
    "optimizer_history" ([{criterion_name, optimizer_name, lr_scheduler_state, num_updates: 7}]: the
    step counter is optimizer_history[-1]["num_updates"]), "task_state" ({}), "extra_state"
    ({metrics: {}, previous_training_time, train_iterator, val_loss}). No "last_optimizer_state": no
    optimizer ever ran. The weights are the ones the forward below used.
reference_{m}_io.pt
    "source"       the input: image (2, 3, 32, 32) float32; audio (2, 8000) float32; text (2, 12) int64
    "mask"         bool (B*M, T), True = masked, the mask every clone row used; rows sample-major
                   (rows 0..M-1 are sample 0's M=2 clones), same count masked in each row
    "ids_keep"     int64 (B*M, K): the positions the student kept, in the order it keeps them
    "targets"      float32 (B, T, D): the teacher's targets before the per-clone repeat (the return value
                   of the reference's `make_targets`: the average of the top-K instance-normed FFN outputs,
                   then the final layer norm where the recipe has layer_norm_targets; extra tokens removed)
    "encoder_out"  float32 (B*M, E + K, D): the student's output of its last main block; E extra (CLS)
                   tokens first, then the K kept tokens in "ids_keep" order. That order is the
                   reference's `mask.argsort(dim=1)` (an unstable sort): ascending here for image (T=16)
                   and text (T=12), scrambled for audio (T=24) -- reorder by ids_keep before comparing
    "decoder_in"   float32 (B*M, T, D): the decoder's input: encoder_out without its extra tokens, put back
                   at the kept positions (ids_restore), exactly 0 at the masked ones (mask_noise_std 0)
    "decoder_out"  float32 (B*M, T, D): the decoder's output at every position (before the masked ones
                   are selected)
    "losses"       {reference loss name: float64 tensor exactly as the model returned it (per element,
                   unreduced)}, plus "sample_size" (float64 scalar: the number of masked tokens)
    "loss"         float64 scalar: what fairseq's ModelCriterion backprops: the sum over the loss terms of
                   term.float().sum() (no loss_weights; not divided by sample_size -- fairseq's trainer
                   divides the gradients by sample_size later, before the optimizer step)
    "grads"        {student state_dict key: gradient (float32)} for every student parameter that got a
                   gradient from backward() of "loss"
    "logs"         the model's logged scalars (pred_var, target_var, masked_pct, ema_decay), float64
    "num_updates", "notes" (how each tensor was captured), "versions"
reference_text_dict.txt
    The text model's vocabulary in fairseq dict.txt format (one "symbol count" a line, specials not
    listed). The reference's masked_lm task loads it into a Dictionary (<s>=0 <pad>=1 </s>=2 <unk>=3, then
    these symbols from id 4) and appends "<mask>" as the last id.

How to set up the reference venv and regenerate (never install any of this into the project's .venv)
-----------------------------------------------------------------------------------------------
    python3.11 -m venv ref_venv
    # torch must be the CPU build of 2.13.0 (torch.version.cuda is None): never a bare `torch`
    ref_venv/bin/pip install torch==2.13.0 numpy==2.4.6
    ref_venv/bin/pip install omegaconf==2.3.0 hydra-core==1.3.2 regex sacrebleu tqdm bitarray \
        packaging cffi pyyaml huggingface_hub safetensors scikit-learn pillow
    # timm (the reference's Mlp, DropPath, PatchEmbed) imports torchvision; --no-deps keeps them from
    # replacing the CPU torch
    ref_venv/bin/pip install --no-deps timm==1.0.31 torchvision==0.28.0
    ref_venv/bin/python tools/make_reference_fixtures.py --out tests/fixtures   # ~1 min

The script fetches the reference itself: `pip download --no-deps --no-binary :all: --no-build-isolation
fairseq-fixed==0.12.3.1` (the PyPI sdist whose `examples/data2vec` files are upstream fairseq's, after
CRLF -> LF) into --cache (default ~/.cache/d2v-reference), unpacks it and patches the unpacked copy,
never building or installing it. The patches, all mechanical (see `patch_reference_tree`):
  * layout: the sdist keeps the examples under fairseq/examples, while data2vec imports `examples.*`:
    the top-level examples/ (only a C++ file) is replaced by a link to fairseq/examples;
  * examples/data2vec/**.py: CRLF -> LF, and dataclass fields whose default is a config *instance*
    (`x: Cfg = Cfg()`, which Python 3.11 rejects as a mutable default; 3.10 accepted it) become
    `dataclasses.field(default_factory=Cfg)` -- the same default, made per instance;
  * models/mae.py: `np.float` (removed in numpy 1.24) becomes `float`, which is what it aliased.
At import time the `torchvision::nms` and `torchvision::qnms` op schemas are defined before timm
imports torchvision, whose compiled ops do not load beside the CPU torch; no torchvision op is called.

The run is deterministic (fixed seeds, one thread): running it twice writes identical files.

Checking `d2v export --format fairseq` output against the reference (--check-export)
-------------------------------------------------------------------------------------
    d2v export --checkpoint RUN_DIR --format fairseq --out /tmp/exports/image.pt   # project venv
    ref_venv/bin/python tools/make_reference_fixtures.py --check-export /tmp/exports/*.pt

With --check-export no fixtures are written: each FILE (a fairseq-layout checkpoint: "cfg" with "model",
"task", "common", "optimization", "optimizer", "lr_scheduler" sections; "model", the student's state dict
with the EMA teacher under "_ema"; "optimizer_history"[-1]["num_updates"]) is loaded into the reference
the way fairseq loads a checkpoint, one file at a time, and must pass every step:
  1. config: cfg is made an OmegaConf config as `checkpoint_utils.load_checkpoint_to_cpu` does, and
     cfg["model"] is merged into `OmegaConf.structured(Data2VecMultiConfig)` *strictly*: a field name the
     dataclass lacks, or a value it rejects (null for an int, a bad enum), is an error naming the field
     (fairseq itself would drop an unknown name silently). The merged config is parented to the file's
     cfg, as fairseq's `merge_with_parent` does, so that ${optimization.max_update}, ${common.seed},
     ${model.num_heads}, ${model.depth} resolve from the file's own sections; every value of the model
     section and of its modality must then resolve. `_name` must be "data2vec_multi" and
     `supported_modality` must name a modality that `modalities` holds (d2v writes only that one; the
     reference's own checkpoints hold all three, and the reference builds only supported_modality's).
  2. model: built through fairseq's model registry (`fairseq.models.build_model`, what
     `task.build_model(cfg.model)` calls), for that one modality. Text gets a `MaskedLMTask` whose
     Dictionary has exactly as many symbols as the checkpoint's embedding rows
     (modality_encoders.TEXT.local_encoder.embed_tokens.weight: 4 specials + n symbols + "<mask>" last).
  3. weights: `model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)`, as
     `checkpoint_utils.load_model_ensemble_and_task` does. The reference's `_load_from_state_dict` hands
     "_ema" to `EMAModule.restore`, which loads the teacher with strict=False, so the teacher's keys and
     shapes are compared separately (missing/unexpected/mismatched names are errors), and after loading
     both the teacher module and its fp32 copy (`ema.fp32_params`, what the reference saves) must equal
     the file's "_ema" tensors, and the student the file's. The step counter is then set with
     `model.set_num_updates(num_updates)` as fairseq's trainer does on resume (in eval mode, so that it
     never takes an EMA step).
  4. one train-mode forward through fairseq's `ModelCriterion` (no backward) on a small random input:
     image (1, in_chans, input_size, input_size), audio (1, 16000), text (1, 10) ids in [4, <mask>);
     the loss must be finite.
It prints one line per file, "PASS FILE: ..." or "FAIL FILE: <every error, naming the field or key>",
with details indented below it (where interpolated fields came from, full key lists), and exits 1 if
any file fails. A FAIL caused by the export is for d2v's exporter (or model) to fix, not this script.
The reference's own checkpoints (the reference_{m}_checkpoint.pt this script writes) pass this check.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SDIST_REQ = "fairseq-fixed==0.12.3.1"
SDIST_FILE = "fairseq_fixed-0.12.3.1.tar.gz"
SDIST_SHA256 = "c607577a54ab30e2ee0f0b0a754ea5cdbc6ad0a9f99a1726638a2201445bc1cc"
TREE_NAME = "fairseq-fixed-0.12.3.1"
PATCH_VERSION = "2"  # bump when patch_reference_tree changes: the cached tree is then rebuilt

BATCH = 2  # samples per batch
CLONES = 2  # clone_batch (M)
NUM_UPDATES = 7  # step counter written to the checkpoint
STUDENT_NOISE = 0.05
TEACHER_NOISE = 0.02


# --------------------------------------------------------------------------- the reference's code


def fetch_reference(cache: Path) -> Path:
    """Download (once) the fairseq-fixed sdist, unpack and patch it; return the tree to put on sys.path."""
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / TREE_NAME
    marker = tree / ".d2v_patched"
    if marker.exists() and marker.read_text().strip() == PATCH_VERSION:
        return tree
    tarball = cache / SDIST_FILE
    if not tarball.exists():
        # --no-build-isolation: pip only reads the sdist's metadata, and an isolated build env would
        # pull a CUDA torch; nothing is built or installed
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", SDIST_REQ, "-d", str(cache)],
            check=True,
        )
    if sha256(tarball) != SDIST_SHA256:
        raise SystemExit(f"{tarball}: sha256 is not {SDIST_SHA256}; delete it to download it again")
    if tree.exists():
        shutil.rmtree(tree)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        (Path(tmp) / "fairseq_fixed-0.12.3.1").rename(tree)
    patch_reference_tree(tree)
    marker.write_text(PATCH_VERSION + "\n")
    return tree


# `    name: SomeConfig = SomeConfig()` (also `Optional[SomeConfig]`) -> a default_factory field
_INSTANCE_DEFAULT = re.compile(r"^([ \t]+\w+: [\w\[\]\.]+) = ([A-Z]\w*)\(\)[ \t]*$", re.M)


def patch_reference_tree(tree: Path) -> None:
    # data2vec imports `examples.data2vec...`; in this sdist the examples live in fairseq/examples
    top = tree / "examples"
    if top.is_symlink() or top.is_file():
        top.unlink()
    elif top.exists():
        shutil.rmtree(top)
    top.symlink_to(Path("fairseq") / "examples", target_is_directory=True)

    d2v_dir = tree / "fairseq" / "examples" / "data2vec"
    for py in sorted(d2v_dir.rglob("*.py")):
        text = py.read_bytes().decode("utf-8").replace("\r\n", "\n")
        text, n = _INSTANCE_DEFAULT.subn(r"\1 = dataclasses.field(default_factory=\2)", text)
        if n:
            text = "import dataclasses  # d2v patch: default_factory for config-instance defaults\n" + text
        if py.name == "mae.py":
            text = text.replace("dtype=np.float)", "dtype=float)")  # np.float was an alias of float
        py.write_bytes(text.encode("utf-8"))


def import_reference(tree: Path):
    """Put the patched tree on sys.path and import what we use from the reference."""
    import torch

    # torchvision's compiled ops do not load beside the CPU torch, and its Python part needs their
    # schemas to register fake kernels; define the schemas (no implementation: never called)
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        import_reference._tv_lib = lib  # keep the library alive
    sys.path.insert(0, str(tree))
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths
    logging.disable(logging.WARNING)  # fairseq logs optional-dependency notes at import

    from examples.data2vec.models import data2vec2
    from examples.data2vec.tasks.mae_image_pretraining import MaeImagePretrainingConfig
    from fairseq import models as fairseq_models
    from fairseq import utils as fairseq_utils
    from fairseq.criterions.model_criterion import ModelCriterion
    from fairseq.data import Dictionary
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
    from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask
    from omegaconf import OmegaConf

    ns = argparse.Namespace(
        OmegaConf=OmegaConf, data2vec2=data2vec2, ModelCriterion=ModelCriterion, Dictionary=Dictionary,
        FairseqConfig=FairseqConfig, MaskedLMTask=MaskedLMTask, fairseq_utils=fairseq_utils,
        fairseq_models=fairseq_models, merge_with_parent=merge_with_parent,
        task_configs={"image": MaeImagePretrainingConfig, "audio": AudioPretrainingConfig,
                      "text": MaskedLMConfig},
    )
    return ns


# --------------------------------------------------------------------------- configs

RECIPE_FILE = {"image": "base_images_only_task.yaml", "audio": "base_audio_only_task.yaml",
               "text": "base_text_only_task.yaml"}
TASK_NAME = {"image": "mae_image_pretraining", "audio": "audio_pretraining", "text": "masked_lm"}
OPTIMIZER_NAME = {"image": "FairseqCompositeOptimizer", "audio": "FairseqAdam",
                  "text": "FairseqCompositeOptimizer"}

# model fields shared by the three tiny models (everything else: the recipe's values)
TINY_MODEL = dict(
    embed_dim=32, num_heads=2, depth=2, mlp_ratio=4.0, average_top_k_layers=2, clone_batch=CLONES,
    encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0, activation_dropout=0.0,
    dropout_input=0.0, layerdrop=0.0, start_drop_path_rate=0.0, end_drop_path_rate=0.0,
)
TINY_DECODER = dict(decoder_dim=16, decoder_layers=2, decoder_kernel=3, decoder_groups=4, input_dropout=0.0)
TINY_MODALITY = dict(
    model_depth=2, mask_noise_std=0.0, prenet_dropout=0.0, prenet_layerdrop=0.0,
    start_drop_path_rate=0.0, end_drop_path_rate=0.0, decoder=TINY_DECODER,
)
TINY_PER_MODALITY = {
    "image": dict(input_size=32, patch_size=8, in_chans=3, embed_dim=32, prenet_depth=1, num_extra_tokens=1),
    "audio": dict(
        feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32,2,2)] + [(32,2,2)]",
        conv_pos_depth=2, conv_pos_width=8, conv_pos_groups=4, num_alibi_heads=2, prenet_depth=0,
        use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_head=True,
    ),
    "text": dict(max_source_positions=16, dropout=0.0),
}


def build_run_config(ref, tree: Path, modality: str, variant: dict | None = None):
    """The whole run config, as fairseq composes it: FairseqConfig + the recipe yaml + the tiny overrides
    (+ `variant`, more modality fields)."""
    OmegaConf = ref.OmegaConf
    recipes = tree / "fairseq" / "examples" / "data2vec" / "config" / "v2"
    recipe = OmegaConf.load(recipes / RECIPE_FILE[modality])
    recipe = OmegaConf.to_container(recipe, resolve=False)
    recipe["common"].pop("user_dir", None)  # ${env:PWD}/examples/data2vec: not needed here
    recipe["common"]["fp16"] = False  # this run is fp32 on CPU
    recipe["dataset"]["batch_size"] = BATCH
    recipe["distributed_training"]["distributed_world_size"] = 1
    recipe["task"]["data"] = "."  # no data is read; the text vocabulary is reference_text_dict.txt
    if modality == "image":
        recipe["task"]["input_size"] = 32
        recipe["task"]["local_cache_path"] = None
    if modality == "audio":
        recipe["task"]["min_sample_size"] = 8000
    if modality == "text":
        recipe["task"]["tokens_per_sample"] = 12

    root = OmegaConf.structured(ref.FairseqConfig)
    root.model = OmegaConf.structured(ref.data2vec2.Data2VecMultiConfig)
    root.task = OmegaConf.structured(ref.task_configs[modality])
    root = OmegaConf.merge(root, {k: v for k, v in recipe.items() if k != "model"})

    model = dict(recipe["model"])
    model.update(TINY_MODEL)
    mods = model.pop("modalities")
    mod = dict(mods[modality])
    mod.update(TINY_MODALITY)
    mod.update(TINY_PER_MODALITY[modality])
    mod.update(variant or {})
    mod["decoder"] = {**mods[modality].get("decoder", {}), **TINY_DECODER}
    model["modalities"] = {modality: mod}
    root = OmegaConf.merge(root, {"model": model})
    return root


# --------------------------------------------------------------------------- inputs and masks


def fixed_mask(rows: int, length: int, n_masked: int, seed: int):
    """bool (rows, length), True = masked, exactly n_masked per row, from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        mask[r, torch.randperm(length, generator=g)[:n_masked]] = True
    return mask


def make_text_dictionary(ref, out_dir: Path):
    """A 40-symbol vocabulary written in dict.txt format, loaded back the way the masked_lm task does."""
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
             "but have an they you were her she there been one all we their has").split()
    assert len(words) == 40 and len(set(words)) == 40
    d = ref.Dictionary()
    for i, w in enumerate(words):
        d.add_symbol(w, n=1000 - 20 * i)
    path = out_dir / "reference_text_dict.txt"
    d.save(str(path))  # "symbol count" lines, specials omitted
    return ref.Dictionary.load(str(path))


# --------------------------------------------------------------------------- one reference step


def perturb_(model, teacher_key_to_student_key, frozen_keys, seed: int) -> None:
    """Student: p += 0.05 * N(0, 1) for every floating param/buffer (frozen sin-cos table excepted).
    Teacher: set to (perturbed student) + 0.02 * N(0, 1), through the reference's own EMAModule.restore."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and name not in frozen_keys:
                t.add_(STUDENT_NOISE * torch.randn(t.shape, generator=g))
        student = model.state_dict()
        teacher = collections.OrderedDict()
        for k, v in model.ema.fp32_params.items():
            base = student[teacher_key_to_student_key(k)]
            assert base.shape == v.shape, k
            if base.is_floating_point() and teacher_key_to_student_key(k) not in frozen_keys:
                teacher[k] = base + TEACHER_NOISE * torch.randn(base.shape, generator=g)
            else:
                teacher[k] = base.clone()
        model.ema.restore(teacher, build_fp32_params=True)
        # the teacher's module (what forward runs) and its fp32 copy (what state_dict saves) agree
        used = model.ema.model.state_dict()
        assert set(used) == set(teacher), (set(used) ^ set(teacher))
        for k, v in teacher.items():
            assert torch.equal(used[k], v) and torch.equal(model.ema.fp32_params[k], v), k


def run_reference(ref, root, modality: str, source, mask, task=None, seed: int = 0):
    """Build the model, perturb it, run one forward/backward through fairseq's ModelCriterion."""
    import torch

    d2v = ref.data2vec2
    torch.manual_seed(seed)
    model = d2v.Data2VecMultiModel.build_model(root.model, task)
    model.train()
    mode = modality.upper()
    enc = model.modality_encoders[mode]
    assert model.ema is not None

    ema_encoder_only = bool(root.model.ema_encoder_only)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    to_student = (lambda k: "blocks." + k) if ema_encoder_only else (lambda k: k)
    perturb_(model, to_student, frozen, seed + 1)
    model.num_updates = NUM_UPDATES  # no effect on this forward (masks are precomputed); as at step 7

    state_before = {k: v.clone() for k, v in model.state_dict().items() if k != "_ema"}

    rec = {}

    def keep(name, pick):
        def hook(module, inputs, output):  # a forward hook that returns None leaves the output as is
            if name not in rec:
                rec[name] = pick(output)
        return hook

    hooks = [
        # the student's modality encoder: its output carries the MaskInfo (mask, ids_keep, ids_restore)
        enc.register_forward_hook(keep("encoder_mask", lambda o: o["encoder_mask"])),
        # the student's last main block returns (x, ffn_out): x is the encoder output
        model.blocks[-1].register_forward_hook(keep("encoder_out", lambda o: o[0].detach().clone())),
        enc.decoder.register_forward_hook(keep("decoder_out", lambda o: o.detach().clone())),
        # the decoder's input (x, mask_info): x is the encoder output put back in place, zeros at masked slots
        enc.decoder.register_forward_pre_hook(
            lambda m, inputs: keep("decoder_in", lambda o: o.detach().clone())(m, None, inputs[0])),
        model.register_forward_hook(keep("net_output", lambda o: o)),
    ]
    # record make_targets' return value (the targets before the per-clone repeat); its math is untouched
    make_targets = model.make_targets

    def recording_make_targets(y, num_layers):
        out = make_targets(y, num_layers)
        rec["targets"] = out.detach().clone()
        return out

    model.make_targets = recording_make_targets

    criterion = ref.ModelCriterion(task, loss_weights={}, log_keys=[])
    sample = {"id": torch.arange(source.size(0)),
              "net_input": {"source": source, "precomputed_mask": mask}}
    loss, sample_size, _ = criterion(model, sample)
    loss.backward()
    for h in hooks:
        h.remove()
    del model.make_targets

    net = rec["net_output"]
    mi = rec["encoder_mask"]
    used_mask = mi.mask.bool()
    assert torch.equal(used_mask, mask), "the reference did not use the precomputed mask as given"
    assert torch.all(rec["decoder_in"][used_mask] == 0), "decoder input at masked slots is not 0"
    total = sum(v.float().sum() for v in net["losses"].values())
    assert torch.equal(total, loss), (total, loss)
    for k, v in model.state_dict().items():
        if k != "_ema":
            assert torch.equal(v, state_before[k]), f"{k} changed during the step"

    io = {
        "source": source,
        "mask": used_mask.clone(),
        "ids_keep": mi.ids_keep[..., 0].clone(),
        "targets": rec["targets"],
        "encoder_out": rec["encoder_out"],
        "decoder_in": rec["decoder_in"],
        "decoder_out": rec["decoder_out"],
        "losses": {k: v.detach().double() for k, v in net["losses"].items()},
        "loss": loss.detach().double(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        "logs": {k: torch.as_tensor(net[k]).detach().double()
                 for k in net if k.startswith(("pred_var", "target_var", "masked_pct", "ema_decay"))},
        "num_updates": NUM_UPDATES,
    }
    io["losses"]["sample_size"] = torch.as_tensor(sample_size).double()
    return model, io


def checkpoint_dict(ref, root, model, modality: str) -> dict:
    """What fairseq's trainer.state_dict() + save_checkpoint's extra_state would write."""
    OmegaConf = ref.OmegaConf
    cfg = OmegaConf.to_container(root, resolve=True, enum_to_str=True)
    state = ref.fairseq_utils.move_to_cpu(model.state_dict())
    # detach from the live model (the teacher's fp32 copy shares storage with the teacher module)
    state = ref.fairseq_utils.apply_to_sample(lambda t: t.detach().clone(), state)
    return {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": [{
            "criterion_name": "ModelCriterion",
            "optimizer_name": OPTIMIZER_NAME[modality],
            # a cosine scheduler's state; under the composite optimizer, one per parameter group
            "lr_scheduler_state": {"best": None} if modality == "audio" else {"default": {"best": None}},
            "num_updates": NUM_UPDATES,
        }],
        "task_state": {},
        "extra_state": {
            "metrics": {},
            "previous_training_time": 0.0,
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": NUM_UPDATES, "shuffle": True},
            "val_loss": None,
        },
    }


# --------------------------------------------------------------------------- per modality


def make_image(ref, tree, out_dir: Path):
    import torch

    root = build_run_config(ref, tree, "image")
    g = torch.Generator().manual_seed(101)
    source = torch.randn(BATCH, 3, 32, 32, generator=g)  # (B, 3, 32, 32)
    mask = fixed_mask(BATCH * CLONES, 16, 10, seed=102)  # (B*M, 16 patches), 10 masked per row
    model, io = run_reference(ref, root, "image", source, mask, seed=103)
    io["notes"] = NOTES + (
        " Image: 4x4 = 16 patches of 8x8, row-major over the patch grid; one extra (CLS) token; "
        "precomputed_mask goes to ImageEncoder.compute_mask (mask_length 3 > 1 path), as the image "
        "dataset's precomputed masks do. The frozen sin-cos table "
        "(modality_encoders.IMAGE.fixed_positional_encoder.positions) was not perturbed.")
    return root, model, io


def make_audio(ref, tree, out_dir: Path):
    import torch

    root = build_run_config(ref, tree, "audio")
    g = torch.Generator().manual_seed(201)
    source = torch.randn(BATCH, 8000, generator=g)  # (B, L) waveform, no padding
    # the CNN's frame count: 8000 -> 1599 -> 799 -> 399 -> 199 -> 99 -> 49 -> 24
    T = 8000
    for _, k, s in eval(root.model.modalities.audio.feature_encoder_spec):
        T = (T - k) // s + 1
    mask = fixed_mask(BATCH * CLONES, T, T // 2, seed=202)  # (B*M, T), half masked per row
    model, io = run_reference(ref, root, "audio", source, mask, seed=203)
    io["notes"] = NOTES + (
        f" Audio: T = {T} frames; precomputed_mask goes to ModalitySpecificEncoder.compute_mask, which "
        "also zeroes the masked frames before the conv positional encoder (encoder_zero_mask). "
        "The teacher reuses the student's CNN + project_features output (ema_local_encoder false) and "
        "runs its own conv positions, alibi scale and prenet LayerNorm.")
    return root, model, io


def make_text(ref, tree, out_dir: Path, prenet_depth: int = 0):
    """The text fixture; with `prenet_depth` > 0 (variant text_prenet) the reference adds an input
    LayerNorm before the prenet blocks (none in the released config, which has no prenet)."""
    import torch

    root = build_run_config(ref, tree, "text", {"prenet_depth": prenet_depth})
    dictionary = make_text_dictionary(ref, out_dir)
    task = ref.MaskedLMTask(root.task, dictionary=dictionary)  # adds "<mask>" as the last symbol
    g = torch.Generator().manual_seed(301)
    n_plain = len(dictionary) - 1  # ids 4 .. n_plain-1 are the 40 words; the last id is <mask>
    source = torch.randint(4, n_plain, (BATCH, 12), generator=g)  # (B, T) int64, no padding
    mask = fixed_mask(BATCH * CLONES, 12, 6, seed=302)  # (B*M, 12), 6 masked per row
    model, io = run_reference(ref, root, "text", source, mask, task=task, seed=303)
    io["vocab"] = list(dictionary.symbols)
    io["notes"] = NOTES + (
        f" Text: vocab {len(dictionary)} = 4 specials + 40 words (reference_text_dict.txt) + <mask>; "
        "learned positions with padding_idx 1, so token t (0-based) reads embed_positions row t + 2; "
        "no padding_mask was passed (no padding). ema_encoder_only: the teacher is model.blocks alone "
        "(its _ema keys lack the 'blocks.' prefix) and reads the student's token embedding + "
        "embedding LayerNorm output.")
    return root, model, io


# fixture name -> maker; text_prenet: the text model with one prenet block (and its input LayerNorm)
MAKERS = {"image": make_image, "audio": make_audio, "text": make_text,
          "text_prenet": lambda ref, tree, out_dir: make_text(ref, tree, out_dir, prenet_depth=1)}

NOTES = (
    "Captured from fairseq's own data2vec2.py (fairseq-fixed 0.12.3.1 sdist) on CPU fp32, model.train(), "
    "every dropout 0, mask_noise_std 0 (decoder inputs at masked slots are exactly 0). The loss came from "
    "fairseq's ModelCriterion(model, sample) with sample['net_input'] = {source, precomputed_mask}; mask: "
    "the MaskInfo returned by the student's modality encoder (forward hook); ids_keep: MaskInfo.ids_keep; "
    "encoder_out: forward hook on model.blocks[-1] (output[0]); decoder_out: forward hook on the modality "
    "encoder's decoder, decoder_in: a forward pre-hook on it (inputs[0]); targets: the return value of "
    "model.make_targets (wrapped to record it); losses and logs: the model's returned dict; grads: p.grad "
    "after loss.backward(). encoder_out rows hold the kept tokens in ids_keep order, which is "
    "mask.argsort(dim=1) (not stable) as the reference's make_maskinfo takes it: compare after "
    "reordering by ids_keep, not by assuming ascending positions."
)


# --------------------------------------------------------------------------- saving and checks


def plain_check(obj, where="") -> None:
    """Everything saved must load without fairseq/omegaconf: tensors and plain python values only."""
    import torch

    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, int, float, bool)):
        return
    if isinstance(obj, dict):  # dict and OrderedDict
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            plain_check(v, f"{where}/{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            plain_check(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj)} is not a plain type")


def save(obj, path: Path) -> None:
    import torch

    plain_check(obj, path.name)
    torch.save(obj, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- checking `d2v export` output

EXPORT_SECTIONS = ("model", "task", "common", "optimization", "optimizer", "lr_scheduler")
EMBED_TOKENS = "modality_encoders.TEXT.local_encoder.embed_tokens.weight"
# interpolated fields of Data2VecMultiConfig: where their value comes from when the model section omits them
INTERPOLATED = {"ema_anneal_end_step": "optimization.max_update", "max_update": "optimization.max_update",
                "seed": "common.seed"}


class _Abort(Exception):
    """The check cannot go on (what failed is already in the error list)."""


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _first_line(e: BaseException) -> str:
    msg = str(getattr(e, "msg", None) or e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _where(e: BaseException) -> str:
    """The source line that raised e (for an exception without a message, such as a bare assert)."""
    import traceback

    tb = traceback.extract_tb(e.__traceback__)[-1]
    return f"{tb.line} ({Path(tb.filename).name}:{tb.lineno})"


def strict_model_config(ref, model_section: dict, errors: list):
    """cfg["model"] merged into OmegaConf.structured(Data2VecMultiConfig) strictly: every field name the
    dataclass does not have, and every value it rejects, is an error naming the field. (fairseq's own
    checkpoint loading would drop unknown names silently: merge_with_parent(..., remove_missing=True).)
    The offending entry is removed and the merge retried, so that all of them are reported at once."""
    import copy

    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    OmegaConf = ref.OmegaConf
    data = copy.deepcopy(model_section)
    for _ in range(10_000):
        try:
            return OmegaConf.merge(OmegaConf.structured(ref.data2vec2.Data2VecMultiConfig), data)
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", "") or "")
            what = "unknown field" if isinstance(e, ConfigKeyError) else "value rejected"
            errors.append(f"cfg.model.{key or '?'}: {what} ({_first_line(e)})")
            parts = key.split(".")
            node = data
            try:
                for part in parts[:-1]:
                    node = node[part]
                del node[parts[-1]]
            except (KeyError, TypeError):
                return None
    return None


def _config_read_errors(OmegaConf, node, prefix: str, errors: list, skip=()) -> None:
    """Read every value (resolving interpolations such as ${optimization.max_update} against the file's
    own sections): one that does not resolve, or a mandatory value (???) left unset, is an error."""
    from omegaconf.errors import OmegaConfBaseException

    for key in node.keys():
        if key in skip:
            continue
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            errors.append(f"{prefix}{key}: {_first_line(e)}")
            continue
        if OmegaConf.is_dict(value):
            _config_read_errors(OmegaConf, value, f"{prefix}{key}.", errors)


def _check_export(ref, path: Path, errors: list, details: list) -> str:
    """The steps of one --check-export file; returns the PASS summary. Errors go to `errors`."""
    import numpy as np
    import torch

    OmegaConf = ref.OmegaConf
    d2v = ref.data2vec2

    # ---- the file, loaded as fairseq's load_checkpoint_to_cpu does (torch.load to CPU)
    if not path.is_file():
        errors.append("no such file")
        raise _Abort
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a reason to fail: fairseq 0.12's torch loaded with weights_only=False
        details.append(f"note: torch.load(weights_only=True) refused it ({_first_line(e)}); "
                       "loaded with weights_only=False")
        state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        errors.append(f"the file holds a {type(state).__name__}, not a dict")
        raise _Abort
    for key in ("cfg", "model", "optimizer_history"):
        if key not in state:
            errors.append(f'no top-level "{key}"')
    if errors:
        raise _Abort
    cfg = state["cfg"]
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(cfg, dict):
        errors.append(f'"cfg" is a {type(cfg).__name__}, not a dict')
        raise _Abort
    for sec in EXPORT_SECTIONS:
        if sec not in cfg:
            errors.append(f'cfg has no "{sec}" section')
        elif sec in ("model", "task") and not isinstance(cfg[sec], dict):  # the rest: any value
            errors.append(f'cfg["{sec}"] is a {type(cfg[sec]).__name__}, not a dict')
    if not isinstance(cfg.get("model"), dict):
        raise _Abort
    model_section = cfg["model"]

    # ---- which model, which modality (the reference builds the encoder of supported_modality alone;
    # without it, all three)
    name = model_section.get("_name")
    if ref.fairseq_models.MODEL_REGISTRY.get("data2vec_multi") is not d2v.Data2VecMultiModel:
        raise RuntimeError("the reference did not register Data2VecMultiModel as data2vec_multi")
    if name != "data2vec_multi":
        errors.append(f'cfg.model._name is {name!r}: the reference registers Data2VecMultiModel as '
                      f'"data2vec_multi"')
        raise _Abort
    mods = model_section.get("modalities")
    mods = sorted(k for k in mods if k != "_name") if isinstance(mods, dict) else []
    supported = model_section.get("supported_modality")
    modality = str(supported).lower()
    if supported is None:
        errors.append("cfg.model.supported_modality is not set: the reference would build all three "
                      "modality encoders")
        raise _Abort
    if modality not in mods:
        errors.append(f"cfg.model.supported_modality is {supported!r} but cfg.model.modalities has no "
                      f"{modality!r} (it has {mods})")
        raise _Abort
    if len(mods) > 1:  # the reference's own checkpoints hold all three (the dataclass's defaults)
        details.append(f"note: cfg.model.modalities also holds {[m for m in mods if m != modality]} "
                       "(not built: supported_modality is " + repr(supported) + ")")
    mode = str(modality).upper()

    # ---- the config: the file's cfg as fairseq loads it (OmegaConf.create), the model section merged
    # into the reference's dataclass and parented to it, as fairseq's merge_with_parent does, so that
    # ${optimization.max_update}, ${common.seed}, ${model.num_heads}, ${model.depth} resolve from the
    # file's own sections
    root = OmegaConf.create(cfg, flags={"allow_objects": True})
    model_cfg = strict_model_config(ref, model_section, errors)
    if model_cfg is None or any("value rejected" in e for e in errors):
        raise _Abort  # a rejected value would leave the default in its place: the model would be wrong
    model_cfg.__dict__["_parent"] = root
    OmegaConf.set_struct(model_cfg, True)
    read_errors = []
    _config_read_errors(OmegaConf, model_cfg, "cfg.model.", read_errors, skip=("modalities",))
    if str(modality) in model_cfg.modalities:
        _config_read_errors(OmegaConf, model_cfg.modalities[str(modality)],
                            f"cfg.model.modalities.{modality}.", read_errors)
    errors.extend(read_errors)
    if read_errors:
        raise _Abort
    for field, source in INTERPOLATED.items():
        where = "the model section" if field in model_section else source
        details.append(f"cfg.model.{field} = {model_cfg[field]} (from {where})")

    # ---- the task: only text needs one (TextEncoder reads task.source_dictionary)
    file_sd = state["model"]
    if not isinstance(file_sd, dict):
        errors.append(f'"model" is a {type(file_sd).__name__}, not a dict')
        raise _Abort
    task = None
    rows = None
    if mode == "TEXT":
        if EMBED_TOKENS not in file_sd:
            errors.append(f"no {EMBED_TOKENS}: the vocabulary size cannot be known")
            raise _Abort
        rows = int(file_sd[EMBED_TOKENS].shape[0])
        if rows < 5:
            errors.append(f"{EMBED_TOKENS} has {rows} rows: fewer than 4 specials + <mask>")
            raise _Abort
        dictionary = ref.Dictionary()  # <s>=0 <pad>=1 </s>=2 <unk>=3
        for i in range(rows - 5):
            dictionary.add_symbol(f"tok{i}")
        task_cfg = ref.merge_with_parent(ref.task_configs["text"](), root.task, remove_missing=True)
        task = ref.MaskedLMTask(task_cfg, dictionary=dictionary)  # appends <mask> last, as masked_lm does
        assert len(task.source_dictionary) == rows and task.mask_idx == rows - 1
        details.append(f"text vocabulary: {rows} = 4 specials + {rows - 5} symbols + <mask> (id {rows - 1})")

    # ---- the model, built the way task.build_model(cfg.model) does
    torch.manual_seed(0)
    np.random.seed(0)
    model = ref.fairseq_models.build_model(model_cfg, task)
    assert isinstance(model, d2v.Data2VecMultiModel), type(model)
    if model.ema is None:
        errors.append("cfg.model.skip_ema is true: the reference builds no teacher and drops _ema")
        raise _Abort

    # ---- the keys, compared before loading (load_state_dict reports the student's; the teacher's
    # are loaded by EMAModule.restore with strict=False, which would skip a wrong name silently)
    expected = {k: v for k, v in model.state_dict().items() if k != "_ema"}
    expected_t = model.ema.model.state_dict()
    given = {k: v for k, v in file_sd.items() if k != "_ema"}
    given_t = file_sd.get("_ema")
    if not isinstance(given_t, dict):
        errors.append('"model" has no "_ema" dict (the teacher\'s parameters)'
                      if given_t is None else f'"model"["_ema"] is a {type(given_t).__name__}, not a dict')
        given_t = {}

    def compare(what: str, want: dict, got: dict) -> None:
        missing, unexpected = set(want) - set(got), set(got) - set(want)
        if missing:
            errors.append(f"missing {what} keys: {_names(missing)}")
            details.append(f"all missing {what} keys: {sorted(missing)}")
        if unexpected:
            errors.append(f"unexpected {what} keys: {_names(unexpected)}")
            details.append(f"all unexpected {what} keys: {sorted(unexpected)}")
        bad = []
        for k in sorted(set(want) & set(got)):
            if not isinstance(got[k], torch.Tensor):
                bad.append(f"{k}: a {type(got[k]).__name__}, not a tensor")
            elif tuple(got[k].shape) != tuple(want[k].shape):
                bad.append(f"{k}: file {tuple(got[k].shape)} vs reference {tuple(want[k].shape)}")
        if bad:
            errors.append(f"{what} shape mismatches: " + "; ".join(bad[:4])
                          + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
            details.append(f"all {what} shape mismatches: {bad}")

    compare("student", expected, given)
    compare("teacher (_ema)", expected_t, given_t)

    # ---- the load, as checkpoint_utils.load_model_ensemble_and_task does it
    try:
        model.load_state_dict(dict(file_sd), strict=True, model_cfg=model_cfg)
    except Exception as e:
        msg = " ".join(str(e).split()) or _where(e)
        errors.append(f"load_state_dict(strict=True) raised {type(e).__name__}: "
                      + (msg if len(msg) <= 400 else msg[:400] + " ..."))
        raise _Abort from None

    # ---- the step counter, as fairseq's trainer sets it on resume (in eval mode: the reference's
    # set_num_updates would take an EMA step in train mode if num_updates were 1)
    hist = state["optimizer_history"]
    num_updates = hist[-1].get("num_updates") if isinstance(hist, list) and hist and \
        isinstance(hist[-1], dict) else None
    if not isinstance(num_updates, int):
        errors.append(f"optimizer_history[-1]['num_updates'] is not an int: {num_updates!r}")
    else:
        model.eval()
        model.set_num_updates(num_updates)
        model.train()

    # ---- what was loaded: the student, and the teacher (its module and its fp32 copy) from "_ema"
    loaded = model.state_dict()
    differ = [k for k in expected if k in given and not torch.equal(loaded[k], given[k].to(loaded[k].dtype))]
    if differ:
        errors.append(f"student tensors not equal to the file's after loading: {_names(differ)}")
    fp32 = model.ema.fp32_params
    teacher = model.ema.model.state_dict()
    if set(fp32) != set(expected_t):
        errors.append(f"the teacher's fp32 params have keys its module lacks: "
                      f"{_names(set(fp32) ^ set(expected_t))}")
    not_set = []
    for k in sorted(set(expected_t) & set(given_t)):
        want = given_t[k]
        if not (torch.equal(fp32[k], want.float() if want.is_floating_point() else want)
                and torch.equal(teacher[k], want.to(teacher[k].dtype))):
            not_set.append(k)
    if not_set:
        errors.append(f"teacher tensors not set from _ema: {_names(not_set)}")
    to_student = (lambda k: "blocks." + k) if model.cfg.ema_encoder_only else (lambda k: k)
    same = 0
    for k, v in given_t.items():
        s = given.get(to_student(k))
        same += isinstance(v, torch.Tensor) and isinstance(s, torch.Tensor) and v.shape == s.shape \
            and torch.equal(v, s.to(v.dtype))
    details.append(f"teacher: {len(given_t)} tensors from _ema ({same} equal to the student's); "
                   f"ema_encoder_only={model.cfg.ema_encoder_only}")
    if errors:
        raise _Abort

    # ---- one training forward through fairseq's ModelCriterion, on a small random input
    torch.manual_seed(0)
    np.random.seed(0)
    mcfg = model_cfg.modalities[str(modality)]
    if mode == "IMAGE":
        source = torch.randn(1, mcfg.in_chans, mcfg.input_size, mcfg.input_size)
    elif mode == "AUDIO":
        source = torch.randn(1, 16000)
    else:
        source = torch.randint(4, max(5, rows - 1), (1, 10))  # no specials, no <mask>
    criterion = ref.ModelCriterion(task, loss_weights={}, log_keys=[])
    # id: masks from MaskSeed(cfg.seed, num_updates, id), reproducible (without it, audio's and text's
    # compute_mask_indices draw from an unseeded numpy Generator)
    sample = {"id": torch.arange(1), "net_input": {"source": source, "id": torch.arange(1)}}
    model.train()
    try:
        with torch.no_grad():
            loss, sample_size, _ = criterion(model, sample)
    except Exception as e:
        errors.append(f"train-mode forward on {tuple(source.shape)} raised {type(e).__name__}: "
                      f"{_first_line(e)}")
        raise _Abort from None
    if not torch.isfinite(loss).all():
        errors.append(f"train-mode forward gave a non-finite loss {float(loss)}")
        raise _Abort
    n_params = sum(p.numel() for p in model.parameters())
    return (f"data2vec_multi {mode}, {len(given)} student + {len(given_t)} teacher tensors loaded "
            f"(strict), teacher == _ema, num_updates={num_updates}, {n_params / 1e6:.2f}M student params; "
            f"train forward {tuple(source.shape)}: loss {float(loss):.4f}, sample_size {int(sample_size)}")


def check_exports(ref, paths) -> bool:
    """--check-export: one PASS/FAIL line per file (details indented below it); True if all pass."""
    import gc

    ok = True
    for p in paths:
        path = Path(p)
        errors, details = [], []
        summary = ""
        try:
            summary = _check_export(ref, path, errors, details)
        except _Abort:
            pass
        except Exception as e:  # a failure of the check itself: show where
            errors.append(f"{type(e).__name__}: {_first_line(e)} (at {_where(e)})")
        if errors:
            ok = False
            print(f"FAIL {path}: " + "; ".join(errors), flush=True)
        else:
            print(f"PASS {path}: {summary}", flush=True)
        for d in details:
            print(f"    {d}", flush=True)
        gc.collect()
    return ok


LOAD_CHECK = r"""
import sys, torch
for mod in ("fairseq", "omegaconf", "hydra", "examples"):
    try:
        __import__(mod)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{mod} is importable here: the load check proves nothing")
for p in sys.argv[1:]:
    obj = torch.load(p, weights_only=False)
    print("loaded", p, sorted(obj)[:6])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"), help="where the fixtures go")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/d2v-reference"),
                    help="where the reference sdist is downloaded and unpacked")
    ap.add_argument("--modality", default="all", choices=["all", *MAKERS])
    ap.add_argument("--check-python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="a python without fairseq that must load the files (skipped if missing)")
    ap.add_argument("--check-export", nargs="+", metavar="FILE",
                    help="instead of writing fixtures: load each fairseq-layout checkpoint written by "
                         "`d2v export --format fairseq` into the reference, strictly (see the docstring); "
                         "one PASS/FAIL line per file, exit status 1 if any fails")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    np.random.seed(0)
    if args.check_export:
        ref = import_reference(fetch_reference(Path(args.cache)))
        sys.exit(0 if check_exports(ref, args.check_export) else 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tree = fetch_reference(Path(args.cache))
    ref = import_reference(tree)

    mods = list(MAKERS) if args.modality == "all" else [args.modality]
    written = []
    for m in mods:
        root, model, io = MAKERS[m](ref, tree, out_dir)
        if m == "text":
            written.append(out_dir / "reference_text_dict.txt")
        io["versions"] = _versions()
        ck = checkpoint_dict(ref, root, model, m.split("_")[0])
        for name, obj in ((f"reference_{m}_checkpoint.pt", ck), (f"reference_{m}_io.pt", io)):
            save(obj, out_dir / name)
            written.append(out_dir / name)
        losses = {k: float(v.sum()) for k, v in io["losses"].items()}
        print(f"{m}: T={io['mask'].shape[1]} masked/row={int(io['mask'][0].sum())} "
              f"encoder_out={tuple(io['encoder_out'].shape)} loss={float(io['loss']):.6f} {losses}")

    for p in written:
        print(f"{p.stat().st_size:>9} B  {sha256(p)[:16]}  {p}")
    check = Path(args.check_python)
    if check.exists():
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([str(check), "-c", LOAD_CHECK] + [str(p) for p in written if p.suffix == ".pt"],
                       check=True, env=env, cwd="/")
    else:
        print(f"load check skipped: {check} not found")


def _versions() -> dict:
    import numpy
    import omegaconf
    import timm
    import torch

    return {"reference": SDIST_REQ, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "timm": timm.__version__, "omegaconf": omegaconf.__version__}


if __name__ == "__main__":
    main()
