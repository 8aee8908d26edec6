"""fairseq data2vec 2.0 checkpoints in and out: `d2v import --from fairseq` and `d2v export --format fairseq`.

Import reads a checkpoint file of the reference's `data2vec_multi` model (image, audio or text; with or
without the EMA teacher under `model["_ema"]`), derives the d2v config from its own `cfg`
(d2v.interop.fairseq_config), maps every key (d2v.interop.fairseq_keys) and writes a d2v run folder
whose one checkpoint holds weights only (student, teacher, the step from the checkpoint's
optimizer history): `d2v probe`, `d2v embed`, `d2v export` read it, and `d2v pretrain --config
RUN/config.yaml --resume RUN` continues pretraining from it with a fresh optimizer. Without `_ema`
the teacher starts as a copy of the student, as the reference's does.

Export writes the inverse: a checkpoint in the reference's layout (student keys, the teacher nested
under `_ema`, `cfg` with the model, task, optimization and optimizer sections, the step in
`optimizer_history`), from any d2v checkpoint. import(export(run)) gives the run's weights bit for bit.

References: fairseq/checkpoint_utils.py (save_checkpoint, load_checkpoint_to_cpu),
examples/data2vec/models/data2vec2.py.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2v.checkpoint import CONFIG_FILE, WEIGHTS_ONLY, checkpoint_root, save_checkpoint
from d2v.config import Config
from d2v.interop.fairseq_config import FairseqConfigError, config_from_fairseq, config_to_fairseq
from d2v.interop.fairseq_keys import (
    KeyMappingError,
    export_state,
    import_state,
    nest_ema,
    split_ema,
)
from d2v.interop.fairseq_text import read_dict_symbols
from d2v.log import get_logger

log = get_logger(__name__)
TEXT_EMBED = "modality_encoders.TEXT.local_encoder.embed_tokens.weight"


class FairseqImportError(ValueError):
    """The file is not a checkpoint d2v can import; the message names what and where."""


@dataclass
class ImportResult:
    run_dir: Path
    checkpoint: Path
    config: Config
    step: int
    has_teacher: bool
    notes: list[str] = field(default_factory=list)


def load_torch_file(path: str | Path):
    """torch.load a checkpoint file on the CPU, with errors that say what is wrong with it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--from fairseq {p}: no such file")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:  # pickled objects of a package this Python lacks
        raise FairseqImportError(f"{p}: the checkpoint pickles objects of the '{e.name}' package, which "
                                 f"is not installed here (pip install {e.name}), then import again") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise FairseqImportError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None


def fairseq_state(state, path: str | Path) -> dict:
    """A loaded file's contents as a fairseq checkpoint (its cfg as a plain dict), or FairseqImportError
    saying what it lacks."""
    p = Path(path).expanduser()
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise FairseqImportError(f"{p}: not a fairseq checkpoint (expected a dict with a 'model' state dict "
                                 f"and a 'cfg')")
    cfg = state.get("cfg")
    if cfg is not None and not isinstance(cfg, dict):  # an OmegaConf DictConfig (omegaconf installed)
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # noqa: BLE001
            raise FairseqImportError(f"{p}: cannot read its cfg ({type(e).__name__}: {e})") from None
        state["cfg"] = cfg
    if cfg is None:
        if state.get("args") is not None:
            raise FairseqImportError(f"{p}: an argparse-era fairseq checkpoint ('args', no 'cfg'); data2vec "
                                     f"2.0 checkpoints carry a 'cfg' (re-save it with a current fairseq)")
        raise FairseqImportError(f"{p}: the checkpoint has no 'cfg' (its model config)")
    return state


def _step_of(state: dict) -> int:
    hist = state.get("optimizer_history") or []
    if hist and isinstance(hist[-1], dict) and hist[-1].get("num_updates") is not None:
        return int(hist[-1]["num_updates"])
    return 0


def _teacher_template(model) -> dict:
    return copy.deepcopy(model).strip_to_teacher().state_dict()


