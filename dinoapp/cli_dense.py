"""CLI subcommands on dense features: ``extract``, ``pca``, ``similarity``, ``fit-head``, ``predict``.

Each ``_cmd`` takes the parsed arguments; :func:`add_parsers` registers them on ``dinoapp``'s parser.
Inputs are read with :func:`domains.load` (images, GeoTIFFs, DICOM); outputs are PNG maps at the
input's size and, for GeoTIFF inputs, georeferenced GeoTIFFs on the patch grid.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, InputError
from .extract import block_indices
from .labelled import read_label_csv, read_mask, seg_pairs

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp", ".webp", ".jp2", "")


# ---------------------------------------------------------------------------------------------- helpers


def _backbone(args):
    from .loading import load_backbone

    return load_backbone(args.backbone, device=args.device)


def _load_opts(args, path: Path | None = None, bb=None) -> dict[str, Any]:
    """``domains.load`` option groups from the CLI flags. Given ``path`` and ``bb``: a GeoTIFF with more bands
    than an RGB backbone takes and no ``--bands`` gets ``bands="rgb"`` (decided from its header, no pixels read;
    a grey raster is repeated to RGB as it is)."""
    import domains

    geo: dict[str, Any] = {}
    if args.bands:
        items = [b.strip() for a in args.bands for b in a.split(",") if b.strip()]  # "4,3,2" or 4 3 2
        geo["bands"] = "rgb" if [b.lower() for b in items] == ["rgb"] else [int(b) if b.isdigit() else b for b in items]
    elif (
        path is not None
        and bb is not None
        and bb.in_chans == 3
        and domains.reader_for(path)[0] == "geotiff"
        and domains.raster_info(path)["shape"][0] > bb.in_chans
    ):
        geo["bands"] = "rgb"
    if args.stats:
        geo["stats"] = args.stats
    opts: dict[str, Any] = {"geotiff": geo}
    if args.dicom_window:
        opts["dicom"] = {"window": args.dicom_window}
    return opts


def _read(path: Path, bb, args) -> tuple[np.ndarray, dict]:
    """An input as float32 [C, H, W] matching the backbone's channels (RGB picked from multiband rasters)."""
    import domains

    return domains.load(path, **_load_opts(args, path, bb))


def _inputs(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            from domains import find_files

            out += find_files(p)
        else:
            out.append(p)
    if not out:
        raise InputError(f"no input files in {paths}")
    return out


def _dense(bb, arr, args, layers=None):
    from .dense import dense_features

    return dense_features(bb, arr, resolution=args.resolution, policy=args.policy, layers=layers,
                          max_tokens=args.max_tokens, tile=args.tile, overlap=args.overlap,
                          channels_first=True, progress=True)  # fmt: skip


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG")
    return path


def _geo_like(meta: dict, df) -> tuple[dict, int]:
    """``like`` meta and scale for writing a patch-grid map of a GeoTIFF read at native pixels (policy pad):
    patch (r, c) covers the read's pixels [p*r, p*r + p) x [p*c, p*c + p)."""
    return meta, df.input_size[0] // df.grid[0]


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """Output names per input: the file stem, with the parent folder prepended where stems repeat."""
    stems = [p.stem for p in files]
    return {p: (f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem) for p in files}


def _bar(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2)


# ---------------------------------------------------------------------------------------------- commands


def _extract(args) -> None:
    from safetensors.torch import save_file

    from .identity import backbone_identity

    bb = _backbone(args)
    tensors: dict[str, torch.Tensor] = {}
    index = []
    for i, p in enumerate(_bar(_inputs(args.inputs), "extract")):
        arr, _ = _read(p, bb, args)
        df = _dense(bb, arr, args, layers=args.layers)
        tensors[f"{i}.patches"] = df.patches.contiguous()
        tensors[f"{i}.cls"] = df.cls.contiguous()
        for b, t in df.layers.items():
            tensors[f"{i}.layer{b}"] = t.contiguous()
        index.append({"file": str(p), "grid": list(df.grid), "image_size": list(df.image_size),
                      "input_size": list(df.input_size), "windows": df.windows})  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "dinoapp.features", "inputs": json.dumps(index), "backbone": json.dumps(backbone_identity(bb)),
            "policy": args.policy, "resolution": json.dumps(args.resolution)}  # fmt: skip
    save_file(tensors, str(out), metadata=meta)
    print(f"wrote features of {len(index)} input(s) to {out} (keys '<i>.patches' [h, w, D], '<i>.cls' [D])")


