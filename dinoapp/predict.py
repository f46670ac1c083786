"""Segmenting whole raster scenes with a head trained on frozen features, written as GeoTIFFs.

``segment_scene`` runs the backbone window by window over the scene (:func:`dinoapp.dense.scene_features`,
bounded memory), blends the head's patch logits into one map at patch resolution, then writes

- ``<out>_classes.tif``: the class map at the scene's full resolution (logits upsampled bilinearly,
  strip by strip, so a 10000 x 10000 scene never holds K x 10^8 floats), uint8 (nodata 255; uint16 with
  nodata 65535 for heads of more than 255 classes) with a colour table and class names, on the
  scene's CRS and transform;
- ``<out>_probs.tif`` (optional): class probabilities at patch resolution (transform x 16).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .dense import scene_features
from .heads import SegHead, check_backbone


def segment_scene(
    head: SegHead,
    backbone,
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bands=None,
    stats=None,
    stretch="auto",
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    probabilities: bool = True,
    pixel_nodata: bool = True,
    strip_rows: int = 64,
    memmap_dir: str | os.PathLike | None = None,
    progress: bool = True,
    tags: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Segment the raster at ``path``; returns the written files ``{"classes": ..., "probs": ...}``.

    Patches with too few valid pixels get no class (nodata); with ``pixel_nodata`` (default) the
    scene's own nodata / mask pixels inside valid patches are nodata in the class map too (the mask is
    read again strip by strip, so memory stays bounded). The head runs on the backbone's device (a copy
    of it is moved there; ``head`` itself is not changed).
    """
    import rasterio
    from rasterio.windows import Window

    import domains

    check_backbone(head, backbone)
    K = head.n_classes
    # A copy of the head (a BatchNorm + 1x1 conv: small) on the device the features come from: fit_seg_head and
    # load_head give heads on the CPU, the backbone may be on a GPU; the caller's head is left as it is.
    dev = next(backbone.parameters()).device  # where scene_features runs the backbone
    module = copy.deepcopy(head.module).to(dev).eval()

    def logits(f: torch.Tensor) -> torch.Tensor:  # [B, h, w, C] -> [B, h, w, K]
        return module(f.to(dev)).permute(0, 2, 3, 1)

    sm = scene_features(backbone, path, reduce=logits, channels=K, layers=head.layers, bands=bands, stats=stats,
                        stretch=stretch, tile=tile, overlap=overlap, batch_size=batch_size, memmap_dir=memmap_dir,
                        progress=progress)  # fmt: skip
    info, p = sm.meta, sm.scale
    _, H, W = info["shape"]
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"head_classes": ",".join(head.class_names), "backbone": (head.identity or {}).get("fingerprint"),
                  "windows": sm.windows, **(tags or {})}  # fmt: skip
    written: dict[str, Path] = {}
    if probabilities:
        lg = torch.from_numpy(np.nan_to_num(sm.values, nan=0.0))  # [K, h, w]
        probs = lg.softmax(0).numpy()
        probs[:, ~sm.valid] = np.nan
        written["probs"] = domains.write_geotiff(out.with_name(out.name + "_probs.tif"), probs, like=info, scale=p,
                                                 kind="probabilities", band_names=head.class_names, tags=provenance)
    # full-resolution classes, strip by strip: upsample a band of patch rows (+1 row halo each side)
    classes_path = out.with_name(out.name + "_classes.tif")
    dtype, nodata = (np.uint8, 255) if K <= 255 else (np.uint16, 65535)  # nodata never collides with a class
    profile = {"driver": "GTiff", "width": W, "height": H, "count": 1, "dtype": np.dtype(dtype).name,
               "crs": info["crs"], "transform": info["transform"], "nodata": nodata, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate", "predictor": 2}  # fmt: skip
    if info.get("gcps"):  # a scene placed by ground control points (SAR): same grid, same GCPs
        profile.update(crs=info.get("gcp_crs"), gcps=info["gcps"])
        profile.pop("transform")
    vals = sm.values  # [K, h, w] (may be a memmap)
    valid = sm.valid
    h, w = valid.shape
    tmp = classes_path.with_name(f".{classes_path.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, h, strip_rows):
            r1 = min(h, r0 + strip_rows)
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)  # halo rows for the bilinear kernel
            lg = torch.from_numpy(np.nan_to_num(np.asarray(vals[:, a0:a1]), nan=0.0))[None]  # [1, K, rows, w]
            up = F.interpolate(lg, size=((a1 - a0) * p, w * p), mode="bilinear", align_corners=False)[0]
            y0, y1 = (r0 - a0) * p, (r1 - a0) * p
            cls = up[:, y0:y1].argmax(0).numpy().astype(dtype)  # [rows*p, w*p]
            ok = np.repeat(np.repeat(valid[r0:r1], p, axis=0), p, axis=1)
            cls[~ok] = nodata
            rows = min(H, r1 * p) - r0 * p
            cls = cls[:rows, :W]
            if pixel_nodata:  # nodata pixels inside valid patches get no class either (this strip's mask only)
                _, m = domains.read_geotiff(path, bands=bands, window=(0, r0 * p, W, rows), stretch="none")
                cls[~m["valid"]] = nodata
            dst.write(cls[None], window=Window(0, r0 * p, W, rows))
        dst.write_colormap(1, domains.geowrite.default_colormap(K))
        for i, name in enumerate(head.class_names):
            dst.update_tags(**{f"DINOAPP_CLASS_{i}": name})
        dst.update_tags(DINOAPP_KIND="classes", DINOAPP_CLASSES=",".join(head.class_names),
                        DINOAPP_SOURCE=Path(str(path)).name, TIFFTAG_SOFTWARE="dinoapp",
                        **{f"DINOAPP_{k.upper()}": str(v) for k, v in provenance.items()})  # fmt: skip
    os.replace(tmp, classes_path)
    written["classes"] = classes_path
    return written
