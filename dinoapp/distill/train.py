"""The distillation loop: :func:`distill` (Python) behind ``dinoapp distill`` (CLI).

Each step (DINOv3 spec, section 4): one batch of multi-crops -> **one** teacher forward (frozen,
eval, ``no_grad``, never in DDP) -> targets for every student (patch grids aligned per student,
Sinkhorn-Knopp targets for the head recipe) -> the teacher's activations are dropped -> each
student in turn: forward, loss, backward (skipped on every process when its loss or gradient is
not finite), clipping, AdamW, EMA update. Students differ in architecture, optimizer settings and
schedule; each has its own optimizer, EMA copy and output folder (``students/<name>/``).

The run machinery is the pretraining engine's: batches, crops and patch positions are pure
functions of ``(seed, step)``, the global RNG is re-seeded at every step, checkpoints are atomic
and a resumed run continues bit-exactly; SIGTERM/SIGINT checkpoint and stop; torchrun runs every
student as DDP over all processes (the teacher is replicated).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..ssl import dist as D
from ..ssl import runstate
from ..ssl.config import OptimConfig
from ..ssl.model import ema_update
from ..ssl.optim import build_optimizer, param_groups, set_lr_wd
from ..ssl.schedules import cosine, warmup_constant, warmup_cosine
from ..ssl.train import (
    TrainingDivergedError,
    _install_signal_handlers,
    _restore_signal_handlers,
    autocast_context,
    full_state_dict,
    guarded_step,
    load_full_state_dict,
    open_run,
    step_seed,
)
from .config import DistillConfig, load_distill_config
from .model import (
    StudentNet,
    Teacher,
    agreement,
    dino_targets,
    feature_losses,
    grid_of,
    head_losses,
    ibot_targets,
    resize_crops,
)

log = logging.getLogger("dinoapp.distill")

# Settings a resumed run may change; anything else would silently change what is trained.
RESUME_MAY_CHANGE = ("train.steps", "train.nan_patience", "data.path", "data.num_workers", "run.", "eval.")


@dataclass
class DistillResult:
    run_dir: Path
    step: int
    exported: dict[str, Path] = field(default_factory=dict)  # student name -> backbone file
    last_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json contents


@dataclass
class Student:
    """One student's training state."""

    name: str
    net: StudentNet
    ema: StudentNet  # the EMA copy: what is evaluated and exported (spec section 4)
    optimizer: torch.optim.Optimizer
    optim: OptimConfig
    module: nn.Module | None = None  # net or its DDP wrapper
    nan_run: int = 0


# --- building blocks -------------------------------------------------------------------------------
def resolve_mode(mode: str, teacher_has_heads: bool) -> tuple[bool, bool]:
    """(use_heads, use_features) for ``loss.mode``."""
    if mode in ("heads", "both") and not teacher_has_heads:
        raise ConfigError(
            f"loss.mode={mode} needs a teacher with DINO/iBOT heads (a `dinoapp pretrain` export or a Meta training "
            "dump); released checkpoints have none: use loss.mode=features (or auto)"
        )
    use_heads = mode in ("heads", "both") or (mode == "auto" and teacher_has_heads)
    return use_heads, mode in ("features", "both") or (mode == "auto" and not teacher_has_heads)


def build_teacher(cfg: DistillConfig, device: torch.device) -> Teacher:
    from ..loading import load_backbone
    from .losses import head_from_state_dict

    if not cfg.teacher.backbone:
        raise ConfigError("no teacher: set teacher.backbone (a checkpoint path, timm name or architecture name)")
    bb = load_backbone(cfg.teacher.backbone, device=device, seed=cfg.train.seed)  # seed: arch-name teachers
    heads = bb.pretrained_heads or {}
    dino = head_from_state_dict(heads["dino_head"]).to(device) if "dino_head" in heads else None
    ibot = head_from_state_dict(heads["ibot_head"]).to(device) if dino is not None and "ibot_head" in heads else None
    return Teacher(bb, dino, ibot)


