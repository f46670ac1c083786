"""CLI: extract, pca, similarity, fit-head and predict, end to end on small files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import dinoapp
from dinoapp.cli import main

rasterio = pytest.importorskip("rasterio")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny backbone file, 6 images with masks (yellow squares = class 1), a GeoTIFF, a labels CSV."""
    d = tmp_path_factory.mktemp("cli")
    bb = dinoapp.load_backbone("vit_tiny", depth=2, seed=0)
    dinoapp.save_backbone(bb, d / "bb.safetensors")
    (d / "images").mkdir()
    (d / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = (rng.random((80, 96, 3)) * 60 + 20).astype(np.uint8)
        mask = np.zeros((80, 96), np.uint8)
        y, x = rng.integers(0, 40), rng.integers(0, 50)
        img[y : y + 36, x : x + 40] = (230, 220, 40)
        mask[y : y + 36, x : x + 40] = 1
        if i % 2:
            img[:, :, 2] = 200  # bluish images: label "b"
        Image.fromarray(img).save(d / "images" / f"im{i}.png")
        Image.fromarray(mask).save(d / "masks" / f"im{i}.png")
        rows.append({"path": f"images/im{i}.png", "label": "b" if i % 2 else "a"})
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    from tests.geo_factory import make_geotiff

    geo = np.asarray(Image.open(d / "images" / "im0.png")).transpose(2, 0, 1)
    make_geotiff(d / "scene.tif", np.concatenate([geo, geo[:1]]), descriptions=["red", "green", "blue", "nir"])
    return d


def test_extract_writes_features(files, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "f.safetensors"
    assert main(["extract", str(files / "images" / "im0.png"), str(files / "images" / "im1.png"), "--backbone",
                 str(files / "bb.safetensors"), "--out", str(out), "--layers", "0"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("0.patches").shape == (5, 6, 192) and f.get_tensor("1.cls").shape == (192,)
        assert f.get_tensor("0.layer0").shape == (5, 6, 192)
    inputs = json.loads(meta["inputs"])
    assert inputs[0]["image_size"] == [80, 96] and json.loads(meta["backbone"])["fingerprint"]


def test_pca_png_and_georeferenced_tif(files, tmp_path):
    from affine import Affine

    assert main(["pca", str(files / "images" / "im0.png"), str(files / "scene.tif"), "--backbone",
                 str(files / "bb.safetensors"), "--out", str(tmp_path)]) == 0
    png = np.asarray(Image.open(tmp_path / "im0_pca.png"))
    assert png.shape == (80, 96, 3) and png.std() > 0
    with rasterio.open(tmp_path / "scene_pca.tif") as dst, rasterio.open(files / "scene.tif") as src:
        assert dst.count == 3 and dst.shape == (5, 6) and dst.transform == src.transform @ Affine.scale(16)
        tif = dst.read()
    # same image content (scene.tif's RGB is im0) and one shared basis: same colours in both outputs
    np.testing.assert_allclose(tif.transpose(1, 2, 0).astype(float), png[8::16, 8::16].astype(float), atol=1)
    assert "components" in json.loads((tmp_path / "pca_basis.json").read_text())


def test_backbone_from_env_and_comma_separated_bands(files, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOAPP_BACKBONE", str(files / "bb.safetensors"))
    # no --backbone: the environment variable names it; bands given as the app writes them ("3,2,1")
    assert main(["pca", str(files / "scene.tif"), "--bands", "3,2,1", "--out", str(tmp_path / "a")]) == 0
    assert main(["pca", str(files / "scene.tif"), "--bands", "3", "2", "1", "--out", str(tmp_path / "b")]) == 0
    with rasterio.open(tmp_path / "a" / "scene_pca.tif") as a, rasterio.open(tmp_path / "b" / "scene_pca.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # band order matters: 3,2,1 is not 1,2,3 (the default RGB choice)
    assert main(["pca", str(files / "scene.tif"), "--out", str(tmp_path / "c")]) == 0
    with rasterio.open(tmp_path / "a" / "scene_pca.tif") as a, rasterio.open(tmp_path / "c" / "scene_pca.tif") as c:
        assert not np.array_equal(a.read(), c.read())
    monkeypatch.delenv("DINOAPP_BACKBONE")
    with pytest.raises(SystemExit):  # no flag, no variable: argparse's "required" error
        main(["pca", str(files / "scene.tif"), "--out", str(tmp_path / "d")])


def test_similarity_png_tif_and_errors(files, tmp_path, capsys):
    bb = ["--backbone", str(files / "bb.safetensors")]
    assert main(["similarity", str(files / "images" / "im0.png"), "--pixel", "10", "20", "--out",
                 str(tmp_path / "s.png"), *bb]) == 0
    assert "query patch (0, 1)" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (80, 96, 3)
    assert main(["similarity", str(files / "scene.tif"), "--pixel", "10", "20", "--out", str(tmp_path / "s.tif"),
                 *bb]) == 0
    with rasterio.open(tmp_path / "s.tif") as dst:
        sim = dst.read(1)
        assert sim.shape == (5, 6) and sim[0, 1] == pytest.approx(1.0)
    assert main(["similarity", str(files / "images" / "im0.png"), "--pixel", "500", "20", "--out",
                 str(tmp_path / "x.png"), *bb]) == 2
    assert "outside" in capsys.readouterr().err


def test_fit_seg_head_and_predict(files, tmp_path, capsys):
    bb = ["--backbone", str(files / "bb.safetensors")]
    head = tmp_path / "seg.safetensors"
    assert main(["fit-head", "--images", str(files / "images"), "--masks", str(files / "masks"), "--out", str(head),
                 "--epochs", "30", "--class-names", "ground", "square", *bb]) == 0
    assert "training mIoU" in capsys.readouterr().out
    assert main(["predict", str(files / "images" / "im2.png"), str(files / "scene.tif"), "--head", str(head),
                 "--out", str(tmp_path / "pred"), *bb]) == 0
    cls = np.asarray(Image.open(tmp_path / "pred" / "im2_classes.png"))
    truth = np.asarray(Image.open(files / "masks" / "im2.png"))
    assert cls.shape == truth.shape and dinoapp.metrics.mean_iou(truth, cls, 2) > 0.5
    with rasterio.open(tmp_path / "pred" / "scene_classes.tif") as dst:
        assert dst.shape == (80, 96) and dst.tags()["DINOAPP_CLASSES"] == "ground,square"
    other = dinoapp.load_backbone("vit_tiny", depth=2, seed=5)
    dinoapp.save_backbone(other, tmp_path / "other.safetensors")
    assert main(["predict", str(files / "images" / "im2.png"), "--head", str(head), "--out", str(tmp_path / "x"),
                 "--backbone", str(tmp_path / "other.safetensors")]) == 2
    assert "backbone" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["logistic", "knn"])
def test_fit_classifier_from_csv_and_predict(files, tmp_path, kind):
    bb = ["--backbone", str(files / "bb.safetensors")]
    head = tmp_path / f"{kind}.safetensors"
    assert main(["fit-head", "--labels", str(files / "labels.csv"), "--kind", kind, "--size", "64", "--embedding",
                 "cls+mean", "--out",
                 str(head), *bb]) == 0
    assert main(["predict", str(files / "images"), "--head", str(head), "--out", str(tmp_path / "p"), *bb]) == 0
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 6
    truth = {f"im{i}.png": ("b" if i % 2 else "a") for i in range(6)}
    assert np.mean([r["label"] == truth[r["path"].split("/")[-1]] for r in rows]) >= 5 / 6
