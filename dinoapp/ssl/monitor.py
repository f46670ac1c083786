"""Dense-feature health monitor for self-supervised runs: a few numbers and a PCA picture per checkpoint.

Spec section 3 (Gram anchoring): in long training the global (CLS) quality keeps improving while the
dense (patch) features degrade, and nothing in the training losses shows it. Every N steps the loop
calls :meth:`DenseMonitor.measure` on a small fixed probe set of the user's own images
(:func:`probe_batch`) and logs:

- ``dense_gram_distance``: how far the patch-similarity structure has drifted from an anchor (the
  Gram teacher, or the released checkpoint being adapted); the Gram loss of spec section 3 measured
  on fixed probes. Only with ``anchor``.
- ``dense_locality``: neighbouring patches similar, distant ones less so (spatially coherent maps);
  falls towards 0 when patch similarity maps become noisy.
- ``dense_rank``: effective rank of the patch features / D; a fall towards 1/D is dimensional collapse.
- ``probe_miou``: a linear probe on patch features against the user's own masks. Only with ``labels``.

:meth:`DenseMonitor.render_pca` writes ``out_dir/monitor/pca_step{step:08d}.png`` (the probe image
beside a 3-component PCA map of its patch features), with colours kept consistent from one
checkpoint to the next, so the run folder shows the features evolving.

Everything runs in torch on the backbone's device except the small eigen-decompositions and the
probe (CPU, float64 / float32): no scikit-learn, so a training environment without the ``ml`` extra
can use it. The backbone is run in eval mode under ``torch.no_grad()``; the training flags of all its
modules are restored afterwards. With FSDP every rank must call :meth:`~DenseMonitor.measure` (the
forward is collective); give ``out_dir`` only on rank 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..metrics import iou_per_class
from ..viz import PCABasis, upsample
from .data import to_unit
from .gram import gram_loss, resize_patch_grid

if TYPE_CHECKING:
    from ..backbone import DinoBackbone

_EPS = 1e-12


# ------------------------------------------------------------------------------------------ probes


def probe_batch(
    dataset: Any, n: int, size: int, mean: Sequence[float], std: Sequence[float], *, return_paths: bool = False
) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """``n`` images of ``dataset`` as a normalised probe batch [n, C, size, size], C = ``len(mean)``.

    ``dataset``: a ``domains.FolderDataset`` or anything with ``__len__`` and ``__getitem__(i) ->
    (float32 [C, H, W], meta)`` with ``meta["value_range"]``. Items are taken at evenly spaced
    indices ``round(k (len - 1) / (n - 1))`` (deterministic, spread over the sorted files); each is
    scaled from ``meta["value_range"]`` to [0, 1] and clipped (as :class:`~dinoapp.ssl.data.SSLDataset`
    does), centre-cropped to a square, resized to ``size`` (bicubic, antialiased, clipped to [0, 1]
    again), repeated from 1 channel to C, and normalised with ``mean``/``std``.

    Items that cannot be used are skipped and replaced by the next unused index: FolderDataset
    already substitutes the next readable file for an unreadable one (a repeated ``meta["path"]``
    is skipped here), and items without a ``value_range`` (physical units) or with a channel count
    other than 1 or C are skipped too. Fewer than ``n`` usable items give a shorter batch;
    none raise :class:`InputError`. ``return_paths``: also the chosen items' ``meta["path"]``.
    """
    if int(n) < 1 or int(size) < 1:
        raise ConfigError(f"probe_batch needs n >= 1 and size >= 1, got n={n}, size={size}")
    mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
    std_t = torch.as_tensor(tuple(std), dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
    if mean_t.numel() != std_t.numel() or mean_t.numel() < 1 or not bool((std_t > 0).all()):
        raise ConfigError(f"mean and std need one value per channel and std > 0, got {tuple(mean)} / {tuple(std)}")
    C, total = mean_t.numel(), len(dataset)
    if total < 1:
        raise InputError("the dataset is empty: no images to probe")
    first = [round(k * (total - 1) / (n - 1)) for k in range(n)] if n > 1 else [0]
    order = list(dict.fromkeys(first + list(range(total))))  # spread picks first, then the rest as spares
    out: list[torch.Tensor] = []
    paths: list[str] = []
    seen: set[str] = set()
    reasons: list[str] = []
    for i in order:
        if len(out) == n:
            break
        arr, meta = dataset[i]
        key = str(meta.get("path", f"#{i}"))
        if key in seen:  # FolderDataset handed us the next readable file again
            continue
        seen.add(key)
        try:
            out.append(_probe_image(arr, meta, C, int(size)))  # [C, size, size] in [0, 1]
            paths.append(key)
        except InputError as err:
            reasons.append(str(err))
    if not out:
        raise InputError(f"none of the {total} items can be used as a probe image; last problem: {reasons[-1]}")
    batch = (torch.stack(out) - mean_t) / std_t  # [n, C, size, size]
    return (batch, paths) if return_paths else batch


def probe_labels(paths: Sequence[str], size: int, folder: str | Path) -> torch.Tensor:
    """Label maps for probe images: ``folder/<stem>.png`` (or ``.tif``) per probe path, class ids as
    stored (no stretch), centre-cropped and resized (nearest) exactly like the probe image ->
    int64 [P, size, size]; 255 and missing files become -1 (ignored)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"monitor.labels: {folder} is not a folder of label images (<image stem>.png)")
    out = []
    for p in paths:
        stem = Path(p).stem
        candidates = [folder / f"{stem}{ext}" for ext in (".png", ".tif", ".tiff")]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            out.append(torch.full((size, size), -1, dtype=torch.int64))
            continue
        y = torch.from_numpy(np.asarray(Image.open(found)).astype(np.int64))
        if y.ndim == 3:
            y = y[..., 0]
        H, W = y.shape
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        y = y[top : top + s, left : left + s][None, None].float()
        y = F.interpolate(y, size=(size, size), mode="nearest")[0, 0].long()  # [size, size]
        y[y == 255] = -1
        out.append(y)
    labels = torch.stack(out)  # [P, size, size]
    if not bool((labels >= 0).any()):
        raise InputError(f"monitor.labels: no label image in {folder} matches a probe image ({', '.join(paths[:3])})")
    return labels


