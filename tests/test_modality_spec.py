"""A modality is one registered ModalitySpec: the registered ones are complete, a key of another
modality is refused, and a fourth modality (tests/toy_modality.py: an encoder and a data module, no
d2v file edited) pretrains, resumes exactly, probes and benchmarks through the shared code.

Run: .venv/bin/python -m pytest -q tests/test_modality_spec.py
"""
import importlib

import pytest
import torch

from d2v import registry
from d2v.config import Config, ConfigError
from d2v.data.build import build_pretrain_data, synthetic_batch
from d2v.metrics import read_metrics
from d2v.modalities import ModalityEncoder
from d2v.registry import ModalitySpec, get_modality, modality_names, register_modality
from d2v.trainer import Trainer
from tests import toy_modality


@pytest.fixture
def toy(monkeypatch):
    """The toy modality registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return register_modality(ModalitySpec(**toy_modality.SPEC))


def _toy_cfg(out_dir, steps=4, **train):
    return Config.from_dict({"model": {"modality": "toy"},
                             "train": {"max_steps": steps, "batch_size": 4, "log_every": 1, "ckpt_every": 2,
                                       "out_dir": str(out_dir), "probe_after": False, **train},
                             "optim": {"warmup_steps": 1}, "ema": {"anneal_end_step": steps},
                             "data": {"num_workers": 0}})


@pytest.mark.parametrize("name", ["image", "audio", "text"])
def test_each_registered_modality_names_an_encoder_and_a_data_module(name):
    spec = get_modality(name)
    module, _, cls = spec.encoder.partition(":")
    assert issubclass(getattr(importlib.import_module(module), cls), ModalityEncoder)
    data = importlib.import_module(spec.data)
    assert all(callable(getattr(data, f)) for f in ("pretrain_data", "probe_tasks", "synthetic_batch"))
    assert "tiny" in spec.flavors and spec.source_key and spec.sample_unit
    cfg = Config.from_dict({"model": {"modality": name}})  # every preset and default passes validation
    assert cfg.model.modality == name


def test_owned_keys_are_config_fields_and_owned_once():
    cfg = Config()
    owners = {}
    for spec in map(get_modality, modality_names()):
        for sec, keys in (("model", spec.model_keys), ("data", spec.data_keys)):
            for k in keys:
                assert hasattr(getattr(cfg, sec), k), f"{spec.name}: {sec}.{k} is not a config field"
                assert (sec, k) not in owners, f"{sec}.{k} owned by {owners.get((sec, k))} and {spec.name}"
                owners[(sec, k)] = spec.name


@pytest.mark.parametrize("modality,key,value", [("image", "vocab_size", 100), ("audio", "image_size", 64),
                                                ("text", "use_alibi", True)])
def test_a_key_of_another_modality_is_refused(modality, key, value):
    with pytest.raises(ConfigError, match=rf"model\.{key}: .* is set, but it is a .* key and model\.modality "
                                          rf"is {modality}"):
        Config.from_dict({"model": {"modality": modality, key: value}})
    with pytest.raises(ConfigError, match=r"data\.tokens_per_sample: .*text key.*modality is image"):
        Config.from_dict({"model": {"modality": "image"}, "data": {"tokens_per_sample": 64}})


def test_unknown_modality_lists_the_registered_ones(toy):
    with pytest.raises(ConfigError, match=r"model\.modality: expected one of \['image', 'audio', 'text', "
                                          r"'toy'\], got 'video'"):
        Config.from_dict({"model": {"modality": "video"}})


def test_registered_checks_run(toy):
    with pytest.raises(ConfigError, match=r"model\.image_size \(30\) must be a multiple of model\.patch"):
        Config.from_dict({"model": {"image_size": 30}})
    with pytest.raises(ConfigError, match=r"model\.num_extra_tokens \(1\): audio models have no extra"):
        Config.from_dict({"model": {"modality": "audio", "num_extra_tokens": 1}})


def test_a_fourth_modality_pretrains_resumes_probes_and_benchmarks(toy, tmp_path):
    from d2v.probe import run_probe

    full = Trainer(_toy_cfg(tmp_path / "full", steps=4), progress=False).train()
    rows = read_metrics(full["metrics_csv"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    # a crash after step 3 (checkpoint at 2), then --resume: the same losses, bit for bit
    crashing = Trainer(_toy_cfg(tmp_path / "split", steps=4), progress=False)
    update = crashing.teacher.update

    def update_then_crash(step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return update(step)

    crashing.teacher.update = update_then_crash
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = Trainer(_toy_cfg(tmp_path / "split", steps=4), resume=True, progress=False)
    assert resumed.step == 2
    got = read_metrics(resumed.train()["metrics_csv"])
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in rows]

    res = run_probe(tmp_path / "full", device="cpu")
    assert res["modality"] == "toy" and set(res["tasks"]) == {"last_sign"}
    assert all(0.0 <= acc <= 100.0 for acc in res["pretrained"].values())  # percent

    cfg = _toy_cfg(tmp_path / "bench")
    batch, tokens, per_sample = synthetic_batch(cfg)
    assert batch["x"].shape == (4, toy_modality.T, toy_modality.C) and tokens == toy_modality.T
    ds, loader = build_pretrain_data(cfg)
    assert next(iter(loader))["vectors"].shape == (4, toy_modality.T, toy_modality.C)
