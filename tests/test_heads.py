"""Heads on frozen features: naive references, learning on toy data, save/load round trips, typed errors.

The segmentation data are synthetic: a yellow disc (class 1) and a cyan square (class 2) on a dark
random texture (class 0), 128 px, seen through the tiny random ViT. Its features are close to a
normalised random projection of each 16x16 patch's pixels: local colour, so a linear head can
learn the shapes but only at patch resolution (boundary patches are mixed).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import average_precision_score

import dinoapp
from dinoapp.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    InputError,
    SourceNotFoundError,
    UnsupportedFormatError,
)
from dinoapp.heads import (
    ForegroundClassifier,
    HeadBackboneMismatchError,
    KNNClassifier,
    LinearSegHead,
    LogisticClassifier,
    SegHead,
    evenly_spaced_layers,
    fit_foreground,
    fit_seg_head,
    image_embedding,
    load_head,
    patch_fractions,
    patch_targets,
    predict_foreground,
    save_head,
    upsample_logits,
)
from dinoapp.metrics import mean_iou

SIZE = 128
GRID = SIZE // 16
COLORS = {1: (0.95, 0.85, 0.2), 2: (0.2, 0.8, 0.95)}


def make_shapes(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n images [n, 3, 128, 128] in [0, 1] and masks [n, 128, 128]: 0 texture, 1 disc, 2 square."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 3, SIZE, SIZE), np.float32)
    masks = np.zeros((n, SIZE, SIZE), np.int64)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        coarse = np.kron(rng.normal(0, 0.06, (3, SIZE // 8, SIZE // 8)), np.ones((8, 8)))
        img = rng.uniform(0.05, 0.35, 3)[:, None, None] + coarse + rng.normal(0, 0.08, (3, SIZE, SIZE))
        for cls in (1, 2):
            r = rng.uniform(16, 28)
            cy, cx = rng.uniform(r, SIZE - r, 2)
            if cls == 1:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                region = (abs(yy - cy) <= 0.85 * r) & (abs(xx - cx) <= 0.85 * r)
            col = np.array(COLORS[cls]) + rng.normal(0, 0.05, 3)
            img[:, region] = col[:, None] + rng.normal(0, 0.05, (3, int(region.sum())))
            masks[i][region] = cls
        imgs[i] = np.clip(img, 0, 1)
    return torch.from_numpy(imgs), masks


def scribbles(masks: np.ndarray, seed: int, length: int = 20) -> np.ndarray:
    """One short 3-px-wide horizontal stroke per class per image, well inside the region; the rest 255."""
    rng = np.random.default_rng(seed)
    out = np.full_like(masks, 255)
    for i, m in enumerate(masks):
        for c in np.unique(m):
            dist = ndimage.distance_transform_edt(m == c)
            inside = dist >= min(4, dist.max())  # a shape mostly hidden by the other: its widest part
            ys, xs = np.nonzero(inside)
            j = rng.integers(len(ys))
            band = np.zeros_like(inside)
            band[ys[j] - 1 : ys[j] + 2, max(0, xs[j] - length // 2) : xs[j] + length // 2] = True
            out[i][band & inside] = c
    return out


@pytest.fixture(scope="module")
def bb():
    return dinoapp.load_backbone("vit_tiny", depth=2, seed=0)


@pytest.fixture(scope="module")
def shapes(bb):
    x_tr, m_tr = make_shapes(16, seed=0)
    x_te, m_te = make_shapes(8, seed=1)
    f_tr = dinoapp.extract(bb, x_tr, size=SIZE, layers=[0, 1])
    f_te = dinoapp.extract(bb, x_te, size=SIZE, layers=[0, 1])
    return {"x_tr": x_tr, "m_tr": m_tr, "x_te": x_te, "m_te": m_te, "f_tr": f_tr, "f_te": f_te}


@pytest.fixture(scope="module")
def seg_head(bb, shapes) -> SegHead:
    return fit_seg_head(shapes["f_tr"], shapes["m_tr"], 3, class_names=["background", "disc", "square"],
                        backbone=bb, size=SIZE, seed=0)  # fmt: skip


def held_out_miou(head: SegHead, shapes) -> float:
    pred = head.predict(shapes["f_te"], (SIZE, SIZE))
    return mean_iou(shapes["m_te"], pred.numpy(), 3)


# ---------------------------------------------------------------------------------------- embeddings


def test_image_embedding_modes(bb):
    f = dinoapp.extract(bb, torch.rand(2, 3, 32, 48), size=(32, 48))
    assert torch.equal(image_embedding(f), f.cls)
    e = image_embedding(f, "cls+mean")
    assert e.shape == (2, 2 * bb.embed_dim)
    torch.testing.assert_close(e[:, bb.embed_dim :], f.patches.mean(dim=(1, 2)))
    with pytest.raises(ConfigError):
        image_embedding(f, "mean")


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(24) == [4, 11, 17, 23]  # ViT-L, spec section 5
    assert evenly_spaced_layers(12) == [2, 5, 8, 11]
    assert evenly_spaced_layers(40) == [9, 19, 29, 39]
    assert evenly_spaced_layers(2) == [0, 1]


# ---------------------------------------------------------------------------------------- k-NN


def naive_knn_proba(train, labels, test, k, T, n_classes):
    """The weighted vote written as loops, float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(test), n_classes))
    for i, q in enumerate(test):
        q = q / np.linalg.norm(q)
        sims = [(float(q @ t), j) for j, t in enumerate(train)]
        sims.sort(key=lambda s: -s[0])
        for s, j in sims[:k]:
            out[i, labels[j]] += np.exp(s / T)
        out[i] /= out[i].sum()
    return out


