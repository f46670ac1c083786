"""Distillation config: presets, the students list and its overrides, typed errors."""

from __future__ import annotations

import pytest

from dinoapp.distill.config import DistillConfig, distill_preset_names, load_distill_config
from dinoapp.errors import ConfigError


def test_presets_load_and_validate():
    assert distill_preset_names() == ["distill-cpu-smoke", "distill-l-to-s"]
    smoke = load_distill_config("distill-cpu-smoke")
    assert [s.name for s in smoke.students] == ["vit", "cnn"]
    assert smoke.students[1].backbone == "timm:convnext_atto" and smoke.students[1].arch_overrides == {"out_index": 2}
    big = load_distill_config("distill-l-to-s")
    assert big.teacher.backbone == "vit_large_patch16_dinov3.lvd1689m" and big.students[0].name == "vits"


def test_student_overrides_by_index_and_whole_list():
    cfg = load_distill_config("distill-cpu-smoke", ["students.1.drop_path=0.1", "students.0.optim={lr: 2e-3}",
                                                    "students.0.arch_overrides.depth=3"])  # fmt: skip
    assert cfg.students[1].drop_path == 0.1
    assert cfg.students[0].optim == {"lr": 0.002} and cfg.student_optim(0).lr == 0.002  # YAML's "2e-3" typed
    assert cfg.student_optim(1).lr == cfg.optim.lr  # the other student keeps the run's optim section
    assert cfg.students[0].arch_overrides["depth"] == 3
    cfg = load_distill_config("distill-cpu-smoke", ['students=[{name: a}, {name: b, backbone: "timm:resnet18"}]'])
    assert [(s.name, s.backbone) for s in cfg.students] == [("a", "vits16"), ("b", "timm:resnet18")]
    assert DistillConfig().to_dict()["students"][0]["name"] == "student"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("students.5.drop_path=0.1", "students.<index>"),
        ("students.0.colour=1", "unknown key students.0.colour"),
        ("students=[{nme: a}]", "unknown key 'nme'"),
        ("students=[{name: a}, {name: a}]", "unique"),
        ("students=[]", "at least one student"),
        ("students.0.name=a/b", "folder name"),
        ("students.0.projector=big", "projector"),
        ("students.0.optim={lrr: 1}", "unknown keys"),
        ("students.0.optim={lr: fast}", "lr must be a number"),
        ("loss.mode=magic", "loss.mode"),
        ("loss.feature_loss=l1", "cosine or mse"),
        ("teacher.resolution=0.5", "teacher.resolution"),
        ("train.strategy=fsdp", "unknown key train.strategy"),
        ("data.global_sizes=[64,96]", "one global size"),
        ("eval.seg_images=x", "go together"),
        ("optim.layer_decay=0", "layer_decay"),  # the shared sections keep their own range checks
        ("students.0.optim={schedule: cosin}", "students.0.optim.schedule"),  # so do a student's own settings
        ("students.0.optim={ema_momentum: 1.5}", "students.0.optim.ema_momentum"),
        ("students.1.optim={lr: -1}", "students.1.optim.lr"),
    ],
)
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_distill_config("distill-cpu-smoke", [override])


def test_yaml_file_with_base(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: distill-cpu-smoke\nteacher: {backbone: my.safetensors}\nstudents:\n  - {name: only}\n")
    cfg = load_distill_config(f)
    assert cfg.teacher.backbone == "my.safetensors" and [s.name for s in cfg.students] == ["only"]
    assert cfg.data.global_size == 64  # from the base preset
    saved = tmp_path / "config.yaml"
    cfg.save(saved)
    again = load_distill_config(saved)
    assert again.to_dict() == cfg.to_dict()