def teacher_sizes(cfg: DistillConfig, teacher: Teacher, features_on_locals: bool) -> tuple[int, int]:
    """Crop sizes the data pipeline produces: the teacher's (global, local) sizes; the students get
    them resized to ``data.global_size`` / ``data.local_size``. Local crops are only produced at the
    teacher's scale when the teacher sees them (feature terms)."""
    p = teacher.backbone.patch_size
    r = cfg.teacher.resolution

    def scaled(size: int) -> int:
        return max(p, int(round(size * r / p)) * p) if r != 1 else size

    g = scaled(cfg.data.global_size)
    if g % p:
        raise ConfigError(f"data.global_size={cfg.data.global_size} is not a multiple of the teacher's {p}px patch")
    loc = scaled(cfg.data.local_size) if features_on_locals else cfg.data.local_size
    if features_on_locals and loc % p:
        raise ConfigError(f"data.local_size={cfg.data.local_size} is not a multiple of the teacher's {p}px patch "
                          "(the teacher sees the local crops in the feature recipe)")  # fmt: skip
    return g, loc


def build_student(cfg: DistillConfig, i: int, teacher: Teacher, use_heads: bool, use_features: bool,
                  device: torch.device) -> StudentNet:  # fmt: skip
    from ..loading import load_backbone

    s = cfg.students[i]
    tb = teacher.backbone
    torch.manual_seed(cfg.train.seed + 1009 * (i + 1))
    bb = load_backbone(s.backbone, in_chans=tb.in_chans, mean=tb.mean, std=tb.std, drop_path_rate=s.drop_path,
                       seed=cfg.train.seed + i, **s.arch_overrides)  # fmt: skip
    bb.mean, bb.std = tuple(tb.mean), tuple(tb.std)  # students learn from (and are used with) the teacher's inputs
    if isinstance(getattr(bb, "mask_token", None), nn.Parameter):
        bb.mask_token.requires_grad_(False)  # students see unmasked crops (spec section 4): no gradient ever reaches it
    for what, size in (("data.global_size", cfg.data.global_size), ("data.local_size", cfg.data.local_size)):
        if what == "data.local_size" and cfg.data.n_local == 0:
            continue
        if size % bb.patch_size:
            raise ConfigError(
                f"{what}={size} is not a multiple of student {s.name!r}'s {bb.patch_size}px patch / stride"
            )
    heads = None
    if use_heads:
        from ..ssl.heads import DINOHead

        def fresh(t) -> DINOHead:
            lin = [m for m in t.mlp if isinstance(m, nn.Linear)]
            hidden = lin[0].out_features if len(lin) > 1 else 2048
            return DINOHead(bb.embed_dim, t.n_prototypes, hidden_dim=hidden, bottleneck_dim=lin[-1].out_features,
                            n_layers=len(lin))  # fmt: skip

        # a teacher with one shared head (DINOv2 style) gives iBOT targets from its DINO head
        ibot_src = teacher.ibot_head if teacher.ibot_head is not None else teacher.dino_head
        heads = (fresh(teacher.dino_head), fresh(ibot_src) if cfg.loss.ibot_weight > 0 else None)
    lo = cfg.loss
    net = StudentNet(bb, teacher_dim=tb.embed_dim, cls_features=use_features and lo.cls_weight > 0,
                     patch_features=use_features and lo.patch_weight > 0, projector=s.projector,
                     heads=heads)  # fmt: skip
    if cfg.train.grad_checkpointing:
        bb.set_grad_checkpointing(True)
    return net.to(device).train()


def student_schedule(o: OptimConfig, steps: int, step: int) -> dict[str, float]:
    """This student's scheduled values at ``step`` (pure function of its optim settings)."""
    lr = warmup_cosine(step, steps, o.lr, o.min_lr, o.warmup_steps) if o.schedule == "cosine" else \
        warmup_constant(step, o.warmup_steps, o.lr)  # fmt: skip
    head = o.head_lr if o.head_lr is not None else o.lr
    hlr = warmup_cosine(step, steps, head, o.min_lr, o.warmup_steps) if o.schedule == "cosine" else \
        warmup_constant(step, o.warmup_steps, head)  # fmt: skip
    return {"lr": lr, "head_lr": hlr, "weight_decay": cosine(step, steps, o.weight_decay, o.weight_decay_end),
            "momentum": cosine(step, steps, o.ema_momentum, o.ema_momentum_end),
            "freeze_last_layer": float(step < o.freeze_last_layer_steps)}  # fmt: skip