def test_knn_matches_naive_weighted_vote():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    test = rng.normal(size=(40, 16)).astype(np.float32)
    want = naive_knn_proba(train, labels, test, k=20, T=0.07, n_classes=5)
    for max_elements in (1 << 24, 1000):  # one chunk, then 3 queries per chunk
        knn = KNNClassifier(k=20, temperature=0.07, max_elements=max_elements).fit(train, labels)
        np.testing.assert_allclose(knn.predict_proba(test), want, atol=1e-5)
        np.testing.assert_array_equal(knn.predict(test), want.argmax(1))


def test_knn_small_temperature_and_k_larger_than_bank():
    rng = np.random.default_rng(1)
    train, labels = rng.normal(size=(8, 4)), np.array(list("aabbbccc"))
    knn = KNNClassifier(k=50, temperature=0.005).fit(train, labels)  # exp(1/0.005) overflows float32 unshifted
    p = knn.predict_proba(train)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    np.testing.assert_array_equal(knn.predict(train), labels)  # each point is its own nearest neighbour


def test_knn_and_logistic_learn_digits():
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[:1200], idx[1200:]
    knn = KNNClassifier(k=10).fit(X[tr], y[tr])
    assert np.mean(knn.predict(X[te]) == y[te]) > 0.9
    logi = LogisticClassifier(cv=3).fit(X[tr], y[tr])
    assert np.mean(logi.predict(X[te]) == y[te]) > 0.9
    assert logi.C_ in logi.Cs and set(logi.cv_scores_) == set(logi.Cs)
    # our probabilities (from the stored arrays) are scikit-learn's
    np.testing.assert_allclose(logi.predict_proba(X[te]), logi.model_.predict_proba((X[te] - logi.mean_) / logi.scale_),
                               atol=1e-10)  # fmt: skip


