"""Config: recipes load, paper values are in base_image.yaml, bad keys/values fail naming the key,
key=value overrides parse as YAML, and to_dict round-trips.

Run: .venv/bin/python -m pytest -q tests/test_config.py
"""
from pathlib import Path

import pytest

from d2v.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny_image", "base_image", "large_image"])
def test_recipes_load_and_round_trip(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_base_image_is_the_paper_recipe():
    c = load_config(CONFIGS / "base_image.yaml")
    m = c.model
    assert (m.image_size, m.patch_size, m.embed_dim, m.depth, m.prenet_depth, m.num_heads) == (224, 16, 768, 10, 2, 12)
    assert (m.decoder.dim, m.decoder.kernel, m.decoder.layers, m.decoder.groups) == (768, 3, 6, 16)
    assert (c.masking.mask_prob, c.masking.mask_length, c.masking.mask_prob_adjust, c.masking.clone_batch) == \
        (0.8, 3, 0.07, 16)
    assert (c.objective.average_top_k_layers, c.objective.final_norm, c.objective.cls_loss) == (10, "layer", 0.01)
    assert c.objective.loss_scale is None and c.objective.loss_beta == 0.0
    assert (c.ema.ema_start, c.ema.ema_end, c.ema.anneal_end_step) == (0.9998, 0.99999, 100000)
    o = c.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.clip_norm) == \
        (1e-3, (0.9, 0.95), 1e-8, 0.05, 50040, 4.0)
    assert c.train.max_steps == 375300 and c.train.batch_size == 16


def test_large_image_values():
    c = load_config(CONFIGS / "large_image.yaml")
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.decoder.kernel) == (1024, 24, 16, 5)
    assert (c.masking.mask_prob, c.masking.mask_prob_adjust, c.objective.average_top_k_layers) == (0.75, 0.1, 18)


def test_unknown_key_names_it_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
        load_config(None, ["optim.lrr=0.1"])
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'trian'.*did you mean 'train'"):
        load_config(p)
    with pytest.raises(ConfigError, match="model.decoder.depth"):
        load_config(None, ["model.decoder.depth=2"])


@pytest.mark.parametrize("override,match", [
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("train.precision=fp8", "train.precision: expected one of"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2"),
    ("data.hflip=3", "data.hflip: expected true/false"),
    ("masking.mask_prob=1.5", "masking.mask_prob"),
    ("model.flavor=huge", "model.flavor: unknown flavor 'huge'"),
    ("objective.average_top_k_layers=40", "exceeds model.depth"),
    ("model.patch_size=5", "multiple of model.patch_size"),
    ("train.max_steps", "expected key=value"),
    ("probe.pool=cls model.num_extra_tokens=0", "'cls' needs a CLS token"),
    ("train.compile=1", "train.compile: expected true/false"),
    ("train.compile_mode=reduce-overhead", "train.compile_mode: expected one of"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "tiny_image.yaml", override.split(" "))


@pytest.mark.parametrize("recipe", ["tiny_audio", "tiny_text"])
def test_extra_tokens_are_image_only(recipe):
    """Audio/text models have no CLS token (as in the reference): the key is refused, not ignored."""
    assert load_config(CONFIGS / f"{recipe}.yaml", []).model.num_extra_tokens == 0
    with pytest.raises(ConfigError, match="model.num_extra_tokens .1.: .* no extra .CLS. tokens"):
        load_config(CONFIGS / f"{recipe}.yaml", ["model.num_extra_tokens=1"])
    with pytest.raises(ConfigError, match="probe.pool: 'cls' needs a CLS token"):
        load_config(CONFIGS / f"{recipe}.yaml", ["probe.pool=cls"])


def test_overrides_parse_yaml_and_flavor_then_fields():
    c = load_config(CONFIGS / "tiny_image.yaml", ["train.max_steps=7", "optim.betas=[0.8, 0.9]",
                                                  "data.path=/x/y", "model.depth=6", "objective.loss_scale=1"])
    assert c.train.max_steps == 7 and c.optim.betas == (0.8, 0.9) and c.data.path == "/x/y"
    assert c.model.depth == 6 and c.model.embed_dim == 128  # flavor preset, then the override
    assert c.objective.loss_scale == 1.0
    c2 = load_config(None, ["model.flavor=base", "objective.average_top_k_layers=10"])
    assert c2.model.embed_dim == 768 and c2.model.image_size == 224


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_defaults_are_valid_and_k_defaults_to_all_blocks():
    c = load_config(None)
    assert c.objective.average_top_k_layers is None  # all main blocks (the reference's image base: 10 of 10)


def test_normalization_defaults_follow_the_data():
    from d2v.data.build import normalization
    from d2v.data.embedded import DIGITS32_MEAN
    from d2v.data.images import IMAGENET_MEAN

    assert normalization(load_config(CONFIGS / "tiny_image.yaml"))[0] == tuple(DIGITS32_MEAN)
    assert normalization(load_config(CONFIGS / "tiny_image.yaml", ["data.path=/x"]))[0] == tuple(IMAGENET_MEAN)
    got = normalization(load_config(CONFIGS / "tiny_image.yaml", ["data.mean=[0.1,0.2,0.3]"]))[0]
    assert got == (0.1, 0.2, 0.3)


def test_compile_may_change_on_resume():
    """train.compile changes only float rounding (like train.num_threads): a run resumes with it switched,
    and a checkpoint saved before the key existed resumes too."""
    from d2v.config import check_resume_config

    saved = load_config(CONFIGS / "tiny_image.yaml").to_dict()
    now = load_config(CONFIGS / "tiny_image.yaml",
                      ["train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"]).to_dict()
    check_resume_config(saved, now, "ck")
    old = dict(saved, train={k: v for k, v in saved["train"].items() if not k.startswith("compile")})
    check_resume_config(old, now, "ck")
