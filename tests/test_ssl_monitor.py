"""Tests for dinoapp.ssl.monitor: the dense-feature health monitor (CPU, tiny random ViTs and stubs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dinoapp.errors import InputError
from dinoapp.loading import load_backbone
from dinoapp.ssl.monitor import (
    DenseMonitor,
    effective_rank,
    labels_to_grid,
    linear_probe_miou,
    locality,
    probe_batch,
)
from domains.datasets import FolderDataset

P, S = 4, 64  # probes of 4 x 3 x 64 x 64: a 4 x 4 grid of 16-px patches


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("vit_tiny", depth=2, seed=0)


@pytest.fixture(scope="module")
def probes():
    return torch.randn(P, 3, S, S, generator=torch.Generator().manual_seed(0))  # [P, 3, S, S]


class FixedFeatures(nn.Module):
    """A feature-extractor stub with the backbone contract: returns given patch features whatever the input."""

    def __init__(self, feats: torch.Tensor, patch_size: int = 16) -> None:
        super().__init__()
        self.feats = feats  # [h*w, D]
        self.proj = nn.Linear(1, 1)  # a parameter, so the device is known; a submodule for the flag test
        self.patch_size, self.mean, self.std = patch_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward_features(self, x):
        return {"x_norm_patchtokens": self.feats.expand(x.shape[0], -1, -1)}  # [B, h*w, D]


def _naive_locality(f: torch.Tensor, h: int, w: int) -> float:
    """The definition in locality()'s docstring, as plain loops over pairs of patches."""
    near, far = [], []
    radius = max(2.0, max(h, w) / 4.0)
    for b in range(f.shape[0]):
        for i in range(h * w):
            for j in range(h * w):
                (r1, c1), (r2, c2) = divmod(i, w), divmod(j, w)
                cos = float(F.cosine_similarity(f[b, i], f[b, j], dim=0))
                if abs(r1 - r2) + abs(c1 - c2) == 1:
                    near.append(cos)
                if math.hypot(r1 - r2, c1 - c2) >= radius:
                    far.append(cos)
    return float(np.mean(near) - np.mean(far))


# ----------------------------------------------------------------------------------- measures


def test_locality_matches_naive_loop():
    f = torch.randn(2, 5 * 6, 7, generator=torch.Generator().manual_seed(1))  # [B, h*w, D]
    assert locality(f, (5, 6)) == pytest.approx(_naive_locality(f, 5, 6), abs=1e-5)


def test_locality_smooth_field_beats_shuffled_patches():
    h = w = 8
    g = torch.Generator().manual_seed(2)
    r, c = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    basis = torch.stack([torch.sin(math.pi * (k + 1) * r) * torch.cos(math.pi * (m + 1) * c)
                         for k in range(2) for m in range(2)], dim=-1)  # fmt: skip
    smooth = (basis.reshape(h * w, -1) @ torch.randn(4, 32, generator=g))[None]  # [1, h*w, 32], low frequency
    shuffled = smooth[:, torch.randperm(h * w, generator=g)]
    s, sh = locality(smooth, (h, w)), locality(shuffled, (h, w))
    assert s > 0.5 and abs(sh) < 0.2 and s > sh + 0.4


def test_effective_rank_bounds_and_collapse():
    g = torch.Generator().manual_seed(3)
    D = 16
    full = effective_rank(torch.randn(4000, D, generator=g))
    assert 0.9 < full <= 1.0  # isotropic -> ~1
    rank1 = torch.randn(500, 1, generator=g) * torch.randn(1, D, generator=g) + torch.randn(D, generator=g)
    assert effective_rank(rank1) == pytest.approx(1 / D, rel=1e-3)  # collapse onto a line
    assert effective_rank(torch.ones(10, D)) == 0.0


def test_labels_to_grid_majority_and_ignore():
    lab = torch.full((1, 4, 4), -1, dtype=torch.long)  # 2 x 2 grid of 2-px patches
    lab[0, 0:2, 0:2] = torch.tensor([[3, 3], [1, -1]])  # majority 3
    lab[0, 0:2, 2:4] = torch.tensor([[1, 2], [-1, -1]])  # tie 1/2 -> the smaller id
    lab[0, 2:4, 2:4] = 0
    assert labels_to_grid(lab, 2).tolist() == [[[3, 1], [-1, 0]]]


def test_linear_probe_miou_skips_classes_missing_from_eval():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(3, 8, generator=g) * 5
    ytr = torch.tensor([0, 1, 2] * 20)
    xtr = centres[ytr] + torch.randn(60, 8, generator=g) * 0.1
    yev = torch.tensor([0, 1] * 10 + [-1] * 3)  # class 2 missing in eval, -1 ignored
    xev = centres[yev.clamp_min(0)] + torch.randn(23, 8, generator=g) * 0.1
    assert linear_probe_miou(xtr, ytr, xev, yev) == 1.0
    assert math.isnan(linear_probe_miou(xtr, ytr, xev, torch.full((23,), -1)))


# ------------------------------------------------------------------------------------- monitor


def test_gram_distance_zero_for_anchor_positive_for_other(tiny, probes):
    mon = DenseMonitor(probes, anchor=tiny)
    same = mon.measure(tiny, step=0)
    assert set(same) == {"dense_gram_distance", "dense_locality", "dense_rank"}
    assert same["dense_gram_distance"] == pytest.approx(0.0, abs=1e-10)
    other = mon.measure(load_backbone("vit_tiny", depth=2, seed=1), step=1)
    assert other["dense_gram_distance"] > 1e-6
    assert 0.0 < same["dense_rank"] <= 1.0 and all(math.isfinite(v) for v in same.values())