def import_fairseq(ckpt: str | Path, out_dir: str | Path, *, dict_path: str | Path | None = None,
                   tokenizer: str | Path | None = None, gpt2_bpe: str | Path | None = None) -> ImportResult:
    """Write the d2v run folder `out_dir` from fairseq checkpoint `ckpt` (never into an existing run).

    Text: `dict_path` is the fairseq dictionary (dict.txt) the token ids index (found beside the
    checkpoint when not given) and `tokenizer` a tokenizers JSON file whose ids are those indices;
    both are copied into the run folder. Or `gpt2_bpe`, a folder with GPT-2's encoder.json and
    vocab.bpe: the run's tokenizer is then that BPE re-indexed by the dictionary
    (d2v.interop.fairseq_text)."""
    out = Path(out_dir).expanduser()
    if checkpoint_root(out).exists() and any(checkpoint_root(out).iterdir()):
        raise FileExistsError(f"--out {out} already holds a run (checkpoints/): import into a new folder "
                              f"(nothing was overwritten)")
    conv = convert_fairseq(ckpt, out, dict_path=dict_path, tokenizer=tokenizer, gpt2_bpe=gpt2_bpe)
    out.mkdir(parents=True, exist_ok=True)
    if "dict" in conv.text_files:
        shutil.copyfile(conv.text_files["dict"], out / "dict.txt")
    if conv.tokenizer is not None:
        conv.tokenizer.save(str(out / "tokenizer.json"))
    record = {"from": str(Path(ckpt).resolve()), "format": "fairseq", "notes": conv.notes}
    ck = save_checkpoint(out, conv.step, {"engine": WEIGHTS_ONLY, "step": conv.step, "skipped_steps": 0,
                                          "model": conv.student, "teacher": conv.teacher, "imported": record},
                         conv.config.to_dict(), keep_last=max(conv.config.train.keep_last, 1))
    shutil.copyfile(ck / CONFIG_FILE, out / CONFIG_FILE)  # the config to continue pretraining with
    return ImportResult(out, ck, conv.config, conv.step, conv.has_teacher, conv.notes)


@dataclass
class Converted:
    config: Config
    student: dict
    teacher: dict
    step: int
    has_teacher: bool
    notes: list[str]
    text_files: dict
    tokenizer: object = None  # text: a tokenizers.Tokenizer whose ids index the embedding


def convert_fairseq(ckpt: str | Path, out_dir: str | Path | None = None, *, dict_path=None,
                    tokenizer=None, gpt2_bpe=None, loaded=None) -> Converted:
    """A fairseq checkpoint file -> d2v config and student/teacher state dicts, in memory (import_fairseq
    writes them as a run folder `out_dir`; d2v.load_encoder reads a checkpoint file this way). `loaded`:
    the file's contents when the caller already read it (read once)."""
    from d2v.model import build_model

    state = fairseq_state(load_torch_file(ckpt) if loaded is None else loaded, ckpt)
    student_ref, teacher_ref = split_ema(state["model"])
    vocab = student_ref[TEXT_EMBED].shape[0] if TEXT_EMBED in student_ref else None
    try:
        cfg, notes = config_from_fairseq(state["cfg"], student_ref.keys(), vocab_size=vocab)
    except FairseqConfigError as e:
        raise FairseqImportError(f"{ckpt}: {e}") from None
    if out_dir is not None:
        cfg.train.out_dir = str(Path(out_dir).expanduser())
    m, H = cfg.model.modality, cfg.model.num_heads
    text_files = _text_files(ckpt, state["cfg"], m, vocab, dict_path, tokenizer) if m == "text" else {}
    tok = _text_tokenizer(text_files, gpt2_bpe, vocab) if m == "text" else None
    if m == "text" and out_dir is not None:
        # always named: without a tokenizer the file is missing and probe/embed/resume stop saying so,
        # instead of training a new tokenizer whose ids would not be the embedding's
        cfg.data.tokenizer = str((Path(out_dir).expanduser() / "tokenizer.json").resolve())
    cfg.validate()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    try:
        student = import_state(student_ref, model.state_dict(), m, H, where=f"{ckpt}: ")
        template_t = _teacher_template(model)
        if teacher_ref is not None:
            teacher = import_state(teacher_ref, template_t, m, H, teacher=True, where=f"{ckpt}: ")
        else:  # the reference starts its teacher as a copy of the student
            teacher = {k: student[k].clone() for k in template_t}
            notes.append("no EMA teacher (_ema) in the checkpoint: the teacher starts as a copy of the "
                         "student")
    except KeyMappingError as e:
        raise FairseqImportError(str(e)) from None
    if m == "text" and tok is None:
        notes.append("no tokenizer: give --tokenizer or --gpt2-bpe (with the dictionary) to probe, embed or "
                     "continue pretraining this text model")
    return Converted(cfg, student, teacher, _step_of(state), teacher_ref is not None, notes, text_files, tok)


