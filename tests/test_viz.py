"""dinoapp.viz: PCA maps, similarity, matches, parts and pictures against numpy references."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import dinoapp
from dinoapp import viz
from dinoapp.errors import InputError


def low_rank_features(h=10, w=12, D=24, seed=0, variances=(9.0, 4.0, 1.0)) -> np.ndarray:
    """[h, w, D] features with three dominant directions of distinct variance plus small noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    z = rng.normal(size=(h * w, len(variances))) * np.sqrt(variances)
    x = z @ basis[: len(variances)] + 0.05 * rng.normal(size=(h * w, D)) + rng.normal(size=D)
    return x.reshape(h, w, D).astype(np.float32)


def reference_projection(x: np.ndarray, k: int = 3) -> np.ndarray:
    """Plain PCA: centre, SVD, sign so the largest |loading| is positive, whiten by S / sqrt(n - 1)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:k] * np.sign(vt[:k][np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    return xc @ comps.T / (s[:k] / np.sqrt(len(x) - 1))


# ------------------------------------------------------------------------------------------- PCA


def test_pca_projection_matches_numpy_reference():
    f = low_rank_features()
    basis = viz.fit_pca(f)
    proj = basis.project(f)  # [h, w, 3]
    assert proj.shape == (10, 12, 3) and proj.dtype == np.float32
    np.testing.assert_allclose(proj.reshape(-1, 3), reference_projection(f), atol=1e-4)
    np.testing.assert_allclose(proj.reshape(-1, 3).std(0, ddof=1), 1.0, atol=1e-4)  # whitened
    s = np.linalg.svd(f.reshape(-1, 24) - f.reshape(-1, 24).mean(0), compute_uv=False)
    np.testing.assert_allclose(basis.explained_variance_ratio, (s**2 / (s**2).sum())[:3], atol=1e-5)
    # colours are the recipe's sigmoid(2 * projection)
    np.testing.assert_allclose(viz.pca_rgb(f), 1 / (1 + np.exp(-2 * proj)), atol=1e-6)


def test_pca_sign_is_fixed_by_the_data_not_the_patch_order():
    f = low_rank_features(seed=1)
    a = viz.fit_pca(f)
    b = viz.fit_pca(f[::-1, ::-1].copy())  # same patches, other order
    np.testing.assert_allclose(a.components, b.components, atol=1e-5)
    assert np.all(a.components[np.arange(3), np.abs(a.components).argmax(1)] > 0)


def test_pca_fits_on_foreground_patches_only():
    f = low_rank_features(seed=2)
    mask = np.zeros(f.shape[:2], bool)
    mask[2:8, 3:10] = True
    a = viz.fit_pca(f, masks=[mask])
    g = f.copy()
    g[~mask] = np.random.default_rng(5).normal(size=(int((~mask).sum()), 24)) * 50  # new background
    b = viz.fit_pca(torch.from_numpy(g), masks=[torch.from_numpy(mask)])
    np.testing.assert_allclose(a.components, b.components, atol=1e-6)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-6)
    assert not np.allclose(viz.fit_pca(g).components, a.components, atol=1e-2)  # the mask mattered
    np.testing.assert_allclose(a.project(f[mask]), reference_projection(f[mask]), atol=1e-4)


def test_pca_rgb_background_modes():
    f = low_rank_features(seed=3)
    mask = np.zeros(f.shape[:2], bool)
    mask[:, :6] = True
    keep = viz.pca_rgb(f, mask=mask, background="keep")
    assert keep.shape == (10, 12, 3) and keep.dtype == np.float32 and keep.min() >= 0 and keep.max() <= 1
    black = viz.pca_rgb(f, mask=mask, background="black")
    dim = viz.pca_rgb(f, mask=mask, dim=0.2)
    assert np.all(black[~mask] == 0) and np.array_equal(black[mask], keep[mask])
    np.testing.assert_allclose(dim[~mask], 0.2 * keep[~mask], atol=1e-7)
    # fit_on_mask=False fits on every patch: same as no mask for the foreground colours
    np.testing.assert_allclose(viz.pca_rgb(f, mask=mask, fit_on_mask=False)[mask], viz.pca_rgb(f)[mask], atol=1e-6)
    with pytest.raises(InputError, match="background must be one of"):
        viz.pca_rgb(f, mask=mask, background="white")
    with pytest.raises(InputError, match="patch grid is"):
        viz.pca_rgb(f, mask=np.ones((160, 192), bool))


def test_joint_basis_gives_matching_colours():
    A, B = low_rank_features(seed=4), low_rank_features(h=8, w=8, seed=5)
    (m1, m2), _ = viz.joint_pca_rgb([A, A])
    assert np.array_equal(m1, m2)
    (a1, b1), basis = viz.joint_pca_rgb([A, B])
    (a2, b2), _ = viz.joint_pca_rgb([A, B])
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert b1.shape == (8, 8, 3)
    np.testing.assert_allclose(viz.pca_rgb(B, basis=basis), b1, atol=0)
    # a [B, h, w, D] batch is a list of images
    (c1, c2), _ = viz.joint_pca_rgb(torch.from_numpy(np.stack([A, A])))
    assert np.array_equal(c1, m1)


def test_basis_round_trips_through_json():
    f = low_rank_features(seed=6)
    basis = viz.fit_pca(f)
    again = viz.PCABasis.from_dict(json.loads(json.dumps(basis.to_dict())))
    np.testing.assert_allclose(again.project(f), basis.project(f), atol=1e-6)
    np.testing.assert_allclose(again.rgb(f), basis.rgb(f), atol=1e-6)
    with pytest.raises(InputError, match="missing keys"):
        viz.PCABasis.from_dict({"mean": [0.0]})
    with pytest.raises(InputError, match="do not match this basis"):
        basis.project(np.zeros((2, 2, 7)))


def test_pca_input_errors():
    f = low_rank_features()
    with pytest.raises(InputError, match=r"feats.patches\[i\]"):
        viz.pca_rgb(np.stack([f, f]))
    with pytest.raises(InputError, match="2 masks for 1 images"):
        viz.fit_pca(f, masks=[None, None])
    with pytest.raises(InputError, match="foreground patches"):
        viz.fit_pca(f, masks=[np.zeros(f.shape[:2], bool)])
    with pytest.raises(InputError, match="NaN"):
        viz.fit_pca(np.full((2, 2, 4), np.nan))


def test_missing_ml_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)
    with pytest.raises(ImportError, match=r'pip install "dinoapp\[ml\]"'):
        viz.fit_pca(low_rank_features())


# ------------------------------------------------------------------------------------ similarity


def test_similarity_matches_reference_and_is_scale_invariant():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(6, 7, 16)).astype(np.float32)
    sim = viz.similarity_map(f, (2, 3))
    unit = f / np.linalg.norm(f, axis=-1, keepdims=True)
    assert sim.shape == (6, 7) and sim.dtype == np.float32
    np.testing.assert_allclose(sim, unit @ unit[2, 3], atol=1e-5)
    assert sim[2, 3] == 1.0 and sim.max() <= 1.0 and sim.min() >= -1.0
    np.testing.assert_allclose(viz.similarity_map(f * 7.3, (2, 3)), sim, atol=1e-6)
    per_patch = rng.uniform(0.1, 10.0, size=(6, 7, 1)).astype(np.float32)
    np.testing.assert_allclose(viz.similarity_map(f * per_patch, (2, 3)), sim, atol=1e-6)
    np.testing.assert_allclose(viz.similarity_map(f, torch.from_numpy(f[2, 3] * 3)), sim, atol=1e-6)
    wide = rng.normal(size=(4, 5, 384)).astype(np.float32) * 37.1
    assert all(viz.similarity_map(wide, (r, c))[r, c] == 1.0 for r in range(4) for c in range(5))


def test_cross_image_similarity():
    rng = np.random.default_rng(8)
    f, g = rng.normal(size=(6, 7, 16)), rng.normal(size=(4, 9, 16))
    g[3, 5] = 2 * f[1, 1]
    sim = viz.similarity_map(f, (1, 1), other=g)
    assert sim.shape == (4, 9)
    assert viz.top_k_patches(sim, 1) == [(3, 5, pytest.approx(1.0, abs=1e-6))]
    with pytest.raises(InputError, match="outside the 6x7 patch grid"):
        viz.similarity_map(f, (6, 0))
    with pytest.raises(InputError, match=r"feature vector \[16\]"):
        viz.similarity_map(f, np.zeros(15))


def test_top_k_patches():
    m = np.array([[0.1, 0.9, 0.3], [0.9, -1.0, 0.5]])
    assert viz.top_k_patches(m, 3) == [(0, 1, 0.9), (1, 0, 0.9), (1, 2, 0.5)]
    assert len(viz.top_k_patches(m, 100)) == 6
    with pytest.raises(InputError, match="positive integer"):
        viz.top_k_patches(m, 0)


def test_pixel_to_patch_on_a_resized_image():
    shape, grid = (750, 1000), (24, 32)  # 1000 wide x 750 tall -> 32 x 24 patches of 31.25 px
    assert viz.pixel_to_patch((0, 0), shape, grid) == (0, 0)
    assert viz.pixel_to_patch((749, 999), shape, grid) == (23, 31)
    assert viz.pixel_to_patch((30, 500), shape, grid) == (0, 16)  # pixel 30 lies in [0, 31.25)
    assert viz.pixel_to_patch((31, 500), shape, grid) == (1, 16)  # centre 31.5 is past 31.25
    assert viz.pixel_to_patch((375.2, 62.4), shape, grid) == (12, 2)
    assert viz.pixel_to_patch((999, 0), shape, grid, xy=True) == (0, 31)  # (x, y) from a GUI click
    for bad in [(750, 10), (10, 1000), (-1, 0)]:
        with pytest.raises(InputError, match="outside the 750x1000 image"):
            viz.pixel_to_patch(bad, shape, grid)
    with pytest.raises(InputError, match=r"x=1000, y=5"):
        viz.pixel_to_patch((1000, 5), shape, grid, xy=True)


# --------------------------------------------------------------------------------------- matches


def shifted_pair(h=10, w=12, D=32, shift=2, noise=0.05, seed=9):
    """Image B is image A moved right by ``shift`` patches (new random patches enter on the left)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(h, w, D)).astype(np.float32)
    b = rng.normal(size=(h, w, D)).astype(np.float32)
    b[:, shift:] = a[:, :-shift] + noise * rng.normal(size=(h, w - shift, D))
    return a, b


