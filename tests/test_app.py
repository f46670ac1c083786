"""The Gradio app: handlers (the library glue), every API endpoint through gradio_client, sessions kept apart."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")
import app as A  # noqa: E402
from dinoapp import load_backbone  # noqa: E402
from dinoapp.checkpoint import save_backbone  # noqa: E402
from dinoapp.errors import InputError  # noqa: E402

RED, BLUE = (200, 40, 40), (40, 60, 200)


def tiny(path: Path, seed: int = 0) -> Path:
    """A tiny ViT whose features depend on the image (LayerScale 0.5; a random init's 1e-5 would not)."""
    bb = load_backbone("vit_tiny", depth=2, seed=seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    return save_backbone(bb, path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("w")
    tiny(folder / "other.safetensors", seed=1)  # a second backbone to compare with (slot B)
    return tiny(folder / "tiny.safetensors")


@pytest.fixture(scope="module")
def the_app(weights) -> A.App:
    return A.App(A.Settings(weights=str(weights), allowed_dir=weights.parent))


def two_regions(path: Path, w: int = 128, h: int = 96, split: int = 64, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Left red, right blue (with noise); returns the PNG and the true labels (0 left, 1 right)."""
    from PIL import Image

    g = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    img[:, :split] = RED
    img[:, split:] = BLUE
    img += g.normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    truth = np.zeros((h, w), np.uint8)
    truth[:, split:] = 1
    return path, truth


def strokes(h: int, w: int, split: int) -> dict:
    """An ImageEditor value with one stroke per class (class colours of the app's palette)."""
    layer = np.zeros((h, w, 4), np.uint8)
    layer[20:30, 10 : split - 10] = (*A.CLASS_COLORS[0], 255)
    layer[60:70, split + 10 : w - 10] = (*A.CLASS_COLORS[1], 255)
    return {"background": np.zeros((h, w, 4), np.uint8), "layers": [layer], "composite": layer}


# --- handlers --------------------------------------------------------------------------------------------
def test_explore_and_click_similarity_peaks_at_the_clicked_patch(the_app, tmp_path):
    png, _ = two_regions(tmp_path / "a.png")
    s, rgb, pca_a, pca_b, info = the_app.explore(None, [str(png)], resolution=128)
    assert rgb.shape == (96, 128, 3) and pca_a.shape == (96, 128, 3) and pca_b is None
    assert info["grid"] == [6, 8] and info["name"] == "a.png"
    for x, y in ((5.0, 5.0), (100.0, 80.0), (70.0, 40.0)):
        s, overlay, _, top = the_app.similarity(s, x, y, k=3)
        assert overlay.shape == (96, 128, 3)
        # the clicked pixel's patch (resolution 128 = the image size: 16 px patches) is the best match
        assert (top[0]["row"], top[0]["col"]) == (int(y // 16), int(x // 16)) and top[0]["score"] > 0.99


def test_second_backbone_gives_side_by_side_maps(the_app, weights, tmp_path):
    png, _ = two_regions(tmp_path / "a.png")
    s, _ = the_app.load_backbone(None, str(weights.parent / "other.safetensors"), "B")
    s, _, pca_a, pca_b, _ = the_app.explore(s, [str(png)], resolution=128)
    assert pca_b is not None and pca_b.shape == pca_a.shape
    s, sim_a, sim_b, _ = the_app.similarity(s, 10, 10)
    assert sim_b is not None and sim_b.shape == sim_a.shape


def test_scribbles_train_a_head_that_separates_two_regions(the_app, tmp_path):
    png, truth = two_regions(tmp_path / "train.png")
    s, msg = the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "red, blue")
    assert "1 training image" in msg
    s, overlay, m = the_app.train_head(s, epochs=60)
    assert overlay.shape == (96, 128, 3) and m["scribble_accuracy"] >= 0.9
    new, new_truth = two_regions(tmp_path / "new.png", split=40, seed=1)  # another boundary, new noise
    mask_path = tmp_path / "new_mask.png"
    from PIL import Image

    Image.fromarray(new_truth).save(mask_path)
    s, pred, metrics, files = the_app.predict(s, str(new), str(mask_path))
    assert metrics["miou"] >= 0.8, metrics
    assert Path(files[0]).suffix == ".png" and np.asarray(Image.open(files[0])).shape == (96, 128)
    s, head_file = the_app.save_head(s)
    s2, msg = the_app.load_head(None, head_file)  # a fresh session: the head brings its own layer and resolution
    _, _, metrics2, _ = the_app.predict(s2, str(new), str(mask_path))
    assert metrics2["miou"] == metrics["miou"]


def test_geotiff_maps_are_georeferenced(the_app, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from tests.geo_factory import make_geotiff, smooth_bands

    tif = make_geotiff(tmp_path / "scene.tif", smooth_bands(4, 96, 128))
    s, rgb, _, _, info = the_app.explore(None, [str(tif)], resolution=128)  # > 3 unnamed bands: 1, 2, 3
    assert info["kind"] == "geotiff"
    s, files = the_app.download_maps(s)
    assert [Path(f).suffix for f in files] == [".png", ".tif"]
    with rasterio.open(tif) as src, rasterio.open(files[1]) as out:
        assert out.crs == src.crs
        assert out.bounds == pytest.approx(src.bounds, abs=1e-6)  # the same footprint, on the patch grid


def test_bad_inputs_give_readable_errors(the_app, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises((ValueError, OSError)) as e:
        the_app.explore(None, [str(bad)])
    assert "broken.png" in str(e.value)
    with pytest.raises(InputError, match="explore an image first"):
        the_app.similarity(None, 1, 1)
    with pytest.raises(InputError, match="at most 6 classes"):
        png, _ = two_regions(tmp_path / "p.png")
        the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "a, b, c, d, e, f, g")
    with pytest.raises(InputError, match="must be a number"):
        s, *_ = the_app.explore(None, [str(png)], resolution=128)
        the_app.similarity(s, None, 3)
    with pytest.raises(InputError, match="no scribbles"):
        png, _ = two_regions(tmp_path / "p.png")
        empty = {"background": None, "layers": [np.zeros((96, 128, 4), np.uint8)], "composite": None}
        the_app.add_scribbles(None, str(png), empty, "a, b")


def test_backbone_names_a_client_may_use(weights, tmp_path, monkeypatch):
    """Clients name released models or files under --allowed-dir; nothing else reaches load_backbone."""
    monkeypatch.chdir(weights.parent)  # bare names must not resolve against the server's working folder
    no_dir = A.App(A.Settings(weights=str(weights)))
    for name in (".", "..", ".git", "tiny.safetensors", "vit_tiny", "vit7b16", "timm:resnet50", "/etc/passwd"):
        with pytest.raises(InputError, match="by path is off"):
            no_dir.load_backbone(None, name)
    import huggingface_hub.constants as c

    from dinoapp.errors import HubUnavailableError

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnavailableError):  # a release name goes to the hub cache, not to the path check
        no_dir.load_backbone(None, "vit_large_patch16_dinov3.sat493m")


def test_server_paths_only_under_the_allowed_folder(weights, tmp_path):
    allowed = tmp_path / "ok"
    allowed.mkdir()
    inside = allowed / "bb.safetensors"
    inside.write_bytes(weights.read_bytes())
    app = A.App(A.Settings(weights=str(weights), allowed_dir=allowed))
    s, text = app.load_backbone(None, str(inside))
    assert "ViT dim 192" in text
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(weights.read_bytes())
    with pytest.raises(InputError, match="outside the allowed folder"):
        app.load_backbone(s, str(outside))  # a real file, but not under the allowed folder
    with pytest.raises(InputError, match="outside the allowed folder"):
        app.load_backbone(s, str(allowed / ".." / outside.name))


def test_offline_default_is_the_demo_backbone_with_a_notice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    app = A.App(A.Settings())
    assert app.default_source == "demo" and "demo" in app.default_notice.lower()
    _, text = app.backbone_info(None)
    assert "Demo weights" in text


def _save_mask(labels: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def test_images_and_masks_train_a_head(the_app, tmp_path):
    ims, masks = [], []
    (tmp_path / "m").mkdir()
    for i, split in enumerate((50, 80)):
        png, truth = two_regions(tmp_path / f"img{i}.png", split=split, seed=i)
        truth[:10] = 255  # an unlabelled band: ignored
        ims.append(str(png))
        # matched by name: the same stem (a.png <-> a.png, uploads keep their names) or with _mask
        masks.append(str(_save_mask(truth, tmp_path / "m" / "img0.png" if i == 0 else tmp_path / "img1_mask.png")))
    s, overlay, m = the_app.train_from_masks(None, ims, masks, "red, blue", epochs=60)
    assert overlay.shape == (96, 128, 3) and m["images"] == 2 and m["classes"] == ["red", "blue"]
    assert m["scribble_accuracy"] >= 0.9 and m["train_miou"] >= 0.8
    new, new_truth = two_regions(tmp_path / "new.png", split=30, seed=5)
    _, _, metrics, _ = the_app.predict(s, str(new), str(_save_mask(new_truth, tmp_path / "gt.png")))
    assert metrics["miou"] >= 0.8, metrics
    # without names: class 0, class 1
    _, _, m2 = the_app.train_from_masks(None, ims, masks, "", epochs=10)
    assert m2["classes"] == ["class 0", "class 1"]


def test_images_and_masks_errors_say_what_to_fix(the_app, tmp_path):
    png, truth = two_regions(tmp_path / "a.png")
    other, _ = two_regions(tmp_path / "b.png")
    with pytest.raises(InputError, match="no mask for b.png"):
        the_app.train_from_masks(None, [str(png), str(other)], [str(_save_mask(truth, tmp_path / "a_mask.png"))])
    small = _save_mask(truth[:50, :60], tmp_path / "m" / "a.png") if (tmp_path / "m").mkdir() is None else None
    with pytest.raises(InputError, match="a mask must match its image"):
        the_app.train_from_masks(None, [str(png)], [str(small)])
    with pytest.raises(InputError, match="class index 1, but 1 class names"):
        the_app.train_from_masks(None, [str(png)], [str(tmp_path / "a_mask.png")], "only")
    with pytest.raises(InputError, match="the masks label no pixel"):
        the_app.train_from_masks(None, [str(png)], [str(_save_mask(truth * 0 + 255, tmp_path / "a_mask.png"))])


def _solid(path: Path, rgb, seed: int) -> str:
    from PIL import Image

    g = np.random.default_rng(seed)
    img = np.asarray(rgb, np.float32) + g.normal(0, 25, (80, 96, 3))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return str(path)


def test_labelled_images_train_a_classifier(the_app, tmp_path):
    ims = [_solid(tmp_path / f"r{i}.png", RED, i) for i in range(3)] + [
        _solid(tmp_path / f"b{i}.png", BLUE, 10 + i) for i in range(3)
    ]
    labels = ["red"] * 3 + ["blue"] * 3
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{Path(p).name},{y}\n" for p, y in zip(ims, labels)))
    for kind, how in (("knn", {"labels_csv": str(csv)}), ("logistic", {"labels": ", ".join(labels)})):
        s, rows = the_app.train_classifier(None, ims, kind=kind, **how)
        assert [r[1] for r in rows] == labels and all(r[2] == r[1] for r in rows), rows
        new_red = _solid(tmp_path / "new_red.png", RED, 99)
        s, shown, out, files = the_app.predict(s, new_red, None, "red")
        assert out["predicted"] == "red" and out["correct"] is True and files == []
        assert set(out["probabilities"]) == {"red", "blue"} and shown.shape == (80, 96, 3)
    s, head_file = the_app.save_head(s)
    s2, msg = the_app.load_head(None, head_file)
    assert "classes ['blue', 'red']" in msg
    assert the_app.predict(s2, _solid(tmp_path / "nb.png", BLUE, 7), None, "")[2]["predicted"] == "blue"
    with pytest.raises(InputError, match="2 labels for 6 images"):
        the_app.train_classifier(None, ims, labels="red, blue")
    with pytest.raises(InputError, match="only one class"):
        the_app.train_classifier(None, ims[:3], labels="red, red, red")


def test_a_failed_training_leaves_the_session_as_it_was(the_app, tmp_path):
    png, truth = two_regions(tmp_path / "a.png")
    s, _ = the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "red, blue")
    s, _, _ = the_app.train_head(s, epochs=10)
    head, train = s.head, list(s.train)
    one_class = _save_mask(np.where(truth == 0, 0, 255), tmp_path / "a_mask.png")
    with pytest.raises(InputError, match="only class 0: a head needs at least two classes"):
        the_app.train_from_masks(s, [str(png)], [str(one_class)], "", 10)
    assert s.head is head and s.train == train and s.train_names == ["red", "blue"] == s.class_names
    with pytest.raises(InputError):
        the_app.explore(s, [str(png)], resolution=128, layer=99)  # a bad layer: nothing of it stays
    assert s.layer is None and s.resolution == 448
    # a classifier does not rename the painted set: training the segmentation head again keeps its classes
    ims = [_solid(tmp_path / f"c{i}.png", c, i) for i, c in enumerate((RED, RED, BLUE, BLUE))]
    s, _ = the_app.train_classifier(s, ims, labels="cat, cat, dog, dog")
    assert s.class_names == ["cat", "dog"]
    s, _, m = the_app.train_head(s, epochs=10)
    assert m["classes"] == ["red", "blue"] == s.class_names


def test_saved_heads_name_the_backbone_file_not_a_server_path(the_app, tmp_path):
    import json

    from safetensors import safe_open

    png, _ = two_regions(tmp_path / "a.png")
    s, _ = the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "red, blue")
    s, _, _ = the_app.train_head(s, epochs=10)
    _, path = the_app.save_head(s)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["dinoapp"])
    assert meta["backbone"]["source"] == "tiny.safetensors"
    assert str(tmp_path.parent) not in json.dumps(meta) and "/" not in meta["backbone"]["source"]


def test_uploaded_checkpoints_load_and_other_paths_do_not(the_app, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    up = tmp_path / "uploads" / "abc123" / "my_backbone.safetensors"
    up.parent.mkdir(parents=True)
    up.write_bytes((weights.parent / "other.safetensors").read_bytes())
    s, text = the_app.upload_backbone(None, str(up), "B")
    assert "my_backbone.safetensors" in text and "ViT dim 192" in text and str(tmp_path) not in text
    png, _ = two_regions(tmp_path / "a.png")
    s, _, pca_a, pca_b, _ = the_app.explore(s, [str(png)], resolution=128)  # B comes from the upload
    assert pca_b is not None
    with pytest.raises(InputError, match="only an uploaded checkpoint"):
        the_app.upload_backbone(None, str(weights), "A")  # a server file outside the upload folder
    up.unlink()  # gradio deletes uploads after an hour: the session keeps the model it loaded
    the_app.backbones._items.clear()
    s, _, _, pca_b, _ = the_app.explore(s, [str(png)], resolution=64)
    assert pca_b is not None
    with pytest.raises(InputError, match="upload it again"):
        the_app.upload_backbone(None, str(up), "A")


def test_errors_shown_to_visitors_name_files_not_server_folders(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    settings = A.Settings(weights=str(weights), allowed_dir=tmp_path / "data")
    msg = (f"{tmp_path}/uploads/9f8e7d/scan.dcm: bad; {weights}: fine; {tmp_path}/data/site/a/b.tif is "
           f"{tmp_path}/data/x.png")  # fmt: skip
    out = A.scrub_paths(msg, settings)
    assert out == "scan.dcm: bad; tiny.safetensors: fine; b.tif is x.png", out


def test_a_session_over_its_memory_limit_is_refused_and_kept_as_it_was(weights, tmp_path):
    app = A.App(A.Settings(weights=str(weights), session_mb=1))
    png, _ = two_regions(tmp_path / "a.png", w=600, h=400, split=300)  # 400x600 float32 x3 + rgb: > 1 MB
    # how much the image needs against what is left in the session, and what to do
    with pytest.raises(InputError, match=r"needs about 3\.7 MB .* 1\.0 MB left of its 1 MB.*resolution.*--session-mb"):
        app.explore(None, [str(png)], resolution=128)
    s = A.Session()
    small, _ = two_regions(tmp_path / "s.png", w=32, h=32, split=16)
    s, *_ = app.explore(s, [str(small)], resolution=32)
    assert 0 < s.nbytes() < 2**20
    with pytest.raises(InputError, match="per session"):
        app.explore(s, [str(png)], resolution=128)
    # nothing half-loaded stays behind: the session still holds (and clicks on) what it had
    assert [im.name for im in s.images] == ["s.png"] and s.nbytes() < 2**20
    assert app.similarity(s, 5, 5)[3][0]["score"] > 0.99


def test_command_line_binds_locally_and_warns_without_auth():
    opts, warnings = A.launch_options(A.parse_args([]))
    assert opts["server_name"] == "127.0.0.1" and "auth" not in opts and warnings == []
    assert opts["max_file_size"] == "500mb"
    opts, warnings = A.launch_options(A.parse_args(["--host", "0.0.0.0"]))
    assert len(warnings) == 1 and "--auth" in warnings[0]
    opts, warnings = A.launch_options(A.parse_args(["--host", "0.0.0.0", "--auth", "ana:s3cret:x"]))
    assert opts["auth"] == ("ana", "s3cret:x") and warnings == []
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(SystemExit):
            A.parse_args(["--auth", bad])
    assert A.parse_args(["--auth", ""]).auth is None  # DINOAPP_AUTH="" means no login


# --- the server: every endpoint through gradio_client, two sessions at once -----------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(the_app):
    demo = A.build_ui(the_app)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_every_endpoint_through_the_api(server, weights, tmp_path):
    server_weights = weights.parent
    from gradio_client import handle_file
    from PIL import Image

    c = _client(server)
    info = c.predict(api_name="/backbone_info")
    assert "ViT dim 192" in info
    assert "ViT dim 192" in c.predict(str(Path(server_weights) / "other.safetensors"), "B", api_name="/load_backbone")
    png, truth = two_regions(tmp_path / "a.png")
    img, pca_a, pca_b, meta = c.predict([handle_file(png)], 128, -1, "", "auto", 0, False, api_name="/explore")
    assert np.asarray(Image.open(img)).shape == (96, 128, 3) and Path(pca_a).suffix == ".png"
    assert pca_b is not None and meta["grid"] == [6, 8]
    sim_a, sim_b, top = c.predict(100, 20, 3, 0, api_name="/similarity")
    assert (top[0]["row"], top[0]["col"]) == (1, 6)
    assert np.asarray(Image.open(sim_a)).shape == (96, 128, 3)
    gallery = c.predict(False, api_name="/gallery")
    assert len(gallery) == 1
    maps = c.predict(False, api_name="/download_maps")
    assert [Path(m).suffix for m in maps] == [".png"]
    # head trainer: an ImageEditor value travels as files
    layer = tmp_path / "layer.png"
    Image.fromarray(strokes(96, 128, 64)["layers"][0]).save(layer)
    editor = {"background": handle_file(png), "layers": [handle_file(layer)], "composite": handle_file(layer)}
    status = c.predict(handle_file(png), editor, "red, blue", api_name="/add_scribbles")
    assert "1 training image" in status
    pred_img, metrics = c.predict(60, api_name="/train_head")
    assert metrics["scribble_accuracy"] >= 0.9
    mask = tmp_path / "mask.png"
    Image.fromarray(truth).save(mask)
    pred, m, files = c.predict(handle_file(png), handle_file(mask), api_name="/predict")
    assert m["miou"] >= 0.8 and np.asarray(Image.open(files[0])).shape == (96, 128)
    head = c.predict(api_name="/save_head")
    assert "head loaded" in c.predict(handle_file(head), api_name="/load_head")
    # from uploaded images + masks, and an image classifier
    a_mask = _save_mask(truth, tmp_path / "a_mask.png")  # masks pair with images by name
    pred_img, metrics = c.predict([handle_file(png)], [handle_file(a_mask)], "red, blue", 40,
                                  api_name="/train_from_masks")  # fmt: skip
    assert metrics["train_miou"] >= 0.8
    reds = [_solid(tmp_path / f"r{i}.png", RED, i) for i in range(2)]
    blues = [_solid(tmp_path / f"b{i}.png", BLUE, i) for i in range(2)]
    rows = c.predict([handle_file(p) for p in reds + blues], None, "red, red, blue, blue", "knn",
                     api_name="/train_classifier")  # fmt: skip
    assert [r[1] for r in rows["data"]] == ["red", "red", "blue", "blue"]
    shown, out, files = c.predict(handle_file(_solid(tmp_path / "q.png", BLUE, 5)), None, "blue", api_name="/predict")
    assert out["predicted"] == "blue" and out["correct"] is True
    assert "ViT dim 192" in c.predict(handle_file(weights.parent / "other.safetensors"), "B",
                                      api_name="/upload_backbone")  # fmt: skip
    with pytest.raises(Exception, match="explore an image first|outside|by path is off"):
        c.predict("/etc/passwd.pth", "A", api_name="/load_backbone")


def test_two_sessions_keep_their_own_images(server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import handle_file
    from PIL import Image

    small, _ = two_regions(tmp_path / "small.png", w=64, h=48, split=32)
    big, _ = two_regions(tmp_path / "big.png", w=160, h=112, split=80, seed=3)
    c1, c2 = _client(server), _client(server)

    def run(c, p):
        c.predict([handle_file(p)], 112, -1, "", "auto", 0, False, api_name="/explore")
        return c.predict(5, 5, 3, 0, api_name="/similarity")

    with ThreadPoolExecutor(2) as ex:
        r1, r2 = ex.map(run, (c1, c2), (small, big))
    assert np.asarray(Image.open(r1[0])).shape[:2] == (48, 64)
    assert np.asarray(Image.open(r2[0])).shape[:2] == (112, 160)
    # and a third client that never explored sees nothing of theirs
    with pytest.raises(Exception, match="explore an image first"):
        _client(server).predict(5, 5, 3, 0, api_name="/similarity")


def test_a_dicom_series_upload_is_one_volume_with_a_slice_control(the_app, tmp_path):
    pytest.importorskip("pydicom")
    from tests.dicom_factory import make_series

    paths, _, _ = make_series(tmp_path / "series", n=5, rows=48, cols=48)
    s, rgb, _, _, info = the_app.explore(None, paths, resolution=48, window="lung", slice_index=1)
    assert info["kind"] == "dicom" and info["images"] == 1 and info["slices"] == 5 and info["slice"] == 1
    assert "PatientName" not in str(info["meta"])
    _, _, _, _, middle = the_app.explore(s, paths, resolution=48, slice_index=-1)
    assert middle["slice"] == 2


def test_a_series_uploaded_with_other_images_is_one_volume_among_them(the_app, tmp_path):
    pytest.importorskip("pydicom")
    from tests.dicom_factory import make_series

    paths, _, _ = make_series(tmp_path / "series", n=4, rows=48, cols=48)
    png, _ = two_regions(tmp_path / "a.png")
    s, rgb, _, _, info = the_app.explore(None, [str(png), *paths], resolution=48)
    assert info["images"] == 2 and info["kind"] == "image"
    assert s.images[1].kind == "dicom" and s.images[1].n_slices == 4
    # single images of two other series stay two images, and no note names the upload folder
    one, _, _ = make_series(tmp_path / "one", n=1, rows=48, cols=48, series_uid="1.2.3.4")
    two, _, _ = make_series(tmp_path / "two", n=1, rows=48, cols=48, series_uid="1.2.3.6")
    s, _, _, _, info = the_app.explore(None, [str(png), *paths, one[0], two[0]], resolution=48)
    assert [(im.kind, im.n_slices) for im in s.images] == [("image", 1), ("dicom", 4), ("dicom", 1), ("dicom", 1)]
    assert str(tmp_path) not in str([im.meta for im in s.images])


# --- review findings: heads keep their read settings and backbone, paths scrubbed, clear messages ---------
def _band_scene(path: Path) -> Path:
    """4 bands: 1-3 smooth noise, band 4 dark on the left half and bright on the right (only it separates them)."""
    from tests.geo_factory import make_geotiff, smooth_bands

    data = smooth_bands(4, 96, 128)
    data[3] = np.where(np.arange(128)[None, :] < 64, 300, 3500).astype(data.dtype) + data[3] // 20
    return make_geotiff(path, data)


def test_a_head_reads_new_images_with_the_bands_it_was_trained_with(the_app, tmp_path):
    pytest.importorskip("rasterio")
    from PIL import Image

    from dinoapp import heads

    tif = _band_scene(tmp_path / "scene.tif")
    s, *_ = the_app.explore(None, [str(tif)], resolution=128, bands="4,3,2")
    s, msg = the_app.add_scribbles(s, str(tif), strokes(96, 128, 64), "dark, bright")
    s, _, _ = the_app.train_head(s, epochs=40)
    s, _, before, files = the_app.predict(s, str(tif))
    assert "bands 4,3,2" in before["read_with"]
    mask = np.asarray(Image.open(files[0]))
    s, *_ = the_app.explore(s, [str(tif)], resolution=128, bands="1,2,3")  # the explorer moves on: the head does not
    s, _, after, files = the_app.predict(s, str(tif))
    assert after == before and np.array_equal(np.asarray(Image.open(files[0])), mask)
    s, head_file = the_app.save_head(s)
    s2, *_ = the_app.explore(None, [str(tif)], resolution=128, bands="1,2,3")  # a fresh session, other bands
    s2, msg = the_app.load_head(s2, head_file)
    assert "bands 4,3,2" in msg
    s2, _, loaded, files = the_app.predict(s2, str(tif))
    assert loaded == before and np.array_equal(np.asarray(Image.open(files[0])), mask)
    # an older head file without read settings: the session's settings, said so
    import copy

    old = copy.deepcopy(s.head)
    old.preprocessing = {k: v for k, v in old.preprocessing.items() if k != "read"}
    heads.save_head(old, tmp_path / "old_head.safetensors")
    s3, msg = the_app.load_head(s2, str(tmp_path / "old_head.safetensors"))
    assert "does not record the bands" in msg
    _, _, m, _ = the_app.predict(s3, str(tif))
    assert "bands 1,2,3" in m["read_with"] and "explore settings" in m["read_with"]


def test_nodata_pixels_are_neither_trained_predicted_nor_scored(the_app, tmp_path):
    pytest.importorskip("rasterio")
    import rasterio
    from PIL import Image

    from tests.geo_factory import make_geotiff, smooth_bands

    data = smooth_bands(3, 96, 128)
    data[:, :, 64:] += 2000  # right half brighter
    data[:, :, 120:] = 0  # a nodata strip on the right edge, under the "bright" stroke's end
    tif = make_geotiff(tmp_path / "nd.tif", data, nodata=0)
    valid = np.ones((96, 128), bool)
    valid[:, 120:] = False
    s, *_ = the_app.explore(None, [str(tif)], resolution=128)
    s, _ = the_app.add_scribbles(s, str(tif), strokes(96, 128, 64), "dark, bright")
    s, _, train = the_app.train_head(s, epochs=30)
    truth = np.where(np.arange(128)[None, :] < 64, 0, 1).repeat(96, 0).astype(np.uint8)  # nodata labelled too
    Image.fromarray(truth).save(tmp_path / "truth.png")
    s, _, m, files = the_app.predict(s, str(tif), str(tmp_path / "truth.png"))
    assert sum(m["pixels"].values()) == int(valid.sum())  # the strip is no class
    png = np.asarray(Image.open(next(f for f in files if f.endswith(".png"))))
    assert (png[~valid] == 255).all() and (png[valid] < 2).all()
    with rasterio.open(next(f for f in files if f.endswith(".tif"))) as src:
        assert src.nodata == 255 and (src.read(1)[~valid] == 255).all()
    assert m["miou"] > 0.9  # scored on the valid pixels only


def test_a_dicom_head_keeps_its_window(the_app, tmp_path):
    pytest.importorskip("pydicom")
    from tests.dicom_factory import make_series

    paths, _, _ = make_series(tmp_path / "series", n=1, rows=48, cols=48)
    s, *_ = the_app.explore(None, paths, resolution=48, window="lung")
    layer = np.zeros((48, 48, 4), np.uint8)
    layer[5:10, 5:20] = (*A.CLASS_COLORS[0], 255)
    layer[35:40, 25:45] = (*A.CLASS_COLORS[1], 255)
    s, _ = the_app.add_scribbles(s, paths[0], {"background": None, "layers": [layer], "composite": layer}, "a, b")
    s, _, _ = the_app.train_head(s, epochs=10)
    s, _, before, _ = the_app.predict(s, paths[0])
    assert "DICOM window lung" in before["read_with"]
    s, *_ = the_app.explore(s, paths, resolution=48, window="bone")
    _, _, after, _ = the_app.predict(s, paths[0])
    assert after == before


def test_heads_on_the_demo_backbone_name_its_file_not_its_install_path(the_app, tmp_path):
    import json

    from safetensors import safe_open

    from dinoapp.demo import DEMO_WEIGHTS

    demo = A.App(A.Settings(weights="demo"))
    png, _ = two_regions(tmp_path / "a.png")
    s, *_ = demo.explore(None, [str(png)], resolution=64)
    s, _ = demo.add_scribbles(s, str(png), strokes(96, 128, 64), "red, blue")
    s, _, _ = demo.train_head(s, epochs=5)
    _, path = demo.save_head(s)
    with safe_open(path, "pt") as f:
        meta = f.metadata()["dinoapp"]
    assert json.loads(meta)["backbone"]["source"] == DEMO_WEIGHTS.name and str(DEMO_WEIGHTS.parent) not in meta
    with pytest.raises(Exception, match="trained on features of") as e:  # another backbone: the error names files
        the_app.load_head(None, path)
    assert DEMO_WEIGHTS.name in str(e.value) and str(DEMO_WEIGHTS.parent) not in str(e.value)


def test_a_head_is_saved_with_its_own_backbone_after_backbone_a_changed(the_app, weights, tmp_path):
    import json

    from safetensors import safe_open

    png, truth = two_regions(tmp_path / "a.png")
    s, _ = the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "red, blue")
    s, _, _ = the_app.train_head(s, epochs=20)
    s, _ = the_app.load_backbone(s, str(weights.parent / "other.safetensors"), "A")
    s, path = the_app.save_head(s)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["dinoapp"])["backbone"]["source"] == "tiny.safetensors"
    s2, _ = the_app.load_head(None, path)  # a fresh session on tiny.safetensors takes it
    _, _, m, _ = the_app.predict(s2, str(png), str(_save_mask(truth, tmp_path / "gt.png")))
    assert m["miou"] >= 0.8


def test_duplicate_class_names_are_refused(the_app, tmp_path):
    png, truth = two_regions(tmp_path / "a.png")
    with pytest.raises(InputError, match="'a' and 'A' are the same"):
        the_app.add_scribbles(None, str(png), strokes(96, 128, 64), "a,  A ")
    mask = _save_mask(truth, tmp_path / "a_mask.png")
    with pytest.raises(InputError, match="are the same"):
        the_app.train_from_masks(None, [str(png)], [str(mask)], "red, red", 10)


def test_scrub_paths_cuts_whole_folders_only():
    from huggingface_hub.constants import HF_HUB_CACHE

    s = A.Settings(allowed_dir=Path("/var/tmp/rv_allowed"))
    msg = "/etc/passwd is outside the allowed folder /var/tmp/rv_allowed"
    assert A.scrub_paths(msg, s) == "/etc/passwd is outside the allowed folder <allowed folder>"
    assert A.scrub_paths("/var/tmp/rv_allowed/a/b.png: bad", s) == "b.png: bad"
    assert A.scrub_paths("see /tmpfoo/x.png and /var/tmpx", s) == "see /tmpfoo/x.png and /var/tmpx"
    hosp = A.Settings(allowed_dir=Path("/srv/hospital/data"))
    assert A.scrub_paths("/srv/hospital/data", hosp) == "<allowed folder>"
    assert A.scrub_paths("no such file under /srv/hospital/data.", hosp) == "no such file under <allowed folder>."
    assert A.scrub_paths("(path=/srv/hospital/data/p1/ct.dcm)", hosp) == "(path=ct.dcm)"
    assert A.scrub_paths("/srv/hospital/database/x.png", hosp) == "/srv/hospital/database/x.png"
    hub_file = f"{HF_HUB_CACHE}/models--timm--vit/snapshots/0a1b/model.safetensors"
    assert A.scrub_paths(f"'{hub_file}' is damaged", s) == "'model.safetensors' is damaged"
    assert A.scrub_paths(f"cache: {HF_HUB_CACHE}", s) == "cache: <hub cache>"
    assert A.scrub_paths(f"{Path.home()}/models/x.pth: missing", s) == "x.pth: missing"


@pytest.mark.parametrize("weights_arg", ["missing.pth", "vit_huge_plus_patch16_dinov3.lvd1689m"])
def test_a_bad_weights_option_is_a_one_line_error(weights_arg, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # nothing cached
    r = subprocess.run([sys.executable, str(Path(A.__file__).resolve()), "--weights", weights_arg], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_timm_name_that_is_not_dinov3_says_how_to_load_it(the_app, weights):
    with pytest.raises(InputError, match="neither a released DINOv3 model name .* nor a file in the allowed folder.*"
                                         "--weights vit_base_patch16_224"):  # fmt: skip
        the_app.load_backbone(None, "vit_base_patch16_224")
    s, text = the_app.load_backbone(None, "other.safetensors", "B")  # a bare name of a file in the allowed folder
    assert "ViT dim 192" in text and s.sources["B"] == str((weights.parent / "other.safetensors").resolve())


def test_cross_image_similarity_has_the_comparison_map_too(the_app, weights, tmp_path):
    a, _ = two_regions(tmp_path / "a.png")
    b, _ = two_regions(tmp_path / "b.png", split=40, seed=2)
    s, _ = the_app.load_backbone(None, str(weights.parent / "other.safetensors"), "B")
    s, *_ = the_app.explore(s, [str(a), str(b)], resolution=128)
    s, sim_a, sim_b, _ = the_app.similarity(s, 10, 10, k=3, target=1)
    assert sim_b is not None and sim_b.shape == sim_a.shape


def test_the_api_names_every_parameter(server):
    api = _client(server).view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {ep: [p["parameter_name"] for p in info["parameters"]] for ep, info in api.items()}
    assert names["/explore"] == ["files", "resolution", "layer", "bands", "window", "slice_index", "foreground"]
    assert names["/similarity"] == ["x", "y", "k", "target"]
    assert names["/train_head"] == ["epochs"]
    assert not [(ep, n) for ep, ns in names.items() for n in ns if n.startswith("param_")], names
