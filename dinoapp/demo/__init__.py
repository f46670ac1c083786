"""Small demo weights that ship with dinoapp, and the recipe that makes them.

The app's default backbone is the released DINOv3 ViT-S/16 through timm
(``vit_small_patch16_dinov3.lvd1689m``). Where the hub cannot be reached it falls back to
:func:`demo_backbone`: a small ViT (dim 192, 4 blocks, patch 16) that **we** trained from scratch
with our own pretraining engine (:mod:`dinoapp.ssl`, DINO + iBOT + KoLeo, Gram anchoring) on images that ship with
installed packages: scikit-image's bundled sample photos and dinoapp's own GeoTIFF samples
(:mod:`domains.samples`). No Meta weights are involved. Its features are illustrative only; show
:data:`DEMO_NOTICE` next to anything computed with it.

The recipe is the pretraining preset ``demo-weights`` (``dinoapp/ssl/presets/demo-weights.yaml``)
on the folder :func:`prepare_demo_data` writes; :func:`build_demo_weights` runs both and writes the
checkpoint (``python -m dinoapp.demo build``; ``python -m dinoapp.demo info`` shows where the
shipped file came from). See ``dinoapp/demo/weights/README.md`` for the command, the time and the
sha256 of the shipped file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DinoappError, SourceNotFoundError

PRESET = "demo-weights"  # the recipe: dinoapp/ssl/presets/demo-weights.yaml
WEIGHTS_NAME = "dinoapp-demo-vit.safetensors"
DEMO_WEIGHTS: Path = Path(str(resources.files(__name__) / "weights" / WEIGHTS_NAME))
MAX_BYTES = 25 * 2**20  # the limit for shipped weights


class DemoBuildStoppedError(DinoappError, RuntimeError):
    """The demo pretraining run stopped before its last step (SIGTERM, Ctrl-C): rerun the same build
    command with the same ``--work-dir`` to resume it."""


DEMO_NOTICE = (
    "Demo weights: a small ViT trained by dinoapp from scratch on a handful of sample images "
    "(scikit-image's bundled photos and dinoapp's GeoTIFF samples; no Meta weights), used when the DINOv3 "
    "weights cannot be fetched. Features, maps and heads are illustrative only. Load real DINOv3 "
    "weights with `python app.py --weights PATH_OR_TIMM_NAME`, the environment variable DINOAPP_WEIGHTS, "
    "or the backbone panel: a timm name such as `vit_small_patch16_dinov3.lvd1689m` (needs the hub or "
    "its local cache) or a downloaded Meta file such as `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`."
)

# scikit-image sample images that load without network access (no pooch download), by name.
# `astronaut` is held out of training: tests and the README measure the features on it.
SKIMAGE_IMAGES: tuple[str, ...] = (
    "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket",
    "shepp_logan_phantom", "stereo_motorcycle", "text",
)  # fmt: skip
HELD_OUT = "astronaut"
GEOTIFF_SAMPLES: tuple[str, ...] = ("aerial", "landsat", "sentinel2")  # read with data.bands=rgb
MAX_SIDE = 384  # long side of a training image (bigger ones are downsampled first)
QUADRANT_MIN_SIDE = 384  # images at least this big on both sides also give their four quadrants


def demo_backbone(device: Any = None):
    """The shipped demo backbone (a :class:`~dinoapp.backbone.DinoBackbone` in eval mode).

    Raises :class:`~dinoapp.errors.SourceNotFoundError` when the file is missing from this install
    (for example a source checkout without the weights); rebuild it with ``python -m dinoapp.demo build``.
    """
    from ..loading import load_backbone

    if not DEMO_WEIGHTS.is_file():
        raise SourceNotFoundError(
            f"the demo weights are missing from this dinoapp install ({DEMO_WEIGHTS}). Rebuild them offline "
            "with `python -m dinoapp.demo build` (40-60 minutes on one CPU core; needs scikit-image and "
            "rasterio), or load real DINOv3 weights instead: `python app.py --weights PATH_OR_TIMM_NAME`"
        )
    return load_backbone(DEMO_WEIGHTS, device=device)


# ---------------------------------------------------------------------------------------------- data
def _skimage_rgb(name: str) -> list[np.ndarray]:
    """One scikit-image sample as uint8 RGB [H, W, 3] arrays (a stereo pair gives two)."""
    try:
        from skimage import data
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("building the demo weights needs scikit-image: pip install 'dinoapp[ml]'") from None
    img = getattr(data, name)()
    imgs = list(img[:2]) if name == "stereo_motorcycle" else [img]  # (left, right, disparity)
    out = []
    for a in imgs:
        a = np.asarray(a)
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype.kind == "f":  # shepp_logan_phantom: [0, 1]
            a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.shape[2] == 4:  # logo: composite on white
            alpha = a[..., 3:].astype(np.float32) / 255.0
            a = (a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
        out.append(np.ascontiguousarray(a[..., :3], dtype=np.uint8))
    return out


def _fit(img, max_side: int):
    from PIL import Image

    w, h = img.size
    s = max_side / max(w, h)
    return img if s >= 1 else img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)


def prepare_demo_data(folder: str | os.PathLike) -> list[str]:
    """Write the demo training folder and return its file names (sorted; fixed by this function).

    Each scikit-image sample of :data:`SKIMAGE_IMAGES` becomes ``<name>.png`` (RGB uint8, long side at
    most :data:`MAX_SIDE`); images of at least :data:`QUADRANT_MIN_SIDE` pixels on both sides also give
    their four quadrants (``<name>_q0..3.png``, each again at most :data:`MAX_SIDE`), a closer view for
    the crops. dinoapp's GeoTIFF samples are copied unchanged (the preset reads them with
    ``data.bands=rgb``). No network access is needed.
    """
    from PIL import Image

    from domains import samples

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for name in SKIMAGE_IMAGES:
        arrays = _skimage_rgb(name)
        for j, a in enumerate(arrays):
            stem = name if len(arrays) == 1 else f"{name}_{'lr'[j]}"
            img = Image.fromarray(a)
            items = {stem: _fit(img, MAX_SIDE)}
            w, h = img.size
            if min(w, h) >= QUADRANT_MIN_SIDE:
                boxes = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
                items.update({f"{stem}_q{k}": _fit(img.crop(b), MAX_SIDE) for k, b in enumerate(boxes)})
            for s, im in items.items():
                im.save(folder / f"{s}.png", optimize=False)
                names.append(f"{s}.png")
    for name in GEOTIFF_SAMPLES:
        src = samples.path(name)
        shutil.copyfile(src, folder / src.name)
        names.append(src.name)
    return sorted(names)


def data_digest(folder: str | os.PathLike, names: list[str]) -> str:
    """sha256 over the training files' names and decoded pixels (PNG) or bytes (GeoTIFF): the same
    data gives the same digest whatever PNG encoder wrote it."""
    from PIL import Image

    h = hashlib.sha256()
    for n in sorted(names):
        p = Path(folder).expanduser() / n
        h.update(n.encode())
        if p.suffix == ".png":
            with Image.open(p) as im:
                h.update(np.asarray(im.convert("RGB")).tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- recipe
def build_demo_weights(
    out_path: str | os.PathLike = DEMO_WEIGHTS,
    *,
    steps: int | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overrides: list[str] | None = None,
) -> Path:
    """Reproduce the demo weights: write the training folder, run the ``demo-weights`` pretraining
    preset on it from scratch, and save the exported EMA teacher (backbone only: the DINO/iBOT heads
    are dropped to keep the file small) to ``out_path`` with the recipe in its provenance.

    ``steps`` overrides ``train.steps`` (tests use 2); ``work_dir`` keeps the data and the run folder
    (``work_dir/data``, ``work_dir/run``; a temporary folder, removed afterwards, when ``None``).
    ``overrides`` are further ``section.key=value`` settings (recorded in the provenance).
    """
    import json

    import torch

    from .. import __version__
    from ..checkpoint import save_backbone, sha256_file
    from ..loading import load_backbone
    from ..ssl.config import load_config
    from ..ssl.train import pretrain

    out_path = Path(out_path).expanduser()
    recipe = list(overrides or [])  # what changes the trained weights (recorded in the provenance)
    if steps is not None:
        recipe.append(f"train.steps={int(steps)}")
    cfg = load_config(PRESET, [*recipe, f"run.progress={'true' if progress else 'false'}"])
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="dinoapp-demo-")
        work_dir = tmp
    work = Path(work_dir).expanduser()
    try:
        data_dir = work / "data"
        if data_dir.exists():  # always the exact recipe data, never a stale folder
            shutil.rmtree(data_dir)
        names = prepare_demo_data(data_dir)
        res = pretrain(cfg, work / "run", data=data_dir, resume="auto")
        if res.stopped_early:
            raise DemoBuildStoppedError(
                f"demo pretraining stopped at step {res.step} of {cfg.train.steps}; rerun the same command with "
                f"--work-dir {work} (work_dir=) to resume it"
                + ("" if tmp is None else " (this run used a temporary folder, which is removed: pass --work-dir)")
            )
        bb = load_backbone(res.exported["dinoapp"])
        bb.pretrained_heads = {}  # backbone only: the heads (prototypes) are not needed for features
        bb.provenance = {
            k: v for k, v in bb.provenance.items() if k in ("trained_steps", "init", "layout")
        }  # drop this machine's temporary paths
        bb.provenance.update({
            "source": "dinoapp demo recipe",
            "recipe": " ".join([f"preset {PRESET}", *recipe]),
            "preset": PRESET,
            "steps": int(cfg.train.steps),
            "seed": int(cfg.train.seed),
            "data": json.dumps(names),
            "data_digest": data_digest(data_dir, names),
            "held_out": HELD_OUT,
            "dinoapp_version": __version__,
            "torch_version": torch.__version__,
            "command": " ".join(["python -m dinoapp.demo build", *([f"--steps {steps}"] if steps is not None else []),
                                 *(f"--set {o}" for o in overrides or [])]),
            "heads": "stripped (DINO/iBOT heads not shipped)",
            "licence": "trained by dinoapp from scratch on scikit-image and dinoapp sample images; no Meta weights",
        })  # fmt: skip
        save_backbone(bb.eval(), out_path)
        if progress:
            size = out_path.stat().st_size / 2**20
            print(f"wrote {out_path} ({size:.1f} MB, sha256 {sha256_file(out_path)})")
        return out_path
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def provenance(path: str | os.PathLike = DEMO_WEIGHTS) -> dict[str, Any]:
    """The provenance record of a demo weights file (read from its metadata, without building the model)."""
    from ..checkpoint import read_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceNotFoundError(f"no demo weights at {path}; build them with `python -m dinoapp.demo build`")
    raw = read_checkpoint(path)
    return {**dict(raw.obj.get("provenance") or {}), "path": str(path), "sha256": raw.sha256,
            "arch": dict(raw.obj.get("arch") or {})}  # fmt: skip


__all__ = [
    "DEMO_NOTICE",
    "DEMO_WEIGHTS",
    "DemoBuildStoppedError",
    "HELD_OUT",
    "PRESET",
    "build_demo_weights",
    "demo_backbone",
    "prepare_demo_data",
    "provenance",
]