def _is_vit(bb) -> bool:
    from ..backbone import DinoBackbone

    return isinstance(bb, DinoBackbone)


@dataclass
class DistillEngine:
    """Everything one distillation step needs; :meth:`step` is the loop body (also timed by
    ``benchmarks/distill_step.py``)."""

    cfg: DistillConfig
    info: D.DistInfo
    teacher: Teacher
    students: list[Student]
    use_heads: bool
    use_features: bool
    teacher_forwards: int = 0  # teacher passes so far (one per step, shared by every student)

    @property
    def local_batch(self) -> int:
        return self.cfg.train.batch_size // self.info.world_size

    @property
    def features_on_locals(self) -> bool:
        """The feature terms use local crops (the teacher sees them too); the Gram term is global-only."""
        lo = self.cfg.loss
        return self.use_features and self.cfg.data.n_local > 0 and (lo.cls_weight > 0 or lo.patch_weight > 0)

    @property
    def students_see_locals(self) -> bool:
        return self.cfg.data.n_local > 0 and (self.use_heads or self.features_on_locals)

    def _positions(self, step: int, grid: tuple[int, int], G: int) -> torch.Tensor:
        """iBOT patch positions ``[G*b, h*w]`` of this process's images, drawn for the global batch
        (the same on any number of processes) like iBOT masks; students see them unmasked."""
        from ..ssl.masking import ibot_masks

        lo, B, b, r = self.cfg.loss, self.cfg.train.batch_size, self.local_batch, self.info.rank
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, 10_007 + 31 * grid[0] + grid[1]))
        m = ibot_masks(G * B, grid[0], grid[1], gen, ratio_range=lo.patch_ratio, sample_prob=lo.patch_sample_prob)
        return m.reshape(G, B, -1)[:, r * b : (r + 1) * b].reshape(G * b, -1).to(self.info.device)

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One step on this process's ``batch`` (``global_crops [G, b, C, g_t, g_t]``,
        ``local_crops [L, b, C, l, l]`` at the teacher's sizes); returns per-student losses."""
        cfg, dev = self.cfg, self.info.device
        G, L = batch["global_crops"].shape[0], batch["local_crops"].shape[0]
        torch.manual_seed(step_seed(cfg.train.seed, step, self.info.rank))
        gc_t = batch["global_crops"].to(dev, non_blocking=True).flatten(0, 1)  # [G*b, C, g_t, g_t]
        lc_t = batch["local_crops"].to(dev, non_blocking=True).flatten(0, 1) if L > 0 else None  # [L*b, C, l, l]
        gc = resize_crops(gc_t, cfg.data.global_size)  # [G*b, C, g, g]: the students' crops
        lc = resize_crops(lc_t, cfg.data.local_size) if lc_t is not None and self.students_see_locals else None

        # one teacher pass for every student; per-student targets; then the raw activations are dropped
        with autocast_context(dev, cfg.train.precision):
            t = self.teacher.forward(gc_t, lc_t if self.features_on_locals else None)
        self.teacher_forwards += 1
        targets = self._targets(step, t, G, gc, lc)
        del t
        results = {}
        for st, tgt in zip(self.students, targets, strict=True):
            results[st.name] = self._student_step(st, step, gc, lc, tgt)
        return results

    @torch.no_grad()
    def _targets(self, step: int, t: dict, G: int, gc: torch.Tensor, lc: torch.Tensor | None) -> list[dict]:
        from .losses import align_patch_grid

        lo = self.cfg.loss
        aligned: dict[tuple, torch.Tensor] = {}  # one alignment per distinct student grid
        positions: dict[tuple, torch.Tensor] = {}
        ibot: dict[tuple, torch.Tensor] = {}
        dino = dino_targets(self.teacher, t["cls"].float(), G, lo.teacher_temp, lo.sk_iters) if self.use_heads else None
        cls_t = t["cls"].float()  # the feature terms' CLS targets: global rows, then local rows
        if self.features_on_locals and lc is not None:
            cls_t = torch.cat([cls_t, t["cls_local"].float()])
        out = []
        for st in self.students:
            bb = st.net.backbone
            grid = grid_of(bb, tuple(gc.shape[-2:]))
            key = ("g", grid)
            if key not in aligned and (self.use_features or (self.use_heads and st.net.ibot_head is not None)):
                aligned[key] = align_patch_grid(t["patches"].float(), t["grid"], grid)  # [G*b, N_s, D_t]
            tgt: dict[str, Any] = {}
            if self.use_features:
                tgt["patches"] = [aligned[key]]
                if self.features_on_locals and lc is not None:
                    lgrid = grid_of(bb, tuple(lc.shape[-2:]))
                    lkey = ("l", lgrid)
                    if lkey not in aligned:
                        aligned[lkey] = align_patch_grid(t["patches_local"].float(), t["grid_local"], lgrid)
                    tgt["patches"].append(aligned[lkey])
                tgt["cls"] = cls_t  # [(G+L)*b, D_t]
            if self.use_heads:
                tgt["dino"] = dino
                if st.net.ibot_head is not None and lo.ibot_weight > 0:
                    if grid not in positions:
                        positions[grid] = self._positions(step, grid, G)
                        ibot[grid] = ibot_targets(self.teacher, aligned[key], positions[grid],
                                                  lo.teacher_temp, lo.sk_iters)  # fmt: skip
                    tgt["positions"], tgt["ibot"] = positions[grid], ibot[grid]
            out.append(tgt)
        return out

    def _student_step(self, st: Student, step: int, gc, lc, tgt: dict) -> dict[str, Any]:
        cfg, lo, dev = self.cfg, self.cfg.loss, self.info.device
        sv = student_schedule(st.optim, cfg.train.steps, step)
        set_lr_wd(st.optimizer, lr=sv["lr"], weight_decay=sv["weight_decay"], head_lr=sv["head_lr"],
                  freeze_last_layer=bool(sv["freeze_last_layer"]))  # fmt: skip
        positions = tgt.get("positions")
        with autocast_context(dev, cfg.train.precision):
            out = st.module(gc, lc, positions)
        losses: dict[str, torch.Tensor] = {}
        total = None
        if self.use_heads:
            h = head_losses(out, tgt["dino"], tgt.get("ibot"), positions, student_temp=lo.student_temp,
                            dino_weight=lo.dino_weight, ibot_weight=lo.ibot_weight, koleo_weight=lo.koleo_weight,
                            same_crop=lo.dino_same_crop)  # fmt: skip
            total = h.pop("loss")
            losses.update(h)
        if self.use_features:
            f = feature_losses(out, tgt["cls"], tgt["patches"], kind=lo.feature_loss, cls_weight=lo.cls_weight,
                               patch_weight=lo.patch_weight, gram_weight=lo.gram_weight)  # fmt: skip
            ft = f.pop("loss")
            total = ft if total is None else total + ft
            losses.update(f)
        losses["loss"] = total
        del out
        ok, grad_norm = guarded_step(total, st.optimizer, st.net, clip=st.optim.clip_grad,
                                     freeze_last_layer=bool(sv["freeze_last_layer"]), device=dev)  # fmt: skip
        if ok:
            ema_update(st.ema, st.net, sv["momentum"])
            with torch.no_grad():  # buffers (BatchNorm running statistics of CNN students) follow the student
                for be, bn in zip(st.ema.buffers(), st.net.buffers(), strict=True):
                    be.copy_(bn)
            st.nan_run = 0
        else:
            st.nan_run += 1
            if self.info.is_main:
                log.warning("step %d, student %s: non-finite loss or gradient, step skipped (%d in a row)", step + 1,
                            st.name, st.nan_run)  # fmt: skip
        st.optimizer.zero_grad(set_to_none=True)
        return {"losses": {k: v.detach() for k, v in losses.items()}, "ok": ok, "grad_norm": grad_norm, "sv": sv}

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        if not self.info.is_main:
            return None
        tb = self.teacher.backbone
        return {
            "kind": "distill",
            "students": {
                st.name: {
                    "net": full_state_dict(st.net),
                    "ema": full_state_dict(st.ema),
                    "optimizer": st.optimizer.state_dict(),
                    "nan_run": st.nan_run,
                }
                for st in self.students
            },  # fmt: skip
            "teacher": {"source": tb.provenance.get("source"), "sha256": tb.provenance.get("sha256")},
            "teacher_forwards": self.teacher_forwards,
            "rng": runstate.rng_state(),
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
        }

    def load_state(self, state: dict[str, Any], path: Path) -> int:
        saved = state.get("teacher", {}).get("sha256")
        now = self.teacher.backbone.provenance.get("sha256")
        if saved and now and saved != now:
            raise ConfigError(f"the teacher file changed since {path.name} was written (sha256 {saved[:12]} -> "
                              f"{now[:12]}): resume with the same teacher, or start a new --out")  # fmt: skip
        for st in self.students:
            s = state["students"][st.name]
            load_full_state_dict(st.net, s["net"])
            load_full_state_dict(st.ema, s["ema"])
            st.optimizer.load_state_dict(s["optimizer"])
            st.nan_run = int(s.get("nan_run", 0))
        self.teacher_forwards = int(state.get("teacher_forwards", 0))
        runstate.set_rng_state(state["rng"])
        return int(state["step"])