def test_logistic_binary_string_labels_and_tiny_classes():
    X, y = make_blobs(n_samples=80, centers=2, n_features=6, random_state=0)
    names = np.array(["sea", "land"])[y]
    logi = LogisticClassifier().fit(X[:60], names[:60])
    assert np.mean(logi.predict(X[60:]) == names[60:]) > 0.9
    p = logi.predict_proba(X[60:])
    np.testing.assert_allclose(p, logi.model_.predict_proba((X[60:] - logi.mean_) / logi.scale_), atol=1e-10)
    # a class with 2 samples (fewer than the 3 folds) and one with a single sample still fit
    Xs, ys = make_blobs(n_samples=[20, 2, 1], n_features=4, cluster_std=0.5, random_state=1)
    small = LogisticClassifier(cv=3).fit(Xs, ys)
    assert list(small.classes_) == [0, 1, 2] and small.C_ in small.Cs
    assert np.mean(small.predict(Xs) == ys) > 0.9
    with pytest.raises(InputError, match="at least 2 classes"):
        LogisticClassifier().fit(Xs, np.zeros(len(Xs)))


# ---------------------------------------------------------------------------------------- patch targets


def naive_targets(mask: np.ndarray, K: int, p: int = 16):
    h, w = mask.shape[0] // p, mask.shape[1] // p
    t, wt = np.zeros((h, w, K)), np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            block = mask[r * p : (r + 1) * p, c * p : (c + 1) * p]
            lab = block != 255
            wt[r, c] = lab.mean()
            for k in range(K):
                if lab.any():
                    t[r, c, k] = (block == k).sum() / lab.sum()
    return t, wt


def test_patch_targets_dense_scribble_and_ignore_match_naive_loop():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, (2, 64, 48))
    t, w = patch_targets(dense, (4, 3), 4)
    assert t.shape == (2, 4, 3, 4) and w.shape == (2, 4, 3)
    assert torch.all(w == 1) and torch.allclose(t.sum(-1), torch.ones(2, 4, 3))
    sparse = np.full((2, 64, 48), 255)
    sparse[0, 3:6, 2:30] = 1  # a stroke across two patches
    sparse[1, 40:44, 20:24] = 3
    sparse[1, 18, 18] = 0  # a single labelled pixel
    mixed = np.where(rng.random((2, 64, 48)) < 0.3, 255, dense)
    for masks in (dense, sparse, mixed):
        t, w = patch_targets(torch.from_numpy(masks), (4, 3), 4)
        for b in range(2):
            nt, nw = naive_targets(masks[b], 4)
            np.testing.assert_allclose(t[b].numpy(), nt, atol=1e-6)
            np.testing.assert_allclose(w[b].numpy(), nw, atol=1e-6)
    t, w = patch_targets(sparse[0], (4, 3), 4)  # one [H, W] mask -> [h, w, K], [h, w]
    assert t.shape == (4, 3, 4) and w[0, 0] == pytest.approx(3 * 14 / 256)


def test_patch_targets_resize_and_pad_masks_of_another_size():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, (100, 90))
    mask[rng.random(mask.shape) < 0.2] = 255
    t, w = patch_targets(mask[None], (6, 5), 3)  # resized (nearest) to 96 x 80 like the image
    ref = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(96, 80), mode="nearest-exact")[0, 0]
    nt, nw = naive_targets(ref.long().numpy(), 3)
    np.testing.assert_allclose(t[0].numpy(), nt, atol=1e-6)
    np.testing.assert_allclose(w[0].numpy(), nw, atol=1e-6)
    small = mask[:80, :70]
    t, w = patch_targets([small], (6, 5), 3, policy="pad")  # padded with 255 like policy="pad" images
    padded = np.full((96, 80), 255)
    padded[:80, :70] = small
    nt, nw = naive_targets(padded, 3)
    np.testing.assert_allclose(t[0].numpy(), nt, atol=1e-6)
    np.testing.assert_allclose(w[0].numpy(), nw, atol=1e-6)
    assert float(w[0, -1].max()) == 0.0  # the last patch row is all padding


def test_patch_targets_bad_labels():
    with pytest.raises(InputError, match="outside \\[0, 3\\)"):
        patch_targets(np.full((32, 32), 7), (2, 2), 3)
    with pytest.raises(InputError, match="does not fit"):
        patch_targets(np.zeros((40, 32), int), (2, 2), 3, policy="pad")