def test_anchor_of_other_patch_size_is_resized(tiny, probes):
    anchor = load_backbone("vit_tiny", depth=1, patch_size=8, seed=0)  # 8 x 8 grid vs the tiny's 4 x 4
    out = DenseMonitor(probes, anchor=anchor).measure(tiny, step=0)
    assert 0.0 < out["dense_gram_distance"] < 4.0


def test_probe_miou_on_half_bright_half_dark(tiny):
    # Left part bright, right part dark, the boundary on a patch edge that varies per image; the labels
    # are the part. A random 2-block ViT separates bright from dark patches linearly (no stub needed).
    g = torch.Generator().manual_seed(5)
    x = torch.empty(P, 3, S, S)
    labels = torch.zeros(P, S, S, dtype=torch.long)
    for i in range(P):
        cut = 16 * (1 + i % 3)
        x[i, :, :, :cut], x[i, :, :, cut:] = 1.5, -1.5
        labels[i, :, cut:] = 1
    x += 0.3 * torch.randn(x.shape, generator=g)
    labels[:, :2] = -1  # some ignored pixels
    out = DenseMonitor(x, labels=labels).measure(tiny, step=0)
    assert out["probe_miou"] > 0.95


def test_training_flags_restored(tiny, probes):
    bb = load_backbone("vit_tiny", depth=2, seed=0).train()
    bb.vit.blocks[0].eval()  # a submodule deliberately in eval mode stays so
    before = [m.training for m in bb.modules()]
    DenseMonitor(probes, anchor=bb).measure(bb, step=0)
    assert [m.training for m in bb.modules()] == before
    assert torch.is_grad_enabled()


def test_bad_input(tiny, probes):
    with pytest.raises(InputError, match="multiple of the patch size"):
        DenseMonitor(probes[..., :40, :40]).measure(tiny, step=0)
    with pytest.raises(InputError, match="labels"):
        DenseMonitor(probes, labels=torch.zeros(P, 8, 8, dtype=torch.long))


def test_render_pca_png(tiny, probes, tmp_path):
    assert DenseMonitor(probes).render_pca(tiny, step=1) is None
    path = DenseMonitor(probes, out_dir=tmp_path).render_pca(tiny, step=12, index=2)
    assert path == tmp_path / "monitor" / "pca_step00000012.png"
    img = Image.open(path)
    assert img.size == (2 * S, S) and img.mode == "RGB"
    left = np.asarray(img)[:, :S].astype(np.float32) / 255.0  # [S, S, 3] de-normalised probe
    expect = (probes[2] * torch.tensor(tiny.std).view(3, 1, 1) + torch.tensor(tiny.mean).view(3, 1, 1)).clamp(0, 1)
    assert np.abs(left - expect.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6


def test_render_pca_colours_consistent_across_steps(probes, tmp_path):
    # Step 2's features have the first two principal directions swapped in variance order and all
    # signs flipped: the same picture once components are matched to the previous step's.
    g = torch.Generator().manual_seed(6)
    z = torch.randn(16, 3, generator=g) ** 3  # [h*w, 3] skewed, distinct patterns
    z = torch.linalg.qr(z - z.mean(0))[0] * 4  # [h*w, 3] zero-mean, uncorrelated: exactly the principal axes
    q = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:3]  # [3, D=8] orthonormal directions
    f1 = (z * torch.tensor([3.0, 2.0, 1.0])) @ q  # [16, 8]
    f2 = -(z * torch.tensor([2.0, 3.0, 1.0])) @ q
    mon = DenseMonitor(probes, out_dir=tmp_path)
    a = np.asarray(Image.open(mon.render_pca(FixedFeatures(f1), step=1)))
    b = np.asarray(Image.open(mon.render_pca(FixedFeatures(f2), step=2)))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # Without the previous picture the order follows the variance: the colours differ.
    c = np.asarray(Image.open(DenseMonitor(probes, out_dir=tmp_path).render_pca(FixedFeatures(f2), step=3)))
    assert np.abs(a[:, S:].astype(int) - c[:, S:].astype(int)).max() > 50


# ---------------------------------------------------------------------------------------- probes


def test_probe_batch_from_folder(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "a.png")  # wide RGB
    Image.fromarray(np.full((30, 20), 51, np.uint8)).save(tmp_path / "b.png")  # tall grey
    (tmp_path / "c.png").write_bytes(b"not a png")  # unreadable: FolderDataset substitutes the next file
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "d.png")
    ds = FolderDataset(tmp_path)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    x = probe_batch(ds, 3, 32, mean, std)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    unit = x * s + m  # [3, 3, 32, 32] back in [0, 1]; constant images stay constant through crop + resize
    for img, v in zip(unit, (200, 100, 51)):  # picks 0, 2 (c -> the next readable, d), 3 (d again: skipped), spare b
        assert torch.allclose(img, torch.full_like(img, v / 255), atol=1e-4), v
    assert sorted(round(float(i.mean()) * 255) for i in unit) == [51, 100, 200]
    assert probe_batch(ds, 10, 16, mean, std).shape == (3, 3, 16, 16)  # only 3 readable images: a shorter batch


def test_probe_batch_crop_is_central(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, 10:30] = 255  # the central 20 x 20 square is white
    Image.fromarray(a).save(tmp_path / "a.png")
    x = probe_batch(FolderDataset(tmp_path), 1, 20, (0.0,), (1.0,))
    assert x.shape == (1, 1, 20, 20) and torch.allclose(x, torch.ones_like(x))