def test_dense_matches_recover_a_shift():
    a, b = shifted_pair()
    m = viz.dense_matches(a, b)
    assert m.dtype == np.float32 and m.shape[1] == 5
    good = (m[:, 2] == m[:, 0]) & (m[:, 3] == m[:, 1] + 2)
    assert good.sum() >= 0.9 * 10 * 10 and good.mean() >= 0.95  # 100 patches of A stay in view
    assert np.all(m[good, 4] > 0.9)
    # chunked computation gives the same matches
    chunked = viz.dense_matches(a, b, chunk=7)
    np.testing.assert_array_equal(chunked[:, :4], m[:, :4])
    np.testing.assert_allclose(chunked[:, 4], m[:, 4], atol=1e-6)


def test_dense_matches_masks_mutual_and_min_score():
    a, b = shifted_pair()
    mask_a = np.ones(a.shape[:2], bool)
    mask_a[:5] = False
    mask_b = np.ones(b.shape[:2], bool)
    mask_b[:, 8:] = False
    m = viz.dense_matches(a, b, mask_a=mask_a, mask_b=mask_b)
    assert len(m) and np.all(m[:, 0] >= 5) and np.all(m[:, 3] < 8)
    loose = viz.dense_matches(a, b, mutual=False)
    assert len(loose) == a.shape[0] * a.shape[1] > len(viz.dense_matches(a, b))
    strict = viz.dense_matches(a, b, mutual=False, min_score=0.9)
    assert np.all(strict[:, 4] >= 0.9) and len(strict) < len(loose)


