"""The shipped demo weights (dinoapp/demo/weights/) and the recipe that rebuilds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoapp import SourceNotFoundError, demo, dense_features, load_backbone
from dinoapp.ssl.config import load_config, preset_names
from dinoapp.ssl.monitor import effective_rank, locality

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def shipped():
    return demo.demo_backbone()


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()  # held out of the demo training data


def _patch_stats(bb, image) -> tuple[float, float]:
    f = dense_features(bb, image, resolution=224).patches  # [h, w, D]
    h, w, d = f.shape
    return locality(f.reshape(1, h * w, d), (h, w)), effective_rank(f)


# ------------------------------------------------------------------------------------- shipped file
def test_shipped_file_is_small_and_inside_the_package():
    assert demo.DEMO_WEIGHTS.is_file(), f"{demo.DEMO_WEIGHTS} is missing: run python -m dinoapp.demo build"
    assert demo.DEMO_WEIGHTS.stat().st_size <= demo.MAX_BYTES
    assert demo.DEMO_WEIGHTS.parent.parent == Path(demo.__file__).parent
    assert demo.DEMO_WEIGHTS.suffix == ".safetensors"  # no pickle in a file every user loads


def test_package_data_lists_the_weights():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"dinoapp.demo" = ["weights/*.safetensors", "weights/*.md"]' in text


def test_shipped_backbone_loads_with_the_demo_recipe_provenance(shipped):
    bb = shipped
    cfg = load_config(demo.PRESET)
    assert (bb.embed_dim, bb.n_blocks, bb.patch_size, bb.in_chans) == (192, 4, 16, 3)
    assert not bb.training and bb.pretrained_heads == {}  # heads stripped: backbone only
    prov = bb.provenance
    assert prov["preset"] == "demo-weights" and prov["recipe"] == "preset demo-weights"
    assert prov["layout"] == "dinoapp" and prov["init"] == "vit_tiny"  # from scratch, no Meta weights
    assert prov["steps"] == prov["trained_steps"] == cfg.train.steps
    assert prov["seed"] == cfg.train.seed
    assert prov["dinoapp_version"] and prov["command"] == "python -m dinoapp.demo build"
    data = json.loads(prov["data"])
    assert data == sorted(data) and "coffee.png" in data and "sentinel2_b2348_256.tif" in data
    assert prov["held_out"] == "astronaut" and not any(n.startswith("astronaut") for n in data)
    assert "no Meta weights" in prov["licence"]


def _region_contrast(bb, image) -> float:
    """On the held-out astronaut photo (14x14 patches at 224 px): mean cosine similarity between patches
    of the orange suit, minus that between suit and sky-grey background patches."""
    import torch.nn.functional as F

    f = F.normalize(dense_features(bb, image, resolution=224).patches.float(), dim=-1)  # [14, 14, D]
    suit = torch.stack([f[10, 2], f[12, 4], f[11, 1], f[13, 3]])  # lower left: the suit
    background = torch.stack([f[2, 12], f[1, 11], f[4, 13], f[3, 10]])  # upper right: the wall
    same = (suit @ suit.T)[~torch.eye(4, dtype=torch.bool)].mean()
    return float(same - (suit @ background.T).mean())


def test_shipped_features_are_finite_and_trained(shipped, astronaut):
    """Not a random init: compared with the very init the recipe starts from (vit_tiny, seed 0) on a
    held-out photo, the trained features tell the suit from the background far better (random ViT
    features are mostly pixel colour: measured contrast 0.26 random vs 0.91 trained), and keep their
    spatial coherence."""
    rand = load_backbone("vit_tiny", seed=load_config(demo.PRESET).train.seed)
    x = torch.rand(2, 3, 64, 96)
    out = shipped.forward_features(x)
    assert all(torch.isfinite(out[k]).all() for k in ("x_norm_clstoken", "x_norm_patchtokens"))
    trained, random_init = _region_contrast(shipped, astronaut), _region_contrast(rand, astronaut)
    assert trained > random_init + 0.25, (trained, random_init)
    loc_demo, _ = _patch_stats(shipped, astronaut)
    assert loc_demo > 0.1, loc_demo


def _cls_margin(bb, images) -> float:
    """Mean cosine between the CLS tokens of views of one image (flip, centre crop, grey) minus that
    between different images: what DINO trains for (random ViT CLS tokens are all alike)."""
    import torch.nn.functional as F

    from dinoapp import preprocess

    embs = []
    for img in images:
        h, w = img.shape[:2]
        views = [img, img[:, ::-1].copy(), img[h // 8 : h - h // 8, w // 8 : w - w // 8].copy(),
                 img.mean(2, keepdims=True).repeat(3, 2).astype(img.dtype)]  # fmt: skip
        x = torch.stack([preprocess(v, bb, size=(224, 224)) for v in views])  # [V, 3, 224, 224]
        with torch.no_grad():
            embs.append(F.normalize(bb.forward_features(x)["x_norm_clstoken"], dim=-1))  # [V, D]
    e = torch.stack(embs)  # [I, V, D]
    n_img, n_view = e.shape[:2]
    sim = torch.einsum("ivd,jwd->ivjw", e, e)  # [I, V, I, V]
    same_img = torch.eye(n_img, dtype=torch.bool)[:, None, :, None].expand_as(sim)
    same_view = torch.eye(n_view, dtype=torch.bool)[None, :, None, :].expand_as(sim)
    return float(sim[same_img & ~same_view].mean() - sim[~same_img].mean())


def test_shipped_cls_tokens_tell_images_apart(shipped, astronaut):
    skimage_data = pytest.importorskip("skimage.data")
    images = [astronaut, skimage_data.coffee(), skimage_data.cat(), skimage_data.rocket()]
    rand = load_backbone("vit_tiny", seed=load_config(demo.PRESET).train.seed)
    trained, random_init = _cls_margin(shipped, images), _cls_margin(rand, images)
    assert random_init < 0.05 and trained > random_init + 0.2, (trained, random_init)


def test_demo_backbone_names_the_rebuild_command_when_the_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(SourceNotFoundError, match=r"python -m dinoapp\.demo build") as e:
        demo.demo_backbone()
    assert isinstance(e.value, FileNotFoundError)


def test_notice_says_what_the_weights_are_and_how_to_load_real_ones():
    n = demo.DEMO_NOTICE
    for part in ("demo weights", "illustrative", "--weights", "DINOAPP_WEIGHTS", "backbone panel",
                 "vit_small_patch16_dinov3.lvd1689m", ".pth", "no Meta weights"):  # fmt: skip
        assert part.lower() in n.lower(), part


def test_info_prints_the_provenance_of_the_shipped_file():
    r = subprocess.run([sys.executable, "-m", "dinoapp.demo", "info"], env=_env(), capture_output=True, text=True,
                       timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "preset demo-weights" in r.stdout and "python -m dinoapp.demo build" in r.stdout
    assert demo.provenance()["sha256"] in r.stdout
    assert "DINOAPP_WEIGHTS" in r.stdout  # the notice
    r = subprocess.run([sys.executable, "-m", "dinoapp.demo", "info", "--json"], env=_env(), capture_output=True,
                       text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert json.loads(r.stdout)["preset"] == "demo-weights"


def test_info_on_a_missing_file_is_an_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dinoapp.demo", "info", str(tmp_path / "x.safetensors")], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "dinoapp.demo build" in r.stderr


# ------------------------------------------------------------------------------------------- recipe
def test_recipe_preset_loads():
    assert "demo-weights" in preset_names()
    cfg = load_config("demo-weights")
    assert cfg.model.backbone == "vit_tiny" and not cfg.model.arch_overrides
    assert (cfg.data.global_size, cfg.data.local_size, cfg.data.bands) == (112, 48, "rgb")
    assert cfg.loss.ibot_weight > 0 and cfg.loss.koleo_weight > 0
    assert cfg.train.precision == "fp32"


def test_demo_data_is_fixed_and_offline(tmp_path):
    pytest.importorskip("skimage")
    names = demo.prepare_demo_data(tmp_path / "a")
    assert names == sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) >= 40 and "coffee_q3.png" in names and "stereo_motorcycle_r.png" in names
    assert not any(n.startswith(demo.HELD_OUT) for n in names)
    names_b = demo.prepare_demo_data(tmp_path / "b")
    assert names_b == names
    assert demo.data_digest(tmp_path / "a", names) == demo.data_digest(tmp_path / "b", names)
    from PIL import Image

    with Image.open(tmp_path / "a" / "logo.png") as im:  # RGBA composited, grey repeated: every PNG is RGB
        assert im.mode == "RGB" and max(im.size) <= demo.MAX_SIDE


@pytest.mark.slow
def test_build_runs_end_to_end_and_writes_a_loadable_file(tmp_path):
    pytest.importorskip("skimage")
    out = demo.build_demo_weights(tmp_path / "w" / "demo.safetensors", steps=2, work_dir=tmp_path / "work",
                                  progress=False)  # fmt: skip
    assert out.is_file() and out.stat().st_size <= demo.MAX_BYTES
    assert (tmp_path / "work" / "run" / "export" / "teacher_backbone.safetensors").is_file()  # the engine's export
    bb = load_backbone(out)
    assert bb.pretrained_heads == {}
    prov = bb.provenance
    assert prov["trained_steps"] == prov["steps"] == 2 and prov["recipe"] == "preset demo-weights train.steps=2"
    assert prov["command"] == "python -m dinoapp.demo build --steps 2"
    assert json.loads(prov["data"]) == demo.prepare_demo_data(tmp_path / "again")
    assert torch.isfinite(bb.forward_features(torch.rand(1, 3, 48, 48))["x_norm_patchtokens"]).all()
    r = subprocess.run([sys.executable, "-m", "dinoapp.demo", "info", str(out)], env=_env(), capture_output=True,
                       text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and "train.steps=2" in r.stdout