def _probe_image(arr: Any, meta: dict[str, Any], C: int, size: int) -> torch.Tensor:
    """One item -> float32 [C, size, size] in [0, 1] (scaled as for training, then centre square, resize)."""
    x = to_unit(arr, meta, C)  # [C, H, W] in [0, 1]
    H, W = x.shape[-2:]
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    x = x[:, top : top + s, left : left + s]  # [c, s, s] centre square
    if s != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
        x = x.clamp(0.0, 1.0)  # bicubic overshoot
    return x.contiguous()  # [C, size, size]


# ---------------------------------------------------------------------------------------- measures


def _pair_masks(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(4-neighbour mask, far mask, far radius) over the [h*w, h*w] pairs of an h x w grid (row-major)."""
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([r.flatten(), c.flatten()], dim=1).float()  # [N, 2]
    dr = (pos[:, None, 0] - pos[None, :, 0]).abs()  # [N, N]
    dc = (pos[:, None, 1] - pos[None, :, 1]).abs()  # [N, N]
    near = (dr + dc) == 1
    radius = max(2.0, max(h, w) / 4.0)
    far = (dr**2 + dc**2).sqrt() >= radius
    return near, far, radius


def locality(features: torch.Tensor, grid: tuple[int, int]) -> float:
    """Spatial coherence of patch features [B, h*w, D] on an ``grid = (h, w)`` patch grid (row-major).

    ``locality = mean cos(f_p, f_q) over 4-neighbour pairs - mean cos(f_p, f_q) over far pairs``,
    where 4-neighbour pairs are patches of the same image at ``|dr| + |dc| = 1`` and far pairs are
    patches of the same image at Euclidean distance ``sqrt(dr^2 + dc^2) >= max(2, max(h, w) / 4)``
    patches (a quarter of the grid; at least 2 so that small grids keep neighbours out of it). Both
    means pool the ordered pairs of all images (each pair counted in both orders, which leaves the
    means unchanged). In [-2, 2]: near 0 for spatially shuffled features, positive and large for
    features that vary smoothly over the image with distinct content far apart. NaN when the grid has
    no far pair (fewer than 3 patches along both sides).
    """
    h, w = grid
    n_patches = features.shape[1]
    if n_patches != h * w:
        raise InputError(f"{n_patches} patches do not fill a {h}x{w} grid")
    near, far, _ = _pair_masks(h, w, features.device)
    if not bool(far.any()) or not bool(near.any()):
        return math.nan
    x = F.normalize(features.float(), dim=-1)  # [B, N, D]
    sim = x @ x.transpose(1, 2)  # [B, N, N]
    s_near = sim[:, near].mean()
    s_far = sim[:, far].mean()
    return float(s_near - s_far)


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank of the patch-feature covariance divided by D, pooling all patches [..., D].

    ``exp(H(p)) / D`` with ``p_i = lambda_i / sum(lambda)`` the normalised eigenvalues of the [D, D]
    covariance of the (mean-centred) features and ``H`` the Shannon entropy (Roy & Vetterli 2007).
    In (0, 1]: 1/D for rank-1 features (total collapse onto a line), 1 for isotropic features. With M
    pooled patches the covariance has rank at most ``M - 1``, so the ceiling is ``min(D, M - 1) / D``:
    compare values over a run (a fixed probe set), not across probe sets. 0 if the features are constant.
    """
    d = features.shape[-1]
    x = features.reshape(-1, d)  # [M, D]
    if x.device.type not in ("cpu", "cuda"):  # no float64 linear algebra on some accelerators (MPS)
        x = x.cpu()
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    # The non-zero eigenvalues of X^T X [D, D] and X X^T [M, M] are the same: decompose the smaller one.
    g = x @ x.T if x.shape[0] < d else x.T @ x  # [min(M, D), min(M, D)]
    ev = torch.linalg.eigvalsh(g).clamp_min(0.0)  # covariance eigenvalues up to the factor 1 / (M - 1)
    total = ev.sum()
    if not total > 0:
        return 0.0
    p = ev / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()) / d)