# ----------------------------------------------------------------------------------------- parts


def test_kmeans_parts_recovers_clusters_across_images():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(10)
    centres = rng.normal(size=(3, 16)) * 5
    truth = [rng.integers(0, 3, size=(8, 9)), rng.integers(0, 3, size=(6, 6))]
    feats = [centres[t] + 0.3 * rng.normal(size=(*t.shape, 16)) for t in truth]
    masks = [np.ones(t.shape, bool) for t in truth]
    masks[1][0] = False
    labels = viz.kmeans_parts(feats, 3, masks=masks, seed=0)
    assert [lab.shape for lab in labels] == [(8, 9), (6, 6)] and labels[0].dtype == np.int32
    assert np.all(labels[1][0] == -1)
    fg = np.concatenate([labels[0].ravel(), labels[1][1:].ravel()])
    want = np.concatenate([truth[0].ravel(), truth[1][1:].ravel()])
    assert adjusted_rand_score(want, fg) > 0.95  # one clustering: same label = same part in both images
    assert viz.kmeans_parts(feats, 3, masks=masks, seed=0)[0].tolist() == labels[0].tolist()
    with pytest.raises(InputError, match="at least 99"):
        viz.kmeans_parts(feats[0][:1, :1], 99)


# -------------------------------------------------------------------------------------- pictures


def test_upsample_nearest_and_bilinear():
    m = np.array([[1, 2], [3, 4]], dtype=np.int32)
    up = viz.upsample(m, (32, 32), mode="nearest")
    assert up.shape == (32, 32) and up.dtype == np.int32
    for r in range(2):
        for c in range(2):
            assert np.all(up[16 * r : 16 * r + 16, 16 * c : 16 * c + 16] == m[r, c])
    bil = viz.upsample(m, (32, 32))
    assert bil.dtype == np.float32
    assert np.all(bil[:8, :8] == 1) and np.all(bil[24:, 24:] == 4)  # constant beyond the outer patch centres
    np.testing.assert_allclose(bil[15:17, 15:17].mean(), 2.5, atol=1e-6)
    rgb = viz.upsample(np.random.default_rng(0).random((3, 4, 3)), (30, 40))
    assert rgb.shape == (30, 40, 3)
    with pytest.raises(InputError, match="mode must be"):
        viz.upsample(m, (4, 4), mode="cubic")


