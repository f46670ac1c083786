"""dinoapp's Gradio app: explore what a DINOv3 backbone "sees" in your images and train a head in seconds.

    python app.py                                   # released ViT-S/16 when the hub is reachable, else demo weights
    python app.py --weights vit_large_patch16_dinov3.sat493m
    python app.py --weights ~/models/dinov3_vitl16_pretrain_sat493m.pth --allowed-dir ~/data
    DINOAPP_WEIGHTS=runs/s16/export/teacher_backbone.safetensors python app.py

UI glue only: every computation is a library call (``dinoapp.explore``, ``dinoapp.heads``,
``dinoapp.loading``, ``domains``). Each browser session (and each API client) has its own state:
images, cached features, heads; backbones are loaded once per process and shared read-only.
The server binds 127.0.0.1 unless told otherwise, limits uploads, and opens server paths only
under ``--allowed-dir``.
"""

import argparse
import contextlib
import functools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dinoapp
from dinoapp import explore, hub
from dinoapp.errors import ConfigError, DinoappError, InputError

DEFAULT_WEIGHTS = "vit_small_patch16_dinov3.lvd1689m"
MAX_FILES = 16  # images per explore call
MAX_TRAIN = 24  # painted images per session
DEFAULT_READ = {"bands": None, "dicom_window": None, "stretch": None}  # how explore.open_image reads by default
CLASS_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240)]


# --- process-wide: backbones (shared, read-only) and settings -----------------------------------------
@dataclass
class Settings:
    weights: str | None = None  # --weights / DINOAPP_WEIGHTS
    allowed_dir: Path | None = None  # server paths may only be opened below this folder
    device: str | None = None
    max_backbones: int = 3
    session_mb: int = 2048  # images + features one session may hold (--session-mb)


class Backbones:
    """Loaded backbones by source, least recently used dropped beyond ``max_backbones`` (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._items: OrderedDict[str, tuple[Any, str]] = OrderedDict()
        self._lock = threading.Lock()

    def default(self) -> tuple[str, Any, str]:
        """(source, backbone, notice): ``--weights``, else the released ViT-S/16 through the hub, else demo weights."""
        if self.settings.weights:
            return self.get(self.settings.weights, trusted=True)
        try:
            return self.get(DEFAULT_WEIGHTS, trusted=True)
        except (DinoappError, OSError):  # offline, or the hub is unreachable: demo weights
            return self.get("demo", trusted=True)

    def get(self, source: str, *, trusted: bool = False, uploaded: bool = False) -> tuple[str, Any, str]:
        """(key, backbone, notice). A client may name the demo weights and the released DINOv3 models
        (timm names, through the hub cache), or upload a checkpoint (``uploaded``: a file in gradio's
        upload folder); anything else is a server path and must lie under ``--allowed-dir`` (the key is
        then the resolved path). Only the operator (``--weights``, ``trusted``) may name architectures
        with random weights or other sources."""
        source = (source or "").strip()
        if not source:
            raise InputError(
                "name a backbone: a released DINOv3 timm name (vit_small_patch16_dinov3.lvd1689m), or a checkpoint "
                "file under the allowed folder"
            )
        key = source
        if uploaded:
            key = str(uploaded_path(source))
        elif not trusted and source != "demo" and hub.split_timm_name(source) is None:
            key = str(self._client_path(source))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return (key, *self._items[key])
        if key == "demo":
            from dinoapp.demo import DEMO_NOTICE, demo_backbone

            bb = demo_backbone(device=self.settings.device)
            bb.provenance["source"] = Path(str(bb.provenance.get("source") or "demo")).name  # never the install path
            bb.provenance.pop("path", None)
            item = (bb, DEMO_NOTICE)
        else:
            bb = dinoapp.load_backbone(key, device=self.settings.device)
            if Path(key).expanduser().exists():  # a file or folder: visitors see its name, never server folders
                bb.provenance["source"] = Path(key).name  # (what heads record and errors quote; not the fingerprint)
                bb.provenance.pop("path", None)
            item = (bb, "")
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.settings.max_backbones:
                self._items.popitem(last=False)
        return (key, *item)

    def _client_path(self, source: str) -> Path:
        """A server path a client named; a bare name (no folder) is looked up in the allowed folder, and
        is otherwise refused as what it most likely is: a model name this app does not load for clients."""
        bare = "/" not in source and os.sep not in source and not source.startswith(("~", "."))
        if not bare:
            return allowed_path(source, self.settings)
        root = self.settings.allowed_dir
        if root is not None and (root / source).exists():
            return allowed_path(str(root / source), self.settings)
        where = ("nor a file in the allowed folder" if root is not None
                 else "and opening files on the server by path is off")  # fmt: skip
        raise InputError(
            f"{source} is neither a released DINOv3 model name (e.g. {DEFAULT_WEIGHTS} or "
            f"vit_large_patch16_dinov3.sat493m) {where}: upload the checkpoint file, give the path of a file under "
            f"the allowed folder, or ask the operator to start the app with --weights {source} (other timm models "
            "and architectures are loaded that way only)"
        )


def allowed_path(path: str, settings: Settings) -> Path:
    """``path`` resolved, if it lies under ``--allowed-dir``; otherwise a readable refusal."""
    if settings.allowed_dir is None:
        raise InputError(
            "opening files on the server by path is off: upload the file instead, or start the app "
            "with --allowed-dir DIR"
        )
    p = Path(path).expanduser().resolve()
    root = settings.allowed_dir.resolve()
    if p != root and root not in p.parents:
        raise InputError(f"{path} is outside the allowed folder {root}")
    if not p.exists():
        raise InputError(f"{path}: no such file or folder under {root}")
    return p


def uploaded_path(path: str) -> Path:
    """``path`` resolved, if it is a file gradio received as an upload (its upload folder), else a refusal."""
    from gradio.utils import get_upload_folder

    p = Path(path).resolve()
    root = Path(get_upload_folder()).resolve()
    if root not in p.parents:
        raise InputError("only an uploaded checkpoint can be loaded this way")
    if not p.is_file():
        raise InputError(
            "the uploaded checkpoint is no longer on the server (uploads are kept an hour): upload it again"
        )
    return p


def describe_backbone(source: str, bb, notice: str = "") -> str:
    """What a visitor may see of a backbone: names, architecture, normalisation; for files only the file name."""
    prov = bb.provenance
    if Path(source).expanduser().exists():
        source = Path(source).name
    arch = bb.arch.to_dict()
    kind = (
        f"timm {arch['model_name']}"
        if arch.get("family") == "timm"
        else (f"ViT dim {bb.embed_dim}, {bb.n_blocks} blocks, patch {bb.patch_size}, {bb.n_registers} registers")
    )
    n = sum(p.numel() for p in bb.parameters())
    lines = [
        f"**{source}**: {kind}, {n / 1e6:.1f}M parameters, {bb.in_chans} input channels",
        f"normalisation: mean {tuple(round(m, 3) for m in bb.mean)}, std {tuple(round(s, 3) for s in bb.std)}"
        f" ({prov.get('normalisation', 'file')})",
        f"weights: {prov.get('weights', prov.get('layout', '?'))}; sha256 {str(prov.get('sha256') or '-')[:16]}",
    ]
    if notice:
        lines.insert(0, f"> **Demo weights.** {notice}")
    return "\n\n".join(lines)


# --- per-session state -----------------------------------------------------------------------------------
@dataclass
class Session:
    """One browser tab's (or API client's) data; never shared."""

    sources: dict[str, str] = field(default_factory=dict)  # slot "A"/"B" -> backbone source
    pinned: dict[str, Any] = field(default_factory=dict)  # uploaded backbones by key: kept while the session lives
    images: list[explore.LoadedImage] = field(default_factory=list)  # explorer gallery; [0] is the current image
    views: dict[tuple, Any] = field(default_factory=dict)  # (slot, image index, resolution, layer) -> FeatureView
    resolution: int = 448
    layer: int | None = None
    train: list[tuple[explore.LoadedImage, np.ndarray]] = field(default_factory=list)  # (image, uint8 label mask)
    train_names: list[str] = field(default_factory=list)  # the classes of the training set
    class_names: list[str] = field(default_factory=list)  # the classes of the current head
    head: Any = None
    head_slot: str = "A"
    open_opts: dict = field(default_factory=lambda: dict(DEFAULT_READ))  # the explorer's bands / window / stretch:
    # the head trainer reads alike
    train_read: dict | None = None  # the read settings (bands / window / stretch) of the training set's images
    base_bytes: int = 0  # what the session held when the running handler started (for memory messages)
    _out: Path | None = None
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def out_dir(self) -> Path:
        """This session's download folder (made on first use, removed when the session ends)."""
        if self._out is None:
            self._out = Path(tempfile.mkdtemp(prefix="dinoapp-"))
        return self._out

    def nbytes(self) -> int:
        """Memory this session holds: its images (gallery and training), features and masks."""
        imgs = {id(im): im for im in [*self.images, *(im for im, _ in self.train)]}
        return (sum(im.nbytes for im in imgs.values()) + sum(v.nbytes for v in self.views.values())
                + sum(m.nbytes for _, m in self.train))  # fmt: skip

    def snapshot(self) -> dict:
        """What :meth:`restore` puts back (containers copied one level: their items are never changed in place)."""
        keep = ("lock", "_out")
        return {f.name: _copy1(getattr(self, f.name)) for f in fields(self) if f.name not in keep}

    def restore(self, saved: dict) -> None:
        for k, v in saved.items():
            setattr(self, k, v)

    def close(self) -> None:
        if self._out is not None:
            shutil.rmtree(self._out, ignore_errors=True)