# ---------------------------------------------------------------------------------------- segmentation


def test_linear_seg_head_layouts_and_upsampling():
    torch.manual_seed(0)
    head = LinearSegHead(12, 3).eval()
    x = torch.randn(2, 4, 5, 12)
    out = head(x)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(head(x.permute(0, 3, 1, 2)), out)
    logits, classes = head.predict(x, (50, 70))
    assert logits.shape == (2, 3, 50, 70) and classes.shape == (2, 50, 70)
    torch.testing.assert_close(classes, logits.argmax(1))
    # policy "pad": the grid covers a padded canvas, so upsample to it and crop, never stretch
    full = upsample_logits(out, None, policy="pad")
    torch.testing.assert_close(upsample_logits(out, (50, 70), policy="pad"), full[..., :50, :70])
    with pytest.raises(InputError, match="channels"):
        head(torch.randn(1, 4, 5, 7))


def test_seg_head_learns_shapes(seg_head, shapes):
    miou = held_out_miou(seg_head, shapes)
    assert miou > 0.65, miou
    assert seg_head.history["loss"][-1] < 0.6 * seg_head.history["loss"][0]
    assert seg_head.preprocessing == {"size": SIZE, "policy": "resize", "patch_size": 16}
    assert seg_head.class_names == ["background", "disc", "square"] and seg_head.layers is None
    # shuffled labels (masks of other images) must do much worse: the pipeline, not chance, did it
    perm = np.random.default_rng(0).permutation(16)
    while np.any(perm == np.arange(16)):
        perm = np.random.default_rng(int(perm[0]) + 1).permutation(16)
    shuffled = fit_seg_head(shapes["f_tr"], shapes["m_tr"][perm], 3, seed=0)
    assert held_out_miou(shuffled, shapes) < miou - 0.25


def test_seg_head_from_scribbles(shapes):
    scr = scribbles(shapes["m_tr"], seed=0)
    assert (scr != 255).mean() < 0.01  # under 1% of pixels labelled
    head = fit_seg_head(shapes["f_tr"], scr, 3, seed=0)
    assert held_out_miou(head, shapes) > 0.55  # chance (uniform random classes) is ~0.2


def test_seg_head_on_several_layers_and_per_layer_lists(shapes):
    f = shapes["f_tr"]
    head = fit_seg_head(f, shapes["m_tr"], 3, layers=[0, 1], epochs=30, seed=0)
    assert head.module.in_channels == 2 * f.patches.shape[-1] and head.layers == [0, 1]
    pred = head.predict(shapes["f_te"], (SIZE, SIZE))
    assert pred.shape == (8, SIZE, SIZE) and pred.dtype == torch.int64
    as_list = fit_seg_head([f.layers[0], f.layers[1]], shapes["m_tr"], 3, layers=[0, 1], epochs=30, seed=0)
    torch.testing.assert_close(as_list.module.conv.weight, head.module.conv.weight)  # same data, same seed
    single = head.predict_proba([shapes["f_te"].layers[0][0], shapes["f_te"].layers[1][0]])  # one image
    assert single.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(single.sum(0), torch.ones(SIZE, SIZE))
    with pytest.raises(InputError, match="missing \\[1\\]"):
        head.predict(shapes["f_te"].__class__(f.cls, f.registers, f.patches, {0: f.layers[0], 5: f.layers[1]}))


def test_fit_seg_head_rejects_unlabelled_and_mismatched_inputs(shapes):
    f = shapes["f_tr"]
    with pytest.raises(InputError, match="no labelled pixels"):
        fit_seg_head(f, np.full((16, SIZE, SIZE), 255), 3, epochs=1)
    with pytest.raises(InputError, match="masks for"):
        fit_seg_head(f, shapes["m_tr"][:4], 3, epochs=1)


# ---------------------------------------------------------------------------------------- foreground