def test_colorize_shape_and_clipping():
    v = np.linspace(-1, 2, 12, dtype=np.float32).reshape(3, 4)
    c = viz.colorize(v, vmin=0, vmax=1)
    assert c.shape == (3, 4, 3) and c.dtype == np.uint8
    lo, hi = viz.colorize(np.array([[0.0, 1.0]]), vmin=0, vmax=1)[0]
    assert np.all(c[v <= 0] == lo) and np.all(c[v >= 1] == hi) and not np.array_equal(lo, hi)
    assert np.array_equal(viz.colorize(v)[0, 0], lo)  # default range: min -> first colour
    with pytest.raises(InputError, match="unknown colour map"):
        viz.colorize(v, cmap="no-such-map")


def test_overlay_shapes_and_alpha():
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    heat = rng.random((5, 7))
    out = viz.overlay(img, heat, alpha=0.5)
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert np.array_equal(viz.overlay(img, heat, alpha=0.0), img)
    assert not np.array_equal(out, img)
    # [C, H, W] float from the domain readers, grey included
    chw = img.transpose(2, 0, 1).astype(np.float32) / 255
    assert np.array_equal(viz.overlay(chw, heat, alpha=0.0), img)
    grey = viz.overlay(chw[:1], heat, alpha=0.0)
    assert grey.shape == (40, 56, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    # colours [h, w, 3] at alpha 1 are the upsampled colours
    rgb = rng.random((5, 7, 3)).astype(np.float32)
    full = viz.overlay(img, rgb, alpha=1.0, mode="nearest")
    np.testing.assert_array_equal(full, np.round(viz.upsample(rgb, (40, 56), mode="nearest") * 255))
    with pytest.raises(InputError, match="pick three bands"):
        viz.overlay(np.zeros((6, 40, 56), np.float32), heat)


def test_mark_patch_draws_on_the_patch_border():
    img = np.zeros((750, 1000, 3), np.uint8)
    out = viz.mark_patch(img, (1, 2), (24, 32), color=(0, 255, 0), width=2)
    assert out.shape == img.shape and out.dtype == np.uint8 and img.sum() == 0  # a copy
    y0, y1, x0, x1 = 31, 62, 62, 94  # round(31.25), round(62.5) (banker's), round(62.5), round(93.75)
    box = out[y0:y1, x0:x1, 1]
    assert np.all(box[:2] == 255) and np.all(box[-2:] == 255) and np.all(box[:, :2] == 255)
    assert np.all(box[2:-2, 2:-2] == 0)
    assert out[:, :, 1].sum() == box.sum() and out[..., 0].sum() == 0
    with pytest.raises(InputError, match="outside the 24x32 patch grid"):
        viz.mark_patch(img, (24, 0), (24, 32))


def test_label_colours():
    cols = viz.label_colors(12)
    assert cols.shape == (12, 3) and cols.dtype == np.uint8
    assert len({tuple(c) for c in cols}) == 12
    lab = np.array([[0, 1], [-1, 11]])
    rgb = viz.labels_to_rgb(lab)
    assert rgb.shape == (2, 2, 3) and np.all(rgb[1, 0] == 0)
    assert np.array_equal(rgb[0, 0], cols[0]) and np.array_equal(rgb[1, 1], cols[11])
    with pytest.raises(InputError, match="n >= 12"):
        viz.labels_to_rgb(lab, colors=cols[:3])


# ------------------------------------------------------------------------------------ end to end


def test_tiny_backbone_pca_map_separates_two_halves():
    bb = dinoapp.load_backbone("vit_tiny", depth=2, seed=0)
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :64] = (220, 40, 30)
    img[:, 64:] = (30, 60, 210)
    feats = dinoapp.extract(bb, img, size=(64, 128))
    rgb = viz.pca_rgb(feats.patches)  # [1, h, w, D] batch of one
    assert rgb.shape == (4, 8, 3)
    left, right = rgb[:, :4].reshape(-1, 3), rgb[:, 4:].reshape(-1, 3)
    between = np.linalg.norm(left.mean(0) - right.mean(0))
    within = max(
        np.linalg.norm(left - left.mean(0), axis=1).mean(), np.linalg.norm(right - right.mean(0), axis=1).mean()
    )
    assert between > 2 * within
    sim = viz.similarity_map(feats.patches[0], (1, 1))
    assert sim[:, :4].mean() > sim[:, 4:].mean()
    pic = viz.overlay(img, rgb, alpha=0.6)
    assert pic.shape == (64, 128, 3)