def _copy1(v: Any) -> Any:
    return type(v)(v) if isinstance(v, (list, dict, set)) else v


def changes_session(fn):
    """A handler that changes the session: one at a time per session, and all or nothing. Gradio keeps the
    session object a failing handler has half changed, so a failure puts back what the session held."""

    @functools.wraps(fn)
    def run(self, s, *args, **kwargs):
        if s is None:
            return fn(self, s, *args, **kwargs)
        with s.lock:
            saved = s.snapshot()
            s.base_bytes = s.nbytes()
            try:
                return fn(self, s, *args, **kwargs)
            except BaseException:
                s.restore(saved)
                raise

    return run


class App:
    """The handlers behind the UI and the API; each takes and returns the session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backbones = Backbones(settings)
        self.default_source, _, self.default_notice = self.backbones.default()
        self.trusted = {self.default_source, self.settings.weights}

    # --- backbones -------------------------------------------------------------------------------
    def backbone(self, s: Session, slot: str = "A"):
        source = s.sources.get(slot, self.default_source if slot == "A" else None)
        if source is None:
            return None, ""
        if source in s.pinned:  # uploaded by this session
            return s.pinned[source], ""
        _, bb, notice = self.backbones.get(source, trusted=source in self.trusted)
        return bb, notice

    @changes_session
    def load_backbone(self, s: Session | None, source: str, slot: str = "A") -> tuple[Session, str]:
        """Backbone ``slot`` (A = main, B = comparison) from a released DINOv3 timm name, "demo", or a file under
        the allowed folder; an empty source removes B."""
        s = s or Session()
        _slot(slot)
        if slot == "B" and not (source or "").strip():
            s.sources.pop("B", None)
            s.views = {k: v for k, v in s.views.items() if k[0] != "B"}
            return s, "comparison backbone removed"
        source = (source or "").strip()
        key, bb, notice = self.backbones.get(source, trusted=source in self.trusted)
        return self._use(s, slot, key, bb, notice, label=source)

    @changes_session
    def upload_backbone(self, s: Session | None, file: Any, slot: str = "A") -> tuple[Session, str]:
        """Backbone ``slot`` from an uploaded checkpoint (Meta .pth, timm/HF .safetensors or .bin, a dinoapp run's
        export): read with ``weights_only`` (no code runs), its architecture record checked against its
        tensors before anything is built, the layout detected like ``dinoapp.load_backbone``."""
        s = s or Session()
        _slot(slot)
        paths = _paths(file)
        if not paths:
            raise InputError("choose a checkpoint file to upload (.pth, .pt, .safetensors, .bin)")
        key, bb, notice = self.backbones.get(paths[0], uploaded=True)
        s.pinned = {k: v for k, v in s.pinned.items() if k in s.sources.values()}  # drop uploads no slot uses
        s.pinned[key] = bb  # gradio deletes the upload after an hour: the model stays with the session
        return self._use(s, slot, key, bb, notice, label=Path(paths[0]).name)

    def _use(self, s: Session, slot: str, key: str, bb, notice: str, label: str) -> tuple[Session, str]:
        s.sources[slot] = key  # the resolved path: later lookups hit the cache
        s.views = {k: v for k, v in s.views.items() if k[0] != slot}  # features of the old backbone are stale
        return s, describe_backbone(label, bb, notice)

    def _cap(self) -> int:
        return self.settings.session_mb * 2**20

    def _fits(self, s: Session) -> None:
        """Refuse what makes this session hold more than ``--session-mb`` (the handler's changes are undone)."""
        used = s.nbytes()
        if used > self._cap():
            raise InputError(self._over(s, used - s.base_bytes))

    def _over(self, s: Session, need: float) -> str:
        """How much this step needs against what is left of the session's memory, and what to do."""
        base = min(s.base_bytes, self._cap())
        left, held = (self._cap() - base) / 2**20, base / 2**20
        return (
            f"that needs about {need / 2**20:.1f} MB of images and features, but your session has only "
            f"{left:.1f} MB left of its {self.settings.session_mb} MB (what you explored or painted before holds "
            f"{held:.1f} MB): lower the processing resolution, use fewer or smaller images, close images you no "
            "longer need (explore fewer images, or reload the page for a new session), or ask the operator for "
            "more with --session-mb (this app's limit per session)"
        )

    def _open(self, s: Session, src: Any, slice_index: int | None = None, opts: dict | None = None):
        """``explore.open_image`` with the session's read settings (or ``opts``), refusing before decoding an
        image that would not fit in what is left of the session's memory."""
        opts = s.open_opts if opts is None else opts
        left = self._cap() - s.nbytes()
        limit = max(1, left // 16)  # bytes per pixel: float32 x 3 channels + RGB for display (+ masks)
        if limit >= 64_000_000:  # open_image's own limit applies
            return explore.open_image(src, **opts, slice_index=slice_index)
        try:
            return explore.open_image(src, **opts, slice_index=slice_index, max_pixels=limit)
        except InputError as e:
            if "(max_pixels)" in str(e):
                import re

                size = re.search(r" is (\d+) x (\d+) pixels", str(e))  # the image's size, read from its header
                pixels = int(size[1]) * int(size[2]) if size else limit + 1
                raise InputError(self._over(s, s.nbytes() - s.base_bytes + 16 * pixels)) from None
            raise

    def backbone_info(self, s: Session | None) -> tuple[Session, str]:
        s = s or Session()
        bb, notice = self.backbone(s, "A")
        return s, describe_backbone(s.sources.get("A", self.default_source), bb, notice)

    # --- explorer --------------------------------------------------------------------------------
    def view(self, s: Session, slot: str, index: int = 0, *, compute: bool = True):
        """The features of gallery image ``index`` for backbone ``slot`` (None without that backbone).
        Only queued handlers compute (``compute=True``); a click uses what is cached."""
        bb, _ = self.backbone(s, slot)
        if bb is None:
            return None
        key = (slot, index, s.resolution, s.layer)
        if key not in s.views:
            if not compute:
                return None
            s.views[key] = explore.FeatureView(bb, s.images[index], resolution=s.resolution, layer=s.layer)
            self._fits(s)
        return s.views[key]

    @changes_session
    def explore(
        self,
        s: Session | None,
        files: Any,
        resolution: int = 448,
        layer: int | None = None,
        bands: str = "",
        window: str = "auto",
        slice_index: int = -1,
        foreground: bool = False,
    ) -> tuple[Session, np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """Open the image(s), compute features, return (image, PCA map A, PCA map B or None, info).
        The DICOM files of one series become one volume (``slice_index``: -1 = the middle slice)."""
        s = s or Session()
        paths = _paths(files)
        if not paths:
            raise InputError("upload an image (PNG, JPEG, TIFF), a GeoTIFF or a DICOM file")
        if len(paths) > MAX_FILES:
            raise InputError(f"{len(paths)} files: explore at most {MAX_FILES} at a time")
        sl = None if slice_index in (None, -1) else int(_number(slice_index, "slice"))
        win = None if window in ("", "auto", None) else window
        s.open_opts = {"bands": _bands(bands), "dicom_window": win, "stretch": None}
        s.resolution = int(_number(resolution, "resolution"))
        s.layer = None if layer in (None, "", -1) else int(_number(layer, "layer"))
        s.images, s.views = [], {}  # the old gallery goes (and comes back if this fails)
        s.base_bytes = s.nbytes()  # what stays: the training set
        for item in _gallery_items(paths):
            s.images.append(self._open(s, item, slice_index=sl))
            self._fits(s)
        img = s.images[0]
        va = self.view(s, "A")
        vb = self.view(s, "B")
        for i in range(1, len(s.images)):  # cross-image similarity and the joint PCA need them: compute now (queued)
            self.view(s, "A", i)
            if vb is not None:  # and the comparison backbone's map of a cross-image click
                self.view(s, "B", i)
        pca_a = va.pca(foreground=bool(foreground))
        pca_b = vb.pca(foreground=bool(foreground)) if vb is not None else None
        self._fits(s)
        info = {
            "name": img.name,
            "kind": img.kind,
            "size": list(img.rgb.shape[:2]),
            "grid": list(va.grid),
            "slices": img.n_slices,
            "slice": img.slice_index,
            "images": len(s.images),
            "meta": img.meta,
        }
        return s, img.rgb, pca_a, pca_b, info

    def similarity(
        self, s: Session | None, x: float, y: float, k: int = 5, target: int = 0
    ) -> tuple[Session, np.ndarray, np.ndarray | None, list]:
        """Cosine similarity of the patch under pixel (x, y) of the current image to every patch of
        image ``target`` of the gallery (0 = itself), for backbone A (and B when loaded). Reads only what
        Explore cached: no lock, no forward pass."""
        if s is None or not s.images:
            raise InputError("explore an image first, then click on it")
        x, y, k, target = _number(x, "x"), _number(y, "y"), int(_number(k, "k")), int(_number(target, "target"))
        images = s.images
        if not 0 <= int(target) < len(images):
            raise InputError(f"target image {target} is not in the gallery of {len(images)} image(s)")
        out = []
        for slot in ("A", "B"):
            v = self.view(s, slot, compute=False)
            other = self.view(s, slot, int(target), compute=False) if int(target) else None
            if v is None or (int(target) and other is None):
                if slot == "A":
                    raise InputError("press Explore first (features are computed there, so clicks are instant)")
                out.append(None)  # no comparison backbone (or not for that image)
                continue
            out.append(v.similarity(float(x), float(y), other=other, k=int(k)))
        top = [{"row": r, "col": c, "score": round(float(sc), 4)} for r, c, sc in out[0].top_k]
        return s, out[0].overlay, (out[1].overlay if out[1] is not None else None), top

    @changes_session
    def gallery(self, s: Session | None, foreground: bool = False) -> tuple[Session, list[np.ndarray]]:
        """PCA maps of every gallery image in one shared basis (colours comparable across images)."""
        if s is None or not s.images:
            raise InputError("explore one or more images first")
        views = [self.view(s, "A", i) for i in range(len(s.images))]
        return s, explore.joint_pca(views, foreground=bool(foreground))

    @changes_session
    def download_maps(self, s: Session | None, foreground: bool = False) -> tuple[Session, list[str]]:
        """The current image's PCA map as PNG, and as a georeferenced GeoTIFF for GeoTIFF inputs."""
        if s is None or not s.images:
            raise InputError("explore an image first")
        v = self.view(s, "A")
        stem = Path(s.images[0].name).stem
        files = [str(explore.export_png(v.pca(foreground=bool(foreground)), s.out_dir / f"{stem}_pca.png"))]
        if s.images[0].geo is not None:
            grid = explore.pca_grid(v, foreground=bool(foreground))  # one pixel per patch, on the input raster
            files.append(str(explore.export_geotiff(grid, s.images[0], s.out_dir / f"{stem}_pca.tif")))
        return s, files

    # --- head trainer ----------------------------------------------------------------------------
    @changes_session
    def add_scribbles(self, s: Session | None, file: Any, editor: Any, class_names: str) -> tuple[Session, str]:
        """Add one training image with its painted scribbles (class i = colour i of the palette)."""
        s = s or Session()
        names = _class_names(class_names)
        if len(names) < 2:
            raise InputError("name at least two classes, separated by commas (e.g. water, land)")
        if len(names) > len(CLASS_COLORS):
            raise InputError(f"at most {len(CLASS_COLORS)} classes (one brush colour each)")
        note = ""
        if s.train and names == s.train_names and s.train_read != s.open_opts:
            note = (
                f" (a new training set: the images before were read with {_describe_read(s.train_read)}, this one "
                f"with {_describe_read(s.open_opts)}; one head reads all its images alike)"
            )
        if names != s.train_names or s.train_read != s.open_opts:
            s.train = []  # a new class list (or other bands / window) starts a new training set
        if len(s.train) >= MAX_TRAIN:
            raise InputError(f"{MAX_TRAIN} painted images are enough for a linear head: train now")
        paths = _paths(file)
        if not paths:
            raise InputError("upload the image you painted on")
        img = self._open(s, paths[0])
        mask = explore.scribble_mask(editor, CLASS_COLORS[: len(names)], shape=img.size).astype(np.uint8)
        painted = {names[c]: int((mask == c).sum()) for c in range(len(names)) if (mask == c).any()}
        if not painted:
            raise InputError("no scribbles found: paint over the image with the class colours first")
        s.train.append((img, mask))
        s.train_names, s.train_read = names, dict(s.open_opts)
        self._fits(s)
        return s, f"{len(s.train)} training image(s); painted pixels: {painted}{note}"

    @changes_session
    def train_head(self, s: Session | None, epochs: int = 100, progress=None) -> tuple[Session, np.ndarray, dict]:
        """A linear segmentation head on the painted images (frozen features of backbone A)."""
        if s is None or not s.train:
            raise InputError("add at least one painted image first")
        return self._fit_seg(s, epochs, progress)

    @changes_session
    def train_from_masks(
        self, s: Session | None, images: Any, masks: Any, class_names: str = "", epochs: int = 100, progress=None
    ) -> tuple[Session, np.ndarray, dict]:
        """A linear segmentation head from uploaded images and their label masks (single-band PNG/TIFF of class
        indices, 255 = unlabelled), matched by file name: ``a.jpg`` <-> ``a.png`` or ``a_mask.png``.
        Replaces the painted training set. Class names: comma separated, else ``class 0, class 1, ...``."""
        from dinoapp.labelled import read_mask

        s = s or Session()
        ims, ms = _paths(images), _paths(masks)
        if not ims or not ms:
            raise InputError(
                "upload the images and their masks (single-band PNG of class indices, 255 = unlabelled), matched by "
                "file name: a.jpg <-> a.png or a_mask.png"
            )
        if len(ims) > MAX_TRAIN:
            raise InputError(f"{len(ims)} images: train from at most {MAX_TRAIN} here (use `dinoapp fit-seg` for more)")
        by_stem: dict[str, str] = {}
        for m in ms:
            stem = Path(m).stem
            by_stem[stem] = m
            by_stem.setdefault(stem.removesuffix("_mask"), m)
        missing = [Path(i).name for i in ims if Path(i).stem not in by_stem]
        if missing:
            raise InputError(
                f"no mask for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: name each mask like its "
                "image (a.jpg <-> a.png or a_mask.png)"
            )
        names = _class_names(class_names)
        if len(names) > len(CLASS_COLORS):
            raise InputError(f"at most {len(CLASS_COLORS)} classes here (one display colour each)")
        s.train, s.train_names = [], names  # replaces the painted set (restored if this fails)
        s.train_read = dict(s.open_opts)
        present: set[int] = set()
        for i in ims:
            img, mask = self._open(s, i), read_mask(by_stem[Path(i).stem])
            if mask.shape != img.size:
                raise InputError(
                    f"{Path(by_stem[Path(i).stem]).name} is {mask.shape[1]}x{mask.shape[0]} pixels but "
                    f"{Path(i).name} is {img.size[1]}x{img.size[0]}: a mask must match its image"
                )
            labels = np.unique(mask)
            bad = [int(v) for v in labels if v != explore.UNLABELLED and not 0 <= v < len(CLASS_COLORS)]
            if bad:
                raise InputError(f"{Path(by_stem[Path(i).stem]).name} holds class index {bad[0]}: class indices "
                                 f"0-{len(CLASS_COLORS) - 1} here, 255 = unlabelled")  # fmt: skip
            present |= {int(v) for v in labels if v != explore.UNLABELLED}
            s.train.append((img, mask.astype(np.uint8)))
            self._fits(s)
        if len(present) < 2:
            raise InputError(
                f"the masks label {'only class ' + str(min(present)) if present else 'no pixel'}: a head needs at "
                "least two classes with labelled pixels (255 = unlabelled)"
            )
        top = max(present)
        if not names:
            s.train_names = [f"class {k}" for k in range(top + 1)]
        elif top >= len(names):
            raise InputError(f"the masks use class index {top}, but {len(names)} class names were given")
        return self._fit_seg(s, epochs, progress)

    def _fit_seg(self, s: Session, epochs: int, progress) -> tuple[Session, np.ndarray, dict]:
        from dinoapp.metrics import segmentation_report

        names = s.train_names
        bb = self.backbone(s, "A")[0]
        views = [explore.FeatureView(bb, img, resolution=s.resolution, layer=s.layer) for img, _ in s.train]
        masks = [img.mask_invalid(m) for img, m in s.train]  # labels on nodata pixels neither train nor count
        head = explore.fit_head_from_scribbles(
            views, masks, len(names), class_names=names, epochs=int(epochs), progress=progress
        )
        head.preprocessing = {**head.preprocessing, "read": dict(s.train_read or s.open_opts)}  # saved with it
        preds = [explore.predict(head, v)[0] for v in views]
        # on the labelled pixels of the training images (the scribbles themselves, or the uploaded masks)
        report = segmentation_report(np.concatenate([m.ravel() for m in masks]),
                                     np.concatenate([p.ravel() for p in preds]), len(names), names,
                                     ignore_index=explore.UNLABELLED)  # fmt: skip
        s.head, s.head_slot, s.class_names = head, "A", list(names)
        overlay = explore.label_overlay(s.train[0][0], preds[0], colors=CLASS_COLORS[: len(names)])
        return s, overlay, {"scribble_accuracy": report["pixel_accuracy"], "train_miou": report["mean_iou"],
                            "images": len(views), "classes": list(names)}  # fmt: skip

    @changes_session
    def train_classifier(
        self, s: Session | None, images: Any, labels_csv: Any = None, labels: str = "", kind: str = "knn"
    ) -> tuple[Session, list[list]]:
        """An image classifier (k-NN or logistic regression on CLS features of backbone A) from uploaded images and
        their labels: a CSV with columns ``path,label`` (path = the file name), or labels typed one per image
        in upload order (comma or newline separated). The training set is not kept: one image at a time is
        read, embedded and dropped."""
        s = s or Session()
        ims = _paths(images)
        if len(ims) < 2:
            raise InputError("upload at least two labelled images")
        if len(ims) > 4 * MAX_TRAIN:
            raise InputError(f"{len(ims)} images: at most {4 * MAX_TRAIN} here (use `dinoapp fit-knn` for more)")
        csv = _paths(labels_csv)
        if csv:
            from dinoapp.labelled import read_label_csv

            paths, labs = read_label_csv(csv[0])
            table = {Path(p).name: lab for p, lab in zip(paths, labs)}
            missing = [Path(i).name for i in ims if Path(i).name not in table]
            if missing:
                raise InputError(f"the CSV has no row for {', '.join(missing[:3])}: its 'path' column names each file")
            ys = [table[Path(i).name] for i in ims]
        else:
            ys = [x.strip() for x in (labels or "").replace("\n", ",").split(",") if x.strip()]
            if len(ys) != len(ims):
                raise InputError(f"{len(ys)} labels for {len(ims)} images: give one label per image, in upload order, "
                                 "or a CSV with columns path,label")  # fmt: skip
        if len(set(ys)) < 2:
            raise InputError("the labels name only one class: a classifier needs at least two")
        bb = self.backbone(s, "A")[0]
        embedded = []

        def views():  # one image in memory at a time
            for i in ims:
                v = explore.FeatureView(bb, self._open(s, i), resolution=s.resolution, layer=s.layer)
                embedded.append(explore.embedding(v))
                yield v

        clf = explore.fit_classifier(views(), ys, kind=kind)
        clf.preprocessing = {**(getattr(clf, "preprocessing", None) or {}), "read": dict(s.open_opts)}
        s.head, s.head_slot = clf, "A"
        s.class_names = [str(c) for c in clf.classes_]
        proba = clf.predict_proba(torch.cat(embedded))  # [N, C]
        rows = []
        for i, y, p in zip(ims, ys, proba):
            best = int(np.argmax(p))
            rows.append([Path(i).name, y, str(clf.classes_[best]), round(float(p[best]), 3)])
        return s, rows

    @changes_session
    def predict(
        self, s: Session | None, file: Any, mask_file: Any = None, true_label: str = ""
    ) -> tuple[Session, np.ndarray, dict, list]:
        """The head on a new image: (overlay, metrics, downloads). A segmentation head gives a mask (PNG, and
        GeoTIFF for GeoTIFF inputs; mIoU when a ground-truth mask is given); a classifier gives class
        probabilities (and whether it is right when the true label is given)."""
        if s is None or s.head is None:
            raise InputError("train or load a head first")
        paths = _paths(file)
        if not paths:
            raise InputError("upload an image to predict on")
        # the head's own settings (a loaded head may come from another session): how images are read, too
        read = _head_read(s.head)
        if read is None:
            read_with = (f"{_describe_read(s.open_opts)} (this session's explore settings: the head does not record "
                         "the bands / window it was trained with)")  # fmt: skip
        else:
            read_with = _describe_read(read)
        img = self._open(s, paths[0], opts=s.open_opts if read is None else read)
        res = (getattr(s.head, "preprocessing", None) or {}).get("resolution") or s.resolution
        layers = getattr(s.head, "layers", None)
        v = explore.FeatureView(self.backbone(s, s.head_slot)[0], img, resolution=res,
                                layer=int(layers[0]) if layers else None)  # fmt: skip
        if _is_classifier(s.head):
            proba = explore.classify(s.head, v)
            best = next(iter(proba))
            out: dict[str, Any] = {"predicted": best, "probabilities": {c: round(q, 4) for c, q in proba.items()},
                                   "read_with": read_with}  # fmt: skip
            if (true_label or "").strip():
                out["correct"] = best == true_label.strip()
            return s, img.rgb, out, []
        labels, _ = explore.predict(s.head, v)
        stem = Path(img.name).stem
        files = [str(explore.export_png(labels, s.out_dir / f"{stem}_mask.png"))]
        if img.geo is not None:
            tif = explore.export_geotiff(labels, img, s.out_dir / f"{stem}_mask.tif", kind="labels",
                                         class_names=s.class_names)  # fmt: skip
            files.append(str(tif))
        metrics: dict[str, Any] = {
            "classes": s.class_names,
            "pixels": {n: int((labels == i).sum()) for i, n in enumerate(s.class_names)},
            "read_with": read_with,
        }
        gt = _paths(mask_file)
        if gt:
            from dinoapp.labelled import read_mask
            from dinoapp.metrics import mean_iou

            truth = read_mask(gt[0])
            if truth.shape != labels.shape:
                raise InputError(f"the ground-truth mask is {truth.shape}, the image {labels.shape}")
            truth = img.mask_invalid(truth)  # the raster's nodata pixels are not scored
            metrics["miou"] = round(float(mean_iou(truth, labels, len(s.class_names))), 4)
        return s, explore.label_overlay(img, labels, colors=CLASS_COLORS[: len(s.class_names)]), metrics, files

    @changes_session
    def save_head(self, s: Session | None) -> tuple[Session, str]:
        """The head as a .safetensors file, with the identity of the backbone it was trained on (kept on the head:
        backbone A may have changed since) and the read settings of its images (bands / window / stretch). It
        names its backbone by file name: loaded files never carry the server's folders (:meth:`Backbones.get`)."""
        if s is None or s.head is None:
            raise InputError("train a head first")
        bb = None if getattr(s.head, "identity", None) else self.backbone(s, s.head_slot)[0]
        return s, str(dinoapp.heads.save_head(s.head, s.out_dir / "head.safetensors", backbone=bb))

    @changes_session
    def load_head(self, s: Session | None, file: Any) -> tuple[Session, str]:
        s = s or Session()
        paths = _paths(file)
        if not paths:
            raise InputError("upload a head file (.safetensors) saved by dinoapp")
        bb, _ = self.backbone(s, "A")
        head = dinoapp.heads.load_head(paths[0], backbone=bb)  # refuses a head made with another backbone
        names = [str(c) for c in head.classes_] if _is_classifier(head) else getattr(head, "class_names", None)
        s.head, s.head_slot = head, "A"
        s.class_names = list(names or [f"class {k}" for k in range(int(getattr(head, "n_classes", 0) or 0))])
        read = _head_read(head)
        how = (f"reads images with {_describe_read(read)}" if read is not None else
               "note: this head file does not record the bands / window it was trained with; predictions read "
               "images with this session's explore settings")  # fmt: skip
        return s, f"head loaded: {type(head).__name__}, classes {s.class_names}; {how}"


# --- small glue helpers --------------------------------------------------------------------------------
def _is_classifier(head: Any) -> bool:
    return hasattr(head, "predict_proba") and hasattr(head, "classes_")


def _slot(slot: str) -> None:
    if slot not in ("A", "B"):
        raise InputError("slot must be A (main) or B (comparison)")


def _class_names(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    seen: dict[str, str] = {}
    for n in names:
        if n.casefold() in seen:
            raise InputError(f"the class names {seen[n.casefold()]!r} and {n!r} are the same: give each class its "
                             "own name (comma separated, e.g. water, land)")  # fmt: skip
        seen[n.casefold()] = n
    return names


def _head_read(head: Any) -> dict | None:
    """The read settings (bands / DICOM window / stretch) a head's images were read with; None for head files
    that do not record them."""
    read = (getattr(head, "preprocessing", None) or {}).get("read")
    if not isinstance(read, dict):
        return None
    from domains.geotiff import STRETCHES

    # a head file is a visitor's upload: only these settings, and a stretch only by name (never a file to open)
    out = {k: read.get(k) for k in DEFAULT_READ}
    if not (out["stretch"] is None or (isinstance(out["stretch"], str) and out["stretch"] in STRETCHES)):
        raise InputError("this head file records an unknown stretch for its images: save the head again")
    return out


def _describe_read(opts: dict | None) -> str:
    """Read settings in words: "bands 4,3,2, DICOM window lung, stretch auto"."""
    opts = opts or {}
    bands = opts.get("bands")
    b = "default" if bands is None else bands if isinstance(bands, str) else ",".join(str(x) for x in bands)
    stretch = opts.get("stretch")
    return (
        f"bands {b}, DICOM window {opts.get('dicom_window') or 'auto'}, "
        f"stretch {stretch if isinstance(stretch, str) else 'auto' if stretch is None else 'custom'}"
    )


def _gallery_items(paths: list[str]) -> list:
    """What to open, in upload order: each file, except that the DICOM files of one series become one item
    (a list of files: one volume) at the place of its first file. Series are told apart by their Series
    Instance UID (``domains.find_series``), so two X-rays from different series stay two images."""
    dicoms = [p for p in paths if _is_dicom(p)] if len(paths) > 1 else []
    if len(dicoms) < 2:
        return list(paths)
    import domains

    group = {}  # file -> its series' files
    for series in domains.find_series(dicoms):
        files = [str(f) for f in series.paths]
        for f in files:
            group[f] = files
    items, seen = [], set()
    for p in paths:
        files = group.get(str(p))
        if files is None or len(files) == 1:
            items.append(p)
        elif id(files) not in seen:
            seen.add(id(files))
            items.append(files)
    return items


def _paths(files: Any) -> list[str]:
    if files is None:
        return []
    if isinstance(files, (list, tuple)):
        return [p for f in files for p in _paths(f)]
    if isinstance(files, dict):  # gradio FileData
        return [files["path"]] if files.get("path") else []
    return [str(getattr(files, "name", files))]


def _is_dicom(path: str) -> bool:
    import domains

    try:
        return domains.reader_for(path)[0] == "dicom"
    except (ValueError, OSError):
        return False


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None


def _bands(text: str | None):
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "rgb":
        return "rgb"
    return [int(b) if b.strip().isdigit() else b.strip() for b in text.split(",") if b.strip()]


def scrub_paths(msg: str, settings: Settings) -> str:
    """``msg`` without the server's folders: a path under gradio's upload folder, the temp folder, the allowed
    folder, the folder of ``--weights``, the Hugging Face hub cache or the home folder is cut to its file name;
    such a folder named alone becomes a placeholder ("<allowed folder>"). Folders match only as whole path
    parts at the start of a path (``/tmp`` is not cut out of ``/var/tmp/x``), the longest first."""
    import re

    from gradio.utils import get_upload_folder

    named: dict[str, str] = {}  # folder -> placeholder; later entries win for the same folder

    def add(path: Any, label: str) -> None:
        if not path:
            return
        folder = Path(path).expanduser()
        for p in (folder, folder.resolve()):
            r = str(p).rstrip(os.sep)
            if len(r) > 1:  # never the root folder itself
                named[r] = label

    with contextlib.suppress(RuntimeError):  # no home folder
        add(str(Path.home()), "~")
    try:
        from huggingface_hub import constants as hf

        add(hf.HF_HOME, "<hub cache>")
        add(hf.HF_HUB_CACHE, "<hub cache>")
    except ImportError:
        pass
    add(tempfile.gettempdir(), "<temp folder>")
    add(get_upload_folder(), "<upload folder>")
    if settings.weights and Path(settings.weights).expanduser().exists():
        add(Path(settings.weights).expanduser().parent, "<weights folder>")
    if settings.allowed_dir is not None:
        add(settings.allowed_dir, "<allowed folder>")
    before = r"(?:^|(?<=[\s'\"(\[{=:,;<>]))"  # a path starts the text or follows a space, quote, bracket, =, :
    after = r"(?=$|/|[\s'\"()\[\]{},;:<>]|\.(?:$|\s))"  # the folder ends: end, "/", punctuation
    for root in sorted(named, key=len, reverse=True):
        pattern = before + re.escape(root) + after + r"(?P<rest>(?:/[^/\s'\"]*)*)"

        def cut(m: re.Match, label: str = named[root]) -> str:
            parts = [p for p in m.group("rest").split("/") if p]
            if not parts:
                return label
            return parts[-1] + ("/" if m.group("rest").endswith("/") else "")

        msg = re.sub(pattern, cut, msg)
    return msg


# --- the UI --------------------------------------------------------------------------------------------
def build_ui(app: App):
    import gradio as gr

    def scrub(msg: str) -> str:
        return scrub_paths(msg, app.settings)

    def safe(fn):
        """Every handler error becomes a readable message in the UI (server folders cut from it, file names
        kept); the app keeps serving."""

        @functools.wraps(fn)  # the handler's signature: the API names its parameters (not param_1, ...)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (DinoappError, ConfigError, InputError, ValueError, OSError, ImportError) as e:
                raise gr.Error(scrub(str(e))) from None
            except MemoryError:
                raise gr.Error("not enough memory for this image at this resolution: lower the resolution") from None
            except (TypeError, RuntimeError) as e:  # e.g. an API call with a missing value
                raise gr.Error(scrub(f"could not do that ({type(e).__name__}: {e})")) from None

        return run

    # uploads (possibly DICOM: PHI at rest) and outputs are deleted after an hour; a session's state after 6 h idle
    with gr.Blocks(title="dinoapp: DINOv3 feature explorer", delete_cache=(3600, 3600)) as demo:
        state = gr.State(None, time_to_live=6 * 3600, delete_callback=lambda s: s.close() if s else None)
        gr.Markdown("# dinoapp\nExplore DINOv3 dense features and train a head on a few scribbles.")
        notice = gr.Markdown(
            describe_backbone(app.default_source, *app.backbones.get(app.default_source, trusted=True)[1:])
        )
        with gr.Tab("Backbone"):
            with gr.Row():
                source = gr.Textbox(
                    label="backbone: a released DINOv3 timm name, demo, or a file under the allowed folder",
                    # the operator's own file stays unnamed: its path is not for visitors
                    value="" if Path(app.default_source).expanduser().exists() else app.default_source,
                    placeholder="vit_small_patch16_dinov3.lvd1689m",
                )
                slot = gr.Radio(["A", "B"], value="A", label="slot (B = comparison)")
            load_btn = gr.Button("Load backbone")
            load_btn.click(safe(app.load_backbone), [state, source, slot], [state, notice], api_name="load_backbone")
            with gr.Row():
                ckpt = gr.File(
                    label="or upload a checkpoint (Meta .pth, .safetensors, .bin; read as weights only, no code runs)",
                    file_types=[".pth", ".pt", ".safetensors", ".bin"],
                    elem_id="ckpt-file",
                )
                upload_btn = gr.Button("Load uploaded checkpoint")
            upload_btn.click(
                safe(app.upload_backbone), [state, ckpt, slot], [state, notice], api_name="upload_backbone"
            )
        with gr.Tab("Explorer"):
            with gr.Row():
                files = gr.File(
                    label="image(s): PNG/JPEG/TIFF, GeoTIFF, DICOM", file_count="multiple", elem_id="explore-files"
                )
                with gr.Column():
                    resolution = gr.Slider(112, 1024, value=448, step=16, label="processing resolution (long side)")
                    layer = gr.Number(value=-1, precision=0, label="layer (-1 = last)")
                    bands = gr.Textbox(label="GeoTIFF bands (e.g. rgb or 4,3,2)", value="")
                    window = gr.Dropdown(["auto", *explore.window_presets()], value="auto", label="DICOM window")
                    slice_index = gr.Number(value=-1, precision=0, visible=False)  # the API's slice (-1 = middle)
                    slice_slider = gr.Slider(0, 1, value=0, step=1, label="slice", visible=False, elem_id="slice")
                    foreground = gr.Checkbox(label="PCA on foreground only")
            explore_btn = gr.Button("Explore", variant="primary", elem_id="explore-btn")
            with gr.Row():
                image = gr.Image(
                    label="image (click a patch)",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="explore-image",
                )
                pca_a = gr.Image(label="PCA (A)", type="numpy", format="png", interactive=False)
                pca_b = gr.Image(label="PCA (B)", type="numpy", format="png", interactive=False)
            with gr.Row():
                # JPEG: a heatmap over the photo encodes in ~2 ms (PNG ~55 ms at 512 px): clicks stay instant
                sim_a = gr.Image(
                    label="similarity (A)", type="numpy", format="jpeg", interactive=False, elem_id="sim-a"
                )
                sim_b = gr.Image(label="similarity (B)", type="numpy", format="jpeg", interactive=False)
                with gr.Column():
                    k = gr.Slider(1, 20, value=5, step=1, label="top-k matches")
                    target = gr.Number(value=0, precision=0, label="compare with gallery image #")
                    top = gr.JSON(label="top-k patches", elem_id="topk")
                    info = gr.JSON(label="image info (technical metadata only)", elem_id="info")
            x = gr.Number(visible=False)
            y = gr.Number(visible=False)
            gallery = gr.Gallery(label="gallery: one shared PCA basis", format="png")
            with gr.Row():
                gallery_btn = gr.Button("Joint PCA of all images")
                maps_btn = gr.Button("Download maps")
            maps = gr.File(label="maps (PNG, GeoTIFF)", file_count="multiple")
            explore_inputs = [state, files, resolution, layer, bands, window, slice_index, foreground]
            explore_outputs = [state, image, pca_a, pca_b, info]

            def slices(s):  # a volume: the slider spans its slices
                img = s.images[0] if s and s.images else None
                n = img.n_slices if img is not None else 1
                return gr.update(minimum=0, maximum=max(n - 1, 1), value=img.slice_index if img else 0, visible=n > 1)

            explore_btn.click(safe(app.explore), explore_inputs, explore_outputs, api_name="explore").success(
                slices, state, slice_slider, api_name=False, queue=False
            )
            files.change(lambda: (-1, gr.update(visible=False)), None, [slice_index, slice_slider], api_name=False,
                         queue=False)  # fmt: skip

            # moved by the user (mouse or keys; not by the update above): that slice, the last one while dragging
            def explore_slice(s, f, res, lay, ban, win, sl, fg):  # one queued step, so always_last applies to it
                return (*safe(app.explore)(s, f, res, lay, ban, win, sl, fg), sl)

            slice_slider.input(explore_slice, [*explore_inputs[:6], slice_slider, foreground],
                               [*explore_outputs, slice_index], api_name=False, trigger_mode="always_last")  # fmt: skip

            def clicked(s, kk, tgt, evt: gr.SelectData):
                s, a, b, t = safe(app.similarity)(s, evt.index[0], evt.index[1], kk, tgt)
                return s, a, b, t, evt.index[0], evt.index[1]

            # a click costs milliseconds (cached features): it skips the queue that long work waits in
            image.select(clicked, [state, k, target], [state, sim_a, sim_b, top, x, y], api_name=False, queue=False)
            sim_btn = gr.Button("Similarity at (x, y)", visible=False)
            sim_btn.click(safe(app.similarity), [state, x, y, k, target], [state, sim_a, sim_b, top],
                          api_name="similarity", queue=False)  # fmt: skip
            gallery_btn.click(safe(app.gallery), [state, foreground], [state, gallery], api_name="gallery")
            maps_btn.click(safe(app.download_maps), [state, foreground], [state, maps], api_name="download_maps")
        with gr.Tab("Head trainer"):
            status = gr.Markdown(elem_id="status")
            with gr.Tabs():
                with gr.Tab("Paint scribbles"):
                    gr.Markdown(
                        "Paint a few strokes per class (colour 1 = first class, ...), add the image, repeat, then "
                        "train a linear segmentation head on the frozen features."
                    )
                    with gr.Row():
                        train_file = gr.File(label="image to paint on", elem_id="train-file")
                        editor = gr.ImageEditor(
                            label="scribbles",
                            type="numpy",
                            format="png",
                            brush=gr.Brush(
                                colors=[f"rgb{c}" for c in CLASS_COLORS], color_mode="fixed", default_size=6
                            ),  # fmt: skip
                            elem_id="editor",
                        )
                    class_names = gr.Textbox(
                        label="class names, comma separated", value="class 1, class 2", elem_id="class-names"
                    )

                    def to_editor(s, f):  # the display image (DICOM windowed, bands as explored) as the canvas
                        paths = _paths(f)
                        return safe(explore.open_image)(paths[0], **(s.open_opts if s else {})).rgb if paths else None

                    train_file.change(to_editor, [state, train_file], editor, api_name=False)
                    with gr.Row():
                        add_btn = gr.Button("Add painted image", elem_id="add-btn")
                        epochs = gr.Slider(10, 500, value=100, step=10, label="epochs")
                        train_btn = gr.Button("Train head", variant="primary", elem_id="train-btn")
                    add_btn.click(
                        safe(app.add_scribbles),
                        [state, train_file, editor, class_names],
                        [state, status],
                        api_name="add_scribbles",
                    )
                with gr.Tab("Images + masks"):
                    gr.Markdown(
                        "Upload images and their label masks (single-band PNG of class indices, 255 = unlabelled), "
                        "matched by file name (`a.jpg` with `a.png` or `a_mask.png`), and train a linear "
                        "segmentation head."
                    )
                    with gr.Row():
                        seg_images = gr.File(label="images", file_count="multiple", elem_id="seg-images")
                        seg_masks = gr.File(label="masks", file_count="multiple", elem_id="seg-masks")
                    with gr.Row():
                        seg_names = gr.Textbox(label="class names for indices 0, 1, ... (optional)", value="")
                        seg_epochs = gr.Slider(10, 500, value=100, step=10, label="epochs")
                        seg_btn = gr.Button("Train head from masks", variant="primary")
                with gr.Tab("Images + labels (classifier)"):
                    gr.Markdown(
                        "Upload labelled images and train an image classifier on the frozen CLS features: labels "
                        "from a CSV with columns `path,label` (path = file name) or typed one per image in upload "
                        "order."
                    )
                    with gr.Row():
                        cls_images = gr.File(label="images", file_count="multiple", elem_id="cls-images")
                        cls_csv = gr.File(label="labels CSV (path,label)", file_types=[".csv"])
                    with gr.Row():
                        cls_labels = gr.Textbox(label="or labels in upload order (comma separated)", value="")
                        cls_kind = gr.Radio(["knn", "logistic"], value="knn", label="classifier")
                        cls_btn = gr.Button("Train classifier", variant="primary")
                    cls_table = gr.Dataframe(
                        headers=["image", "label", "predicted", "probability"],
                        label="training images (k-NN finds each image itself: judge it on new images)",
                    )
            with gr.Row():
                train_pred = gr.Image(
                    label="prediction on the (first) training image", type="numpy", format="png", elem_id="train-pred"
                )
                train_metrics = gr.JSON(label="training (labelled pixels of the training images)")

            def train(s, epochs, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
                return safe(app.train_head)(s, epochs, progress=progress)

            def train_masks(s, images, masks, class_names, epochs, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
                return safe(app.train_from_masks)(s, images, masks, class_names, epochs, progress=progress)

            train_btn.click(train, [state, epochs], [state, train_pred, train_metrics], api_name="train_head")
            seg_btn.click(train_masks, [state, seg_images, seg_masks, seg_names, seg_epochs],
                          [state, train_pred, train_metrics], api_name="train_from_masks")  # fmt: skip
            cls_btn.click(safe(app.train_classifier), [state, cls_images, cls_csv, cls_labels, cls_kind],
                          [state, cls_table], api_name="train_classifier")  # fmt: skip
            gr.Markdown("### Predict on new images")
            with gr.Row():
                new_file = gr.File(label="new image")
                gt_file = gr.File(label="ground-truth mask (optional, PNG class ids)")
                true_label = gr.Textbox(label="true label (optional, classifier)", value="")
            predict_btn = gr.Button("Predict")
            with gr.Row():
                pred = gr.Image(label="prediction", type="numpy", format="png")
                pred_metrics = gr.JSON(label="prediction")
            pred_files = gr.File(label="predicted mask (PNG, GeoTIFF)", file_count="multiple")
            predict_btn.click(
                safe(app.predict),
                [state, new_file, gt_file, true_label],
                [state, pred, pred_metrics, pred_files],
                api_name="predict",
            )
            with gr.Row():
                save_btn = gr.Button("Save head")
                head_out = gr.File(label="head file")
                head_in = gr.File(label="load a head")
                load_head_btn = gr.Button("Load head")
            save_btn.click(lambda s: safe(app.save_head)(s), state, [state, head_out], api_name="save_head")
            load_head_btn.click(safe(app.load_head), [state, head_in], [state, status], api_name="load_head")
        demo.load(safe(app.backbone_info), state, [state, notice], api_name="backbone_info")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=os.environ.get("DINOAPP_WEIGHTS"), help="backbone (also DINOAPP_WEIGHTS)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument(
        "--allowed-dir",
        default=os.environ.get("DINOAPP_ALLOWED_DIR"),
        help="server folder whose files may be opened by path (default: none, uploads only)",
    )
    ap.add_argument(
        "--auth",
        default=os.environ.get("DINOAPP_AUTH"),
        help="USER:PASSWORD required to open the app (also DINOAPP_AUTH); use it whenever --host is not local",
    )
    ap.add_argument("--max-upload-mb", type=int, default=500, help="largest upload (default 500)")
    ap.add_argument("--session-mb", type=int, default=2048, help="images + features one session may hold")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    args = ap.parse_args(argv)
    args.auth = args.auth or None  # DINOAPP_AUTH="" = no login
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        ap.error("--auth takes USER:PASSWORD (both non-empty)")
    if args.max_upload_mb < 1 or args.session_mb < 64:
        ap.error("--max-upload-mb must be >= 1 and --session-mb >= 64")
    return args


def launch_options(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """gradio ``launch`` keyword arguments for the command line, and warnings to print."""
    opts: dict[str, Any] = {
        "server_name": args.host,
        "server_port": args.port,
        "max_file_size": f"{args.max_upload_mb}mb",
    }
    warnings = []
    if args.auth:
        user, password = args.auth.split(":", 1)
        opts["auth"] = (user, password)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        warnings.append(
            f"warning: listening on {args.host} without --auth: anyone who can reach this port can use the app, "
            "upload files and run the backbone. Sessions are kept apart by a random id in each browser tab, not "
            "by a login. Add --auth USER:PASSWORD (and TLS in front, e.g. a reverse proxy) for a shared server."
        )
    return opts, warnings


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse_args(argv)
    settings = Settings(
        weights=args.weights,
        allowed_dir=Path(args.allowed_dir).expanduser() if args.allowed_dir else None,
        device=args.device,
        session_mb=args.session_mb,
    )
    opts, warnings = launch_options(args)
    for w in warnings:
        print(w, file=sys.stderr)
    try:
        app = App(settings)  # loads the backbone: a missing file or an uncached model name is a one-line error
    except (DinoappError, ConfigError, InputError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    demo = build_ui(app)
    demo.queue(default_concurrency_limit=2).launch(**opts)


if __name__ == "__main__":
    main()