def _text_tokenizer(text_files: dict, gpt2_bpe, vocab: int | None):
    """The run's tokenizer: --tokenizer as given, or GPT-2's BPE re-indexed by the dictionary."""
    from d2v.data.text import load_tokenizer

    if "tokenizer" in text_files:
        return load_tokenizer(text_files["tokenizer"])
    if gpt2_bpe is None:
        return None
    if "dict" not in text_files:
        raise FairseqImportError("--gpt2-bpe needs the checkpoint's dictionary: give --dict dict.txt")
    from d2v.interop.fairseq_text import fairseq_bpe_tokenizer

    d = Path(gpt2_bpe).expanduser()
    for name in ("encoder.json", "vocab.bpe"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"--gpt2-bpe {d}: no {name} there (GPT-2's BPE files)")
    return fairseq_bpe_tokenizer(text_files["dict"], d / "encoder.json", d / "vocab.bpe", vocab)


def _text_files(ckpt, ckpt_cfg: dict, modality: str, vocab: int | None, dict_path, tokenizer) -> dict:
    """The text run's dictionary and tokenizer files to copy (each checked against the embedding)."""
    found: dict[str, Path] = {}
    if dict_path is None:
        task_data = str((ckpt_cfg.get("task") or {}).get("data") or "")
        for cand in (Path(ckpt).expanduser().parent / "dict.txt",
                     *(Path(d) / "dict.txt" for d in task_data.split(":") if d)):
            if cand.is_file():
                dict_path = cand
                break
    if dict_path is not None:
        p = Path(dict_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--dict {p}: no such file")
        try:
            n = len(read_dict_symbols(p))
        except ValueError as e:
            raise FairseqImportError(f"--dict {e}") from None
        # fairseq: 4 specials + the file's symbols (+ <mask> added by the masked-LM task)
        if vocab is not None and vocab not in (n + 4, n + 5):
            raise FairseqImportError(f"--dict {p}: {n} symbols + 4 specials do not fit the checkpoint's "
                                     f"embedding of {vocab} rows (is it the dictionary the model was "
                                     f"trained with?)")
        found["dict"] = p
    if tokenizer is not None:
        from d2v.data.text import load_tokenizer

        p = Path(tokenizer).expanduser()
        n = load_tokenizer(p).get_vocab_size()
        if vocab is not None and n > vocab:
            raise FairseqImportError(f"--tokenizer {p}: {n} entries, more than the checkpoint's {vocab} "
                                     f"embedding rows")
        found["tokenizer"] = p
    return found


def export_fairseq(checkpoint: str | Path, out_file: str | Path) -> tuple[Path, Path]:
    """Any d2v checkpoint (run folder or step folder, every backend) -> a fairseq data2vec_multi
    checkpoint file `out_file` -> (out_file, the checkpoint folder read)."""
    from d2v.weights import load_weights

    state, cfg_dict, ck = load_weights(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    if cfg.model.head != "decoder" or not cfg.model.skip_masked:
        raise FairseqImportError(f"{ck}: a data2vec 1.0-mode run (model.head={cfg.model.head}, "
                                 f"model.skip_masked={cfg.model.skip_masked}) has no data2vec 2.0 "
                                 f"reference layout; export it with --format d2v")
    m, H = cfg.model.modality, cfg.model.num_heads
    student = export_state(state["model"], m, H)
    teacher = export_state(state["teacher"], m, H, teacher=True)
    step = int(state.get("step", 0))
    out = {
        "cfg": config_to_fairseq(cfg),
        "model": nest_ema(student, teacher),
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {}, "num_updates": step}],
        "extra_state": {"d2v_config": cfg.to_dict(), "d2v_checkpoint": str(ck)},
        "last_optimizer_state": None,
    }
    out_file = Path(out_file).expanduser()
    torch.save(out, out_file)
    return out_file, ck
