"""dinoapp.explore: reading for exploration, click similarity, scribble heads and exports, on a tiny ViT."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dinoapp
import domains
from dinoapp import explore, heads, viz
from dinoapp.errors import HeadBackboneMismatchError, InputError

RED, BLUE = (230, 25, 75), (0, 130, 200)


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skdata.astronaut()[:300]).save(path)  # 300 x 512: not square
    return path


def two_regions(h: int = 96, w: int = 128, split: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [h, w, 3]: left red, right blue, with noise; and the true labels (0 left, 1 right)."""
    g = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    img[:, :split] = RED
    img[:, split:] = BLUE
    img += g.normal(0, 12, img.shape)
    truth = np.zeros((h, w), np.uint8)
    truth[:, split:] = 1
    return img.clip(0, 255).astype(np.uint8), truth


def save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def geotiff(path: Path, C: int = 4, H: int = 200, W: int = 300, descriptions=("blue", "green", "red", "nir")) -> Path:
    from affine import Affine
    from geo_factory import make_geotiff, smooth_bands

    return make_geotiff(path, smooth_bands(C, H, W), descriptions=descriptions,
                        transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4_600_000.0))  # fmt: skip


def ct_small() -> str:
    pydicom_data = pytest.importorskip("pydicom.data")
    return pydicom_data.get_testdata_file("CT_small.dcm")  # an explicit bundled name, never a glob


# ------------------------------------------------------------------------------------------------ reading


def test_open_png_keeps_pixels_and_gives_only_the_file_name(astronaut_png):
    from PIL import Image

    li = explore.open_image(astronaut_png)
    assert (li.name, li.kind, li.geo, li.n_slices) == ("astronaut.png", "image", None, 1)
    assert li.array.shape == (3, 300, 512) and li.array.dtype == np.float32
    np.testing.assert_array_equal(li.rgb, np.asarray(Image.open(astronaut_png)))  # exact display round trip
    dump = json.dumps(li.meta)  # JSON-ready for the app
    assert str(astronaut_png.parent) not in dump and "path" not in li.meta


def test_open_geotiff_shows_red_green_blue_and_keeps_georeferencing(tmp_path):
    p = geotiff(tmp_path / "scene.tif")
    li = explore.open_image(p)
    assert li.kind == "geotiff" and li.meta["channels"] == ["red", "green", "blue"] and li.meta["bands"] == [3, 2, 1]
    np.testing.assert_array_equal(li.array, domains.load(p, bands=[3, 2, 1])[0])
    np.testing.assert_array_equal(li.rgb[..., 0], np.round(li.array[0] * 255).astype(np.uint8))  # R = band 3
    with __import__("rasterio").open(p) as src:
        assert li.geo["crs"] == src.crs and li.geo["transform"] == src.transform
    assert li.geo["shape"][-2:] == (200, 300) and li.geo["path"] == "scene.tif"
    json.dumps(li.meta)
    # explicit bands and a stretch; no band names: the first three bands, said in the notes
    assert explore.open_image(p, bands=[4, 3, 2], stretch="dtype").meta["bands"] == [4, 3, 2]
    q = explore.open_image(geotiff(tmp_path / "plain.tif", descriptions=None))
    assert q.meta["bands"] == [1, 2, 3] and "bands 1, 2, 3" in q.meta["notes"][0]


def test_dicom_meta_holds_no_patient_identifiers_and_windows_change_the_picture():
    import pydicom

    path = ct_small()
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName)  # the file does identify a (test) patient
    li = explore.open_image(path)
    assert li.kind == "dicom" and li.name == "CT_small.dcm" and li.array.shape == (1, 128, 128)
    dump = json.dumps(li.meta)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName", "path"):
        assert key not in dump
    for value in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID), str(Path(path).parent)):
        assert value not in dump
    lung = explore.open_image(path, dicom_window="lung")
    assert (lung.rgb != li.rgb).mean() > 0.5 and lung.meta["window"][0]["name"] == "lung"
    np.testing.assert_array_equal(explore.open_image(path, dicom_window="-600, 1500").array, lung.array)
    assert explore.open_image(path, dicom_window="rgb3").array.shape == (3, 128, 128)
    with pytest.raises(domains.WindowError):
        explore.open_image(path, dicom_window="40,wide")
    presets = explore.window_presets()
    assert {"lung", "bone", "soft_tissue", "rgb3"} <= set(presets) and "auto" not in presets


