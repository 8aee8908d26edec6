"""Speech and text end to end through the same trainer, CLI, checkpoint format and probe as images:
pretraining on user folders (with bad files reported and skipped) and on the embedded defaults, the
probe tasks, export, and exact resume after a crash (the text tokenizer is reused, not retrained).

Run: .venv/bin/python -m pytest -q tests/test_e2e_modalities.py
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.checkpoint import resolve_checkpoint
from d2v.config import load_config
from d2v.metrics import read_metrics
from d2v.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

MICRO_AUDIO = {
    "model.conv_dim": 16, "model.embed_dim": 32, "model.num_heads": 2, "model.depth": 2,
    "model.conv_pos_groups": 4, "model.decoder.dim": 16, "model.decoder.groups": 4,
    "objective.average_top_k_layers": 2, "masking.clone_batch": 2, "train.batch_size": 4,
    "data.max_sample_size": 8000, "data.min_sample_size": 1600,
}
MICRO_TEXT = {
    "model.vocab_size": 320, "model.max_positions": 32, "data.tokens_per_sample": 32,
    "model.embed_dim": 32, "model.num_heads": 2, "model.depth": 2, "model.decoder.dim": 16,
    "objective.average_top_k_layers": 2, "masking.clone_batch": 2, "train.batch_size": 4,
}


def overrides(modality, out_dir, steps, **extra):
    d = dict(MICRO_AUDIO if modality == "audio" else MICRO_TEXT)
    d.update({"train.max_steps": steps, "train.log_every": 1, "train.ckpt_every": 3,
              "train.out_dir": str(out_dir), "train.probe_after": False, "optim.warmup_steps": 2,
              "ema.anneal_end_step": steps, "data.num_workers": 0})
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]


def d2v(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "d2v", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def write_audio_folder(root: Path, n_per_class=8):
    """Two classes of real wav files: low and high tones with noise, 0.3-0.6 s, at 16 and 22.05 kHz."""
    rng = np.random.RandomState(0)
    for cls, f0 in (("low", 220.0), ("high", 1760.0)):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            sr = 16000 if i % 2 else 22050
            t = np.arange(int(sr * (0.3 + 0.04 * i))) / sr
            wav = 0.5 * np.sin(2 * np.pi * f0 * (1 + 0.05 * i) * t) + 0.05 * rng.randn(t.size)
            sf.write(root / cls / f"{i}.wav", wav.astype(np.float32), sr)
    (root / "high" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    sf.write(root / "low" / "tiny.wav", np.zeros(200, np.float32), 16000)  # shorter than one frame


TOPICS = {
    "cooking": "stir the soup slowly and add salt, pepper and fresh basil before serving the dinner",
    "sailing": "the boat leaned into the wind as the crew trimmed the sails and watched the waves",
}


def write_text_folder(root: Path, lines_per_class=30):
    rng = np.random.RandomState(0)
    for cls, sentence in TOPICS.items():
        (root / cls).mkdir(parents=True)
        words = sentence.split()
        lines = [" ".join(rng.permutation(words)[: rng.randint(6, len(words))])
                 for _ in range(lines_per_class)]
        (root / cls / "a.txt").write_text("\n".join(lines) + "\n")
    (root / "cooking" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "sailing" / "empty.txt").write_text("   \n")


@pytest.mark.slow
def test_audio_folder_pretrain_probe_export(tmp_path):
    data, out = tmp_path / "audio", tmp_path / "run"
    write_audio_folder(data)
    r = d2v("pretrain", "--config", str(CONFIGS / "tiny_audio.yaml"), "--no-progress",
            *overrides("audio", out, 3, **{"data.path": data}))
    assert r.returncode == 0, r.stderr
    assert "d2v pretrain | audio/tiny" in r.stderr and "done: 3 steps" in r.stdout
    assert "16 samples" in r.stderr and "2 unreadable skipped" in r.stderr
    assert "corrupt.wav" in r.stderr and "tiny.wav" in r.stderr  # reported by path
    p = d2v("probe", "--checkpoint", str(out), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert list(res["tasks"]) == ["class"] and res["n_train"] == 12 and res["n_test"] == 4
    for enc in ("pretrained", "teacher", "random_init"):
        assert 0.0 <= res[enc]["full"] <= 100.0
    exp = tmp_path / "export.pt"
    assert d2v("export", "--checkpoint", str(out), "--out", str(exp)).returncode == 0
    blob = torch.load(exp, map_location="cpu", weights_only=False)
    assert not any("local_encoder" in k for k in blob["teacher"])  # the CNN is the student's
    assert any(k.startswith("modality_encoder.local_encoder") for k in blob["student"])


@pytest.mark.slow
def test_text_folder_pretrain_probe_and_bad_files(tmp_path):
    data, out = tmp_path / "text", tmp_path / "run"
    write_text_folder(data)
    r = d2v("pretrain", "--config", str(CONFIGS / "tiny_text.yaml"), "--no-progress",
            *overrides("text", out, 3, **{"data.path": data}))
    assert r.returncode == 0, r.stderr
    assert "d2v pretrain | text/tiny" in r.stderr and "done: 3 steps" in r.stdout
    assert "latin1.txt" in r.stderr and "empty.txt" in r.stderr  # reported by path, skipped
    assert (out / "tokenizer.json").is_file()
    p = d2v("probe", "--checkpoint", str(out), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert list(res["tasks"]) == ["word_order", "class"]
    cls = res["tasks"]["class"]
    assert cls["n_train"] == 48 and cls["n_test"] == 12 and cls["classes"] == 2  # 60 lines split 80/20
    assert res["tasks"]["word_order"]["classes"] == 2


def test_text_with_no_usable_file_fails_clearly(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (data / "b.txt").write_text("")
    r = d2v("pretrain", "--config", str(CONFIGS / "tiny_text.yaml"),
            *overrides("text", tmp_path / "run", 2, **{"data.path": data}))
    assert r.returncode == 2
    assert str(data) in r.stderr


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_resume_continues_exactly(tmp_path, monkeypatch, modality):
    data = tmp_path / "data"
    (write_audio_folder if modality == "audio" else write_text_folder)(data)
    recipe = CONFIGS / f"tiny_{modality}.yaml"

    def cfg(out):
        return load_config(recipe, overrides(modality, out, 5, **{"data.path": data}))

    Trainer(cfg(tmp_path / "a"), progress=False).train()
    ref = read_metrics(tmp_path / "a" / "metrics.csv")
    crashing = Trainer(cfg(tmp_path / "b"), progress=False)
    orig = crashing.teacher.update

    def update_then_crash(step):
        d = orig(step)
        if step == 4:
            raise RuntimeError("simulated crash")
        return d

    monkeypatch.setattr(crashing.teacher, "update", update_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    assert resolve_checkpoint(tmp_path / "b").name == "step_00000003"
    tok = tmp_path / "b" / "tokenizer.json"
    stamp = tok.stat().st_mtime_ns if modality == "text" else None
    Trainer(cfg(tmp_path / "b"), resume=True, progress=False).train()
    got = read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, got):
        for k in ("loss", "target_var", "pred_var", "lr"):
            assert a[k] == b[k], (modality, a["step"], k)
    if modality == "text":
        assert tok.stat().st_mtime_ns == stamp  # the run's tokenizer is reused, not retrained


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_embedded_speech_pretrain_and_both_probes(tmp_path):
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", str(CONFIGS / "tiny_audio.yaml"), "--no-progress",
            *overrides("audio", out, 3, **{"train.probe_after": True, "train.batch_size": 8}))
    assert r.returncode == 0, r.stderr
    assert "1280 samples" in r.stderr  # 64 training voices x 20 words
    res = json.loads((out / "probe.json").read_text())
    assert set(res["tasks"]) == {"word", "speaker"}
    assert res["tasks"]["word"]["classes"] == 20 and res["tasks"]["word"]["n_test"] == 320
    assert res["tasks"]["speaker"]["classes"] == 80


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="fortunes not installed")
def test_embedded_fortunes_pretrain_and_topic_probe(tmp_path):
    out = tmp_path / "run"
    r = d2v("pretrain", "--config", str(CONFIGS / "tiny_text.yaml"), "--no-progress",
            *overrides("text", out, 3, **{"train.probe_after": True}))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "probe.json").read_text())
    assert list(res["tasks"]) == ["word_order", "topic"] and res["tasks"]["topic"]["classes"] == 8
    assert res["tasks"]["topic"]["n_train"] > 3000 and res["tasks"]["topic"]["n_test"] > 700
    assert res["n_train"] > 2000  # headline task: word order on the fortunes with more than 8 tokens
