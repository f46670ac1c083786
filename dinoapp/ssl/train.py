"""The pretraining loop: :func:`pretrain` (Python) behind ``dinoapp pretrain`` (CLI).

One code path for a CPU smoke run, one GPU and ``torchrun --nproc_per_node=N`` (DDP, or FSDP2 with
``train.strategy=fsdp``). Each step (DINOv3 spec, section 2): schedules -> iBOT masks -> teacher
targets (Sinkhorn-Knopp) -> student forward and DINO + iBOT + KoLeo loss -> backward (skipped on
every process when any loss is not finite) -> last-layer freeze, gradient clipping, AdamW ->
EMA teacher update -> metrics, checkpoints.

Determinism: batches, crops and masks are pure functions of ``(seed, step)`` and the global RNG is
re-seeded from ``(seed, step, rank)`` at every step (drop path, RoPE rescale), so a resumed run
continues exactly as if it had never stopped, with any number of data workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..backbone import DinoBackbone
from ..errors import ConfigError, DinoappError
from . import dist as D
from . import runstate
from .config import DataConfig, PretrainConfig, load_config
from .gram import dino_local_scale, gram_copy_steps, gram_loss, gram_weight, resize_patch_grid
from .model import SSLNetworks, collapse_stats, ema_update, make_teacher, ssl_loss, teacher_targets
from .optim import build_optimizer, param_groups, set_lr_wd
from .schedules import cosine, linear_warmup, ramp, warmup_constant, warmup_cosine

log = logging.getLogger("dinoapp.ssl")


class TrainingDivergedError(DinoappError, RuntimeError):
    """The loss stayed non-finite for ``train.nan_patience`` consecutive steps."""


class CollapseWarning(UserWarning):
    """Training signals that the representation is collapsing (uniform targets, identical embeddings)."""


@dataclass
class RunResult:
    run_dir: Path
    step: int  # steps completed
    exported: dict[str, Path] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False  # SIGTERM/SIGINT or stop_after: resume with the same command + --resume


# --- building blocks -------------------------------------------------------------------------------
def build_backbone(cfg: PretrainConfig):
    from ..loading import load_backbone

    m = cfg.model
    overrides = dict(m.arch_overrides)
    return load_backbone(
        m.backbone,
        in_chans=m.in_chans,
        mean=m.mean,
        std=m.std,
        drop_path_rate=m.drop_path,
        seed=cfg.train.seed,
        **overrides,
    )


def build_networks(cfg: PretrainConfig) -> SSLNetworks:
    """Student backbone (from the config's source) + fresh DINO and iBOT heads (spec section 2:
    released checkpoints contain no heads)."""
    from .heads import DINOHead

    torch.manual_seed(cfg.train.seed)
    bb = build_backbone(cfg)
    bb.set_rope_rescale(cfg.model.rope_rescale)
    m = cfg.model
    kw = dict(hidden_dim=m.head_hidden, bottleneck_dim=m.head_bottleneck, n_layers=m.head_layers)
    dino_head = DINOHead(bb.embed_dim, m.n_prototypes, **kw)
    ibot_head = DINOHead(bb.embed_dim, m.ibot_n_prototypes or m.n_prototypes, **kw)
    return SSLNetworks(bb, dino_head, ibot_head)


def build_source(d: DataConfig, seed: int, run_dir: Path, rank: int = 0):
    """The folder of training files as a ``domains`` dataset (unreadable files recorded in
    ``errors.jsonl``, one file per rank > 0); shared by pretraining and distillation."""
    from domains.datasets import FolderDataset

    if not d.path:
        raise ConfigError("no training data: pass --data PATH (a folder of images, GeoTIFFs or DICOMs) or data.path=")
    geo: dict[str, Any] = {}
    if d.bands is not None:
        geo["bands"] = d.bands
    if d.stats is not None:
        geo["stats"] = d.stats
    opts: dict[str, Any] = {}
    if geo:
        opts["geotiff"] = geo
    if d.dicom_window is not None:
        opts["dicom"] = {"window": d.dicom_window}
    return FolderDataset(d.path, recursive=d.recursive, window=d.window, min_valid=d.min_valid,
                         error_log=run_dir / ("errors.jsonl" if rank == 0 else f"errors.rank{rank}.jsonl"),
                         seed=seed, **opts)  # fmt: skip


def augment_params(d: DataConfig):
    """The domain's augmentation preset with the config's ``data.aug`` overrides."""
    import dataclasses

    from .augment import augment_preset

    params = augment_preset(d.domain)
    return dataclasses.replace(params, **d.aug) if d.aug else params


def build_dataset(cfg: PretrainConfig, in_chans: int, mean, std, run_dir: Path, rank: int = 0, patch: int = 16):
    from .augment import MultiCrop
    from .data import SSLDataset

    d = cfg.data
    src = build_source(d, cfg.train.seed, run_dir, rank)
    params = augment_params(d)
    crops = []
    for size in d.global_sizes or [d.global_size]:  # mixed sizes: one MultiCrop per size, chosen per step
        extra = {}
        if cfg.gram.enabled and cfg.gram.highres > 1:  # the Gram teacher sees the same crop, larger, no colour
            extra["gram_size"] = max(patch, int(round(size * cfg.gram.highres / patch)) * patch)  # whole patches
        crops.append(MultiCrop(global_size=size, local_size=d.local_size, n_local=d.n_local,
                               global_scale=d.global_scale, local_scale=d.local_scale, params=params, mean=mean,
                               std=std, **extra))  # fmt: skip
    return SSLDataset(src, crops, in_chans=in_chans, seed=cfg.train.seed)


def stage_requires_grad(nets: SSLNetworks, *, backbone_frozen: bool, freeze_tokens: bool, train_mask_token: bool):
    """Continued-pretraining stages: stage 1 trains the heads only; stage 2 the backbone too, with
    the CLS and mask tokens frozen when ``freeze_tokens`` (spec section 2). ``train_mask_token``
    False (iBOT off) also freezes the iBOT head."""
    nets.backbone_frozen = backbone_frozen
    for name, p in nets.backbone.named_parameters():
        frozen = backbone_frozen
        if name == "vit.cls_token" and freeze_tokens:
            frozen = True
        if name == "mask_token" and (freeze_tokens or not train_mask_token):
            frozen = True
        p.requires_grad_(not frozen)
    nets.ibot_head.requires_grad_(train_mask_token)  # no iBOT term: no iBOT head gradients (DDP waits for them)


# Settings a resumed run may change; anything else would silently change what is trained.
RESUME_MAY_CHANGE = ("train.steps", "train.nan_patience", "data.path", "data.num_workers", "run.", "monitor.",
                     "gram.")  # fmt: skip  # e.g. continue a run with Gram anchoring


def check_resume_config(saved: dict[str, Any], cfg: Any, path: Path, may_change=RESUME_MAY_CHANGE) -> None:
    """Refuse to resume with a config that changes the model, data stream or objective (anything
    but the ``may_change`` keys; a trailing dot allows a whole section)."""
    if not saved:
        return
    new = cfg.to_dict()
    diffs = []
    for section, values in saved.items():
        if not isinstance(values, dict):  # a list section (distillation students): compared whole
            if new.get(section) != values and not any(a in (section, section + ".") for a in may_change):
                diffs.append(f"{section}: {values!r} -> {new.get(section)!r}")
            continue
        for key, old in values.items():
            name = f"{section}.{key}"
            now = new.get(section, {}).get(key)
            if now != old and not any(name == a or (a.endswith(".") and name.startswith(a)) for a in may_change):
                diffs.append(f"{name}: {old!r} -> {now!r}")
    if diffs:
        raise ConfigError(
            f"resuming {path.name} with a different config: {'; '.join(diffs)}. A resumed run may change only "
            f"{', '.join(may_change)}*; start a new --out to train with other settings"
        )


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2**62)


def schedule_values(cfg: PretrainConfig, step: int) -> dict[str, float]:
    """Every scheduled value at ``step`` (pure function of the config; spec section 2)."""
    o, t, lo, g = cfg.optim, cfg.train, cfg.loss, cfg.gram
    head_lr = o.head_lr if o.head_lr is not None else o.lr
    if o.schedule == "cosine":
        lr = warmup_cosine(step, t.steps, o.lr, o.min_lr, o.warmup_steps)
        hlr = warmup_cosine(step, t.steps, head_lr, o.min_lr, o.warmup_steps)
    else:
        lr = warmup_constant(step, o.warmup_steps, o.lr)
        hlr = warmup_constant(step, o.warmup_steps, head_lr)
    return {
        "lr": lr,
        "head_lr": hlr,
        "backbone_scale": ramp(step, t.freeze_backbone_steps, t.unfreeze_ramp_steps),
        "weight_decay": cosine(step, t.steps, o.weight_decay, o.weight_decay_end),
        "momentum": cosine(step, t.steps, o.ema_momentum, o.ema_momentum_end),
        "teacher_temp": linear_warmup(step, lo.teacher_temp_warmup_steps, lo.teacher_temp_start, lo.teacher_temp),
        "freeze_last_layer": float(step < o.freeze_last_layer_steps),
        "gram_weight": gram_weight(step, start=g.start, ramp_steps=g.ramp_steps, weight=g.weight) if g.enabled else 0.0,
        "dino_local_scale": (dino_local_scale(step, start=g.start, steps_total=t.steps, end_scale=g.dino_local_end)
                             if g.enabled else 1.0),  # fmt: skip
    }


def uses_bf16(device: torch.device, precision: str) -> bool:
    """``train.precision``: bf16 when asked, or by default (``auto``) on CUDA; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def export_teacher(teacher: SSLNetworks, run_dir: Path, *, step: int, cfg: PretrainConfig,
                   write: bool = True) -> dict[str, Path]:  # fmt: skip
    """The teacher backbone (with its DINO/iBOT heads) as a dinoapp checkpoint, and in Meta's flat
    layout; both read back with ``load_backbone``. Under FSDP2 every process must call this (the
    weights are gathered collectively); only the one with ``write=True`` writes."""
    import copy

    from ..checkpoint import save_backbone

    sd = full_state_dict(teacher)  # a collective under FSDP2
    if not write:
        return {}
    src = teacher.backbone
    bb = _plain_backbone(teacher, sd)
    bb.provenance.update({"source": str(run_dir), "trained_steps": step, "init": cfg.model.backbone,
                          "layout": "dinoapp", "sha256": None})  # fmt: skip
    bb.pretrained_heads = copy.copy(src.pretrained_heads)
    for head in ("dino_head", "ibot_head"):
        bb.pretrained_heads[head] = {k.removeprefix(head + "."): v for k, v in sd.items() if k.startswith(head + ".")}
    out = run_dir / "export"
    paths = {"dinoapp": save_backbone(bb.eval(), out / "teacher_backbone.safetensors")}
    if cfg.run.export_meta:
        meta = out / "teacher_backbone_meta.pth"
        tmp = meta.with_name(meta.name + ".tmp")
        torch.save({k: v.contiguous() for k, v in bb.meta_state_dict().items()}, tmp)
        os.replace(tmp, meta)
        paths["meta"] = meta
    return paths


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict with sharded (DTensor) entries gathered; a collective under FSDP2."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def load_full_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a possibly FSDP2-sharded module."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"the checkpoint does not match this run's model (missing {missing[:5]}, unexpected {unexpected[:5]}): "
            "was the config changed?"
        )
    with torch.no_grad():
        for k, v in own.items():
            src = sd[k]
            if hasattr(v, "device_mesh"):  # DTensor: take this process's shard
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(v.device, v.dtype), v.device_mesh, v.placements).to_local()
                D.local_tensor(v).copy_(src)
            else:
                if v.shape != src.shape:
                    raise ConfigError(f"checkpoint tensor {k} has shape {tuple(src.shape)}, the model {tuple(v.shape)}")
                v.copy_(src)