def test_no_identifier_of_a_fully_identified_ct_slice_reaches_meta(tmp_path):
    pytest.importorskip("pydicom")
    from dicom_factory import PHI_VALUES, PRIVATE_VALUE, make_ct_slice

    li = explore.open_image(make_ct_slice(tmp_path / "s.dcm", phi=True))
    dump = json.dumps(li.meta)
    for value in [*PHI_VALUES.values(), PRIVATE_VALUE, str(tmp_path)]:
        assert value not in dump
    assert li.meta["dicom"]["Modality"] == "CT"  # technical attributes are kept


def test_multiframe_dicom_slices_are_read_once(monkeypatch):
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("rtdose.dcm")  # bundled multi-frame RT dose (explicit name)
    explore._VOLUMES.clear()
    mid = explore.open_image(path)
    assert mid.n_slices > 1 and mid.slice_index == mid.n_slices // 2
    frames, _ = domains.read_dicom_frames(path)
    np.testing.assert_array_equal(mid.array, frames[mid.n_slices // 2])

    def no_read(*a, **k):
        raise AssertionError("the volume was read again")

    monkeypatch.setattr(domains, "read_dicom_frames", no_read)
    first = explore.open_image(path, slice_index=0)  # from the cache
    np.testing.assert_array_equal(first.array, frames[0])
    with pytest.raises(InputError, match=f"has {mid.n_slices} slices"):
        explore.open_image(path, slice_index=mid.n_slices)
    monkeypatch.setattr(explore._VOLUMES, "max_bytes", 1000)  # too large to hold decoded: one frame at a time
    one = explore.open_image(path, slice_index=3, dicom_window="80,200")
    assert (one.n_slices, one.slice_index) == (mid.n_slices, 3)
    np.testing.assert_array_equal(one.array, domains.read_dicom(path, frame=3, window=(80, 200))[0])


def test_dicom_series_folder_or_files_give_a_slice_slider(tmp_path):
    pytest.importorskip("pydicom")
    from dicom_factory import make_series

    folder = tmp_path / "study"
    paths, vol, _ = make_series(folder, n=6, rows=32, cols=40)
    explore._VOLUMES.clear()
    li = explore.open_image(folder, slice_index=2)
    assert (li.n_slices, li.slice_index, li.array.shape) == (6, 2, (1, 32, 40))
    ref, _ = domains.read_series(folder, window="auto")
    np.testing.assert_array_equal(li.array[0], ref[2])  # sorted along the slice normal, not by file name
    assert li.name.startswith("study (series ") and str(tmp_path) not in json.dumps(li.meta)
    same = explore.open_image(paths[::-1], slice_index=2)  # a list of files: the same series
    np.testing.assert_array_equal(same.array, li.array)
    # the metadata of slice 2 gives its own position, not attributes of the file the series was described from
    assert li.meta["slice_position"] == li.meta["slice_positions"][2] != li.meta["slice_positions"][0]
    assert not {"InstanceNumber", "ImagePositionPatient", "SliceLocation"} & set(li.meta["dicom"])


def test_damaged_files_raise_the_typed_errors(tmp_path, astronaut_png):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all" * 10)
    cut = tmp_path / "cut.png"
    cut.write_bytes(astronaut_png.read_bytes()[:2000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut_dcm = tmp_path / "cut.dcm"
    cut_dcm.write_bytes(Path(ct_small()).read_bytes()[:1500])
    for p in (junk, cut, empty, cut_dcm):
        with pytest.raises(domains.DomainError) as err:
            explore.open_image(p)
        assert isinstance(err.value, (OSError, ValueError)) and p.name in str(err.value)
    assert isinstance(pytest.raises(domains.DomainError, explore.open_image, cut).value, OSError)
    with pytest.raises(domains.MissingFileError):
        explore.open_image(tmp_path / "missing.png")


def test_dicom_without_a_decoder_or_pixels_raises_the_typed_errors():
    pydicom_data = pytest.importorskip("pydicom.data")
    with pytest.raises(domains.NoPixelDataError, match="no image"):
        explore.open_image(pydicom_data.get_testdata_file("test-SR.dcm"))  # a structured report
    with pytest.raises(domains.UnreadableFileError, match="MR_truncated.dcm"):
        explore.open_image(pydicom_data.get_testdata_file("MR_truncated.dcm"))
    try:  # 12-bit JPEG Extended: only a GPL decoder reads it, which dinoapp does not install
        explore.open_image(pydicom_data.get_testdata_file("JPGExtended.dcm"))
    except domains.MissingCodecError as err:
        assert isinstance(err, ValueError) and "JPEG Extended" in str(err) and err.codec
    else:
        pytest.skip("a JPEG Extended decoder is installed here")


def test_huge_images_are_refused_before_reading(tmp_path, astronaut_png, monkeypatch):
    with pytest.raises(InputError, match=r"512 x 300 pixels .*limit of 1000 pixels \(max_pixels\)"):
        explore.open_image(astronaut_png, max_pixels=1000)
    assert explore.open_image(astronaut_png, max_pixels=None).array.shape == (3, 300, 512)

    def no_read(*a, **k):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(domains, "load", no_read)
    with pytest.raises(InputError, match="gdal_translate"):
        explore.open_image(geotiff(tmp_path / "big.tif"), max_pixels=10_000)
    with pytest.raises(InputError, match="128 x 128"):
        explore.open_image(ct_small(), max_pixels=10_000)


# ------------------------------------------------------------------------------------- features and clicks


def test_similarity_peaks_at_the_clicked_patch(bb, astronaut_png):
    v = explore.FeatureView(bb, explore.open_image(astronaut_png), resolution=224)
    assert v.grid == (8, 14) and v.patches.shape == (8, 14, bb.embed_dim)
    for x, y in ((0, 0), (511, 299), (100.5, 37.2), (300, 200)):
        res = v.similarity(x, y, k=4)
        r, c = res.patch
        assert res.scores.shape == v.grid and res.scores[r, c] == 1.0
        assert np.unravel_index(res.scores.argmax(), v.grid) == (r, c)
        assert res.top_k[0] == (r, c, 1.0) and len(res.top_k) == 4
        assert [t[2] for t in res.top_k] == sorted((t[2] for t in res.top_k), reverse=True)
        assert res.overlay.shape == (300, 512, 3) and res.overlay.dtype == np.uint8
    assert not np.array_equal(res.overlay, v.image.rgb)


def test_clicks_map_to_patches_on_non_square_images_at_another_resolution(bb, astronaut_png):
    li = explore.open_image(astronaut_png)  # H 300, W 512
    v = explore.FeatureView(bb, li, resolution=160)  # 160 x 96 input: grid 6 x 10, patches ~50 x 51 px
    (h, w), (H, W) = v.grid, li.size
    assert (h, w) == (6, 10)
    for r in range(h):
        for c in range(w):
            x, y = (c + 0.5) * W / w, (r + 0.5) * H / h  # the centre of patch (r, c) in the image
            assert v.similarity(x, y, k=1).patch == (r, c)
    assert v.similarity(W - 1, 0).patch == (0, w - 1)  # x is the column, y the row (not swapped)
    assert v.similarity(0, H - 1).patch == (h - 1, 0)
    with pytest.raises(InputError, match="outside"):
        v.similarity(10, 400)  # y beyond the 300 rows


def test_similarity_at_a_grid_position_matches_the_click_on_that_patch(bb, astronaut_png):
    li = explore.open_image(astronaut_png)
    v = explore.FeatureView(bb, li, resolution=160)  # grid 6 x 10
    (h, w), (H, W) = v.grid, li.size
    for r, c in ((0, 0), (5, 9), (2, 7)):
        at = v.similarity_at(r, c, k=3)
        click = v.similarity((c + 0.5) * W / w, (r + 0.5) * H / h, k=3)
        assert at.patch == (r, c) and at.top_k[0] == (r, c, 1.0)
        np.testing.assert_array_equal(at.scores, click.scores)
        np.testing.assert_array_equal(at.overlay, click.overlay)
        # the naive reference: cosine of patch (r, c) with every patch
        f = v.patches.double().numpy()
        q = f[r, c]
        ref = (f @ q) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(q))
        np.testing.assert_allclose(at.scores, ref, atol=1e-5)
    assert v.similarity_at(-1, -1).patch == (h - 1, w - 1)
    for bad in ((h, 0), (0, -w - 1), (1.5, 2), (True, 0)):
        with pytest.raises(InputError, match="patch index"):
            v.similarity_at(*bad)


def test_a_click_costs_no_forward_pass(bb, astronaut_png, monkeypatch):
    v = explore.FeatureView(bb, explore.open_image(astronaut_png), resolution=128)
    other = explore.FeatureView(bb, explore.open_image(astronaut_png), resolution=192)

    def boom(*a, **k):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(explore, "dense_features", boom)
    monkeypatch.setattr(bb, "forward", boom)
    monkeypatch.setattr(bb, "get_intermediate_layers", boom)
    v.similarity(50, 50)
    cross = v.similarity(50, 50, other=other, k=3)
    assert cross.scores.shape == other.grid and cross.overlay.shape == (300, 512, 3)
    assert [t[:2] for t in cross.top_k] == [t[:2] for t in viz.top_k_patches(cross.scores, 3)]
    v.pca()


def test_views_of_other_backbones_or_layers_are_not_compared(bb, astronaut_png):
    li = explore.open_image(astronaut_png)
    v = explore.FeatureView(bb, li, resolution=128)
    other_bb = dinoapp.load_backbone("vit_tiny", depth=2, seed=1)  # same width, other weights
    with pytest.raises(InputError, match="another backbone"):
        v.similarity(10, 10, other=explore.FeatureView(other_bb, li, resolution=128))
    first = explore.FeatureView(bb, li, resolution=128, layer=0)
    assert first.block == 0 and not torch.allclose(first.patches, v.patches)
    with pytest.raises(InputError, match="block"):
        v.similarity(10, 10, other=first)
    assert explore.FeatureView(bb, li, resolution=128, layer=-1).block == bb.n_blocks - 1


def test_feature_cache_is_used(bb, astronaut_png):
    cache = dinoapp.FeatureCache()
    li = explore.open_image(astronaut_png)
    a = explore.FeatureView(bb, li, resolution=128, cache=cache)
    b = explore.FeatureView(bb, li, resolution=128, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1) and b.patches is a.patches


def test_pca_maps_and_joint_pca_share_one_basis(bb, astronaut_png, tmp_path):
    a = explore.FeatureView(bb, explore.open_image(astronaut_png), resolution=160)
    img, _ = two_regions(80, 48)
    b = explore.FeatureView(bb, explore.open_image(save_png(tmp_path / "b.png", img)), resolution=96)
    pa = a.pca()
    assert pa.shape == (300, 512, 3) and pa.dtype == np.uint8
    grid = explore.pca_grid(a)
    assert grid.shape == (*a.grid, 3)
    np.testing.assert_array_equal(pa, viz.upsample(grid, (300, 512), mode="nearest"))  # one colour per patch
    assert a.pca(mode="bilinear").shape == (300, 512, 3)
    maps, basis = explore.joint_pca([a, b], return_basis=True)
    assert [m.shape for m in maps] == [(300, 512, 3), (80, 48, 3)] and all(m.dtype == np.uint8 for m in maps)
    np.testing.assert_array_equal(maps[1], b.pca(basis=basis))  # the shared basis applied to each view
    fg = explore.joint_pca([a, b], foreground=True)
    assert [m.shape for m in fg] == [(300, 512, 3), (80, 48, 3)]
    assert a.pca(foreground=True).shape == (300, 512, 3)
    mask = np.zeros(a.grid, bool)
    mask[2:5, 3:9] = True
    dimmed = explore.pca_grid(a, foreground=mask)
    assert dimmed[~mask].mean() < 0.3 * dimmed[mask].mean()  # background dimmed to 20 %


def test_foreground_rule_finds_an_object_on_a_plain_background(bb, tmp_path):
    img = np.full((128, 128, 3), 30, np.uint8)
    g = np.random.default_rng(0)
    img[32:96, 32:96] = (g.random((64, 64, 3)) * 255).astype(np.uint8)  # a textured object in the middle
    v = explore.FeatureView(bb, explore.open_image(save_png(tmp_path / "obj.png", img)), resolution=128)
    fg = explore.foreground_mask(v)
    assert fg is not None and fg[2:6, 2:6].mean() > 0.9 and fg[0].sum() + fg[-1].sum() == 0


# ------------------------------------------------------------------------------------------------ scribbles


def test_scribble_mask_from_an_image_editor_value():
    h, w = 20, 30
    red_layer = np.zeros((h, w, 4), np.uint8)
    red_layer[2:5, 3:10] = (*RED, 255)
    red_layer[5, 3:10] = (RED[0] - 10, RED[1] + 12, RED[2], 90)  # anti-aliased edge: within tolerance
    red_layer[6, 3] = (120, 120, 120, 255)  # a stray colour: no class
    red_layer[10:12, 10:12] = (*RED, 0)  # the class colour under alpha 0 (erased): not painted
    blue_layer = np.zeros((h, w, 4), np.uint8)
    blue_layer[12:15, 20:28] = (*BLUE, 255)
    blue_layer[4, 5] = (*BLUE, 255)  # painted over the red stroke in a later layer
    value = {"background": np.full((h, w, 3), 255, np.uint8), "layers": [red_layer, blue_layer], "composite": None}
    m = explore.scribble_mask(value, [RED, BLUE])
    expect = np.full((h, w), 255, np.uint8)
    expect[2:6, 3:10] = 0
    expect[4, 5] = 1
    expect[12:15, 20:28] = 1
    assert m.dtype == np.uint8 and m.shape == (h, w)
    np.testing.assert_array_equal(m, expect)
    # colour strings (a gr.Brush palette), PIL layers, a plain RGBA array, and composite vs background
    from PIL import Image

    pil_value = {**value, "layers": [Image.fromarray(red_layer), Image.fromarray(blue_layer)]}
    np.testing.assert_array_equal(explore.scribble_mask(pil_value, ["#e6194b", "rgb(0, 130, 200)"]), expect)
    np.testing.assert_array_equal(explore.scribble_mask(blue_layer, [RED, BLUE]) == 1, blue_layer[..., 3] > 0)
    bg = np.full((h, w, 3), 200, np.uint8)
    comp = bg.copy()
    comp[2:5, 3:10] = RED
    m2 = explore.scribble_mask({"background": bg, "layers": [], "composite": comp}, [RED, BLUE])
    assert (m2 == 0).sum() == 21 and (m2 == 255).sum() == h * w - 21
    assert explore.scribble_mask(value, [RED, BLUE], shape=(40, 60))[8, 12] == 0  # resized to the image
    with pytest.raises(InputError, match="colour"):
        explore.scribble_mask(value, ["reddish"])


def test_patch_strip_gives_each_patch_the_targets_of_its_own_grid(bb, astronaut_png, tmp_path):
    a = explore.FeatureView(bb, explore.open_image(astronaut_png), resolution=128)  # grid 5 x 8
    img, _ = two_regions(64, 48)
    b = explore.FeatureView(bb, explore.open_image(save_png(tmp_path / "b.png", img)), resolution=64)  # 4 x 3
    g = np.random.default_rng(0)
    ma = np.where(g.random((300, 512)) < 0.3, g.integers(0, 3, (300, 512)), 255).astype(np.uint8)
    mb = np.where(g.random((64, 48)) < 0.3, g.integers(0, 3, (64, 48)), 255).astype(np.uint8)
    X, strip = explore._patch_strip([a, b], [ma, mb])
    n = a.grid[0] * a.grid[1] + b.grid[0] * b.grid[1]
    assert X.shape == (1, 1, n, bb.embed_dim) and strip.shape == (16, 16 * n)
    t, wt = heads.patch_targets(strip, (1, n), 3)  # [1, n, 3], [1, n]
    ta, wa = heads.patch_targets(ma, a.grid, 3)  # the view's own grid, mask resized onto it
    tb, wb = heads.patch_targets(mb, b.grid, 3)
    torch.testing.assert_close(t[0], torch.cat([ta.reshape(-1, 3), tb.reshape(-1, 3)]))
    torch.testing.assert_close(wt[0], torch.cat([wa.reshape(-1), wb.reshape(-1)]))
    torch.testing.assert_close(X[0, 0], torch.cat([a.patches.reshape(-1, bb.embed_dim), b.patches.reshape(-1, 192)]))


def test_head_from_a_few_scribbles_segments_two_regions(bb, tmp_path):
    img, truth = two_regions(96, 128, split=64)
    li = explore.open_image(save_png(tmp_path / "two.png", img))
    v = explore.FeatureView(bb, li, resolution=128)
    strokes = np.zeros((96, 128, 4), np.uint8)
    strokes[40:44, 10:30] = (*RED, 255)  # a few pixels of each region
    strokes[60:64, 90:110] = (*BLUE, 255)
    mask = explore.scribble_mask({"background": img, "layers": [strokes], "composite": None}, [RED, BLUE])
    assert (mask != 255).mean() < 0.02
    # a second, narrower image of the same two classes trains along (another grid size)
    img2, _ = two_regions(64, 160, split=80, seed=1)
    v2 = explore.FeatureView(bb, explore.open_image(save_png(tmp_path / "two2.png", img2)), resolution=160)
    mask2 = np.full((64, 160), 255, np.uint8)
    mask2[30:34, 20:40], mask2[30:34, 120:140] = 0, 1

    class Progress(list):  # like gr.Progress: callable, and falsy (len 0) before it tracks anything
        def __call__(self, fraction, desc=None):
            self.append(fraction)

        def __len__(self):
            return 0

    calls = Progress()
    head = explore.fit_head_from_scribbles([v, v2], [mask, mask2], 2, class_names=["red", "blue"], epochs=60,
                                           progress=calls)  # fmt: skip
    assert list(calls) == [0.0, 1.0] and head.class_names == ["red", "blue"] and head.layers is None
    labels, probs = explore.predict(head, v)
    assert labels.shape == (96, 128) and labels.dtype == np.uint8 and probs.shape == (2, 96, 128)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    assert (labels == truth).mean() >= 0.9
    new, new_truth = two_regions(80, 96, split=30, seed=2)  # an unseen image
    labels_new, _ = explore.predict(head, explore.FeatureView(bb, explore.open_image(save_png(tmp_path / "n.png", new)),
                                                              resolution=96))  # fmt: skip
    assert (labels_new == new_truth).mean() >= 0.9
    # the head is a normal SegHead: saved, reloaded, same answer
    path = dinoapp.save_head(head, tmp_path / "head.safetensors", bb)
    np.testing.assert_array_equal(explore.predict(dinoapp.load_head(path, bb), v)[0], labels)
    overlay = explore.label_overlay(li, np.where(mask == 255, 255, labels).astype(np.uint8), colors=[RED, BLUE])
    assert overlay.shape == (96, 128, 3)
    np.testing.assert_array_equal(overlay[mask == 255], li.rgb[mask == 255])  # unlabelled pixels untouched


def test_scribble_head_errors(bb, astronaut_png):
    li = explore.open_image(astronaut_png)
    v = explore.FeatureView(bb, li, resolution=96)
    none = np.full((300, 512), 255, np.uint8)
    one = none.copy()
    one[10:20, 10:20] = 1
    with pytest.raises(InputError, match="no painted pixels"):
        explore.fit_head_from_scribbles([v], [none], 2)
    with pytest.raises(InputError, match="only class 'b' is painted"):
        explore.fit_head_from_scribbles([v], [one], 2, class_names=["a", "b"])
    with pytest.raises(InputError, match="outside 0..1"):
        explore.fit_head_from_scribbles([v], [np.where(one == 1, 7, 255).astype(np.uint8)], 2)
    with pytest.raises(InputError, match="2 masks for 1 views"):
        explore.fit_head_from_scribbles([v], [one, one], 2)
    two = one.copy()
    two[200:210, 300:310] = 0
    head = explore.fit_head_from_scribbles([v], [two], 2, epochs=2)
    with pytest.raises(InputError, match="block"):
        explore.predict(head, explore.FeatureView(bb, li, resolution=96, layer=0))
    with pytest.raises(HeadBackboneMismatchError):
        explore.predict(head, explore.FeatureView(dinoapp.load_backbone("vit_tiny", depth=2, seed=3), li,
                                                  resolution=96))  # fmt: skip


def test_image_classifiers_on_views(bb, tmp_path):
    views, labels = [], []
    for i, (colour, name) in enumerate([(RED, "red"), (BLUE, "blue")] * 2):
        g = np.random.default_rng(i)
        img = np.clip(np.array(colour, np.float32) + g.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        views.append(explore.FeatureView(bb, explore.open_image(save_png(tmp_path / f"{i}.png", img)), resolution=64))
        labels.append(name)
    for kind in ("knn", "logistic"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # logistic: too few images to cross-validate C
            clf = explore.fit_classifier(views, labels, kind=kind)
        out = explore.classify(clf, views[0])
        assert list(out)[0] == "red" and abs(sum(out.values()) - 1) < 1e-6
        assert list(explore.classify(clf, views[3]))[0] == "blue"
    with pytest.raises(InputError, match="3 labels for 4 views"):
        explore.fit_classifier(views, labels[:3])


# ---------------------------------------------------------------------------------------------------- export


def test_export_geotiff_sits_on_the_input_raster(bb, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    src_path = geotiff(tmp_path / "scene.tif", H=200, W=300)
    li = explore.open_image(src_path)
    v = explore.FeatureView(bb, li, resolution=160)  # grid 7 x 10: cells of 28.6 x 30 source pixels
    h, w = v.grid
    out = explore.export_geotiff(explore.pca_grid(v), li, tmp_path / "pca.tif")
    with rasterio.open(src_path) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and (dst.count, dst.height, dst.width) == (3, h, w)
        assert dst.transform.almost_equals(src.transform * Affine.scale(300 / w, 200 / h))
        np.testing.assert_allclose(dst.bounds, src.bounds)  # covers the same ground
        np.testing.assert_array_equal(dst.read().transpose(1, 2, 0), explore.pca_grid(v))
        assert dst.tags()["DINOAPP_SOURCE"] == "scene.tif"
    labels = np.zeros((200, 300), np.uint8)
    labels[:, 150:] = 1
    lab = explore.export_geotiff(labels, li, tmp_path / "labels.tif", kind="labels", class_names=["a", "b"])
    with rasterio.open(src_path) as src, rasterio.open(lab) as dst:
        assert dst.transform == src.transform and dst.crs == src.crs
        np.testing.assert_array_equal(dst.read(1), labels)
        assert dst.tags()["DINOAPP_CLASSES"] == "a,b"
    res = v.similarity(10, 10)
    with rasterio.open(explore.export_geotiff(res.scores, li, tmp_path / "sim.tif")) as dst:
        assert dst.dtypes[0] == "float32" and (dst.height, dst.width) == (h, w)
        np.testing.assert_allclose(dst.read(1), res.scores)
    with pytest.raises(InputError, match="not a georeferenced GeoTIFF"):
        png = explore.open_image(save_png(tmp_path / "p.png", two_regions()[0]))
        explore.export_geotiff(labels, png, tmp_path / "x.tif")
    with pytest.raises(InputError, match="do not cover"):
        explore.export_geotiff(np.zeros((10, 200), np.float32), li, tmp_path / "bad.tif")


def test_exported_maps_keep_the_rasters_nodata(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from geo_factory import make_geotiff, smooth_bands

    data = smooth_bands(3, 64, 80)
    data[:, :10, :20] = 0  # nodata in every band
    li = explore.open_image(make_geotiff(tmp_path / "nd.tif", data, nodata=0))
    assert li.valid is not None and not li.valid[:10, :20].any() and li.valid[10:].all()
    labels = np.ones((64, 80), np.uint8)
    with rasterio.open(explore.export_geotiff(labels, li, tmp_path / "l.tif", kind="labels")) as dst:
        assert dst.nodata == 255 and (dst.read(1)[:10, :20] == 255).all() and (dst.read(1)[10:] == 1).all()
    with rasterio.open(explore.export_geotiff(np.ones((64, 80), np.float32), li, tmp_path / "f.tif")) as dst:
        assert np.isnan(dst.read(1)[:10, :20]).all() and (dst.read(1)[10:] == 1).all()


def test_export_png_is_lossless(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    rgb = g.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    labels = g.integers(0, 5, (17, 23)).astype(np.uint8)
    deep = g.integers(0, 65536, (17, 23)).astype(np.uint16)
    for arr, name in ((rgb, "rgb.png"), (labels, "labels.png"), (deep, "deep.png")):
        p = explore.export_png(arr, tmp_path / "sub" / name)
        np.testing.assert_array_equal(np.asarray(Image.open(p)), arr)
    with pytest.raises(InputError, match="colorize"):
        explore.export_png(rgb.astype(np.float32) / 255, tmp_path / "f.png")
