"""timm names resolve through the local Hugging Face cache, offline."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import dinoapp
from dinoapp.hub import split_timm_name


def _fake_cache(cache, repo, state_dict):
    rev = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snap / "model.safetensors"))


@pytest.mark.parametrize("name,sat", [("vit_large_patch16_dinov3.sat493m", True),
                                      ("vit_small_patch16_dinov3_qkvb.lvd1689m", False)])  # fmt: skip
def test_cached_timm_name_loads_offline(tmp_path, name, sat):
    model_name = name.split(".")[0]
    # a small random model saved under the real repo name (the loader reads the arch from the weights)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, embed_dim=192, depth=2, num_heads=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("q_bias") or n.endswith("v_bias"):
                p.normal_()
    _fake_cache(tmp_path, "timm/" + name, model.state_dict())
    bb = dinoapp.load_backbone(name, cache_dir=tmp_path)
    assert bb.provenance["source"] == name and bb.provenance["layout"] == "timm"
    assert bb.embed_dim == 192 and bb.n_blocks == 2
    assert bb.mean == (dinoapp.SAT_MEAN if sat else dinoapp.LVD_MEAN)
    assert bb.arch.qkv_bias == ("qkvb" in name)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        ours = bb.forward_features(x)["x_norm_patchtokens"]
    assert (ref[:, 5:] - ours).abs().max() <= 1e-5


def test_split_timm_name():
    assert split_timm_name("vit_base_patch16_dinov3.lvd1689m") == ("vit_base_patch16_dinov3", "lvd1689m")
    assert split_timm_name("vit_base_patch16_dinov3") == ("vit_base_patch16_dinov3", None)
    assert split_timm_name("resnet50.a1_in1k") is None


def test_normalisation_override(tmp_path):
    bb = dinoapp.load_backbone("vit_tiny", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), depth=2)
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.25, 0.25) and bb.n_blocks == 2
    with pytest.raises(dinoapp.ConfigError, match="mean/std"):
        dinoapp.load_backbone("vit_tiny", mean=(0.5, 0.5))
