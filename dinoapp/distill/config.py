"""Distillation configuration: typed dataclasses, YAML presets in ``dinoapp/distill/presets``, dotted overrides.

A run is one :class:`DistillConfig` (sections ``teacher``, ``students``, ``loss``, ``data``, ``optim``,
``train``, ``run``, ``eval``). ``students`` is a list; override one entry with ``students.0.lr=...``
style keys (``students.<index>.<key>=value``) or replace the list with ``students=[{...}, ...]``.
Loading, presets (``base:`` chains), type checks and error messages are those of the pretraining
config (:func:`dinoapp.ssl.config.build_config`); ``data``, ``optim`` and ``run`` are the very same
sections as there.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..ssl.config import (
    ConfigFile,
    DataConfig,
    OptimConfig,
    RunConfig,
    _check,
    _coerce,
    build_config,
    preset_names,
)

PACKAGE = "dinoapp.distill"


@dataclass
class TeacherConfig:
    backbone: str | None = None  # anything load_backbone reads: our run export (with heads), Meta dump, timm name
    resolution: float = 1.0  # teacher crop size / student crop size (the teacher sees the same crops, larger)


@dataclass
class StudentConfig:
    name: str = "student"  # output folder students/<name>/
    backbone: str = "vits16"  # arch name (random init), "timm:<model>" (any timm CNN), or a checkpoint to start from
    arch_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 6} or, for timm:, {out_index: 2}
    drop_path: float = 0.0  # stochastic depth (spec: 0.1 or 0 for small students)
    projector: str = "auto"  # feature losses: auto (identity if widths match, else linear) | linear | mlp
    optim: dict[str, Any] = field(default_factory=dict)  # overrides of the optim section for this student


@dataclass
class DistillLossConfig:
    """``mode``: ``heads`` = DINO + iBOT + KoLeo against the teacher's Sinkhorn-Knopp targets (the
    teacher file must hold DINO/iBOT heads, e.g. our pretraining export); ``features`` = cosine/MSE
    on CLS and patch tokens through projectors + a Gram term (head-less released backbones);
    ``auto`` picks ``heads`` when the teacher has heads, else ``features``; ``both`` adds the feature
    terms to the head-based ones."""

    mode: str = "auto"  # auto | heads | features | both (heads + feature terms)
    # feature-level terms
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    gram_weight: float = 20.0  # the Gram MSE (of cosines) is ~100x smaller than the cosine terms: 20 makes it count
    feature_loss: str = "cosine"  # cosine | mse
    # head-based terms (spec section 4: Meta's recipe)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    sk_iters: int = 3
    dino_same_crop: bool = False  # True: also the (student crop i, teacher crop i) pairs (Meta's DINO leaves them out)
    patch_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: share of patch positions distilled per image ...
    patch_sample_prob: float = 0.5  # ... in this share of the images (students see unmasked crops)


@dataclass
class DistillTrainConfig:
    steps: int = 100000
    batch_size: int = 64  # GLOBAL batch: split over processes
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile each ViT block (CUDA)
    grad_checkpointing: bool = False
    nan_patience: int = 5
    device: str = "auto"


@dataclass
class EvalConfig:
    """Student vs teacher after training on a labelled probe (see :mod:`dinoapp.distill.evaluate`)."""

    labels_csv: str | None = None  # CSV path,label: kNN accuracy
    seg_images: str | None = None  # folder of images ...
    seg_masks: str | None = None  # ... and label PNGs with the same stems: linear-segmentation mIoU
    size: int = 224
    k: int = 20
    seg_epochs: int = 50
    n_probes: int = 16  # training images on which CLS / patch agreement with the teacher is reported


def _default_students() -> list[StudentConfig]:
    return [StudentConfig()]


@dataclass
class DistillConfig(ConfigFile):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: list[StudentConfig] = field(default_factory=_default_students)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def student_optim(self, i: int) -> OptimConfig:
        """The optim section with student ``i``'s overrides applied (typed like every other key)."""
        s = self.students[i]
        hints = typing.get_type_hints(OptimConfig)
        bad = sorted(set(s.optim) - set(hints))
        if bad:
            raise ConfigError(f"students.{i}.optim: unknown keys {bad}; keys of optim: {', '.join(hints)}")
        values = {k: _coerce(v, hints[k], f"students.{i}.optim.{k}", "config") for k, v in s.optim.items()}
        return dataclasses.replace(self.optim, **values)

    def validate(self) -> DistillConfig:
        c = self
        lo = c.loss
        _check(lo.mode in ("auto", "heads", "features", "both"), "loss.mode", "auto, heads, features or both", lo.mode)
        _check(lo.feature_loss in ("cosine", "mse"), "loss.feature_loss", "cosine or mse", lo.feature_loss)
        for key in ("cls_weight", "patch_weight", "gram_weight", "dino_weight", "ibot_weight", "koleo_weight"):
            _check(getattr(lo, key) >= 0, f"loss.{key}", ">= 0", getattr(lo, key))
        for key in ("student_temp", "teacher_temp"):
            _check(getattr(lo, key) > 0, f"loss.{key}", "> 0", getattr(lo, key))
        _check(0 <= lo.patch_ratio[0] <= lo.patch_ratio[1] <= 1, "loss.patch_ratio", "(low, high) in [0, 1]",
               lo.patch_ratio)  # fmt: skip
        _check(0 <= lo.patch_sample_prob <= 1, "loss.patch_sample_prob", "in [0, 1]", lo.patch_sample_prob)
        _check(c.teacher.resolution >= 1, "teacher.resolution", ">= 1 (teacher crop size / student crop size)",
               c.teacher.resolution)  # fmt: skip
        _check(len(c.students) >= 1, "students", "a list of at least one student", c.students)
        names = [s.name for s in c.students]
        _check(len(set(names)) == len(names), "students[].name", "unique (each names an output folder)", names)
        for i, s in enumerate(c.students):
            _check(bool(s.name) and s.name.replace("-", "").replace("_", "").isalnum(), f"students.{i}.name",
                   "letters, digits, - and _ (a folder name)", s.name)  # fmt: skip
            _check(s.projector in ("auto", "linear", "mlp", "identity"), f"students.{i}.projector",
                   "auto, linear, mlp or identity", s.projector)  # fmt: skip
            _check(0 <= s.drop_path < 1, f"students.{i}.drop_path", "in [0, 1)", s.drop_path)
            if s.optim:  # the same range checks as the optim section, named for this student
                from ..ssl.config import PretrainConfig

                o = self.student_optim(i)
                try:
                    PretrainConfig(optim=o).validate()
                except ConfigError as e:
                    raise ConfigError(f"students.{i}.{e}") from None
                s.optim = {k: getattr(o, k) for k in s.optim}  # typed, as saved in config.yaml
        t = c.train
        _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", "auto, fp32 or bf16", t.precision)
        _check(t.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", t.device)
        for key, v in (("train.steps", t.steps), ("train.nan_patience", t.nan_patience),
                       ("data.global_size", c.data.global_size), ("data.local_size", c.data.local_size),
                       ("run.ckpt_every", c.run.ckpt_every), ("run.keep_last", c.run.keep_last),
                       ("run.log_every", c.run.log_every), ("loss.sk_iters", lo.sk_iters),
                       ("eval.size", c.eval.size), ("eval.k", c.eval.k)):  # fmt: skip
            _check(v >= 1, key, "a positive integer", v)
        _check(t.batch_size >= 2, "train.batch_size", ">= 2 (Sinkhorn-Knopp and KoLeo need a batch)", t.batch_size)
        _check(c.data.n_local >= 0, "data.n_local", ">= 0", c.data.n_local)
        _check(c.data.global_sizes is None, "data.global_sizes", "null for distillation (one global size)",
               c.data.global_sizes)  # fmt: skip
        if (c.eval.seg_images is None) != (c.eval.seg_masks is None):
            raise ConfigError("eval.seg_images and eval.seg_masks go together (images and their label PNGs)")
        from ..ssl.config import PretrainConfig

        probe = PretrainConfig(data=c.data, optim=c.optim, run=c.run)  # the shared sections' own range checks
        probe.validate()
        return self


def load_distill_config(
    name_or_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> DistillConfig:
    """Defaults <- preset (``distill-cpu-smoke``, ``distill-l-to-s``) or YAML <- ``section.key=value`` overrides."""
    return build_config(DistillConfig, PACKAGE, name_or_path, overrides)


def distill_preset_names() -> list[str]:
    return preset_names(PACKAGE)
