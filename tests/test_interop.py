"""Weights in and out: fairseq checkpoints (import, export, round trips, strict errors), continued
pretraining from imported weights, the HF transformers export of text models and d2v.load_encoder.

The parity of imported weights with the reference's own computation is tests/test_reference_fixtures.py.

Run: .venv/bin/python -m pytest -q tests/test_interop.py
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import d2v
from d2v.checkpoint import save_checkpoint
from d2v.config import Config, load_config
from d2v.ema import EMATeacher
from d2v.interop.fairseq import FairseqImportError, export_fairseq, import_fairseq
from d2v.interop.fairseq_keys import reference_key, split_ema
from d2v.model import build_model
from d2v.weights import load_weights
from tests.utils import micro_overrides

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ("image", "audio", "text")


def tiny_cfg(modality: str, out_dir: Path, **model) -> Config:
    small = dict(embed_dim=32, depth=2, num_heads=2, decoder=dict(dim=16, layers=2, groups=4))
    if modality == "audio":
        small.update(conv_dim=16, conv_pos_depth=2, conv_pos_groups=4)
    if modality == "text":
        small.update(vocab_size=64, max_positions=16, prenet_depth=1)
    small.update(model)
    return Config.from_dict({"model": {"modality": modality, "flavor": "tiny", **small},
                             "objective": {"average_top_k_layers": 2}, "train": {"out_dir": str(out_dir)}})


def save_moved_run(cfg: Config, out_dir: Path, step: int, seed: int, scale: float, teacher_scale: float):
    """A single-backend checkpoint of a model whose parameters were moved by scale * N(0, 1) and whose
    teacher was moved again by teacher_scale -> (student sd, teacher sd)."""
    torch.manual_seed(seed)
    student = build_model(cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * scale)
        teacher = EMATeacher(student, 0.9, 0.99, 10)
        for p in teacher.module.parameters():
            p.add_(torch.randn_like(p) * teacher_scale)
    sd, td = student.state_dict(), teacher.state_dict()
    save_checkpoint(out_dir, step, {"engine": "single", "step": step, "model": sd, "teacher": td,
                                    "optimizer": {}, "rng": None}, cfg.to_dict(), keep_last=3)
    return sd, td


def perturbed_run(modality: str, out_dir: Path, step: int = 7, **model):
    """A d2v run folder whose student and teacher differ from each other and from an init (every
    parameter moved), so that a swapped key shows -> (cfg, student sd, teacher sd)."""
    cfg = tiny_cfg(modality, out_dir, **model)
    sd, td = save_moved_run(cfg, out_dir, step, seed=0, scale=0.1, teacher_scale=0.1)
    return cfg, sd, td


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("modality", MODALITIES)
def test_export_then_import_is_bit_identical(tmp_path, modality):
    cfg, sd, td = perturbed_run(modality, tmp_path / "run")
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    res = import_fairseq(f, tmp_path / "imported")
    state, saved_cfg, _ = load_weights(tmp_path / "imported")
    assert_same(state["model"], sd)
    assert_same(state["teacher"], td)
    assert state["step"] == res.step == 7 and res.has_teacher
    assert res.notes == ([] if modality != "text" else [  # no --tokenizer / --gpt2-bpe given
        "no tokenizer: give --tokenizer or --gpt2-bpe (with the dictionary) to probe, embed or continue "
        "pretraining this text model"])
    flavorless = {k: v for k, v in cfg.to_dict()["model"].items() if k != "flavor"}  # a preset's name
    assert {k: v for k, v in saved_cfg["model"].items() if k != "flavor"} == flavorless
    for sec in ("masking", "objective", "ema"):
        assert saved_cfg[sec] == cfg.to_dict()[sec], sec
    assert (tmp_path / "imported" / "config.yaml").is_file()


@pytest.mark.parametrize("modality", MODALITIES)
def test_export_layout_is_the_references(tmp_path, modality):
    """Keys in the reference's layout: the teacher nested under _ema, every student key mapped by the
    table (audio index shifts, ALiBi scale (1, 1, H, 1, 1); text teacher without `blocks.`; the text
    prenet's input LayerNorm, which the reference builds whenever there is a prenet); "all blocks"
    (average_top_k_layers null) written as the number the reference needs."""
    cfg, sd, td = perturbed_run(modality, tmp_path / "run", depth=3)
    assert cfg.objective.average_top_k_layers == 2
    cfg.objective.average_top_k_layers = None
    from d2v.interop.fairseq_config import config_to_fairseq

    assert config_to_fairseq(cfg)["model"]["average_top_k_layers"] == 3
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    ck = torch.load(f, weights_only=False)
    if modality == "text":
        assert "modality_encoders.TEXT.context_encoder.norm.weight" in ck["model"]
    assert ck["cfg"]["model"]["_name"] == "data2vec_multi"
    assert ck["cfg"]["model"]["supported_modality"] == modality.upper()
    assert ck["optimizer_history"][-1]["num_updates"] == 7
    student, teacher = split_ema(ck["model"])
    assert isinstance(ck["model"]["_ema"], dict)
    M = modality.upper()
    assert all(k.startswith(("blocks.", f"modality_encoders.{M}.")) for k in student)
    if modality == "audio":
        assert student[f"modality_encoders.{M}.alibi_scale"].shape == (1, 1, 2, 1, 1)
        assert f"modality_encoders.{M}.local_encoder.conv_layers.3.2.1.weight" in student
        assert f"modality_encoders.{M}.project_features.2.weight" in student  # the Linear
        assert f"modality_encoders.{M}.relative_positional_encoder.1.0.weight" in student
        assert not any("alibi_slopes" in k for k in student)  # derived, not stored
        assert torch.equal(student[f"modality_encoders.{M}.project_features.2.weight"],
                           sd["modality_encoder.project_features.1.weight"])
    if modality == "text":
        assert set(teacher) == {f"_ema.{k[len('blocks.'):]}" for k in td}
    else:
        assert set(teacher) == {f"_ema.{reference_key(k, modality)}" for k in td if "alibi_slopes" not in k}


def test_cli_export_and_import_fairseq(tmp_path):
    perturbed_run("image", tmp_path / "run")
    env_py = [sys.executable, "-m", "d2v"]
    r = subprocess.run([*env_py, "export", "--checkpoint", str(tmp_path / "run"), "--format", "fairseq",
                        "--out", str(tmp_path / "fs.pt")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*env_py, "import", "--from", "fairseq", str(tmp_path / "fs.pt"), "--out",
                        str(tmp_path / "imp")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "step 7" in r.stdout and "the EMA teacher (_ema)" in r.stdout
    r = subprocess.run([*env_py, "import", "--from", "fairseq", str(tmp_path / "fs.pt"), "--out",
                        str(tmp_path / "imp")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "already holds a run" in r.stderr  # never overwritten


def _export(tmp_path, modality="image"):
    perturbed_run(modality, tmp_path / "run")
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    return torch.load(f, weights_only=False)


def _write(tmp_path, ck, name="bad.pt"):
    torch.save(ck, tmp_path / name)
    return tmp_path / name


def test_import_refuses_missing_extra_and_misshaped_keys(tmp_path):
    ck = _export(tmp_path)
    key = "blocks.1.mlp.fc1.weight"
    bad = copy.deepcopy(ck)
    del bad["model"][key]
    with pytest.raises(FairseqImportError, match=r"missing: blocks\.1\.mlp\.fc1\.weight"):
        import_fairseq(_write(tmp_path, bad), tmp_path / "a")
    bad = copy.deepcopy(ck)
    bad["model"]["blocks.1.mlp.extra.weight"] = torch.zeros(3)
    with pytest.raises(FairseqImportError, match=r"no place in the model: blocks\.1\.mlp\.extra\.weight"):
        import_fairseq(_write(tmp_path, bad), tmp_path / "b")
    bad = copy.deepcopy(ck)
    bad["model"]["_ema"][key] = bad["model"]["_ema"][key][:, :-1]
    with pytest.raises(FairseqImportError, match=r"\(_ema\): _ema\.blocks\.1\.mlp\.fc1\.weight has shape"):
        import_fairseq(_write(tmp_path, bad), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # never a partial run


def test_import_refuses_model_changing_config_and_reports_training_only_fields(tmp_path):
    ck = _export(tmp_path)
    bad = copy.deepcopy(ck)
    bad["cfg"]["model"]["layer_norm_first"] = True
    with pytest.raises(FairseqImportError, match=r"cfg\.model\.layer_norm_first = True"):
        import_fairseq(_write(tmp_path, bad), tmp_path / "a")
    bad = copy.deepcopy(ck)
    bad["cfg"]["model"]["supported_modality"] = "VIDEO"
    with pytest.raises(FairseqImportError, match="'VIDEO' is not a modality d2v knows"):
        import_fairseq(_write(tmp_path, bad), tmp_path / "b")
    ok = copy.deepcopy(ck)
    ok["cfg"]["model"]["end_drop_path_rate"] = 0.1
    res = import_fairseq(_write(tmp_path, ok), tmp_path / "c")
    assert res.notes == ["cfg.model.end_drop_path_rate = 0.1 (d2v supports 0.0)"]


def test_import_refuses_files_that_are_not_fairseq_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FairseqImportError, match="not a readable torch checkpoint"):
        import_fairseq(tmp_path / "junk.pt", tmp_path / "a")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(FairseqImportError, match="not a fairseq checkpoint"):
        import_fairseq(tmp_path / "other.pt", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no such file"):
        import_fairseq(tmp_path / "missing.pt", tmp_path / "c")


def test_audio_per_layer_alibi_scales_are_refused(tmp_path):
    ck = _export(tmp_path, "audio")
    ck["cfg"]["model"]["modalities"]["audio"]["learned_alibi_scale_per_layer"] = True
    with pytest.raises(FairseqImportError, match="learned_alibi_scale_per_layer = True"):
        import_fairseq(_write(tmp_path, ck), tmp_path / "a")


def test_without_ema_the_teacher_starts_as_the_student(tmp_path):
    ck = _export(tmp_path, "audio")
    del ck["model"]["_ema"]
    res = import_fairseq(_write(tmp_path, ck), tmp_path / "imp")
    state, _, _ = load_weights(tmp_path / "imp")
    assert not res.has_teacher and "copy of the student" in res.notes[-1]
    for k, t in state["teacher"].items():
        assert torch.equal(t, state["model"][k]), k


def test_continued_pretraining_from_imported_weights(tmp_path):
    """d2v pretrain --resume on an imported run: student and teacher are the checkpoint's, the step
    counter continues from it, a fresh optimizer; the model section must stay the checkpoint's."""
    from d2v.trainer import Trainer

    out = tmp_path / "src"
    src = load_config(str(ROOT / "configs" / "tiny_image.yaml"), micro_overrides(out, steps=2))
    sd, td = save_moved_run(src, out, 5, seed=1, scale=0.05, teacher_scale=0.0)
    f, _ = export_fairseq(out, tmp_path / "fs.pt")
    run = tmp_path / "imp"
    import_fairseq(f, run)
    cfg = load_config(str(run / "config.yaml"), ["train.max_steps=7", "data.num_workers=0",
                                                 "train.batch_size=8", "train.log_every=1"])
    bad = load_config(str(run / "config.yaml"), ["model.depth=3", "objective.average_top_k_layers=3"])
    with pytest.raises(ValueError, match=r"the model differs in model\.depth: 2 -> 3"):
        Trainer(bad, resume=True, progress=False)
    tr = Trainer(cfg, resume=True, progress=False)
    try:
        assert tr.step == 5 and tr.resumed_from is not None
        assert_same({k: v.detach() for k, v in tr.model.state_dict().items()}, sd)
        assert_same(tr.teacher.state_dict(), td)
        summary = tr.train()
    finally:
        tr.release()
    assert summary["steps"] == 7 and summary["steps_this_run"] == 2


def test_hf_export_matches_the_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from d2v.interop.hf import export_hf

    cfg, sd, _ = perturbed_run("text", tmp_path / "run", prenet_depth=0)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "run" / "tokenizer.json"))
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.RobertaModel.from_pretrained(out, add_pooling_layer=False).eval()
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    ids = torch.randint(4, 64, (3, 12))
    ids[1, 9:], ids[2, 4:] = 1, 1  # right padding
    pad = ids == 1
    x, _, _ = model.encode(ids, padding_mask=pad)
    y = hf(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
    keep = ~pad
    assert ((x - y)[keep].norm() / x[keep].norm()).item() < 1e-5
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast("abc")["input_ids"] == [0, 4, 5, 6]  # <s> first, as d2v's probe encodes a line
    with pytest.raises(ValueError, match="exports text models"):
        perturbed_run("image", tmp_path / "img")
        export_hf(tmp_path / "img", tmp_path / "hf_img")
    perturbed_run("text", tmp_path / "prenet")  # prenet_depth 1: a second LayerNorm RoBERTa lacks
    with pytest.raises(ValueError, match="needs model.prenet_depth 0"):
        export_hf(tmp_path / "prenet", tmp_path / "hf_prenet")


@pytest.mark.parametrize("modality", MODALITIES)
def test_load_encoder_from_runs_and_fairseq_files(tmp_path, modality):
    cfg, sd, td = perturbed_run(modality, tmp_path / "run")
    enc = d2v.load_encoder(tmp_path / "run")
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    source = {"image": lambda: torch.randn(2, 3, 32, 32), "audio": lambda: torch.randn(2, 4000),
              "text": lambda: torch.randint(4, 64, (2, 10))}[modality]()
    out = enc(source, all_layers=True)
    with torch.no_grad():  # the same kernels as the encoder's (no-grad) forward
        x, _, _ = model.encode(source)
    E = model.num_extra_tokens
    assert torch.equal(out.features, x[:, E:]) and len(out.layers) == cfg.model.depth
    assert torch.equal(out.layers[-1], out.features)
    assert (out.cls is not None) == (E > 0)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: dropout stays off
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    from_file = d2v.load_encoder(f)
    assert torch.equal(from_file(source).features, out.features)
    r = subprocess.run([sys.executable, "-m", "d2v", "export", "--checkpoint", str(tmp_path / "run"), "--out",
                        str(tmp_path / "d2v.pt")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert torch.equal(d2v.load_encoder(tmp_path / "d2v.pt")(source).features, out.features)  # d2v's own file
    t_enc = d2v.load_encoder(tmp_path / "run", teacher=True)
    assert not torch.equal(t_enc(source).features, out.features)  # the teacher's weights differ


def test_embed_writes_features_and_names_skipped_files(tmp_path):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from d2v.data.images import eval_image
    from d2v.embed import embed

    perturbed_run("image", tmp_path / "img")
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray((rng.rand(40, 50 + i, 3) * 255).astype(np.uint8)).save(pics / "sub" / f"{i}.png")
    (pics / "broken.jpg").write_bytes(b"not a jpeg")
    res = embed(tmp_path / "img", pics, tmp_path / "f.npz", progress=False)
    d = np.load(tmp_path / "f.npz")
    assert res["items"] == 3 and d["features"].shape == (3, 32) and len(d["names"]) == 3
    assert d["skipped"][0][0].endswith("broken.jpg")
    enc = d2v.load_encoder(tmp_path / "img")
    cfg = enc.config
    from d2v.data.build_image import normalization

    x = eval_image(Path(d["names"][1]), cfg.model.image_size, *normalization(cfg))[None]
    want = enc(x).features.mean(1)[0].numpy()
    np.testing.assert_allclose(d["features"][1], want, rtol=1e-5, atol=1e-6)

    perturbed_run("audio", tmp_path / "aud")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i, n in enumerate((6000, 9000)):
        sf.write(wavs / f"{i}.wav", (rng.randn(n) * 0.1).astype(np.float32), 16000)
    sf.write(wavs / "tiny.wav", np.zeros(100, dtype=np.float32), 16000)
    res = embed(tmp_path / "aud", wavs, tmp_path / "a.pt", pool="none", progress=False)
    a = torch.load(tmp_path / "a.pt")
    assert [Path(n).name for n in a["names"]] == ["0.wav", "1.wav"] and "tiny.wav" in a["skipped"][0][0]
    enc = d2v.load_encoder(tmp_path / "aud")
    wav, _ = sf.read(wavs / "0.wav", dtype="float32")
    w = torch.nn.functional.layer_norm(torch.from_numpy(wav), (len(wav),), eps=1e-5)[None]
    want = enc(w).features[0]  # alone (no padding): the padded batch must give the same frames
    got = a["features"][a["offsets"][0]:a["offsets"][1]]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no CLS token"):
        embed(tmp_path / "aud", wavs, tmp_path / "b.npz", pool="cls", progress=False)


def _mini_gpt2(folder: Path) -> dict:
    """GPT-2-format BPE files (encoder.json, vocab.bpe) over the 256 byte symbols plus three merges."""
    import json

    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he")]
    enc = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        enc[a + b] = len(enc)
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps(enc))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return enc


def test_text_import_without_a_tokenizer_never_makes_one_up(tmp_path):
    """The run's data.tokenizer names a file that import did not write: probe and embed stop with the
    reason, instead of training a new tokenizer whose ids would not be the embedding's."""
    from d2v.embed import embed

    perturbed_run("text", tmp_path / "run")
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    res = import_fairseq(f, tmp_path / "imp")
    assert res.config.data.tokenizer.endswith("tokenizer.json")
    assert not (tmp_path / "imp" / "tokenizer.json").exists()
    (tmp_path / "lines.txt").write_text("some text\n")
    with pytest.raises(FileNotFoundError, match="imported without --tokenizer or --gpt2-bpe"):
        embed(tmp_path / "imp", tmp_path / "lines.txt", tmp_path / "e.npz", progress=False)


def test_text_import_with_dictionary_and_gpt2_bpe_then_embed(tmp_path):
    from d2v.embed import embed

    enc = _mini_gpt2(tmp_path / "gpt2")
    perturbed_run("text", tmp_path / "run")  # vocab 64 = 4 specials + 59 symbols + <mask>
    f, _ = export_fairseq(tmp_path / "run", tmp_path / "fs.pt")
    wanted = ["Ġthe", "t", "he", "Ġ", "Ġt", "a", "b", "c", "."] + [c for c in "defghijklmnopqrsuvwxyz"]
    wanted += [c for c in sorted(enc) if c not in wanted][: 59 - len(wanted)]
    (tmp_path / "dict.txt").write_text("".join(f"{enc[t]} {1000 - i}\n" for i, t in enumerate(wanted)))
    res = import_fairseq(f, tmp_path / "imp", dict_path=tmp_path / "dict.txt", gpt2_bpe=tmp_path / "gpt2")
    assert (tmp_path / "imp" / "dict.txt").is_file() and (tmp_path / "imp" / "tokenizer.json").is_file()
    assert res.config.data.tokenizer == str((tmp_path / "imp" / "tokenizer.json").resolve())
    tok = d2v.load_encoder(tmp_path / "imp").tokenizer
    ids = tok.encode("the the").ids
    assert ids == [4 + wanted.index(t) for t in ("t", "he", "Ġthe")]  # fairseq's indices, 4 + dict line
    assert tok.decode(ids) == "the the" and tok.token_to_id("<mask>") == 63
    (tmp_path / "lines.txt").write_text("the cab\n\nbad face.\n")
    out = embed(tmp_path / "imp", tmp_path / "lines.txt", tmp_path / "e.npz", progress=False)
    assert out["items"] == 2
    bad = tmp_path / "short_dict.txt"
    bad.write_text("".join(f"{enc[t]} 1\n" for t in wanted[:10]))
    with pytest.raises(FairseqImportError, match="do not fit the checkpoint's embedding of 64 rows"):
        import_fairseq(f, tmp_path / "imp2", dict_path=bad)