def test_foreground_separates_shapes(shapes):
    fg = fit_foreground(shapes["f_tr"], shapes["m_tr"] > 0)
    scores, mask = predict_foreground(fg, shapes["f_te"])
    assert scores.shape == (8, GRID, GRID) and mask.dtype == bool
    frac = patch_fractions(shapes["m_te"] > 0, (GRID, GRID))
    clean = (frac < 0.01) | (frac > 0.99)
    assert average_precision_score(frac[clean] > 0.5, scores[clean]) > 0.8
    one, one_mask = fg.predict(shapes["f_te"].patches[0], threshold=0.3)  # one image -> [h, w]
    np.testing.assert_allclose(one, scores[0])
    np.testing.assert_array_equal(one_mask, scores[0] > 0.3)


def test_foreground_score_is_median_filtered(shapes):
    raw = ForegroundClassifier(median=1).fit(shapes["f_tr"], shapes["m_tr"] > 0)
    smooth = ForegroundClassifier(median=3).fit(shapes["f_tr"], shapes["m_tr"] > 0)
    want = ndimage.median_filter(raw.score_map(shapes["f_te"]), size=(1, 3, 3), mode="nearest")
    np.testing.assert_allclose(smooth.score_map(shapes["f_te"]), want)


def test_foreground_needs_both_kinds_of_patches(shapes):
    with pytest.raises(InputError, match="foreground"):
        fit_foreground(shapes["f_tr"], np.zeros((16, SIZE, SIZE), bool))


# ---------------------------------------------------------------------------------------- save / load


def test_seg_head_round_trip_identical_predictions(tmp_path, bb, seg_head, shapes):
    path = save_head(seg_head, tmp_path / "seg.safetensors", bb)
    assert sorted(os.listdir(tmp_path)) == ["seg.safetensors"]  # no temporary file left behind
    loaded = load_head(path, bb)
    assert isinstance(loaded, SegHead)
    assert loaded.class_names == seg_head.class_names and loaded.layers is None
    assert loaded.preprocessing == seg_head.preprocessing
    assert loaded.identity["fingerprint"] == dinoapp.identity.backbone_fingerprint(bb)
    torch.testing.assert_close(loaded.logits(shapes["f_te"]), seg_head.logits(shapes["f_te"]), rtol=0, atol=0)
    # end to end from images, features extracted as at training time
    torch.testing.assert_close(loaded.segment(bb, shapes["x_te"]), seg_head.predict(shapes["f_te"], (SIZE, SIZE)))


def test_classifier_heads_round_trip(tmp_path, bb, shapes):
    X, y = make_blobs(n_samples=120, centers=3, n_features=8, random_state=0)
    labels = np.array(["urban", "forest", "water"])[y]
    fg = fit_foreground(shapes["f_tr"], shapes["m_tr"] > 0)
    heads = {
        "knn": KNNClassifier(k=5, embedding="cls+mean").fit(X, labels),
        "logistic": LogisticClassifier(Cs=[0.01, 1.0]).fit(X, labels),
        "foreground": fg,
    }
    for name, head in heads.items():
        head.preprocessing = {"size": [224, 224], "policy": "resize"}
        path = save_head(head, tmp_path / f"{name}.safetensors", bb)
        loaded = load_head(path, bb)
        assert type(loaded) is type(head)
        assert loaded.preprocessing["size"] == (224, 224)
        if name == "foreground":
            np.testing.assert_array_equal(loaded.score_map(shapes["f_te"]), head.score_map(shapes["f_te"]))
        else:
            np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
            np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
            assert list(loaded.classes_) == list(head.classes_)
    assert load_head(tmp_path / "knn.safetensors").embedding == "cls+mean"
    with open(tmp_path / "knn.safetensors", "rb") as f:
        assert b"pickle" not in f.read()


