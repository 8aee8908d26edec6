"""The DeepSpeed config derived from d2v's typed config (no DeepSpeed process): one source of truth,
user JSON overrides of keys d2v does not own, refusals naming the d2v key, engine selection.

Run: .venv/bin/python -m pytest -q tests/test_engine_config.py
"""
import json
from pathlib import Path

import pytest
import torch

from d2v.backends import backend_name
from d2v.backends.deepspeed.config import deepspeed_config
from d2v.config import ConfigError, check_resume_config, load_config
from d2v.optim import build_optimizer

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_image.yaml"


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_derived_from_d2v_keys():
    c = cfg("train.batch_size=8", "engine.grad_accum_steps=3", "engine.zero_stage=2", "optim.clip_norm=1.5",
            "train.precision=bf16")
    ds = deepspeed_config(c, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2}
    assert "activation_checkpointing" not in ds and "optimizer" not in ds


def test_fp16_dynamic_loss_scale_offload_and_checkpointing():
    ds = deepspeed_config(cfg("train.precision=fp16", "engine.zero_stage=1", "engine.offload_optimizer=true",
                              "engine.activation_checkpointing=true"), world_size=1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "activation_checkpointing" in ds


def test_user_json_overrides_documented_keys(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "wall_clock_breakdown": True,
                             "gradient_clipping": 4.0}))  # same value as derived: allowed
    ds = deepspeed_config(cfg("engine.zero_stage=2", f"engine.ds_config={p}"), world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}
    assert ds["wall_clock_breakdown"] is True


@pytest.mark.parametrize("user, owner", [
    ({"train_micro_batch_size_per_gpu": 3}, "train.batch_size"),
    ({"zero_optimization": {"stage": 3}}, "engine.zero_stage"),
    ({"bf16": {"enabled": True}}, "train.precision"),
    ({"optimizer": {"type": "Adam"}}, "engine.optimizer"),
])
def test_user_json_cannot_contradict_d2v(user, owner):
    with pytest.raises(ConfigError, match=owner.replace(".", r"\.")):
        deepspeed_config(cfg(), world_size=1, user=user)


def test_missing_ds_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="engine.ds_config: file not found"):
        deepspeed_config(cfg(f"engine.ds_config={tmp_path / 'nope.json'}"), world_size=1)


def test_engine_validation():
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        cfg("engine.zero_stage=4")
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        cfg("engine.offload_optimizer=true")
    with pytest.raises(ConfigError, match="fp16"):
        cfg("train.precision=fp16", "engine.name=single")


@pytest.mark.parametrize("override", ["engine.grad_accum_steps=4", "engine.zero_stage=2",
                                      "engine.activation_checkpointing=true",
                                      "engine.optimizer=deepspeed_adam", "engine.max_nonfinite_steps=3"])
def test_single_trainer_refuses_deepspeed_only_keys(tmp_path, override):
    """The single backend would ignore these keys: it names them and builds nothing."""
    from d2v.trainer import Trainer

    c = cfg(override, "engine.name=single", f"train.out_dir={tmp_path / 'run'}")
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*the single backend does not implement.*deepspeed"):
        Trainer(c, progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_engine_follows_the_launcher(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert backend_name(cfg()) == "single"
    assert backend_name(cfg("engine.name=deepspeed")) == "deepspeed"
    assert backend_name(cfg("engine.name=ddp")) == "ddp"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert backend_name(cfg()) == "deepspeed" and backend_name(cfg("engine.name=single")) == "single"


def test_apex_absent_is_a_clear_error():
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("NVIDIA apex is installed here")
    except ImportError:
        pass
    c = cfg("engine.optimizer=apex_fused_adam")
    with pytest.raises(ConfigError, match="needs NVIDIA apex"):
        build_optimizer(c, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])


def test_resume_accepts_runs_saved_before_the_engine_section():
    c = cfg().to_dict()
    old = {k: v for k, v in c.items() if k != "engine"}
    check_resume_config(old, c, "ck")  # defaults: no difference
    with pytest.raises(ValueError, match="engine.zero_stage"):
        check_resume_config(old, cfg("engine.zero_stage=1").to_dict(), "ck")
