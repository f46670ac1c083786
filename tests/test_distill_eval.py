"""Distillation report: k-NN / linear segmentation / throughput of teacher vs students on a user's probe data,
and the readers of labelled data it shares with the CLI (dinoapp.labelled)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinoapp
from dinoapp.distill.evaluate import EvalReport, evaluate_backbones, split_by_class, split_items
from dinoapp.errors import ConfigError, InputError
from dinoapp.labelled import read_label_csv, read_mask, seg_pairs

SIZE = 32  # 2 x 2 patches: enough for colour classes, fast on CPU


def _tiny(depth: int, seed: int):
    """A random tiny ViT whose blocks see the image: at init (LayerScale 1e-5) the blocks add almost
    nothing and the CLS token is the same for every image (k-NN on it is at chance)."""
    bb = dinoapp.load_backbone("vit_tiny", depth=depth, seed=seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    return bb


@pytest.fixture(scope="module")
def backbones():
    return {"teacher": _tiny(2, 0), "student": _tiny(1, 1)}


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def cls_probe(tmp_path_factory):
    """8 reddish and 8 bluish noisy images (sizes vary) in images/, labels.csv with relative paths."""
    d = tmp_path_factory.mktemp("cls")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label = "red" if i % 2 else "blue"
        h, w = rng.integers(24, 48, size=2)
        img = rng.normal(60, 25, (h, w, 3))
        img[..., 0 if label == "red" else 2] += 140
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / "images" / f"im{i:02d}.png")
        rows.append({"path": f"images/im{i:02d}.png", "label": label})
    _write_csv(d / "labels.csv", rows)
    return d


@pytest.fixture(scope="module")
def seg_probe(tmp_path_factory):
    """12 images: red left of a random column, blue right of it; masks 0 / 1, a 255 (unlabelled) stripe."""
    d = tmp_path_factory.mktemp("seg")
    (d / "images").mkdir()
    (d / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        col = int(rng.integers(12, 52))
        img = rng.normal(40, 15, (64, 64, 3))
        img[:, :col, 0] += 180
        img[:, col:, 2] += 180
        mask = np.zeros((64, 64), np.uint8)
        mask[:, col:] = 1
        mask[:2] = 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / "images" / f"s{i:02d}.png")
        Image.fromarray(mask).save(d / "masks" / f"s{i:02d}.png")
    return d


def _naive_knn(bank, bank_y, queries, k, T=0.07):
    """Weighted cosine k-NN written as plain loops (the DINO protocol)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in queries:
        q = q / np.linalg.norm(q)
        sims = bank @ q
        votes = {}
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[bank_y[j]] = votes.get(bank_y[j], 0.0) + np.exp(sims[j] / T)
        out.append(max(sorted(votes), key=lambda c: votes[c]))
    return np.asarray(out)


def test_knn_and_throughput(backbones, cls_probe, tmp_path):
    rep = evaluate_backbones(backbones, labels_csv=cls_probe / "labels.csv", size=SIZE, k=5, throughput_batch=2,
                             throughput_repeats=2)  # fmt: skip
    assert list(rep.rows) == ["teacher", "student"] and rep.reference == "teacher"
    for name, bb in backbones.items():
        r = rep.rows[name]
        assert r["knn_acc"] >= 0.9, (name, r)
        assert (r["n_fit"], r["n_score"]) == (8, 8) and r["seg_miou"] is None and r["logreg_acc"] is None
        assert r["params"] == sum(p.numel() for p in bb.parameters())
        assert r["img_per_s"] > 0 and r["relative_speed"] > 0 and r["size"] == SIZE
    assert rep.rows["teacher"]["relative_speed"] == 1.0
    assert rep.rows["teacher"]["params"] > rep.rows["student"]["params"]  # 2 blocks vs 1

    # the same number as a k-NN written by hand on features extracted directly from the files
    paths, labels = read_label_csv(cls_probe / "labels.csv")
    y = np.asarray(labels)
    fit, score = split_by_class(y, 0.5, 0)
    imgs = [np.asarray(Image.open(p)) for p in paths]
    for name, bb in backbones.items():
        emb = dinoapp.extract(bb, imgs, size=SIZE).cls.numpy()
        want = float(np.mean(_naive_knn(emb[fit], y[fit], emb[score], k=5) == y[score]))
        assert rep.rows[name]["knn_acc"] == pytest.approx(want, abs=1e-12)

    table = rep.table()
    assert "teacher" in table and "student" in table and "kNN acc" in table and "seg mIoU" not in table
    assert table.splitlines()[2].startswith("teacher")
    back = EvalReport.load(rep.save(tmp_path / "out" / "report.json"))
    assert back.rows == json.loads(rep.to_json())["rows"] and back.meta["classes"] == ["blue", "red"]