def build_engine(cfg: DistillConfig, info: D.DistInfo) -> DistillEngine:
    dev = info.device
    teacher = build_teacher(cfg, dev)
    use_heads, use_features = resolve_mode(cfg.loss.mode, teacher.has_heads)
    if info.is_main:
        recipe = " + ".join(n for n, on in (("heads (DINO+iBOT+KoLeo)", use_heads), ("features", use_features)) if on)
        log.info("distilling %s into %s: %s", teacher.backbone.provenance.get("source"),
                 ", ".join(s.name for s in cfg.students), recipe)  # fmt: skip
    compile_blocks = cfg.train.compile and dev.type == "cuda"
    if compile_blocks and _is_vit(teacher.backbone):
        for blk in teacher.backbone.blocks:
            blk.compile()
    students = []
    for i, s in enumerate(cfg.students):
        net = build_student(cfg, i, teacher, use_heads, use_features, dev)
        if info.distributed and getattr(net.backbone, "pruned", True) is False:
            raise ConfigError(f"student {s.name!r}: timm cannot prune {s.backbone}'s stages after out_index, and "
                              "DDP rejects their unused parameters: train it in one process, or pick another "
                              "model")  # fmt: skip
        if info.distributed and info.device.type == "cuda":  # BatchNorm statistics over the global batch
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if compile_blocks and _is_vit(net.backbone):
            for blk in net.backbone.blocks:
                blk.compile()
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        o = cfg.student_optim(i)
        parts: dict[str, nn.Module] = {"backbone": net.backbone}
        for name in ("cls_proj", "patch_proj", "dino_head", "ibot_head"):
            m = getattr(net, name)
            if m is not None and any(True for _ in m.parameters()):
                parts[name] = m
        decay = o.layer_decay if _is_vit(net.backbone) else 1.0  # per-block decay is defined for ViT blocks
        groups = param_groups(parts, layer_decay=decay, patch_embed_lr_mult=o.patch_embed_lr_mult)
        opt = build_optimizer(groups, betas=o.betas, fused=True if dev.type == "cuda" else None)
        students.append(Student(s.name, net, ema, opt, o, module=D.wrap_ddp(net, info)))
    return DistillEngine(cfg, info, teacher, students, use_heads, use_features)