def _pca(args) -> None:
    import domains

    from . import viz

    bb = _backbone(args)
    files = _inputs(args.inputs)
    read = [(p, *_read(p, bb, args)) for p in files]
    dfs = [_dense(bb, a, args) for _, a, _ in _bar(read, "features")]
    masks = None
    if args.foreground is not None:
        thr = float(args.foreground)
        masks = [viz.similarity_map(d.patches, d.patches.mean((0, 1)).numpy()) < thr for d in dfs]
    maps, basis = viz.joint_pca_rgb([d.patches for d in dfs], masks=masks, background=args.background)
    out = Path(args.out)
    for (p, _arr, meta), d, rgb in zip(read, dfs, maps):
        png = viz.upsample(rgb, d.input_size, mode=args.upsample)[: d.image_size[0], : d.image_size[1]] \
            if args.policy == "pad" else viz.upsample(rgb, d.image_size, mode=args.upsample)
        _save_png(out / f"{p.stem}_pca.png", (np.clip(png, 0, 1) * 255 + 0.5).astype(np.uint8))
        if meta["reader"] == "geotiff" and args.policy == "pad" and args.resolution is None:
            like, scale = _geo_like(meta, d)
            domains.write_geotiff(out / f"{p.stem}_pca.tif", rgb.transpose(2, 0, 1), like=like, scale=scale,
                                  kind="rgb", tags={"backbone": bb.provenance.get("source"), "map": "pca"})  # fmt: skip
    (out / "pca_basis.json").write_text(json.dumps(basis.to_dict()))
    print(f"wrote {len(read)} PCA map(s) (one shared basis, pca_basis.json) to {out}")


def _similarity(args) -> None:
    import domains

    from . import viz

    bb = _backbone(args)
    src = Path(args.input)
    arr, meta = _read(src, bb, args)
    d = _dense(bb, arr, args)
    canvas = d.input_size if args.policy == "pad" else d.image_size
    if not (0 <= args.pixel[0] < d.image_size[0] and 0 <= args.pixel[1] < d.image_size[1]):
        raise InputError(f"pixel (row, col) = {tuple(args.pixel)} is outside the {d.image_size[0]} x "
                         f"{d.image_size[1]} image (rows 0..{d.image_size[0] - 1}, cols 0..{d.image_size[1] - 1})")
    r, c = viz.pixel_to_patch(tuple(args.pixel), canvas, d.grid)
    target, tarr, tmeta, td = src, arr, meta, d
    if args.other:
        target = Path(args.other)
        tarr, tmeta = _read(target, bb, args)
        td = _dense(bb, tarr, args)
    sim = viz.similarity_map(d.patches, (r, c), other=td.patches if args.other else None)
    out = Path(args.out)
    if out.suffix.lower() in (".tif", ".tiff"):
        if tmeta["reader"] != "geotiff" or args.policy != "pad":
            raise ConfigError("a .tif similarity map needs a GeoTIFF input and --policy pad (the patch grid must "
                              "sit on the raster's pixels); write a .png otherwise")  # fmt: skip
        like, scale = _geo_like(tmeta, td)
        tags = {"map": "similarity", "query_patch": f"{r},{c}", "query_file": src.name}
        domains.write_geotiff(out, sim, like=like, scale=scale, kind="float", tags=tags)
    else:
        heat = viz.upsample(sim, td.input_size)[: td.image_size[0], : td.image_size[1]] if args.policy == "pad" \
            else sim
        img = viz.overlay(tarr, heat, alpha=args.alpha, cmap="inferno", vmin=-1 if args.signed else 0, vmax=1)
        if not args.other:
            img = viz.mark_patch(img, (r, c), d.grid)
        _save_png(out, img)
    best = viz.top_k_patches(sim, 3)
    print(f"query patch ({r}, {c}); best matches (row, col, cosine): {best}; wrote {out}")


