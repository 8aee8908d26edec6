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
    assert (m.image_size, m.patch_size, m.embed_dim, m.depth, m.prenet_depth, m.num_heads) == \
        (224, 16, 768, 10, 2, 12)
    assert (m.decoder.dim, m.decoder.kernel, m.decoder.layers, m.decoder.groups) == (768, 3, 6, 16)
    mk = c.masking
    assert (mk.mask_prob, mk.mask_length, mk.mask_prob_adjust, mk.clone_batch) == (0.8, 3, 0.07, 16)
    assert (c.objective.average_top_k_layers, c.objective.final_norm, c.objective.cls_loss) == \
        (10, "layer", 0.01)
    assert c.objective.loss_scale is None and c.objective.loss_beta == 0.0
    assert (c.ema.ema_start, c.ema.ema_end, c.ema.anneal_end_step) == (0.9998, 0.99999, 100000)
    o = c.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.clip_norm) == \
        (1e-3, (0.9, 0.95), 1e-8, 0.05, 50040, 4.0)
    assert c.train.max_steps == 375300 and c.train.batch_size == 16


def test_large_image_values():
    c = load_config(CONFIGS / "large_image.yaml")
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.decoder.kernel) == (1024, 24, 16, 5)
    assert (c.masking.mask_prob, c.masking.mask_prob_adjust, c.objective.average_top_k_layers) == \
        (0.75, 0.1, 18)


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
                                                  "data.path=/x/y", "model.depth=6",
                                                  "objective.loss_scale=1"])
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
    from d2v.data.build_image import normalization
    from d2v.data.embedded import DIGITS32_MEAN
    from d2v.data.images import IMAGENET_MEAN

    assert normalization(load_config(CONFIGS / "tiny_image.yaml"))[0] == tuple(DIGITS32_MEAN)
    got = normalization(load_config(CONFIGS / "tiny_image.yaml", ["data.path=/x"]))[0]
    assert got == tuple(IMAGENET_MEAN)
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


# ---- every key checked before any work, one line per bad key -----------------------------------------------

@pytest.mark.parametrize("override,line", [
    ("model.patch_size=0", "model.patch_size must be >= 1, got 0"),
    ("model.embed_dim=100", "model.embed_dim (100) must be divisible by model.decoder.groups (8)"),
    ("masking.mask_prob=0", "masking.mask_prob: expected a value in (0.0, 1.0), got 0.0"),
    ("masking.mask_prob=0.99", "masking.mask_prob: 0.99 keeps 0 of the 64 patches"),
    ("masking.mask_prob=1e-20", "masking.mask_prob: 1e-20 masks 0 of the 64 patches"),
])
def test_bad_key_is_named_before_any_work(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_image.yaml", [override])
    assert line in str(e.value)


def test_audio_embed_dim_must_fit_the_decoder_groups():
    with pytest.raises(ConfigError,
                       match=r"model.embed_dim \(100\) must be divisible by model.decoder.groups"):
        load_config(CONFIGS / "tiny_audio.yaml", ["model.embed_dim=100", "model.num_heads=4",
                                                  "model.conv_pos_groups=4"])


def test_every_bad_key_gets_its_own_line():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_image.yaml", ["optim.lr=-0.001", "optim.eps=0", "optim.clip_norm=-1",
                                                  "train.batch_size=0"])
    lines = str(e.value).splitlines()
    assert lines[0] == f"{CONFIGS / 'tiny_image.yaml'}: 4 invalid config values:"
    assert [s.strip() for s in lines[1:]] == [
        "optim.lr must be > 0, got -0.001",
        "optim.eps must be > 0, got 0.0",
        "optim.clip_norm must be >= 0, got -1.0",
        "train.batch_size must be >= 1, got 0",
    ]
    assert len(e.value.errors) == 4


