"""Student vs teacher on the user's own labelled probe data: accuracy, segmentation, speed, size.

:func:`evaluate_backbones` runs every backbone through the same frozen-feature protocols as the
rest of dinoapp (:mod:`dinoapp.heads`, the recipes of DINOv3's evaluations, spec section 5):

- image classification (a CSV ``path,label``): weighted k-NN on L2-normalised CLS embeddings
  (k = 20, temperature 0.07), fitted on one part of the probe and scored on the other; optionally
  logistic regression on the same embeddings;
- semantic segmentation (a folder of images + a folder of label PNGs with the same stems, 255 =
  unlabelled): a linear head (BatchNorm + 1x1 conv) on the *last* block's patch features only
  (a CNN student's stages have other widths, so no multi-block concatenation), mIoU at the masks'
  own resolution over the score part;
- throughput: images/s of ``forward_features`` on a random batch (the precision :func:`dinoapp.extract`
  uses: bf16 autocast on CUDA, fp32 on CPU), median of several timed runs after a warm-up, the
  backbones measured round-robin so a change of machine load hits all of them alike; and the
  parameter count.

Every backbone sees the same images, the same deterministic fit / score split (stratified by class
for labels) and the same seeds. Files are decoded once; each image is kept resized to each input size
the backbones need (``size`` rounded to a multiple of their patch size): about 0.6 MB per image at 224.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..extract import autocast_for, extract
from ..heads import KNNClassifier, LogisticClassifier, fit_seg_head, image_embedding
from ..labelled import read_label_csv, read_mask, seg_pairs
from ..metrics import IGNORE_INDEX, accuracy, mean_iou
from ..preprocess import preprocess

REPORT_FORMAT = "dinoapp.distill.eval"
ROW_KEYS = ("params", "size", "img_per_s", "relative_speed", "knn_acc", "logreg_acc", "seg_miou",
            "n_fit", "n_score", "seg_n_fit", "seg_n_score")  # fmt: skip
_CONTRACT = ("forward_features", "get_intermediate_layers", "parameters", "patch_size", "embed_dim", "n_blocks",
             "mean", "std")  # fmt: skip


# ---------------------------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """What :func:`evaluate_backbones` measured.

    ``rows``: backbone name -> ``{key: value}`` in the order given (the first is the reference of
    ``relative_speed``, normally the teacher), keys :data:`ROW_KEYS`:

    - ``params`` (int), ``size`` (the square input side used, px);
    - ``img_per_s``, ``relative_speed`` (img/s over the reference's img/s);
    - ``knn_acc``, ``logreg_acc`` (fraction correct on the classification probe's score part),
      ``n_fit``, ``n_score`` (its images in each part);
    - ``seg_miou`` (mIoU on the segmentation probe's score part), ``seg_n_fit``, ``seg_n_score``.

    A value not measured (no such probe, logistic regression not asked for, an mIoU with no
    labelled pixel) is ``None``. ``meta``: the settings and probe facts needed to read or repeat it.
    """

    rows: dict[str, dict[str, float | int | None]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str | None:
        return next(iter(self.rows), None)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "rows": self.rows, "meta": self.meta}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (folders created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        d = json.loads(Path(path).read_text())
        if d.get("format") != REPORT_FORMAT:
            raise InputError(f"{path}: not a distillation evaluation report (format {d.get('format')!r})")
        return cls(rows=d["rows"], meta=d.get("meta", {}))

    def table(self) -> str:
        """An aligned text table, one line per backbone in order (reference first); columns never
        measured are left out, a missing value is ``-``."""
        cols = [("params", "params", _fmt_params), ("size", "size", str), ("img_per_s", "img/s", "{:.1f}".format),
                ("relative_speed", "speed", "{:.2f}x".format), ("knn_acc", "kNN acc", "{:.3f}".format),
                ("logreg_acc", "linear acc", "{:.3f}".format), ("seg_miou", "seg mIoU", "{:.3f}".format)]  # fmt: skip
        cols = [c for c in cols if any(r.get(c[0]) is not None for r in self.rows.values())]
        head = ["backbone", *(c[1] for c in cols)]
        body = [[name, *(("-" if r.get(k) is None else f(r[k])) for k, _, f in cols)] for name, r in self.rows.items()]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])

    def __str__(self) -> str:
        return self.table()


def _fmt_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------- splits


def _n_score(n: int, val_fraction: float) -> int:
    return int(math.floor(n * val_fraction + 0.5))


def _min_items(val_fraction: float) -> int:
    """Smallest n with a non-empty fit and score part: 1 <= round(n * val_fraction) <= n - 1."""
    n = 2
    while not 1 <= _n_score(n, val_fraction) <= n - 1:
        n += 1
    return n


def split_by_class(labels: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified deterministic split -> (fit indices, score indices), each sorted.

    Each class puts round(n_c * val_fraction) of its items in the score part, at most n_c - 1: every
    class keeps at least one item to fit on. Classes are visited in sorted order, one generator
    seeded with ``seed`` shuffles each.
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fit, score = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_s = min(_n_score(len(idx), val_fraction), len(idx) - 1)
        score.append(idx[:n_s])
        fit.append(idx[n_s:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(score))


def split_items(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``n`` items -> (fit indices, score indices), each sorted; either may be empty."""
    perm = np.random.default_rng(seed).permutation(n)
    n_s = _n_score(n, val_fraction)
    return np.sort(perm[n_s:]), np.sort(perm[:n_s])


# ---------------------------------------------------------------------------------------------- inputs


def _check_backbones(backbones: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(backbones, dict) or not backbones:
        raise ConfigError("backbones must be a non-empty dict name -> backbone (the reference, e.g. the teacher, "
                          "first)")  # fmt: skip
    out = {}
    for name, bb in backbones.items():
        missing = [a for a in _CONTRACT if not hasattr(bb, a)]
        if missing:
            raise ConfigError(f"backbone {name!r} ({type(bb).__name__}) lacks {missing} of the backbone contract "
                              "(load it with dinoapp.load_backbone or give it those attributes)")  # fmt: skip
        out[str(name)] = bb
    if len(out) != len(backbones):
        raise ConfigError(f"backbone names must be distinct as strings, got {list(backbones)}")
    return out


def _side(size: int, patch: int) -> int:
    """``size`` rounded to the nearest multiple of ``patch`` (at least one patch)."""
    return max(patch, int(round(size / patch)) * patch)


def _in_chans(bb) -> int:
    return int(getattr(bb, "in_chans", len(bb.mean)))


def _device_of(bb) -> torch.device:
    p = next(iter(bb.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _load_images(
    paths: Sequence[Path], variants: dict[tuple[int, int], list[str]], load_options: dict, progress: bool, what: str
) -> dict[tuple[int, int], torch.Tensor]:
    """Decode each file once -> for each (side, channels) the images resized, not normalised [N, C, side, side]."""
    import domains

    out: dict[tuple[int, int], list[torch.Tensor]] = {v: [] for v in variants}
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc=f"read {what}", unit="file")
    for p in it:
        arr, _ = domains.load(p, **load_options)  # float32 [c, H, W] in [0, 1]
        c = arr.shape[0]
        for (side, chans), names in variants.items():
            if c not in (chans, 1):
                raise InputError(f"backbone {names[0]!r} takes {chans} input channels but {p} has {c}: select bands "
                                 "(load_options={'geotiff': {'bands': [...]}}) or evaluate a backbone made for "
                                 f"{c}-channel images")  # fmt: skip
            x = preprocess(arr, size=side, policy="resize", mean=(0.0,) * chans, std=(1.0,) * chans, patch_size=1,
                           in_chans=chans, channels_first=True)  # fmt: skip
            out[(side, chans)].append(x)  # [C, side, side]
    return {v: torch.stack(xs) for v, xs in out.items()}  # [N, C, side, side]


@dataclass
class _ClsProbe:
    labels: np.ndarray  # [N] str
    fit: np.ndarray
    score: np.ndarray
    images: dict[tuple[int, int], torch.Tensor]


@dataclass
class _SegProbe:
    masks: list[np.ndarray]  # [H_i, W_i] class indices, 255 = unlabelled
    n_classes: int
    fit: np.ndarray
    score: np.ndarray
    images: dict[tuple[int, int], torch.Tensor]


def _cls_probe(labels_csv, variants, vf, seed, load_options, progress) -> _ClsProbe:
    paths, labels = read_label_csv(labels_csv, flag="labels_csv")
    y = np.asarray(labels, dtype=str)
    fit, score = split_by_class(y, vf, seed)
    if len(score) == 0:
        classes, counts = np.unique(y, return_counts=True)
        per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise InputError(f"labels_csv {labels_csv}: {len(y)} labelled image(s) ({per_class}) "
                         f"leave nothing to score with val_fraction={vf}: a class needs at least {_min_items(vf)} "
                         "images (each class keeps at least one image to fit on)")  # fmt: skip
    return _ClsProbe(y, fit, score, _load_images(paths, variants, load_options, progress, "labelled images"))


def _seg_probe(seg_images, seg_masks, variants, vf, seed, load_options, progress) -> _SegProbe:
    pairs = seg_pairs(seg_images, seg_masks, flags=("seg_images", "seg_masks"))
    fit, score = split_items(len(pairs), vf, seed)
    if len(fit) == 0 or len(score) == 0:
        raise InputError(f"seg_images {seg_images}: {len(pairs)} image/mask pair(s) leave the "
                         f"{'fit' if len(fit) == 0 else 'score'} part empty with val_fraction={vf}: give at least "
                         f"{_min_items(vf)} pairs")  # fmt: skip
    masks = [read_mask(m) for _, m in pairs]
    labelled = [m[m != IGNORE_INDEX] for m in masks]
    if not any(v.size for v in labelled):
        raise InputError(f"the masks in {seg_masks} hold no labelled pixel (every pixel is {IGNORE_INDEX})")
    top = max(int(v.max()) for v in labelled if v.size)
    if top < 1:
        raise InputError(f"the masks in {seg_masks} hold a single class (0): segmentation needs at least 2 classes")
    images = _load_images([p for p, _ in pairs], variants, load_options, progress, "segmentation images")
    return _SegProbe(masks, top + 1, fit, score, images)


# ---------------------------------------------------------------------------------------------- measures


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_throughput(
    backbones: dict[str, Any], sides: dict[str, int], *, batch: int = 8, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """Images/s of each backbone's ``forward_features`` on a random [batch, C, side, side] input.

    One warm-up round, then ``repeats`` timed rounds; in each round every backbone runs once, in turn
    (round-robin), so a change of machine load hits all alike. Median time per backbone; CUDA is
    synchronised around each run; bf16 autocast on CUDA (as :func:`dinoapp.extract`), fp32 on CPU.
    """
    xs, flags = {}, {}
    for name, bb in backbones.items():
        g = torch.Generator().manual_seed(seed)
        xs[name] = torch.randn(batch, _in_chans(bb), sides[name], sides[name], generator=g).to(_device_of(bb))
        flags[name] = getattr(bb, "training", False)
    times: dict[str, list[float]] = {n: [] for n in backbones}
    try:
        with torch.inference_mode():
            for bb in backbones.values():
                bb.eval()
            for r in range(repeats + 1):
                for name, bb in backbones.items():
                    dev = _device_of(bb)
                    with autocast_for(dev):
                        _sync(dev)
                        t0 = time.perf_counter()
                        bb.forward_features(xs[name])
                        _sync(dev)
                        dt = time.perf_counter() - t0
                    if r:  # round 0 is the warm-up
                        times[name].append(dt)
    finally:
        for name, bb in backbones.items():
            bb.train(flags[name])
    return {n: batch / max(statistics.median(t), 1e-12) for n, t in times.items()}


def _knn(bb, probe: _ClsProbe, key, k, batch_size, logistic, seed, progress) -> dict[str, Any]:
    f = extract(bb, probe.images[key], size=key[0], policy="resize", batch_size=batch_size, progress=progress)
    emb = image_embedding(f, "cls")  # [N, D]
    fit, score, y = probe.fit, probe.score, probe.labels
    knn = KNNClassifier(k=min(k, len(fit))).fit(emb[fit], y[fit])
    out = {"knn_acc": accuracy(y[score], knn.predict(emb[score])), "n_fit": len(fit), "n_score": len(score)}
    if logistic:
        lr = LogisticClassifier(seed=seed).fit(emb[fit], y[fit])
        out["logreg_acc"] = accuracy(y[score], lr.predict(emb[score]))
    return out


def _seg(bb, probe: _SegProbe, key, epochs, batch_size, seed, progress) -> dict[str, Any]:
    f = extract(bb, probe.images[key], size=key[0], policy="resize", batch_size=batch_size, progress=progress)
    patches = f.patches  # [N, h, w, D], last block
    fit, score = probe.fit, probe.score
    head = fit_seg_head(patches[fit], [probe.masks[i] for i in fit], probe.n_classes, epochs=epochs, seed=seed,
                        size=key[0], policy="resize", patch_size=bb.patch_size, device=_device_of(bb),
                        progress=progress)  # fmt: skip
    truth, pred = [], []
    for i in score:
        m = probe.masks[i]
        truth.append(m.reshape(-1))
        pred.append(head.predict(patches[i], size=m.shape).numpy().reshape(-1))  # [H, W] at the mask's size
    miou = mean_iou(np.concatenate(truth), np.concatenate(pred), probe.n_classes)
    return {"seg_miou": None if math.isnan(miou) else miou, "seg_n_fit": len(fit), "seg_n_score": len(score)}


# ---------------------------------------------------------------------------------------------- entry point


def evaluate_backbones(
    backbones: dict[str, Any],
    *,
    labels_csv: str | os.PathLike | None = None,
    seg_images: str | os.PathLike | None = None,
    seg_masks: str | os.PathLike | None = None,
    size: int = 224,
    k: int = 20,
    val_fraction: float = 0.5,
    seg_epochs: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    throughput_batch: int = 8,
    throughput_repeats: int = 5,
    logistic: bool = False,
    load_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> EvalReport:
    """Compare backbones (a teacher and its distilled students) on the user's labelled probe data.

    Args:
        backbones: name -> backbone (the dinoapp backbone contract); the first is the reference of
            ``relative_speed``, normally ``"teacher"``.
        labels_csv: image classification probe, a CSV ``path,label`` (relative paths from its folder).
        seg_images, seg_masks: segmentation probe, images and label PNGs with the same stems (255 = unlabelled).
        size: square input side in px, rounded per backbone to a multiple of its patch size.
        k: k-NN neighbours (capped by the fit part's size).
        val_fraction: share of the probe held out to score (the rest fits the k-NN bank / head);
            deterministic in ``seed``, stratified by class for labels.
        seg_epochs: epochs of the linear segmentation head.
        batch_size: feature-extraction batch.
        device: run here (backbones are moved and moved back afterwards); default: where each one is.
        throughput_batch, throughput_repeats: random batch size and timed rounds of the speed measure.
        logistic: also score logistic regression on the CLS embeddings (``logreg_acc``; needs scikit-learn).
        load_options: options for :func:`domains.load`, e.g. ``{"geotiff": {"bands": "rgb"}}``.

    Raises:
        InputError: unreadable / missing probes (from :mod:`dinoapp.labelled`), a probe too small to
            split, images whose channels a backbone does not take (the backbone is named).
        ConfigError: bad settings, a backbone lacking the contract.
    """
    bbs = _check_backbones(backbones)
    ints = {"size": size, "k": k, "seg_epochs": seg_epochs, "batch_size": batch_size,
            "throughput_batch": throughput_batch, "throughput_repeats": throughput_repeats}  # fmt: skip
    bad = {n: v for n, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"these settings must be positive integers: {bad}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), the share of the probe held out to score; "
                          f"got {val_fraction}")  # fmt: skip
    if (seg_images is None) != (seg_masks is None):
        raise ConfigError("seg_images and seg_masks go together: a folder of images and one of label PNGs")
    vf = float(val_fraction)
    sides = {n: _side(size, int(bb.patch_size)) for n, bb in bbs.items()}
    keys = {n: (sides[n], _in_chans(bb)) for n, bb in bbs.items()}
    variants: dict[tuple[int, int], list[str]] = {}
    for n, key in keys.items():
        variants.setdefault(key, []).append(n)
    opts = dict(load_options or {})

    cls_probe = _cls_probe(labels_csv, variants, vf, seed, opts, progress) if labels_csv is not None else None
    seg_probe = (_seg_probe(seg_images, seg_masks, variants, vf, seed, opts, progress)
                 if seg_images is not None else None)  # fmt: skip

    home = {n: _device_of(bb) for n, bb in bbs.items()}
    dev = torch.device(device) if device is not None else None
    rows: dict[str, dict[str, Any]] = {}
    try:
        if dev is not None:
            for bb in bbs.values():
                bb.to(dev)
        items = list(bbs.items())
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="probes", unit="backbone")
        for name, bb in items:
            row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
            row["params"] = int(sum(p.numel() for p in bb.parameters()))
            row["size"] = sides[name]
            if cls_probe is not None:
                row.update(_knn(bb, cls_probe, keys[name], k, batch_size, logistic, seed, progress))
            if seg_probe is not None:
                row.update(_seg(bb, seg_probe, keys[name], seg_epochs, batch_size, seed, progress))
            rows[name] = row
        speed = measure_throughput(bbs, sides, batch=throughput_batch, repeats=throughput_repeats, seed=seed)
    finally:
        if dev is not None:
            for n, bb in bbs.items():
                bb.to(home[n])
    ref = next(iter(bbs))
    for name in rows:
        rows[name]["img_per_s"] = float(speed[name])
        rows[name]["relative_speed"] = float(speed[name] / speed[ref])
    meta: dict[str, Any] = {
        "reference": ref,
        "size": size,
        "k": k,
        "val_fraction": vf,
        "seed": seed,
        "seg_epochs": seg_epochs,
        "throughput_batch": throughput_batch,
        "throughput_repeats": throughput_repeats,
        "devices": {n: str(dev or home[n]) for n in bbs},
        "labels_csv": None if labels_csv is None else str(labels_csv),
        "seg_images": None if seg_images is None else str(seg_images),
        "seg_masks": None if seg_masks is None else str(seg_masks),
    }
    if cls_probe is not None:
        meta["classes"] = np.unique(cls_probe.labels).tolist()
    if seg_probe is not None:
        meta["seg_n_classes"] = seg_probe.n_classes
    return EvalReport(rows=rows, meta=meta)