def labels_to_grid(labels: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel labels [P, H, W] (-1 = ignore) -> patch labels [P, H/p, W/p] by majority vote.

    Each patch takes its most frequent non-ignored label (ties: the smallest class id); a patch with
    only ignored pixels is -1.
    """
    P, H, W = labels.shape
    if H % patch or W % patch:
        raise InputError(f"labels of size {H}x{W} are not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    blocks = labels.reshape(P, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(P * h * w, patch * patch)
    K = int(labels.max()) + 1 if labels.numel() else 0
    if K <= 0:
        return torch.full((P, h, w), -1, dtype=torch.long)
    cell = torch.arange(P * h * w)[:, None].expand_as(blocks)  # [P*h*w, p*p]
    keep = blocks >= 0
    counts = torch.bincount(cell[keep] * K + blocks[keep], minlength=P * h * w * K).reshape(P * h * w, K)
    best = counts.argmax(dim=1)  # first maximum = smallest class id on ties
    best[counts.max(dim=1).values == 0] = -1
    return best.reshape(P, h, w)


def linear_probe_miou(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *, steps: int = 100
) -> float:
    """Fit a linear classifier on ``train_x`` [M, D] / ``train_y`` [M] and return the mIoU on the eval set.

    Multinomial logistic regression on standardised features (train mean/std), L2 penalty
    ``1e-3 ||W||^2``, full batch, ``steps`` L-BFGS iterations (strong-Wolfe line search) on CPU in
    float64: deterministic. (The first L-BFGS of a process imports ``torch._dynamo``, about 1 s on CPU;
    a training loop has paid that already with its own optimiser.) Labels -1 are ignored on both
    sides. IoU per class from the eval confusion matrix (:func:`dinoapp.metrics.iou_per_class`),
    averaged over the classes present in ``eval_y`` (a class missing there is left out of the mean);
    classes absent from ``train_y`` are never predicted. NaN when either side has no labelled sample.
    """
    tm, em = train_y >= 0, eval_y >= 0
    xt, yt = train_x[tm].double().cpu(), train_y[tm].long().cpu()  # [M, D], [M]
    xe, ye = eval_x[em].double().cpu(), eval_y[em].long().cpu()  # [M', D], [M']
    if yt.numel() == 0 or ye.numel() == 0:
        return math.nan
    K = int(max(int(yt.max()), int(ye.max()))) + 1
    classes = torch.unique(yt)
    if classes.numel() == 1:
        pred = torch.full_like(ye, int(classes[0]))
    else:
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)  # [D]
        xt, xe = (xt - mu) / sd, (xe - mu) / sd
        W = torch.zeros(xt.shape[1], K, dtype=torch.float64, requires_grad=True)  # [D, K]
        b = torch.zeros(K, dtype=torch.float64, requires_grad=True)  # [K]
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xt @ W + b, yt) + 1e-3 * (W**2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            logits = xe @ W + b  # [M', K]
            logits[:, ~torch.isin(torch.arange(K), classes)] = -math.inf  # never predict an unseen class
            pred = logits.argmax(1)
    iou = iou_per_class(ye.numpy(), pred.numpy(), K, ignore_index=None)  # [K]
    present = np.bincount(ye.numpy(), minlength=K) > 0
    return float(np.mean(iou[present]))


# --------------------------------------------------------------------------------------- monitor


@contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode inside, each submodule's own training flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, f in flags:
            m.training = f


def _param_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


class DenseMonitor:
    """Dense-feature health numbers and PCA pictures of a backbone on a fixed probe set.

    Args:
        probes: float [P, C, H, W], already normalised for the backbones (:func:`probe_batch`), H and
            W multiples of the patch size. Kept on CPU; moved in batches to the backbone's device.
        labels: optional int64 [P, H, W] class ids (-1 = ignore); a linear probe is then fitted at
            every :meth:`measure` (``probe_miou``). Needs P >= 2: even-indexed probes train it,
            odd-indexed ones evaluate it.
        anchor: optional backbone to compare with (the Gram teacher, or the released checkpoint
            being adapted). Its patch features on the probes are computed here, once, and cached on
            CPU (no reference to it is kept); ``dense_gram_distance`` compares with them. Another patch
            size is allowed: its grid is resized to the measured backbone's.
        out_dir: the run folder; pictures and a ``metrics.jsonl`` go to ``out_dir/monitor``.
            ``None`` writes nothing (other ranks of a distributed run).
        batch_size: probes per forward pass.
    """

    def __init__(
        self,
        probes: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        anchor: DinoBackbone | None = None,
        out_dir: str | Path | None = None,
        batch_size: int = 8,
    ) -> None:
        if not isinstance(probes, torch.Tensor) or probes.ndim != 4 or not probes.is_floating_point():
            raise InputError(f"probes must be a float tensor [P, C, H, W], got {getattr(probes, 'shape', probes)!r}")
        if probes.shape[0] < 1:
            raise InputError("probes are empty: give at least one probe image")
        if not bool(torch.isfinite(probes).all()):
            raise InputError("probes contain NaN or infinite values")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.probes = probes.detach().to("cpu", torch.float32).contiguous()  # [P, C, H, W]
        P, _, H, W = self.probes.shape
        self.labels: torch.Tensor | None = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (P, H, W) or labels.is_floating_point():
                raise InputError(f"labels must be integer [P, H, W] = [{P}, {H}, {W}], got {tuple(labels.shape)}")
            if bool((labels < -1).any()):
                raise InputError("labels must be class ids >= 0, or -1 for ignored pixels")
            if P < 2:
                raise InputError("a linear probe needs at least 2 labelled probe images (one to fit, one to score)")
            self.labels = labels.detach().to("cpu", torch.long)  # [P, H, W]
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.batch_size = int(batch_size)
        self._grid_labels: dict[int, torch.Tensor] = {}  # patch size -> [P, h, w]
        self._pca_prev: dict[int, np.ndarray] = {}  # probe index -> last [h*w, 3] projections shown
        self.anchor_features: torch.Tensor | None = None  # [P, h*w, D'] float32, CPU
        self.anchor_grid: tuple[int, int] | None = None
        if anchor is not None:
            feats, self.anchor_grid = self._features(anchor, self.probes)
            self.anchor_features = feats.cpu()

    # --- running a backbone ------------------------------------------------------------------------
    def _features(self, backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features [B, h*w, D] (float32, on the backbone's device) of normalised images ``x``, and (h, w)."""
        p = int(backbone.patch_size)
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise InputError(f"probe images of {H}x{W} px are not a multiple of the patch size {p}")
        device, dtype = _param_device_dtype(backbone)
        outs = []
        with torch.no_grad(), _eval_mode(backbone):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i : i + self.batch_size].to(device=device, dtype=dtype)  # [b, C, H, W]
                outs.append(backbone.forward_features(xb)["x_norm_patchtokens"].float())  # [b, h*w, D]
        feats = torch.cat(outs)  # [B, h*w, D]
        grid = (H // p, W // p)
        if feats.shape[1] != grid[0] * grid[1]:
            raise InputError(f"the backbone returned {feats.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
        return feats, grid

    def _anchor_on(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Cached anchor features [P, h*w, D'] on the measured backbone's grid and device.

        An anchor of another patch size has another grid: it is resized bicubically to this one
        (:func:`~dinoapp.ssl.gram.resize_patch_grid`, as for the high-resolution Gram teacher)."""
        assert self.anchor_features is not None and self.anchor_grid is not None
        return resize_patch_grid(self.anchor_features, self.anchor_grid, grid).to(device)

    # --- public ------------------------------------------------------------------------------------
    def measure(self, backbone: DinoBackbone, step: int) -> dict[str, float]:
        """Run ``backbone`` on the probes and return the dense-feature health numbers (module docstring).

        Keys: ``dense_locality`` (:func:`locality`), ``dense_rank`` (:func:`effective_rank`), plus
        ``dense_gram_distance`` with an anchor (:func:`~dinoapp.ssl.gram.gram_loss` between the
        backbone's and the anchor's patch features: mean squared difference of the per-image Gram
        matrices of L2-normalised patch features, in [0, 4], 0 = same similarity structure) and
        ``probe_miou`` (:func:`linear_probe_miou` on majority-vote patch labels) with labels.
        """
        feats, grid = self._features(backbone, self.probes)  # [P, h*w, D]
        out: dict[str, float] = {}
        if self.anchor_features is not None:
            out["dense_gram_distance"] = float(gram_loss(feats, self._anchor_on(grid, feats.device)))
        out["dense_locality"] = locality(feats, grid)
        out["dense_rank"] = effective_rank(feats)
        if self.labels is not None:
            p = int(backbone.patch_size)
            if p not in self._grid_labels:
                self._grid_labels[p] = labels_to_grid(self.labels, p)
            y = self._grid_labels[p].flatten(1)  # [P, h*w]
            x = feats.cpu()  # [P, h*w, D]
            out["probe_miou"] = linear_probe_miou(
                x[0::2].reshape(-1, x.shape[-1]), y[0::2].reshape(-1), x[1::2].reshape(-1, x.shape[-1]),
                y[1::2].reshape(-1),
            )  # fmt: skip
        return out

    def render_pca(self, backbone: DinoBackbone, step: int, index: int = 0) -> Path | None:
        """Write ``out_dir/monitor/pca_step{step:08d}.png`` and return its path (None without ``out_dir``).

        Left: probe ``index`` de-normalised with ``backbone.mean``/``backbone.std`` (grey for 1-2
        channels, the first three channels otherwise). Right: PCA(3, whitened) of its patch features
        coloured by :meth:`dinoapp.viz.PCABasis.rgb` (spec section 5's recipe, ``sigmoid(2 * projection)``),
        upsampled nearest to the image size. The PNG is [H, 2W] RGB.

        Colours stay comparable across steps: after the first picture of a probe, the three components
        are reordered and their signs flipped to best match the previous picture's projections
        (largest summed absolute correlation, then positive correlation); the first picture (or the
        first after a resume) flips each component so its projections have positive skew (the heavy
        tail bright).
        """
        if self.out_dir is None:
            return None
        P = self.probes.shape[0]
        if not -P <= index < P:
            raise InputError(f"probe index {index} out of range for {P} probes")
        index %= P
        x = self.probes[index : index + 1]  # [1, C, H, W]
        feats, (h, w) = self._features(backbone, x)
        f = feats[0].cpu()  # [h*w, D]
        if f.shape[0] < 3:
            raise InputError(f"a 3-component PCA needs at least 3 patches, the probe has {f.shape[0]}")
        basis = self._aligned_basis(f, index)
        rgb = basis.rgb(f.numpy()).reshape(h, w, 3)  # [h, w, 3] in (0, 1)
        H, W = x.shape[-2:]
        pca = (upsample(rgb, (H, W), mode="nearest") * 255.0 + 0.5).clip(0, 255).astype(np.uint8)  # [H, W, 3]
        image = _denormalize(x[0], backbone.mean, backbone.std)  # [H, W, 3] uint8
        from PIL import Image

        folder = self.out_dir / "monitor"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"pca_step{int(step):08d}.png"
        Image.fromarray(np.concatenate([image, pca], axis=1)).save(path)  # [H, 2W, 3]
        return path

    def _aligned_basis(self, f: torch.Tensor, index: int) -> PCABasis:
        """PCA(3) of one image's patch features [N, D] with components ordered/signed as described in render_pca."""
        x = f.double()
        mu = x.mean(0)  # [D]
        _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)  # s [min(N, D)], vh [min(N, D), D]
        k = 3
        comps, var = vh[:k].clone(), s[:k] ** 2 / max(x.shape[0] - 1, 1)  # [3, D], [3]
        std = var.sqrt().clamp_min(1e-12)
        proj = ((x - mu) @ comps.T / std).numpy()  # [N, 3] whitened
        prev = self._pca_prev.get(index)
        if prev is not None and prev.shape == proj.shape:
            corr = _corr(prev, proj)  # [3 prev, 3 new]
            perm = max(itertools.permutations(range(k)), key=lambda q: sum(abs(corr[i, q[i]]) for i in range(k)))
            signs = np.array([1.0 if corr[i, perm[i]] >= 0 else -1.0 for i in range(k)])
        else:
            perm = tuple(range(k))
            signs = np.where((proj**3).sum(0) >= 0, 1.0, -1.0)
        perm_t = torch.as_tensor(perm)
        comps = comps[perm_t] * torch.as_tensor(signs)[:, None]
        std, var = std[perm_t], var[perm_t]
        self._pca_prev[index] = proj[:, list(perm)] * signs
        total = ((x - mu) ** 2).sum() / max(x.shape[0] - 1, 1)
        return PCABasis(
            mean=mu.float().numpy(),
            components=comps.float().numpy(),
            std=std.float().numpy(),
            explained_variance_ratio=(var / total.clamp_min(1e-12)).float().numpy(),
            whiten=True,
        )


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations [Ka, Kb] between the columns of a [N, Ka] and b [N, Kb]."""
    a = (a - a.mean(0)) / np.maximum(a.std(0), _EPS)
    b = (b - b.mean(0)) / np.maximum(b.std(0), _EPS)
    return a.T @ b / a.shape[0]


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [C, H, W] -> uint8 RGB [H, W, 3]: grey for 1-2 channels, else the first three channels."""
    m = torch.as_tensor(tuple(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(tuple(std), dtype=torch.float32).view(-1, 1, 1)
    img = (x.float() * s + m).clamp(0.0, 1.0)  # [C, H, W]
    img = img[:1].expand(3, -1, -1) if img.shape[0] < 3 else img[:3]  # [3, H, W]
    return (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