def test_type_errors_are_all_listed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=abc", "train.max_steps=x", "optim.lrr=1"])
    text = str(e.value)
    for key in ("optim.lr: expected a number, got 'abc'", "train.max_steps: expected an integer, got 'x'",
                "unknown config key 'optim.lrr'"):
        assert key in text


# ---- numbers written without a dot (YAML 1.1 reads 1e-3 as a string) ---------------------------------------

def test_exponent_numbers_are_numbers(tmp_path):
    c = load_config(CONFIGS / "tiny_image.yaml", ["optim.lr=1e-3", "optim.eps=1E-8", "train.max_steps=1e3",
                                                  "optim.betas=[9e-1, 0.95]"])
    assert c.optim.lr == 1e-3 and c.optim.eps == 1e-8 and c.optim.betas == (0.9, 0.95)
    assert c.train.max_steps == 1000 and type(c.train.max_steps) is int
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 5e-4\n")
    assert load_config(p).optim.lr == 5e-4
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got '1.5e0'"):
        load_config(None, ["train.max_steps=1.5e0"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got nan"):
        load_config(None, ["optim.lr=.nan"])


# ---- property-style: every numeric key, a table of bad values per kind -------------------------------------

# the valid set of each numeric key; keys not listed are integers >= 1
KINDS = {
    "model.conv_pos_depth": ">=0", "model.prenet_depth": ">=0", "model.num_extra_tokens": ">=0",
    "model.vocab_size": ">=8", "model.max_positions": ">=2", "model.mlp_ratio": ">0", "model.norm_eps": ">0",
    "model.encoder_dropout": "[0,1)", "model.attention_dropout": "[0,1)", "model.activation_dropout": "[0,1)",
    "model.post_mlp_dropout": "[0,1)", "model.prenet_dropout": "[0,1)", "model.layerdrop": "[0,1)",
    "model.decoder.kernel": "odd", "model.decoder.input_dropout": "[0,1)",
    "model.decoder.projection_layers": "{1,2}", "model.decoder.projection_ratio": ">0",
    "masking.mask_prob": "(0,1)", "masking.mask_prob_adjust": "[0,1]",
    "objective.loss_beta": ">=0", "objective.loss_scale": ">0", "objective.cls_loss": ">=0",
    "objective.decoder_noise_std": ">=0", "objective.min_target_var": ">=0", "objective.min_pred_var": ">=0",
    "objective.collapse_check_after": ">=0",
    "ema.ema_start": "[0,1]", "ema.ema_end": "[0,1]", "ema.anneal_end_step": ">=0",
    "optim.lr": ">0", "optim.betas": "[0,1)", "optim.eps": ">0", "optim.weight_decay": ">=0",
    "optim.warmup_steps": ">=0", "optim.min_lr": ">=0", "optim.clip_norm": ">=0",
    "train.seed": ">=0", "train.num_threads": ">=0", "train.ckpt_every_minutes": ">=0",
    "engine.timeout_minutes": ">0",
    "data.crop_scale": "(0,1]", "data.crop_ratio": ">0", "data.mean": "any", "data.std": ">0",
    "data.sample_rate": ">=1000", "data.tokens_per_sample": ">=2", "data.num_workers": ">=0",
    "probe.seed": ">=0", "engine.zero_stage": "{0,1,2,3}",
}
BAD = {
    ">=1": [0, -1], ">=0": [-1], ">=2": [1, 0, -3], ">=8": [7, -1], ">=1000": [999, -1],
    ">0": [0, -1e-3], "[0,1)": [-0.1, 1, 1.5], "(0,1)": [0, 1, -0.5], "[0,1]": [-0.1, 1.01],
    "(0,1]": [0, 1.5, -1],
    "odd": [0, -1, 4], "{1,2}": [0, 3], "{0,1,2,3}": [-1, 4], "any": [],
}
NOT_NUMBERS = ["abc", "1e", "[1]", "true"]


def _numeric_keys(cls=Config, prefix=""):
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp, key = typing.get_type_hints(cls)[f.name], prefix + f.name
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, key + ".")
        elif (args[0] if args else tp) in (int, float):
            out.append((key, None))
        elif typing.get_origin(tp) is tuple or (args and typing.get_origin(args[0]) is tuple):
            out.append((key, len(typing.get_args(tp if typing.get_origin(tp) is tuple else args[0]))))
    return out


NUMERIC_KEYS = _numeric_keys()


def _cases():
    for key, n in NUMERIC_KEYS:
        for bad in BAD[KINDS.get(key, ">=1")] + NOT_NUMBERS:
            if n is None:
                yield key, f"{key}={bad}", key
            else:  # a tuple: one bad element, the others the default
                yield key, f"{key}=[{', '.join([str(bad)] + ['0.5'] * (n - 1))}]", f"{key}[0]"


def test_numeric_keys_are_all_classified():
    assert len(NUMERIC_KEYS) > 60
    assert set(KINDS) <= {k for k, _ in NUMERIC_KEYS}


@pytest.mark.parametrize("key,override,named", list(_cases()), ids=lambda x: str(x))
def test_every_numeric_key_rejects_bad_values(key, override, named):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_image.yaml", [override])
    lines = [s.strip().removeprefix(f"{CONFIGS / 'tiny_image.yaml'}: ") for s in str(e.value).splitlines()]
    assert any(s.startswith(named) and s[len(named)] in " :" for s in lines), (override, str(e.value))


# ---- hypothesis: invalid values drawn from each key's complement -------------------------------------------

def _invalid(kind: str):
    """A hypothesis strategy of values outside a kind's valid set (numbers, and things that are not)."""
    from hypothesis import strategies as st

    nums = st.floats(allow_nan=False, allow_infinity=False, width=32)
    ints = st.integers(min_value=-10**6, max_value=10**6)
    bounds = {">=1": 1, ">=0": 0, ">=2": 2, ">=8": 8, ">=1000": 1000}
    if kind in bounds:
        bad = ints.filter(lambda v: v < bounds[kind])
    elif kind == ">0":
        bad = nums.filter(lambda v: v <= 0)
    elif kind == "[0,1)":
        bad = nums.filter(lambda v: v < 0 or v >= 1)
    elif kind == "(0,1)":
        bad = nums.filter(lambda v: v <= 0 or v >= 1)
    elif kind == "[0,1]":
        bad = nums.filter(lambda v: v < 0 or v > 1)
    elif kind == "(0,1]":
        bad = nums.filter(lambda v: v <= 0 or v > 1)
    elif kind == "odd":
        bad = ints.filter(lambda v: v < 1 or v % 2 == 0)
    elif kind == "{1,2}":
        bad = ints.filter(lambda v: v not in (1, 2))
    elif kind == "{0,1,2,3}":
        bad = ints.filter(lambda v: v not in (0, 1, 2, 3))
    else:
        bad = st.nothing()
    words = st.text(alphabet="abcxyz_", min_size=1, max_size=6)  # YAML reads these as strings
    return st.one_of(bad.map(repr), words)


def test_hypothesis_invalid_values_give_a_config_error_naming_the_key():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    keys = [(k, n) for k, n in NUMERIC_KEYS if KINDS.get(k, ">=1") != "any"]

    cases = st.sampled_from(keys).flatmap(
        lambda kn: st.tuples(st.just(kn), _invalid(KINDS.get(kn[0], ">=1"))))

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(cases)
    def check(case):
        (key, n), value = case
        override = f"{key}={value}" if n is None else f"{key}=[{', '.join([value] + ['0.5'] * (n - 1))}]"
        named = key if n is None else f"{key}[0]"
        with pytest.raises(ConfigError) as e:
            load_config(CONFIGS / "tiny_image.yaml", [override])
        assert named in str(e.value), (override, str(e.value))

    check()