def _fit_head(args) -> None:
    from . import heads
    from .extract import extract

    try:
        layers = None if not args.layers else ["auto"] if args.layers == ["auto"] else [int(x) for x in args.layers]
    except ValueError:
        raise ConfigError(f"--layers takes block numbers (e.g. 2 5 8 11, -1 = the last) or 'auto', got "
                          f"{' '.join(args.layers)}") from None  # fmt: skip
    bb = _backbone(args)
    size = (args.size, args.size) if args.size else None
    if layers == ["auto"]:
        layers = heads.evenly_spaced_layers(bb.n_blocks)
    else:
        layers = block_indices(layers, bb.n_blocks) or None  # -1 = the last block
    if args.masks:
        if not args.images:
            raise ConfigError("--masks needs --images (the folder of images the masks belong to)")
        pairs = seg_pairs(args.images, args.masks, flags=("--images", "--masks"))
        imgs = [_read(p, bb, args)[0] for p, _ in _bar(pairs, "read")]
        masks = [read_mask(m) for _, m in pairs]
        for (p, m), a, mask in zip(pairs, imgs, masks):
            if args.policy == "pad" and mask.shape != a.shape[1:]:
                raise InputError(f"{m} is {mask.shape[0]} x {mask.shape[1]} but {p.name} is {a.shape[1]} x "
                                 f"{a.shape[2]}: with --policy pad a mask must have its image's size "
                                 "(--policy resize maps masks of another size onto the image)")  # fmt: skip
        n_classes = args.n_classes or int(max(int(m[m != 255].max(initial=0)) for m in masks)) + 1
        if size is None:
            shapes = {a.shape[1:] for a in imgs}
            if len(shapes) > 1:
                raise ConfigError(f"images differ in size ({sorted(shapes)[:3]} ...): pass --size")
            size = tuple(int(v) + (-int(v) % bb.patch_size) for v in next(iter(shapes)))
        f = extract(bb, [torch.from_numpy(a) for a in imgs], size=size, policy=args.policy, layers=layers,
                    batch_size=args.batch_size, progress=True)  # fmt: skip
        names = args.class_names or [f"class{i}" for i in range(n_classes)]
        head = heads.fit_seg_head(f, masks, n_classes, layers=layers, class_names=names, epochs=args.epochs,
                                  backbone=bb, size=size, policy=args.policy, progress=True)  # fmt: skip
        pred = head.predict(heads.select_features(f, layers), None)
        msg = ""
        if all(m.shape == tuple(pred.shape[-2:]) for m in masks):
            from .metrics import mean_iou

            msg = f", training mIoU {mean_iou(np.stack(masks), pred.numpy(), n_classes):.3f}"
    elif args.labels:
        paths, labels = read_label_csv(args.labels, images_dir=args.images, flag="--labels")
        if args.kind == "logistic" and len(set(labels)) < 2:  # say so before reading every image
            raise InputError(f"{args.labels}: logistic regression needs at least 2 classes, every row is labelled "
                             f"{labels[0]!r}")  # fmt: skip
        imgs = [_read(p, bb, args)[0] for p in _bar(paths, "read")]
        f = extract(bb, [torch.from_numpy(a) for a in imgs], size=args.size or 224, policy="resize",
                    batch_size=args.batch_size, progress=True)  # fmt: skip
        emb = heads.image_embedding(f, args.embedding)
        head = (heads.KNNClassifier(embedding=args.embedding) if args.kind == "knn"
                else heads.LogisticClassifier(embedding=args.embedding)).fit(emb, labels)  # fmt: skip
        head.preprocessing = {"size": args.size or 224, "policy": "resize", "patch_size": bb.patch_size}
        acc = float(np.mean(np.asarray(head.predict(emb)).astype(str) == np.asarray(labels, dtype=str)))
        msg = f", training accuracy {acc:.3f}"
    else:
        raise ConfigError("pass --masks DIR (segmentation) or --labels CSV (image classification)")
    path = heads.save_head(head, args.out, bb)
    print(f"wrote {path}{msg}")


def _predict(args) -> None:
    from . import heads, viz
    from .extract import extract
    from .predict import segment_scene

    bb = _backbone(args)
    head = heads.load_head(args.head, bb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _inputs(args.inputs)
    if isinstance(head, heads.SegHead):
        import domains

        names = _unique_stems(files)
        for p in _bar(files, "predict"):
            if domains.reader_for(p)[0] == "geotiff":  # a scene: never read whole, window by window
                opts = _load_opts(args, p, bb)["geotiff"]
                segment_scene(head, bb, p, out / names[p], bands=opts.get("bands"), stats=opts.get("stats"),
                              tile=args.tile, overlap=args.overlap)  # fmt: skip
                continue
            arr, _ = _read(p, bb, args)
            cls, _ = head.segment_large(bb, arr, policy="pad", tile=args.tile, overlap=args.overlap,
                                        max_tokens=args.max_tokens, channels_first=True)  # fmt: skip
            labels = cls.numpy().astype(np.uint8)
            _save_png(out / f"{names[p]}_classes.png", labels)
            _save_png(out / f"{names[p]}_classes_rgb.png", viz.labels_to_rgb(labels))
        print(f"wrote class maps of {len(files)} input(s) to {out}")
        return
    pre = getattr(head, "preprocessing", {}) or {}
    rows = []
    for p in _bar(files, "predict"):
        arr, _ = _read(p, bb, args)
        f = extract(bb, [torch.from_numpy(arr)], size=pre.get("size", 224), policy="resize")
        emb = heads.image_embedding(f, getattr(head, "embedding", "cls"))
        proba = head.predict_proba(emb)[0]
        rows.append({"path": str(p), "label": str(head.classes_[int(np.argmax(proba))]), "score": f"{proba.max():.4f}"})
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "score"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'predictions.csv'} ({len(rows)} rows)")