def build_dataset(cfg: DistillConfig, eng: DistillEngine, run_dir: Path, rank: int = 0):
    """Multi-crops at the teacher's sizes (the students get them resized), normalised with the teacher's statistics."""
    from ..ssl.augment import MultiCrop
    from ..ssl.data import SSLDataset
    from ..ssl.train import augment_params, build_source

    d, tb = cfg.data, eng.teacher.backbone
    g, loc = teacher_sizes(cfg, eng.teacher, eng.features_on_locals)
    src = build_source(d, cfg.train.seed, run_dir, rank)
    crops = MultiCrop(global_size=g, local_size=loc, n_local=d.n_local, global_scale=d.global_scale,
                      local_scale=d.local_scale, params=augment_params(d), mean=tb.mean, std=tb.std)  # fmt: skip
    return SSLDataset(src, [crops], in_chans=tb.in_chans, seed=cfg.train.seed)


def export_students(eng: DistillEngine, run_dir: Path, step: int) -> dict[str, Path]:
    """Each student's EMA backbone as a dinoapp checkpoint (``students/<name>/backbone.safetensors``,
    read back by ``load_backbone``) with its projectors / DINO-iBOT heads in ``pretrained_heads``, and
    ViT students also in Meta's flat layout."""
    from ..checkpoint import save_backbone

    out = {}
    tb = eng.teacher.backbone
    for st in eng.students:
        bb = copy.deepcopy(st.ema.backbone).cpu().eval()
        init = next(s.backbone for s in eng.cfg.students if s.name == st.name)
        bb.provenance.update({"source": str(run_dir / "students" / st.name), "init": init,
                              "distilled_from": tb.provenance.get("source"),
                              "teacher_sha256": tb.provenance.get("sha256"),
                              "trained_steps": step, "layout": "dinoapp", "sha256": None,
                              "weights": "distilled (EMA)"})  # fmt: skip
        bb.pretrained_heads = {}
        for name in ("cls_proj", "patch_proj", "dino_head", "ibot_head"):
            m = getattr(st.ema, name)
            if m is not None and any(True for _ in m.parameters()):
                bb.pretrained_heads[name] = {k: v.detach().cpu() for k, v in m.state_dict().items()}
        folder = run_dir / "students" / st.name
        out[st.name] = save_backbone(bb, folder / "backbone.safetensors")
        if eng.cfg.run.export_meta and _is_vit(bb):
            meta = folder / "backbone_meta.pth"
            tmp = meta.with_name(meta.name + ".tmp")
            torch.save({k: v.contiguous() for k, v in bb.meta_state_dict().items()}, tmp)
            os.replace(tmp, meta)
    return out


