"""Pretraining config: presets, dotted overrides, typed errors, round trip through the run folder."""

import pytest

from dinoapp.errors import ConfigError
from dinoapp.ssl.config import PretrainConfig, load_config, preset_names


def test_presets_shipped_and_valid():
    names = preset_names()
    for want in ("cpu-smoke", "vits16-continue-1gpu", "vitl16-continue-8gpu", "scratch-tiny"):
        assert want in names
    for n in names:
        cfg = load_config(n)
        assert isinstance(cfg, PretrainConfig)
    c = load_config("vits16-continue-1gpu")
    assert c.train.freeze_backbone_steps > 0 and c.train.unfreeze_ramp_steps > 0 and c.train.freeze_tokens
    assert c.optim.schedule == "constant" and c.optim.lr == pytest.approx(5e-5)
    assert load_config("vitl16-continue-8gpu").data.domain == "satellite"


def test_defaults_follow_the_spec():
    c = PretrainConfig()
    assert (c.loss.student_temp, c.loss.teacher_temp_start, c.loss.teacher_temp) == (0.1, 0.04, 0.07)
    assert c.model.n_prototypes == 65536 and c.model.head_hidden == 2048 and c.model.head_bottleneck == 256
    assert (c.data.global_size, c.data.local_size, c.data.n_local) == (224, 96, 8)
    assert c.data.global_scale == (0.32, 1.0) and c.data.local_scale == (0.05, 0.32)
    assert c.optim.clip_grad == 3.0 and c.optim.layer_decay == 0.9 and c.optim.patch_embed_lr_mult == 0.2
    assert (c.optim.weight_decay, c.optim.weight_decay_end) == (0.04, 0.4)
    assert (c.optim.ema_momentum, c.optim.ema_momentum_end) == (0.992, 1.0)
    assert c.loss.koleo_weight == 0.1 and c.loss.mask_ratio == (0.1, 0.5) and c.loss.mask_sample_prob == 0.5


def test_overrides_parse_yaml_values():
    c = load_config("cpu-smoke", ["optim.lr=1e-4", "train.steps=7", "data.global_scale=[0.4, 1]",
                                  "model.rope_rescale=null", "model.arch_overrides.depth=3", "data.bands=rgb",
                                  "data.bands=[4,3,2]", "train.freeze_tokens=true"])  # fmt: skip
    assert c.optim.lr == pytest.approx(1e-4) and c.train.steps == 7
    assert c.data.global_scale == (0.4, 1.0) and c.model.rope_rescale is None
    assert c.model.arch_overrides == {"depth": 3} and c.data.bands == [4, 3, 2] and c.train.freeze_tokens is True
    # dict overrides work the same
    assert load_config("cpu-smoke", {"train.steps": 3}).train.steps == 3


def test_bands_take_numbers_or_names_as_domains_load_does(tmp_path):
    """data.bands=[B04,B03,B02] (band descriptions) is as valid as [4,3,2]; both survive the run folder."""
    for override, want in [("data.bands=[B04,B03,B02]", ["B04", "B03", "B02"]), ("data.bands=[4, B08]", [4, "B08"]),
                           ("data.bands=[4,3,2]", [4, 3, 2]), ("data.bands=rgb", "rgb"), ("data.bands=B08", "B08"),
                           ("data.bands=4", 4)]:  # fmt: skip
        c = load_config("cpu-smoke", [override])
        assert c.data.bands == want, override
        assert load_config(c.save(tmp_path / "config.yaml")).data.bands == want, override
    assert load_config("cpu-smoke", {"data.bands": ["red", "nir"]}).data.bands == ["red", "nir"]
    for bad in ("data.bands=[1.5]", "data.bands=[[4]]", "data.bands={a: 1}", "data.bands=[true]"):
        with pytest.raises(ConfigError, match="data.bands must be"):
            load_config("cpu-smoke", [bad])


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("nope.lr=1", "unknown section 'nope'"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("train.steps=1.5", "train.steps must be an integer"),
        ("train.steps=true", "train.steps must be an integer"),
        ("data.global_scale=[1]", "needs 2 values"),
        ("train.steps=0", "train.steps must be a positive integer"),
        ("data.domain=web", "data.domain must be rgb, satellite or medical"),
        ("data.global_scale=[0.9, 0.1]", "data.global_scale must be (low, high)"),
        ("optim.lr", "section.key=value"),
        ("train.batch_size=1", ">= 2"),
        ("optim.ema_momentum=1.5", "ema_momentum"),
        ("data.aug.colour=1", "unknown augmentation options"),
        ("optim.lr.x=1", "has no sub-keys"),
    ],
)
def test_bad_overrides_are_typed_errors(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config("cpu-smoke", [override])


def test_unknown_preset_and_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'cpu-smok'.*cpu-smoke"):
        load_config("cpu-smok")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key optim.learning_rate"):
        load_config(bad)


def test_yaml_file_with_base_and_round_trip(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: cpu-smoke\ntrain:\n  steps: 5\ndata:\n  domain: medical\n")
    c = load_config(f)
    assert c.train.steps == 5 and c.data.domain == "medical" and c.model.n_prototypes == 256  # from the base
    saved = c.save(tmp_path / "config.yaml")
    again = load_config(saved)
    assert again == c
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)


def test_augmentation_overrides_are_typed_and_checked_early():
    c = load_config("cpu-smoke", ["data.domain=medical", "data.aug.hflip=0.5", "data.aug.blur_p=[0, 0.5, 1]"])
    assert c.data.aug == {"hflip": 0.5, "blur_p": (0.0, 0.5, 1.0)}
    with pytest.raises(ConfigError, match="data.aug.blur_p must be a list of 3 numbers"):
        load_config("cpu-smoke", ["data.aug.blur_p=0.5"])
    with pytest.raises(ConfigError, match="data.aug.hflip must be a number"):
        load_config("cpu-smoke", ["data.aug.hflip=yes"])
    with pytest.raises(ConfigError, match="hflip=2.0: a probability"):
        load_config("cpu-smoke", ["data.aug.hflip=2"])