# --- the loop --------------------------------------------------------------------------------------
def pretrain(
    cfg: PretrainConfig | str | None,
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool | str = "auto",
    stop_after: int | None = None,
) -> RunResult:
    """Run (or resume) self-supervised pretraining; returns where things were written.

    ``cfg``: a :class:`PretrainConfig`, a preset name or a YAML path (``overrides`` applied on top);
    ``None`` reads ``out_dir/config.yaml`` (resuming from the folder alone).
    ``resume``: ``"auto"`` continues from the newest checkpoint in ``out_dir`` when there is one,
    ``True`` requires one, ``False``
    refuses a folder that already holds checkpoints. ``stop_after``: stop (with a checkpoint) after
    this many steps of this call, e.g. to split a run across jobs.
    """
    run_dir = Path(out_dir).expanduser()
    if cfg is None:  # resume from the run folder alone
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} has no config.yaml: pass --config (a preset name or YAML file)")
        cfg = run_dir / "config.yaml"
    if not isinstance(cfg, PretrainConfig):
        cfg = load_config(cfg, overrides)
    elif overrides:
        raise ConfigError("pass overrides with a preset name or YAML path, or edit the PretrainConfig directly")
    if data is not None:
        cfg.data.path = str(data)
    cfg.validate()
    info = D.init(cfg.train.device)
    try:
        return _pretrain(cfg, run_dir, info, resume, stop_after)
    finally:
        D.shutdown()