# --- the loop --------------------------------------------------------------------------------------
def distill(
    cfg: DistillConfig | str | None,
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool | str = "auto",
    stop_after: int | None = None,
) -> DistillResult:
    """Run (or resume) distillation; returns where things were written.

    ``cfg``: a :class:`DistillConfig`, a preset name or YAML path (``overrides`` applied on top),
    ``None`` reads ``out_dir/config.yaml``. ``data`` / ``teacher`` set ``data.path`` /
    ``teacher.backbone``. ``resume`` and ``stop_after`` as in :func:`dinoapp.ssl.train.pretrain`.
    """
    run_dir = Path(out_dir).expanduser()
    if cfg is None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} has no config.yaml: pass --config (a preset name or YAML file)")
        cfg = run_dir / "config.yaml"
    if not isinstance(cfg, DistillConfig):
        cfg = load_distill_config(cfg, overrides)
    elif overrides:
        raise ConfigError("pass overrides with a preset name or YAML path, or edit the DistillConfig directly")
    if data is not None:
        cfg.data.path = str(data)
    if teacher is not None:
        cfg.teacher.backbone = str(teacher)
    cfg.validate()
    info = D.init(cfg.train.device)
    try:
        with flush_denormals(info.device):
            return _distill(cfg, run_dir, info, resume, stop_after)
    finally:
        D.shutdown()


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """On CPU, treat denormal floats as zero while training. Fresh DINOv3 students (LayerScale 1e-5)
    give squared gradients in Adam's state below 1e-38, and x86 CPUs handle those in microcode: the
    first steps of a run were 10-25x slower than the rest (benchmarks/distill_step.py)."""
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _distill(cfg: DistillConfig, run_dir: Path, info: D.DistInfo, resume, stop_after) -> DistillResult:
    found = open_run(run_dir, cfg, info, resume, RESUME_MAY_CHANGE, kind="distill")
    if info.is_main:
        cfg.save(run_dir / "config.yaml")

    eng = build_engine(cfg, info)
    start = 0
    if found is not None:
        start = eng.load_state(found[0], found[1])
        if info.is_main:
            log.info("resumed from %s (step %d)", found[1], start)
    ds = build_dataset(cfg, eng, run_dir, info.rank)
    from ..ssl.data import StepBatchSampler, make_loader

    sampler = StepBatchSampler(len(ds), cfg.train.batch_size, cfg.train.seed, start_step=start,
                               total_steps=cfg.train.steps, rank=info.rank, world_size=info.world_size)  # fmt: skip
    loader = make_loader(ds, sampler, num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")
    metrics = (
        runstate.MetricsWriter(run_dir, start_step=start, tensorboard=cfg.run.tensorboard) if info.is_main else None
    )

    stop = {"flag": False}
    old_handlers = _install_signal_handlers(stop)
    last: dict[str, Any] = {}
    step = start
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    progress = None
    if info.is_main and cfg.run.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start

    def save(at: int) -> None:
        state = eng.state()
        if state is not None:
            runstate.save_checkpoint(state, run_dir, at, cfg.run.keep_last)

    try:
        it = iter(loader)
        while step < end and not D.any_true(stop["flag"], info.device):
            r = eng.step(step, next(it))
            step += 1
            if step % cfg.run.log_every == 0 or step == end:
                now = time.perf_counter()
                row: dict[str, Any] = {}
                for name, res in r.items():
                    row.update({f"{name}/{k}": float(v) for k, v in res["losses"].items()})
                row = D.mean_scalars(row, info.device)
                for name, res in r.items():
                    sv = res["sv"]
                    row.update({f"{name}/grad_norm": res["grad_norm"], f"{name}/skipped": int(not res["ok"]),
                                f"{name}/lr": sv["lr"], f"{name}/ema_momentum": sv["momentum"]})  # fmt: skip
                row["img_per_s"] = cfg.train.batch_size * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                last = {"step": step, **row}
                if metrics is not None:
                    metrics.write(last)
                if progress is not None:
                    progress.set_postfix({n: f"{row[f'{n}/loss']:.3f}" for n in r}, refresh=False)
            if progress is not None:
                progress.update(1)
            diverged = [st for st in eng.students if st.nan_run >= cfg.train.nan_patience]
            if diverged:
                raise TrainingDivergedError(
                    f"student {diverged[0].name!r}: the loss was not finite for {diverged[0].nan_run} consecutive "
                    f"steps (last at step {step}); training stopped. Resume from the last checkpoint in "
                    f"{run_dir / 'checkpoints'} with a lower optim.lr (students.N.optim.lr), optim.clip_grad set, "
                    "or train.precision=fp32"
                )
            if step % cfg.run.ckpt_every == 0 and step < end:
                save(step)
        stopped_early = step < cfg.train.steps
        save(step)
        exported: dict[str, Path] = {}
        evaluation: dict[str, Any] = {}
        if not stopped_early:
            if info.is_main:
                exported = export_students(eng, run_dir, step)
            D.barrier()  # the last collective: rank 0 evaluates alone, the others are done
            if info.is_main:
                evaluation = evaluate_run(eng, ds, run_dir)
        return DistillResult(run_dir, step, exported, last, stopped_early, evaluation)
    finally:
        _restore_signal_handlers(old_handlers)
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()


def evaluate_run(eng: DistillEngine, ds, run_dir: Path) -> dict[str, Any]:
    """After training: each EMA student's agreement with the teacher on ``eval.n_probes`` training
    images, and (:func:`dinoapp.distill.evaluate.evaluate_backbones`) throughput plus kNN accuracy /
    linear-segmentation mIoU on the labelled probe when ``eval.*`` names one. Written to ``eval.json``."""
    import json

    from ..ssl.monitor import probe_batch
    from .evaluate import evaluate_backbones

    cfg, tb = eng.cfg, eng.teacher.backbone
    g, _ = teacher_sizes(cfg, eng.teacher, False)
    probes = probe_batch(ds.source, cfg.eval.n_probes, g, tb.mean, tb.std).to(eng.info.device)
    agree = {st.name: agreement(eng.teacher, st.ema, probes, cfg.data.global_size) for st in eng.students}
    e = cfg.eval
    report = evaluate_backbones({"teacher": tb, **{st.name: st.ema.backbone for st in eng.students}},
                                labels_csv=e.labels_csv, seg_images=e.seg_images, seg_masks=e.seg_masks, size=e.size,
                                k=e.k, seg_epochs=e.seg_epochs, seed=cfg.train.seed,
                                device=eng.info.device)  # fmt: skip
    result = {"agreement": agree, "probe": json.loads(report.to_json()), "table": report.table()}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