def test_load_with_another_backbone_is_refused(tmp_path, bb, seg_head, shapes):
    path = save_head(seg_head, tmp_path / "seg.safetensors", bb)
    other = dinoapp.load_backbone("vit_tiny", depth=2, seed=1)
    with pytest.raises(HeadBackboneMismatchError) as e:
        load_head(path, other)
    msg = str(e.value)
    fp_a, fp_b = dinoapp.identity.backbone_fingerprint(bb), dinoapp.identity.backbone_fingerprint(other)
    assert fp_a in msg and fp_b in msg and "vit_tiny" in msg and "retrain" in msg
    assert isinstance(e.value, CheckpointMismatchError) and isinstance(e.value, ValueError)
    assert e.value.expected["fingerprint"] == fp_a and e.value.got["fingerprint"] == fp_b
    with pytest.raises(HeadBackboneMismatchError):
        save_head(seg_head, tmp_path / "again.safetensors", other)  # the head knows its backbone
    with pytest.raises(HeadBackboneMismatchError):
        seg_head.segment(other, shapes["x_te"][:1])
    assert not (tmp_path / "again.safetensors").exists()


def test_corrupt_and_foreign_files_are_typed_errors(tmp_path, bb, seg_head):
    path = save_head(seg_head, tmp_path / "seg.safetensors", bb)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))  # damage tensor bytes only
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(500))
    for bad in (cut, flipped, junk):
        with pytest.raises(CheckpointCorruptError):
            load_head(bad)
    backbone_file = tmp_path / "bb.safetensors"
    dinoapp.save_backbone(bb, backbone_file)
    with pytest.raises(UnsupportedFormatError, match="load_backbone"):
        load_head(backbone_file)
    with pytest.raises(SourceNotFoundError):
        load_head(tmp_path / "missing.safetensors")
    # damaged metadata (valid safetensors, broken JSON)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "meta.safetensors"),
              metadata={"dinoapp_format": "dinoapp.head", "dinoapp": "{not json"})  # fmt: skip
    with pytest.raises(CheckpointCorruptError, match="metadata"):
        load_head(tmp_path / "meta.safetensors")


def test_save_needs_a_backbone_and_a_fitted_head(tmp_path):
    with pytest.raises(InputError, match="backbone"):
        save_head(KNNClassifier().fit(np.eye(3), [0, 1, 2]), tmp_path / "h.safetensors")
    bb = dinoapp.load_backbone("vit_tiny", depth=1, seed=0)
    with pytest.raises(InputError, match="not fitted"):
        save_head(KNNClassifier(), tmp_path / "h.safetensors", bb)
    assert os.listdir(tmp_path) == []


def test_metadata_records_identity_and_settings(tmp_path, bb, seg_head):
    from safetensors import safe_open

    path = save_head(seg_head, tmp_path / "seg.safetensors", bb)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dinoapp"])
    assert meta["kind"] == "seg" and meta["backbone"]["source"] == "vit_tiny"
    assert meta["backbone"]["fingerprint"] == dinoapp.identity.backbone_fingerprint(bb)
    assert meta["settings"]["class_names"] == ["background", "disc", "square"]
    assert meta["preprocessing"] == {"size": SIZE, "policy": "resize", "patch_size": 16}


def test_pad_policy_end_to_end(bb, shapes):
    """Images of 120 px padded to 128: masks are padded with ignore, predictions cropped (not stretched)."""
    x_tr, m_tr = shapes["x_tr"][:, :, :120, :120], shapes["m_tr"][:, :120, :120]
    x_te, m_te = shapes["x_te"][:, :, :120, :120], shapes["m_te"][:, :120, :120]
    f_tr = dinoapp.extract(bb, x_tr, size=SIZE, policy="pad")
    head = fit_seg_head(f_tr, m_tr, 3, size=SIZE, policy="pad", backbone=bb, seed=0)
    pred = head.segment(bb, x_te)
    assert pred.shape == (8, 120, 120)
    assert mean_iou(m_te, pred.numpy(), 3) > 0.65
    stretched = upsample_logits(head.logits(dinoapp.extract(bb, x_te, size=SIZE, policy="pad")), (120, 120))
    assert mean_iou(m_te, stretched.argmax(1).numpy(), 3) < mean_iou(m_te, pred.numpy(), 3)