@dataclass
class Engine:
    """Everything one training step needs; :meth:`step` is the body of the loop (also used by
    ``benchmarks/train_step.py`` so the benchmark times exactly this code)."""

    cfg: PretrainConfig
    info: D.DistInfo
    nets: SSLNetworks
    teacher: SSLNetworks
    optimizer: torch.optim.Optimizer
    fsdp: bool
    nan_run: int = 0
    student: nn.Module | None = None  # nets, or its DDP wrapper for the current stage
    stage_frozen: bool | None = None
    gram_teacher: nn.Module | None = None  # frozen DinoBackbone (eval) once the Gram phase needs it
    gram_copies: int = 0  # copies of the EMA teacher taken into the Gram teacher so far ("ema" source)
    gram_copied_at: int = -1  # the step of the latest copy (a resume with another schedule still copies when due)

    @property
    def use_ibot(self) -> bool:
        return self.cfg.loss.ibot_weight > 0 and self.cfg.loss.mask_sample_prob > 0

    @property
    def local_batch(self) -> int:
        return self.cfg.train.batch_size // self.info.world_size

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimisation step on this process's ``batch`` (``global_crops [G, b, C, g, g]``,
        ``local_crops [L, b, C, l, l]``); returns losses, targets, student outputs and flags."""
        cfg, info, dev = self.cfg, self.info, self.info.device
        G, L, b = batch["global_crops"].shape[0], batch["local_crops"].shape[0], self.local_batch
        sv = schedule_values(cfg, step)
        frozen = sv["backbone_scale"] <= 0.0
        if frozen != self.stage_frozen:  # stage change: (re)build the DDP wrapper over what trains now
            stage_requires_grad(self.nets, backbone_frozen=frozen, freeze_tokens=cfg.train.freeze_tokens,
                                train_mask_token=self.use_ibot)  # fmt: skip
            self.student = self.nets if self.fsdp else D.wrap_ddp(self.nets, info)
            self.stage_frozen = frozen
        set_lr_wd(self.optimizer, lr=sv["lr"], weight_decay=sv["weight_decay"], head_lr=sv["head_lr"],
                  backbone_scale=sv["backbone_scale"], freeze_last_layer=bool(sv["freeze_last_layer"]))  # fmt: skip
        torch.manual_seed(step_seed(cfg.train.seed, step, info.rank))
        gc = batch["global_crops"].to(dev, non_blocking=True).flatten(0, 1)  # [G*b, C, g, g]
        lc = batch["local_crops"].to(dev, non_blocking=True).flatten(0, 1) if L > 0 else None  # [L*b, C, l, l]
        masks = None
        if self.use_ibot:
            from .masking import ibot_masks

            h, w = gc.shape[-2] // self.nets.backbone.patch_size, gc.shape[-1] // self.nets.backbone.patch_size
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 10_007))
            B = cfg.train.batch_size
            m = ibot_masks(G * B, h, w, gen, ratio_range=cfg.loss.mask_ratio,
                           sample_prob=cfg.loss.mask_sample_prob)  # fmt: skip  # [G*B, h*w]: the global batch
            m = m.reshape(G, B, h * w)[:, info.rank * b : (info.rank + 1) * b]
            masks = m.reshape(G * b, h * w).to(dev)  # this process's images
        gram_w = self._gram_prepare(step, sv)
        self.nets.keep_patches = gram_w > 0
        with autocast_context(dev, cfg.train.precision):
            targets = teacher_targets(self.teacher, gc, masks, n_global=G, temp=sv["teacher_temp"],
                                      sk_iters=cfg.loss.sk_iters)  # fmt: skip
            if gram_w > 0:
                targets["gram"] = self._gram_targets(batch, gc)  # [G*b, h*w, D_gram]
            out = self.student(gc, lc, masks)
        if self.fsdp:  # a teacher root stays gathered after a forward without backward: shard it again
            D.reshard(self.teacher)
        lo = cfg.loss
        losses = ssl_loss(out, targets, masks, n_global=G, n_local=L, student_temp=lo.student_temp,
                          dino_weight=lo.dino_weight, ibot_weight=lo.ibot_weight, koleo_weight=lo.koleo_weight,
                          koleo_gather=lo.koleo_across_processes, dino_local_scale=sv["dino_local_scale"])  # fmt: skip
        if gram_w > 0:
            neg = cfg.gram.remove_negatives
            losses["gram"] = gram_loss(out["patches_global"], targets["gram"], remove_negatives=neg)
            losses["loss"] = losses["loss"] + gram_w * losses["gram"]
        ok, grad_norm = guarded_step(losses["loss"], self.optimizer, self.nets, clip=cfg.optim.clip_grad,
                                     freeze_last_layer=bool(sv["freeze_last_layer"]), device=dev)  # fmt: skip
        if ok:
            ema_update(self.teacher, self.nets, sv["momentum"])
            self.nan_run = 0
        else:
            self.nan_run += 1
            if info.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step + 1, self.nan_run)
        self.optimizer.zero_grad(set_to_none=True)
        return {"losses": losses, "targets": targets, "out": out, "ok": ok, "grad_norm": grad_norm, "sv": sv}

    # --- Gram anchoring (DINOv3 spec, section 3) ----------------------------------------------------
    @property
    def _gram_from_ema(self) -> bool:
        return self.cfg.gram.enabled and self.cfg.gram.teacher == "ema"

    def _gram_prepare(self, step: int, sv: dict[str, float]) -> float:
        """The Gram weight at ``step``; takes (or refreshes) the Gram teacher when it is due."""
        g = self.cfg.gram
        if not g.enabled:
            return 0.0
        if g.teacher == "ema" and step >= g.start:
            due = [s for s in gram_copy_steps(g.start, g.refresh_every, g.max_refreshes) if s <= step]
            if self.gram_teacher is None or due[-1] > self.gram_copied_at:  # (a resume restores both)
                self.gram_teacher = frozen_backbone_copy(self.teacher, self.info.device)
                self.gram_copies, self.gram_copied_at = self.gram_copies + 1, step
                if self.info.is_main:
                    log.info("step %d: Gram teacher = copy %d of the EMA teacher", step + 1, self.gram_copies)
        return sv["gram_weight"]

    @torch.no_grad()
    def _gram_targets(self, batch: dict[str, torch.Tensor], gc: torch.Tensor) -> torch.Tensor:
        """Gram-teacher patch features of the clean (hi-res) global crops on the student's grid."""
        if self.gram_teacher is None:
            raise ConfigError("gram.enabled with no Gram teacher: set gram.teacher to ema, init or a checkpoint")
        x = batch["gram_crops"].to(gc.device).flatten(0, 1) if "gram_crops" in batch else gc  # [G*b, C, H', W']
        p = self.nets.backbone.patch_size
        ft = self.gram_teacher.forward_features(x)["x_norm_patchtokens"].float()  # [G*b, h'*w', D_t]
        tp = self.gram_teacher.patch_size
        return resize_patch_grid(ft, (x.shape[-2] // tp, x.shape[-1] // tp), (gc.shape[-2] // p, gc.shape[-1] // p))

    def state(self) -> dict[str, Any] | None:
        """Checkpoint contents (a collective under FSDP2: call on every process); None on ranks > 0
        when nothing is sharded (rank 0 holds everything)."""
        if not self.fsdp and not self.info.is_main:
            return None
        return {
            "student": full_state_dict(self.nets),
            "teacher": full_state_dict(self.teacher),
            "optimizer": _optimizer_state(self.optimizer, self.nets, self.fsdp),
            "rng": runstate.rng_state(),
            "nan_run": self.nan_run,
            # only an EMA copy needs saving: "init" and checkpoint teachers are rebuilt from the config
            "gram_teacher": full_state_dict(self.gram_teacher) if self._gram_from_ema and self.gram_teacher else None,
            "gram_copies": self.gram_copies,
            "gram_copied_at": self.gram_copied_at,
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
        }

    def load_state(self, state: dict[str, Any]) -> int:
        load_full_state_dict(self.nets, state["student"])
        load_full_state_dict(self.teacher, state["teacher"])
        _load_optimizer(self.optimizer, self.nets, state["optimizer"], self.fsdp)
        self.nan_run = int(state.get("nan_run", 0))
        self.gram_copies = int(state.get("gram_copies", 0))
        self.gram_copied_at = int(state.get("gram_copied_at", -1))
        if self._gram_from_ema and state.get("gram_teacher") is not None:  # the anchor of a Gram phase in progress
            if self.gram_teacher is None:
                self.gram_teacher = frozen_backbone_copy(self.teacher, self.info.device)
            self.gram_teacher.load_state_dict(state["gram_teacher"])
        runstate.set_rng_state(state["rng"])
        return int(state["step"])


def build_engine(cfg: PretrainConfig, info: D.DistInfo) -> Engine:
    """Networks on the device (sharded/compiled as configured), teacher, optimizer."""
    dev = info.device
    nets = build_networks(cfg)
    if cfg.data.global_size < nets.backbone.patch_size:
        raise ConfigError(f"data.global_size={cfg.data.global_size} is smaller than one "
                          f"{nets.backbone.patch_size}px patch")  # fmt: skip
    bf16 = uses_bf16(dev, cfg.train.precision)
    if cfg.train.grad_checkpointing:
        nets.backbone.set_grad_checkpointing(True)
    fsdp = cfg.train.strategy == "fsdp" and info.distributed
    if not fsdp:
        nets.to(dev)
    nets.train()
    teacher = make_teacher(nets)
    if fsdp:  # shard from host memory: no process ever holds two full models on its GPU
        D.shard_fsdp(nets, bf16=bf16)
        D.shard_fsdp(teacher, bf16=bf16)
        nets.to(dev)  # fully_shard already moved the shards; this moves anything left (buffers)
        teacher.to(dev)
    if cfg.train.compile and dev.type == "cuda":
        for blk in [*nets.backbone.blocks, *teacher.backbone.blocks]:
            blk.compile()
    parts = {"backbone": nets.backbone, "dino_head": nets.dino_head, "ibot_head": nets.ibot_head}
    groups = param_groups(parts, layer_decay=cfg.optim.layer_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, betas=cfg.optim.betas, fused=True if dev.type == "cuda" else None)
    eng = Engine(cfg, info, nets, teacher, optimizer, fsdp)
    if cfg.gram.enabled and cfg.gram.teacher == "init":  # the weights the run starts from (domain adaptation)
        eng.gram_teacher = frozen_backbone_copy(teacher, dev)
    elif cfg.gram.enabled and cfg.gram.teacher != "ema":  # a fixed checkpoint (e.g. a Gram-anchored one)
        from ..loading import load_backbone

        gt = load_backbone(cfg.gram.teacher, device=dev)
        if gt.patch_size != nets.backbone.patch_size:
            raise ConfigError(f"gram.teacher has patch size {gt.patch_size}, the model {nets.backbone.patch_size}")
        eng.gram_teacher = gt.requires_grad_(False).eval()
    return eng


def _plain_backbone(nets: SSLNetworks, sd: dict[str, torch.Tensor]) -> DinoBackbone:
    """A plain (not FSDP) CPU DinoBackbone like ``nets.backbone`` holding the ``backbone.*`` entries of
    ``sd``, a full state dict of ``nets``."""
    src = nets.backbone
    bb = DinoBackbone(src.arch, mean=src.mean, std=src.std, provenance=dict(src.provenance))
    bb.load_state_dict({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
    return bb


def frozen_backbone_copy(nets: SSLNetworks, device: torch.device):
    """A plain (unsharded) frozen eval copy of ``nets.backbone`` (a collective under FSDP2)."""
    return _plain_backbone(nets, full_state_dict(nets)).to(device).requires_grad_(False).eval()


def open_run(run_dir: Path, cfg: Any, info: D.DistInfo, resume, may_change=RESUME_MAY_CHANGE, kind: str = "pretrain"):
    """Check the run folder against ``resume`` (``"auto"``, True, False) and return the checkpoint to
    continue from, ``(state, path)``, or None for a fresh run. Rank 0 picks the checkpoint and every
    rank loads that one (a shared filesystem may lag on some nodes). ``kind``: the run type the folder
    must hold (``pretrain`` / ``distill``). Shared with distillation."""
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must divide evenly over "
            f"{info.world_size} processes"
        )
    existing = runstate.list_checkpoints(run_dir)
    if existing and resume is False:
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    if not existing and resume is True:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not existing or resume is False:
        return None
    found = runstate.latest_checkpoint(run_dir) if info.is_main else None
    path = D.broadcast_object(None if found is None else str(found[1]))
    if path is None:
        raise ConfigError(f"none of the checkpoints in {run_dir / 'checkpoints'} can be read")
    found = found if info.is_main else (runstate.load_checkpoint(path), Path(path))
    held = found[0].get("kind", "pretrain")
    if held != kind:
        raise ConfigError(f"{run_dir} holds a {held} run, not a {kind} run: choose another --out "
                          f"(or `dinoapp {held} --out {run_dir} --resume` to continue it)")  # fmt: skip
    check_resume_config(found[0].get("config", {}), cfg, found[1], may_change)
    return found


def _pretrain(cfg: PretrainConfig, run_dir: Path, info: D.DistInfo, resume, stop_after) -> RunResult:
    found = open_run(run_dir, cfg, info, resume)
    if info.is_main:
        cfg.save(run_dir / "config.yaml")

    eng = build_engine(cfg, info)
    start = 0
    if found is not None:
        start = eng.load_state(found[0])
        if info.is_main:
            log.info("resumed from %s (step %d)", found[1], start)

    bb = eng.nets.backbone
    ds = build_dataset(cfg, bb.in_chans, bb.mean, bb.std, run_dir, info.rank, bb.patch_size)
    from .data import StepBatchSampler, make_loader

    sampler = StepBatchSampler(len(ds), cfg.train.batch_size, cfg.train.seed, start_step=start,
                               total_steps=cfg.train.steps, rank=info.rank, world_size=info.world_size,
                               n_variants=len(cfg.data.global_sizes or [0]))  # fmt: skip
    loader = make_loader(ds, sampler, num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")
    metrics = None
    if info.is_main:
        metrics = runstate.MetricsWriter(run_dir, start_step=start, tensorboard=cfg.run.tensorboard)
    saved_anchor = found[0].get("monitor_anchor") if found is not None else None
    monitor = build_monitor(cfg, eng, ds, run_dir, saved_anchor) if cfg.monitor.every > 0 else None  # rank 0 only

    stop = {"flag": False}
    old_handlers = _install_signal_handlers(stop)
    last: dict[str, Any] = {}
    step = start
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    progress = None
    if info.is_main and cfg.run.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    warned: dict[str, int] = {}
    t_last = time.perf_counter()

    def save(at: int) -> None:
        state = eng.state()  # every process takes part in gathering; only rank 0 writes (no collective after it)
        if state is not None and info.is_main:
            if monitor is not None and monitor.anchor_features is not None:  # the monitor's reference survives resume
                state["monitor_anchor"] = {"features": monitor.anchor_features, "grid": list(monitor.anchor_grid)}
            runstate.save_checkpoint(state, run_dir, at, cfg.run.keep_last)

    try:
        it = iter(loader)
        while step < end and not D.any_true(stop["flag"], info.device):  # every rank stops at the same step
            r = eng.step(step, next(it))
            step += 1
            dense: dict[str, float] = {}
            measured = cfg.monitor.every > 0 and (step % cfg.monitor.every == 0 or step == end)  # same on all ranks
            if measured:
                dense = run_monitor(monitor, eng, step, render=step % cfg.run.ckpt_every == 0 or step == end)
            if step % cfg.run.log_every == 0 or step == end or measured:
                now = time.perf_counter()
                row = {k: float(v.detach()) for k, v in r["losses"].items()}
                row.update(collapse_stats(r["targets"], r["out"]))
                row = D.mean_scalars(row, info.device)
                row.update({k: v for k, v in r["sv"].items() if k != "freeze_last_layer"})
                ips = cfg.train.batch_size * cfg.run.log_every / max(now - t_last, 1e-9)
                row.update({"grad_norm": r["grad_norm"], "skipped": int(not r["ok"]), "img_per_s": ips, **dense})
                t_last = now
                last = {"step": step, **row}
                if metrics is not None:
                    metrics.write(last)
                    _collapse_warnings(last, warned, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            if progress is not None:
                progress.update(1)
            if eng.nan_run >= cfg.train.nan_patience:
                raise TrainingDivergedError(
                    f"the loss was not finite for {eng.nan_run} consecutive steps (last at step {step}); training "
                    f"stopped. Resume from the last checkpoint in {run_dir / 'checkpoints'} with a lower "
                    "optim.lr, optim.clip_grad set, or train.precision=fp32"
                )
            if step % cfg.run.ckpt_every == 0 and step < end:
                save(step)
        stopped_early = step < cfg.train.steps
        save(step)
        exported: dict[str, Path] = {}
        if not stopped_early:
            exported = export_teacher(eng.teacher, run_dir, step=step, cfg=cfg, write=info.is_main)
            D.barrier()
        return RunResult(run_dir, step, exported, last, stopped_early)
    finally:
        _restore_signal_handlers(old_handlers)
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()


def build_monitor(cfg: PretrainConfig, eng: Engine, ds, run_dir: Path, saved_anchor: dict | None = None):
    """The dense-feature health monitor on ``monitor.n_probes`` fixed images of the run's own data.
    Its anchor is the fixed Gram teacher when there is one, else the weights the run started from
    (their probe features are saved in checkpoints, so a resumed run keeps the same reference)."""
    from .monitor import DenseMonitor, probe_batch

    bb = eng.nets.backbone
    size = cfg.monitor.size or cfg.data.global_size
    size = max(bb.patch_size, size - size % bb.patch_size)
    probes, paths = probe_batch(ds.source, cfg.monitor.n_probes, size, bb.mean, bb.std, return_paths=True)
    labels = None
    if cfg.monitor.labels:
        from .monitor import probe_labels

        labels = probe_labels(paths, size, cfg.monitor.labels)  # [P, size, size]
    fixed = cfg.gram.enabled and cfg.gram.teacher != "ema"
    if saved_anchor is not None and saved_anchor["features"].shape[0] != probes.shape[0]:
        log.warning("monitor.n_probes changed: dense_gram_distance is now measured from the resumed weights")
        saved_anchor = None
    anchor = None
    if fixed:
        anchor = eng.gram_teacher
    elif saved_anchor is None:
        anchor = frozen_backbone_copy(eng.teacher, eng.info.device)  # a collective under FSDP2: every rank
    if not eng.info.is_main:
        return None  # rank 0 measures and writes
    monitor = DenseMonitor(probes, labels=labels, anchor=anchor, out_dir=run_dir)
    if anchor is None:  # resumed: the starting weights' probe features from the checkpoint
        monitor.anchor_features = saved_anchor["features"].float()
        monitor.anchor_grid = tuple(int(v) for v in saved_anchor["grid"])
    return monitor


def run_monitor(monitor, eng: Engine, step: int, *, render: bool) -> dict[str, float]:
    """Measure the teacher's dense features on rank 0 and, at checkpoints, render the PCA map. Under
    FSDP2 every process first takes part in gathering a plain copy of the teacher backbone."""
    bb = frozen_backbone_copy(eng.teacher, eng.info.device) if eng.fsdp else eng.teacher.backbone
    if monitor is None:
        return {}
    out = monitor.measure(bb, step)
    if render and eng.cfg.monitor.pca:
        monitor.render_pca(bb, step)
    return out


def guarded_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, module: nn.Module, *, clip: float | None,
                 freeze_last_layer: bool, device: torch.device) -> tuple[bool, float]:  # fmt: skip
    """Backward, the heads' last layer kept still while ``freeze_last_layer``, gradient clipping and the
    optimizer step: skipped on every process when any process's loss is not finite, or when the
    (all-reduced, so common) gradient norm is not. Returns ``(stepped, grad_norm)``; the caller zeroes
    the gradients."""
    ok = D.all_true(bool(torch.isfinite(loss).item()), device)
    grad_norm = float("nan")
    if ok:
        loss.backward()
        if freeze_last_layer:
            for g in optimizer.param_groups:
                if g.get("is_last_layer"):
                    for p in g["params"]:
                        p.grad = None
        grad_norm = _clip(module, clip)
        ok = math.isfinite(grad_norm)
    if ok:
        optimizer.step()
    return ok, grad_norm


def _clip(nets: nn.Module, max_norm: float | None) -> float:
    params = [p for p in nets.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _optimizer_state(optimizer, nets, fsdp: bool):
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(nets, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer(optimizer, nets, state, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never stepped (frozen so far) rightly have no state yet; torch
    # creates state for every parameter while loading (a zero step), so drop it again for those, or
    # their first real step would use the wrong Adam bias correction.
    set_optimizer_state_dict(nets, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    saved = set(state["state"])
    for name, p in nets.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)


def _collapse_warnings(row: dict[str, Any], warned: dict[str, int], step: int) -> None:
    """Warn (at most every 200 steps per kind) when collapse signals show up."""
    checks = []
    if row.get("target_entropy", 0) > 0.98 and step > 50:
        checks.append(("uniform", "the teacher's targets are nearly uniform (target_entropy "
                       f"{row['target_entropy']:.3f}): the heads learn nothing. Lower loss.teacher_temp or optim.lr, "
                       "or check that the images are not all alike"))  # fmt: skip
    if row.get("cls_spread", 1.0) < 0.05 and step > 50:
        checks.append(("point", f"student CLS embeddings collapse to one point (cls_spread {row['cls_spread']:.3f});"
                       " raise loss.koleo_weight or lower optim.lr"))  # fmt: skip
    for kind, msg in checks:
        if step - warned.get(kind, -(10**9)) >= 200:
            warned[kind] = step
            warnings.warn(f"step {step}: {msg}", CollapseWarning, stacklevel=2)
            log.warning("step %d: %s", step, msg)


def _install_signal_handlers(stop: dict[str, bool]):
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, return."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if stop["flag"]:  # second signal: give up at once
            raise KeyboardInterrupt
        stop["flag"] = True
        log.warning("signal %d: stopping after this step and writing a checkpoint", signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)
