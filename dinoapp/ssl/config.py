"""Pretraining configuration: typed dataclasses, YAML presets shipped in the package, dotted overrides.

A run is described by one :class:`PretrainConfig` (sections ``model``, ``data``, ``loss``, ``optim``,
``train``, ``run``, ``gram``, ``monitor``). :func:`load_config` starts from a preset name (``cpu-smoke``, ...) or a YAML
file and applies ``section.key=value`` overrides; unknown keys and wrong types raise
:class:`~dinoapp.errors.ConfigError` naming the key. The resolved config is saved in the run folder
(``config.yaml``), so a run can be resumed or reproduced from the folder alone. Defaults are the
DINOv3 spec, sections 2-3; presets change what a smaller run needs (fewer prototypes, smaller crops).

Only the builders (:func:`dinoapp.ssl.train.pretrain`, the CLI) read these objects; everything
below them takes explicit arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny"  # anything load_backbone takes: arch name (random init), timm name, checkpoint path
    arch_overrides: dict[str, Any] = field(default_factory=dict)  # with an arch name, e.g. {depth: 2}
    in_chans: int | None = None  # expand an RGB patch embedding to this many bands (spec section 2)
    mean: list[float] | None = None  # input normalisation (default: the backbone's own)
    std: list[float] | None = None
    drop_path: float = 0.3  # stochastic depth on the student (0.1 or 0 for small students)
    rope_rescale: float | None = 2.0  # training-only RoPE coordinate rescale factor (student only)
    n_prototypes: int = 65536  # DINO head prototypes K
    ibot_n_prototypes: int | None = None  # iBOT head prototypes (None: same as n_prototypes)
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3


@dataclass
class DataConfig:
    path: str | None = None  # folder (or file) of images, GeoTIFFs, DICOMs; set by --data
    domain: str = "rgb"  # augmentation preset: rgb | satellite | medical
    aug: dict[str, Any] = field(default_factory=dict)  # overrides of AugmentParams fields, e.g. {hflip: 0.0}
    global_size: int = 224
    global_sizes: list[int] | None = None  # mixed global crop sizes, one drawn per step (e.g. [512, 768])
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    window: int | None = None  # read random windows of this size (big scenes: bounded memory)
    min_valid: float = 0.5  # windows with fewer valid (non-nodata) pixels are redrawn
    bands: list[int | str] | int | str | None = None  # GeoTIFF bands: 1-based numbers and/or names ([4,3,2],
    #                                                   [B04,B03,B02]), one band, or "rgb" (as domains.load takes them)
    stats: str | None = None  # GeoTIFF band statistics JSON (dinoapp/domains compute_band_stats)
    dicom_window: str | None = None  # DICOM display window: preset name ("lung"), "c,w", or None (auto)
    num_workers: int = 0
    recursive: bool = True


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 3000
    sk_iters: int = 3
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_across_processes: bool = True  # nearest neighbours over the global batch (world-size independent)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_sample_prob: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak lr of the backbone (after layer decay multipliers)
    head_lr: float | None = None  # peak lr of the heads (None: lr)
    min_lr: float = 1e-6
    schedule: str = "cosine"  # cosine | constant (both after a linear warm-up)
    warmup_steps: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float | None = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_momentum: float = 0.992
    ema_momentum_end: float = 1.0
    freeze_last_layer_steps: int = 1250  # heads' last layer frozen at first (spec: the first epoch of 1250 steps)


@dataclass
class TrainConfig:
    steps: int = 100000
    batch_size: int = 64  # GLOBAL batch: split over processes, so results do not depend on the GPU count
    seed: int = 0
    freeze_backbone_steps: int = 0  # continued pretraining stage 1: train the fresh heads only
    unfreeze_ramp_steps: int = 0  # stage 2: backbone lr ramps 0 -> 1 over these steps
    freeze_tokens: bool = False  # keep CLS and mask tokens frozen (continued-pretraining recipe)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile each block (CUDA)
    grad_checkpointing: bool = False  # activation checkpointing of the student blocks
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block) when run under torchrun
    nan_patience: int = 5  # abort after this many consecutive non-finite losses
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class RunConfig:
    ckpt_every: int = 500  # steps between checkpoints (and one at the end / on SIGTERM)
    keep_last: int = 3
    log_every: int = 1  # metrics rows (JSONL + CSV)
    tensorboard: bool = False
    progress: bool = True
    export_meta: bool = True  # also export the teacher in Meta's flat .pth layout


@dataclass
class GramConfig:
    """Gram anchoring (DINOv3 spec, section 3): match the student's patch-similarity (Gram) matrices
    to those of a frozen Gram teacher from a healthier point of training."""

    enabled: bool = False
    weight: float = 2.0  # target weight (7B recipe 2.0; high-resolution adaptation 1.5)
    start: int = 0  # first step of the Gram phase (weight 0 before)
    ramp_steps: int = 0  # cosine ramp of the weight from 0 over these steps
    teacher: str = "ema"  # "ema": copy of the EMA teacher at `start`, refreshed; "init": the weights the run
    #                       started from (domain adaptation); or a checkpoint path / name for load_backbone
    refresh_every: int = 10000  # "ema" only: copy the EMA teacher again every this many steps ...
    max_refreshes: int = 3  # ... at most this many times, then keep it fixed
    remove_negatives: bool = False  # zero negative patch similarities on both sides (off in DINOv3)
    highres: float = 1.0  # Gram teacher crop size / global crop size (2.0: same crop at 2x, no colour jitter)
    dino_local_end: float = 1.0  # local-DINO weight multiplier reached at the last step (linear from `start`)


@dataclass
class MonitorConfig:
    """Dense-feature health monitor on a fixed probe set of the run's own images."""

    every: int = 0  # steps between measurements (0: off; also measured at every checkpoint when on)
    n_probes: int = 8
    size: int | None = None  # probe image size (None: data.global_size)
    labels: str | None = None  # folder of label images named like probe images (<stem>.png): linear-probe mIoU
    pca: bool = True  # a PCA map of probe image 0 at every checkpoint (run_dir/monitor/)