def test_knn_control_with_labels_unrelated_to_the_images(backbones, cls_probe, tmp_path):
    """Labels that ignore the colour (every image's label = its index's parity, reversed colour for half):
    a pipeline that scores what it should cannot reach the accuracy of the real labels."""
    paths, labels = read_label_csv(cls_probe / "labels.csv")
    rows = [{"path": str(p), "label": ("x" if (i // 2) % 2 else "y")} for i, p in enumerate(paths)]  # absolute
    _write_csv(tmp_path / "scrambled.csv", rows)
    rep = evaluate_backbones({"teacher": backbones["teacher"]}, labels_csv=tmp_path / "scrambled.csv", size=SIZE,
                             k=5, throughput_batch=1, throughput_repeats=1)  # fmt: skip
    assert rep.rows["teacher"]["knn_acc"] <= 0.75


def test_segmentation_probe(backbones, seg_probe):
    rep = evaluate_backbones(backbones, seg_images=seg_probe / "images", seg_masks=seg_probe / "masks", size=64,
                             seg_epochs=10, throughput_batch=1, throughput_repeats=1)  # fmt: skip
    for name in backbones:
        r = rep.rows[name]
        assert r["seg_miou"] >= 0.8, (name, r)
        assert (r["seg_n_fit"], r["seg_n_score"]) == (6, 6) and r["knn_acc"] is None
    assert rep.meta["seg_n_classes"] == 2 and "seg mIoU" in rep.table()


def test_splits_are_deterministic_stratified_and_disjoint():
    y = np.array(["a"] * 5 + ["b"] * 3 + ["c"])
    fit, score = split_by_class(y, 0.5, seed=3)
    assert set(fit).isdisjoint(score) and sorted([*fit, *score]) == list(range(9))
    assert sorted(y[score].tolist()) == ["a", "a", "a", "b", "b"]  # round(2.5) = 3, round(1.5) = 2, c keeps its one
    f2, s2 = split_by_class(y, 0.5, seed=3)
    assert (f2 == fit).all() and (s2 == score).all()
    assert (split_by_class(y, 0.5, seed=4)[1] != score).any()
    fit, score = split_items(10, 0.3, seed=0)
    assert len(score) == 3 and len(fit) == 7 and set(fit).isdisjoint(score)


def test_bad_inputs_are_typed_errors(backbones, cls_probe, seg_probe, tmp_path):
    bb = {"teacher": backbones["teacher"]}
    with pytest.raises(InputError, match="seg_masks .* is not a folder"):
        evaluate_backbones(bb, seg_images=seg_probe / "images", seg_masks=tmp_path / "nope")
    with pytest.raises(InputError, match="labels_csv .*no such CSV file"):
        evaluate_backbones(bb, labels_csv=tmp_path / "nope.csv")
    _write_csv(tmp_path / "one.csv", [{"path": str(cls_probe / "images" / "im00.png"), "label": "blue"}])
    with pytest.raises(InputError, match="at least 2 images"):
        evaluate_backbones(bb, labels_csv=tmp_path / "one.csv")
    (tmp_path / "si").mkdir()
    (tmp_path / "sm").mkdir()
    for n in ("s00", "s01"):
        (tmp_path / "si" / f"{n}.png").write_bytes((seg_probe / "images" / f"{n}.png").read_bytes())
        (tmp_path / "sm" / f"{n}.png").write_bytes((seg_probe / "masks" / f"{n}.png").read_bytes())
    with pytest.raises(InputError, match="at least 3 pairs"):  # round(2 * 0.2) = 0 to score; round(3 * 0.2) = 1
        evaluate_backbones(bb, seg_images=tmp_path / "si", seg_masks=tmp_path / "sm", val_fraction=0.2)
    four = dinoapp.load_backbone("vit_tiny", depth=1, seed=0, in_chans=4)
    with pytest.raises(InputError, match="backbone 'multispectral' takes 4 input channels"):
        evaluate_backbones({**bb, "multispectral": four}, labels_csv=cls_probe / "labels.csv", size=SIZE)
    with pytest.raises(ConfigError, match="'cnn'.*lacks"):
        evaluate_backbones({**bb, "cnn": torch.nn.Conv2d(3, 8, 3)})
    with pytest.raises(ConfigError, match="val_fraction"):
        evaluate_backbones(bb, labels_csv=cls_probe / "labels.csv", val_fraction=1.0)
    with pytest.raises(ConfigError, match="go together"):
        evaluate_backbones(bb, seg_images=seg_probe / "images")


def test_speed_only_report_and_logistic(backbones, cls_probe):
    rep = evaluate_backbones(backbones, throughput_batch=1, throughput_repeats=1, size=SIZE)
    assert all(r["knn_acc"] is None and r["img_per_s"] > 0 for r in rep.rows.values())
    assert "kNN acc" not in rep.table()
    pytest.importorskip("sklearn")
    rep = evaluate_backbones({"s": backbones["student"]}, labels_csv=cls_probe / "labels.csv", size=SIZE,
                             logistic=True, throughput_batch=1, throughput_repeats=1)  # fmt: skip
    assert rep.rows["s"]["logreg_acc"] >= 0.9 and rep.rows["s"]["relative_speed"] == 1.0


# ---------------------------------------------------------------------------------------------- dinoapp.labelled


def test_read_label_csv_resolves_paths_like_the_cli(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "l.csv").write_text("path,label,extra\na.png,cat,1\n/abs/b.png,dog,2\n")
    paths, labels = read_label_csv(tmp_path / "d" / "l.csv")
    assert paths == [tmp_path / "d" / "a.png", Path("/abs/b.png")]
    assert labels == ["cat", "dog"]
    assert read_label_csv(tmp_path / "d" / "l.csv", images_dir=tmp_path / "imgs")[0][0] == tmp_path / "imgs" / "a.png"
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(InputError, match="needs a header with columns 'path' and 'label'"):
        read_label_csv(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(InputError, match="no rows"):
        read_label_csv(tmp_path / "empty.csv")
    with pytest.raises(InputError, match=r"^--labels .*nope.csv: no such CSV file$"):
        read_label_csv(tmp_path / "nope.csv", flag="--labels")


def test_seg_pairs_and_read_mask(seg_probe, tmp_path, capsys):
    pairs = seg_pairs(seg_probe / "images", seg_probe / "masks")
    assert len(pairs) == 12 and all(i.stem == m.stem for i, m in pairs)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    rgb = np.zeros((8, 8, 3), np.uint8)
    for n in ("a", "b"):
        Image.fromarray(rgb).save(tmp_path / "i" / f"{n}.png")
    Image.fromarray(rgb).save(tmp_path / "m" / "a.png")
    assert seg_pairs(tmp_path / "i", tmp_path / "m") == [(tmp_path / "i" / "a.png", tmp_path / "m" / "a.png")]
    assert "1 of 2 images have no mask" in capsys.readouterr().err
    with pytest.raises(InputError, match="single-band"):
        read_mask(tmp_path / "m" / "a.png")
    assert read_mask(pairs[0][1]).shape == (64, 64)
    (tmp_path / "other").mkdir()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "other" / "zzz.png")
    with pytest.raises(InputError, match="no image in .* has a mask with the same file stem"):
        seg_pairs(tmp_path / "i", tmp_path / "other")
    with pytest.raises(InputError, match="^--masks .* is not a folder$"):
        seg_pairs(tmp_path / "i", tmp_path / "nope", flags=("--images", "--masks"))


@pytest.mark.gpu
def test_on_cuda_backbones_are_moved_there_and_back(backbones, cls_probe):
    rep = evaluate_backbones(backbones, labels_csv=cls_probe / "labels.csv", size=SIZE, k=5, device="cuda",
                             throughput_batch=2, throughput_repeats=2)  # fmt: skip
    assert all(r["knn_acc"] >= 0.9 and r["img_per_s"] > 0 for r in rep.rows.values())
    assert rep.meta["devices"]["teacher"].startswith("cuda")
    assert all(next(bb.parameters()).device.type == "cpu" for bb in backbones.values())