# ---------------------------------------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser, backbone_required: bool = True) -> None:
    env = os.environ.get("DINOAPP_BACKBONE") or None  # argparse ignores defaults of required options
    p.add_argument("--backbone", required=backbone_required and env is None, default=env,
                   help="timm name, checkpoint path or architecture (env DINOAPP_BACKBONE)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--resolution", type=int, default=None, help="long side in px (default: native size)")
    p.add_argument("--policy", choices=("pad", "resize"), default="pad",
                   help="pad: native pixels, patch grid on the image's pixels (needed for GeoTIFF outputs)")
    p.add_argument("--tile", type=int, default=512, help="window size for large inputs (px, multiple of 16)")
    p.add_argument("--overlap", type=int, default=128, help="window overlap (px, multiple of 16)")
    p.add_argument("--max-tokens", type=int, default=4096, help="patches above which windows are used")
    p.add_argument("--bands", nargs="+", default=None, help="GeoTIFF bands: numbers or names (4 3 2 or 4,3,2) or 'rgb'")
    p.add_argument("--stats", default=None, help="band statistics JSON (domains.BandStats) for GeoTIFFs")
    p.add_argument("--dicom-window", default=None, help="DICOM window preset (lung, bone, ..., rgb3)")


def add_parsers(sub) -> None:
    p = sub.add_parser("extract", help="dense features of images / rasters / DICOMs to a .safetensors file")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="extra blocks to save")
    _common(p)
    p.set_defaults(func=_extract)

    p = sub.add_parser("pca", help="PCA maps (one shared basis) as PNG, and GeoTIFF for GeoTIFF inputs")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--background", choices=("dim", "black", "keep"), default="dim")
    p.add_argument("--foreground", type=float, default=None, metavar="T",
                   help="fit on patches whose similarity to the mean patch is below T (a simple foreground)")
    p.add_argument("--upsample", choices=("nearest", "bilinear"), default="nearest")
    _common(p)
    p.set_defaults(func=_pca)

    p = sub.add_parser("similarity", help="cosine similarity of one patch to every patch (same or other image)")
    p.add_argument("input")
    p.add_argument("--pixel", type=int, nargs=2, required=True, metavar=("ROW", "COL"), help="a pixel of INPUT")
    p.add_argument("--other", default=None, help="compare against this image instead")
    p.add_argument("--out", required=True, help=".png overlay, or .tif (georeferenced, GeoTIFF inputs)")
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--signed", action="store_true", help="colour the full [-1, 1] range (default [0, 1])")
    _common(p)
    p.set_defaults(func=_similarity)

    p = sub.add_parser("fit-head", help="train a head on frozen features (segmentation or image labels)")
    p.add_argument("--images", default=None, help="folder of images")
    p.add_argument("--masks", default=None, help="folder of label PNGs with the images' stems (255 = unlabelled)")
    p.add_argument("--labels", default=None, help="CSV with columns path,label (image classification)")
    p.add_argument("--out", required=True, help="head file (.safetensors)")
    p.add_argument("--kind", choices=("logistic", "knn"), default="logistic", help="classifier for --labels")
    p.add_argument("--embedding", choices=("cls", "cls+mean"), default="cls")
    p.add_argument("--size", type=int, default=None, help="square input size in px (multiple of 16)")
    p.add_argument("--layers", nargs="+", default=None, help="blocks for the seg head, or 'auto' (4 evenly spaced)")
    p.add_argument("--n-classes", type=int, default=None)
    p.add_argument("--class-names", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    _common(p)
    p.set_defaults(func=_fit_head)

    p = sub.add_parser("predict", help="apply a head: class maps (PNG / GeoTIFF) or a predictions CSV")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--head", required=True)
    p.add_argument("--out", required=True, help="output folder")
    _common(p)
    p.set_defaults(func=_predict)