class ConfigFile:
    """Plain-dict / YAML form of a config dataclass (the run folder's ``config.yaml``)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


@dataclass
class PretrainConfig(ConfigFile):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> PretrainConfig:
        """Range checks the type system cannot express (called by :func:`load_config`)."""
        c = self
        _check(c.data.domain in ("rgb", "satellite", "medical"), "data.domain", "rgb, satellite or medical")
        _check(c.optim.schedule in ("cosine", "constant"), "optim.schedule", "cosine or constant")
        _check(c.train.precision in ("auto", "fp32", "bf16"), "train.precision", "auto, fp32 or bf16")
        _check(c.train.strategy in ("ddp", "fsdp"), "train.strategy", "ddp or fsdp")
        _check(c.train.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda")
        for key, v in (("train.steps", c.train.steps), ("train.batch_size", c.train.batch_size),
                       ("data.global_size", c.data.global_size), ("data.local_size", c.data.local_size),
                       ("model.n_prototypes", c.model.n_prototypes), ("run.ckpt_every", c.run.ckpt_every),
                       ("run.keep_last", c.run.keep_last), ("run.log_every", c.run.log_every),
                       ("loss.sk_iters", c.loss.sk_iters), ("train.nan_patience", c.train.nan_patience)):  # fmt: skip
            _check(v >= 1, key, "a positive integer", v)
        _check(c.data.n_local >= 0, "data.n_local", ">= 0", c.data.n_local)
        if c.data.global_sizes is not None:
            _check(len(c.data.global_sizes) >= 1 and all(s >= 1 for s in c.data.global_sizes), "data.global_sizes",
                   "a list of positive sizes or null", c.data.global_sizes)  # fmt: skip
        _check(c.train.batch_size >= 2, "train.batch_size", ">= 2 (KoLeo and Sinkhorn-Knopp need a batch)",
               c.train.batch_size)  # fmt: skip
        for key, (lo, hi) in (("data.global_scale", c.data.global_scale), ("data.local_scale", c.data.local_scale),
                              ("loss.mask_ratio", c.loss.mask_ratio)):  # fmt: skip
            _check(0 <= lo <= hi <= 1, key, "(low, high) with 0 <= low <= high <= 1", (lo, hi))
        _check(0 <= c.model.drop_path < 1, "model.drop_path", "in [0, 1)", c.model.drop_path)
        _check(0 <= c.loss.mask_sample_prob <= 1, "loss.mask_sample_prob", "in [0, 1]", c.loss.mask_sample_prob)
        for key in ("student_temp", "teacher_temp", "teacher_temp_start"):
            _check(getattr(c.loss, key) > 0, f"loss.{key}", "> 0", getattr(c.loss, key))
        _check(c.optim.lr >= 0 and c.optim.min_lr >= 0, "optim.lr", ">= 0", c.optim.lr)
        _check(0 < c.optim.layer_decay <= 1, "optim.layer_decay", "in (0, 1]", c.optim.layer_decay)
        ema = (c.optim.ema_momentum, c.optim.ema_momentum_end)
        _check(0 <= ema[0] <= ema[1] <= 1, "optim.ema_momentum", "0 <= ema_momentum <= ema_momentum_end <= 1", ema)
        if c.model.rope_rescale is not None:
            _check(c.model.rope_rescale >= 1, "model.rope_rescale", ">= 1 or null", c.model.rope_rescale)
        for key in ("freeze_backbone_steps", "unfreeze_ramp_steps"):
            _check(getattr(c.train, key) >= 0, f"train.{key}", ">= 0", getattr(c.train, key))
        g = c.gram
        _check(g.weight >= 0, "gram.weight", ">= 0", g.weight)
        _check(g.highres >= 1, "gram.highres", ">= 1 (the Gram teacher's crop size over the student's)", g.highres)
        for key in ("start", "ramp_steps", "refresh_every", "max_refreshes"):
            _check(getattr(g, key) >= 0, f"gram.{key}", ">= 0", getattr(g, key))
        _check(0 <= g.dino_local_end <= 1, "gram.dino_local_end", "in [0, 1]", g.dino_local_end)
        _check(c.monitor.every >= 0 and c.monitor.n_probes >= 1, "monitor.every / monitor.n_probes", ">= 0 / >= 1",
               (c.monitor.every, c.monitor.n_probes))  # fmt: skip
        if c.data.aug:  # typed like every other key, and checked now rather than at the first batch
            from .augment import AugmentParams, augment_preset

            hints = typing.get_type_hints(AugmentParams)
            bad = sorted(set(c.data.aug) - set(hints))
            if bad:
                raise ConfigError(f"data.aug: unknown augmentation options {bad}; known: {sorted(hints)}")
            c.data.aug = {k: _coerce(v, hints[k], f"data.aug.{k}", "config") for k, v in c.data.aug.items()}
            dataclasses.replace(augment_preset(c.data.domain), **c.data.aug)  # range checks (ConfigError)
        return self


def _check(ok: bool, key: str, want: str, got: Any = None) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {want}" + ("" if got is None else f", got {got!r}"))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# --- presets and loading ---------------------------------------------------------------------------
def preset_names(package: str = "dinoapp.ssl") -> list[str]:
    """The YAML presets shipped with dinoapp (``<package>/presets``: pretraining in ``dinoapp.ssl``,
    distillation in ``dinoapp.distill``)."""
    folder = resources.files(package) / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path, package: str = "dinoapp.ssl", sections: str = "") -> tuple[dict, str]:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        text, where = p.read_text(), str(p)
    else:
        name = str(name_or_path)
        if name not in preset_names(package):
            raise ConfigError(f"unknown config preset {name!r}; presets: {', '.join(preset_names(package))} "
                              "(or a YAML file)")  # fmt: skip
        text, where = (resources.files(package) / "presets" / f"{name}.yaml").read_text(), f"preset {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a config is a mapping of sections ({sections})")
    return data, where


def load_config(
    name_or_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PretrainConfig:
    """Build a config: defaults <- preset/YAML (which may say ``base: other-preset``) <- overrides.

    ``overrides`` are ``"section.key=value"`` strings (values parsed as YAML: ``optim.lr=1e-4``,
    ``data.global_scale=[0.4,1]``, ``model.rope_rescale=null``) or a ``{"section.key": value}`` dict.
    """
    return build_config(PretrainConfig, "dinoapp.ssl", name_or_path, overrides)


def build_config(cls: type, package: str, name_or_path: str | Path | None, overrides) -> Any:
    """Defaults of dataclass ``cls`` <- a preset of ``package`` or a YAML file (with ``base:``
    chains) <- overrides; then ``validate()``. Shared by the pretraining and distillation configs."""
    cfg = cls()
    sections = ", ".join(_fields(cls))
    if name_or_path is not None:
        data, where = _read_yaml(name_or_path, package, sections)
        chain = [(data, where)]
        seen = {where}
        while "base" in chain[0][0]:
            base = chain[0][0].pop("base")
            data, where = _read_yaml(base, package, sections)
            if where in seen:
                raise ConfigError(f"config 'base' chain loops at {where}")
            seen.add(where)
            chain.insert(0, (data, where))
        for data, where in chain:
            _apply_mapping(cfg, data, where)
    for key, value in _parse_overrides(overrides).items():
        _set(cfg, key, value, "override")
    return cfg.validate()


def _list_section(cfg: Any, section: str) -> Any:
    """The item type of a section that is a list of dataclasses (e.g. distillation ``students``), else None."""
    hint = typing.get_type_hints(type(cfg))[section]
    if typing.get_origin(hint) is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return hint
    return None


def _apply_mapping(cfg: Any, data: dict[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in _fields(cfg):
            raise ConfigError(f"{where}: unknown section {section!r}; sections: {', '.join(_fields(cfg))}")
        hint = _list_section(cfg, section)
        if hint is not None:  # a list of entries (students: [{name: s, backbone: vits16}, ...])
            setattr(cfg, section, _coerce(values, hint, section, where))
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, where)


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _set(cfg: Any, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    section = parts[0]
    if section in _fields(cfg) and _list_section(cfg, section) is not None:  # students=[...] / students.0.lr=...
        hint = _list_section(cfg, section)
        if len(parts) == 1:
            setattr(cfg, section, _coerce(value, hint, section, where))
            return
        items = getattr(cfg, section)
        if not parts[1].isdigit() or int(parts[1]) >= len(items) or len(parts) < 3:
            raise ConfigError(f"{where}: {key!r}: address an entry of {section} as {section}.<index>.<key> with "
                              f"index 0..{len(items) - 1}, or replace the list with {section}=[...]")  # fmt: skip
        item = items[int(parts[1])]
        _set_field(item, parts[2], parts[3:], value, f"{section}.{parts[1]}", where)
        return
    if len(parts) < 2:
        raise ConfigError(f"{where}: {key!r} must be section.key (sections: {', '.join(_fields(cfg))})")
    section, name, rest = parts[0], parts[1], parts[2:]
    if section not in _fields(cfg):
        raise ConfigError(f"{where}: unknown section {section!r} in {key!r}; sections: {', '.join(_fields(cfg))}")
    _set_field(getattr(cfg, section), name, rest, value, section, where)


def _set_field(obj: Any, name: str, rest: list[str], value: Any, section: str, where: str) -> None:
    key = ".".join([section, name, *rest])
    fields = _fields(obj)
    if name not in fields:
        raise ConfigError(f"{where}: unknown key {section}.{name}; keys of {section}: {', '.join(fields)}")
    hint = typing.get_type_hints(type(obj))[name]
    if rest:  # dict-valued fields take nested keys: model.arch_overrides.depth=2
        if typing.get_origin(hint) is not dict:
            raise ConfigError(f"{where}: {section}.{name} has no sub-keys (got {key!r})")
        d = dict(getattr(obj, name))
        d[".".join(rest)] = value
        setattr(obj, name, d)
        return
    setattr(obj, name, _coerce(value, hint, f"{section}.{name}", where))


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, None unions, tuple/list/dict), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {key} must be {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{where}: {key} needs {len(args)} values, got {value!r}")
                return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
            inner = args[0] if args else Any
            seq = [_coerce(v, inner, key, where) for v in value]
            return tuple(seq) if origin is tuple else seq
    elif origin is dict and isinstance(value, dict):
        return dict(value)
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            obj = hint()
            hints = typing.get_type_hints(hint)
            for k, v in value.items():
                if k not in hints:
                    raise ConfigError(f"{where}: unknown key {k!r} in {key}; keys: {', '.join(_fields(obj))}")
                setattr(obj, k, _coerce(v, hints[k], f"{key}.{k}", where))
            return obj
    raise ConfigError(f"{where}: {key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        union = args and typing.get_origin(args[0]) in (typing.Union, types.UnionType)
        parts = typing.get_args(args[0]) if union else args[:1]  # list[int | str]: "integers or strings"
        inner = " or ".join(plural.get(a, "values") for a in parts) if args else "values"
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return f"a list of {len(args)} {inner}" if fixed else f"a list of {inner}"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))
