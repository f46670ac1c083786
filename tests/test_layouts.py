"""The same weights in every checkpoint layout load to identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, make_meta_state_dict
from safetensors.torch import save_file

import dinoapp
from dinoapp.arch import ARCHS
from dinoapp.layouts import detect_layout, infer_arch, timm_to_meta

X = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(11))


def _outputs(bb):
    with torch.no_grad():
        return bb.forward_features(X)


def _same(a, b, atol=0.0):
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        err = (a[key] - b[key]).abs().max().item()
        assert err <= atol, f"{key}: {err}"


def meta_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test-side writer of the Hugging Face layout (independent of dinoapp's reader)."""
    D = sd["cls_token"].shape[-1]
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, D),
        "embeddings.register_tokens": sd["storage_tokens"],
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, h = f"blocks.{i}.", f"layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        bq, _, bv = sd[b + "attn.qkv.bias"].chunk(3)
        out |= {
            h + "norm1.weight": sd[b + "norm1.weight"], h + "norm1.bias": sd[b + "norm1.bias"],
            h + "norm2.weight": sd[b + "norm2.weight"], h + "norm2.bias": sd[b + "norm2.bias"],
            h + "attention.q_proj.weight": q, h + "attention.k_proj.weight": k, h + "attention.v_proj.weight": v,
            h + "attention.q_proj.bias": bq, h + "attention.v_proj.bias": bv,
            h + "attention.o_proj.weight": sd[b + "attn.proj.weight"],
            h + "attention.o_proj.bias": sd[b + "attn.proj.bias"],
            h + "layer_scale1.lambda1": sd[b + "ls1.gamma"], h + "layer_scale2.lambda1": sd[b + "ls2.gamma"],
        }  # fmt: skip
        if b + "mlp.w1.weight" in sd:
            for hf, meta in (("gate", "w1"), ("up", "w2"), ("down", "w3")):
                out[h + f"mlp.{hf}_proj.weight"] = sd[b + f"mlp.{meta}.weight"]
                out[h + f"mlp.{hf}_proj.bias"] = sd[b + f"mlp.{meta}.bias"]
        else:
            for hf, meta in (("up", "fc1"), ("down", "fc2")):
                out[h + f"mlp.{hf}_proj.weight"] = sd[b + f"mlp.{meta}.weight"]
                out[h + f"mlp.{hf}_proj.bias"] = sd[b + f"mlp.{meta}.bias"]
        i += 1
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def meta_bb(tmp_path_factory):
    sd = make_meta_state_dict(TINY, seed=7)
    path = tmp_path_factory.mktemp("lay") / "meta.pth"
    torch.save(sd, path)
    return sd, dinoapp.load_backbone(path)


def test_teacher_dump_loads_identically_and_keeps_heads(meta_bb, tmp_path):
    sd, bb = meta_bb
    heads = {"dino_head.mlp.0.weight": torch.randn(64, 192), "ibot_head.last_layer.weight": torch.randn(100, 32)}
    dump = {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, **heads}}
    torch.save(dump, tmp_path / "teacher_checkpoint.pth")
    t = dinoapp.load_backbone(tmp_path / "teacher_checkpoint.pth")
    assert t.provenance["layout"] == "teacher"
    _same(_outputs(t), _outputs(bb))
    assert set(t.pretrained_heads) == {"dino_head", "ibot_head"}
    assert torch.equal(t.pretrained_heads["dino_head"]["mlp.0.weight"], heads["dino_head.mlp.0.weight"])


def test_timm_layout_from_timms_own_converter(meta_bb, tmp_path):
    """timm converts the Meta file itself (its checkpoint_filter_fn); we load timm's result."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    sd, bb = meta_bb
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0,
                              embed_dim=192, depth=4, num_heads=3)  # fmt: skip
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    for name, save in (("t.pth", torch.save), ("t.safetensors", lambda s, p: save_file(s, str(p)))):
        save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / name)
        t = dinoapp.load_backbone(tmp_path / name)
        assert t.provenance["layout"] == "timm"
        assert "mask_token" in t.provenance  # timm files carry no mask token: said, not hidden
        _same(_outputs(t), _outputs(bb))
        assert t.arch.qkv_bias  # non-zero q/v biases survived
    with torch.no_grad():  # and timm's own forward agrees with ours on patch tokens
        ref = model.forward_features(X)
    assert (ref[:, 5:] - _outputs(bb)["x_norm_patchtokens"]).abs().max() <= 1e-5


def test_hf_file_and_folder(meta_bb, tmp_path):
    sd, bb = meta_bb
    hf = meta_to_hf(sd)
    save_file(hf, str(tmp_path / "model.safetensors"))
    f = dinoapp.load_backbone(tmp_path / "model.safetensors")
    assert f.provenance["layout"] == "hf"
    _same(_outputs(f), _outputs(bb))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                    "image_std": [0.5, 0.5, 0.5]}))  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 3, "layer_norm_eps": 1e-5}))
    d = dinoapp.load_backbone(tmp_path)
    _same(_outputs(d), _outputs(bb))
    assert d.mean == (0.1, 0.2, 0.3)
    assert d.provenance["normalisation"] == "preprocessor_config.json"


def test_transformers_dinov3_model_agrees(meta_bb, tmp_path):
    """Hugging Face's own DINOv3ViTModel, given the same weights, is a second independent reference."""
    transformers = pytest.importorskip("transformers")
    sd, bb = meta_bb
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        num_register_tokens=4, layerscale_value=1.0, query_bias=True, key_bias=False, value_bias=True,
    )  # fmt: skip
    model = transformers.DINOv3ViTModel(cfg).eval()
    hf = meta_to_hf(sd)
    if any(k.startswith("model.layer.") for k in model.state_dict()):  # transformers >= 5 module names
        hf = {("model." + k if k.startswith("layer.") else k): v for k, v in hf.items()}
    model.load_state_dict(hf, strict=True)
    model.save_pretrained(tmp_path / "hf")
    ours = dinoapp.load_backbone(tmp_path / "hf")
    with torch.no_grad():
        hs = model(pixel_values=X).last_hidden_state  # [B, 1+R+N, D], final norm applied
    o = _outputs(ours)
    _same(o, _outputs(bb))
    assert (hs[:, 0] - o["x_norm_clstoken"]).abs().max() <= 1e-5
    assert (hs[:, 5:] - o["x_norm_patchtokens"]).abs().max() <= 1e-5


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dinoapp_checkpoint_round_trip(meta_bb, tmp_path, suffix):
    _, bb = meta_bb
    bb.pretrained_heads = {"dino_head": {"w": torch.randn(4, 4)}}
    path = dinoapp.save_backbone(bb, tmp_path / f"run{suffix}")
    back = dinoapp.load_backbone(path)
    _same(_outputs(back), _outputs(bb))
    assert back.arch == bb.arch and back.mean == bb.mean
    assert back.provenance["layout"] == "dinoapp" and back.sha256 and back.sha256 != bb.sha256
    assert torch.equal(back.pretrained_heads["dino_head"]["w"], bb.pretrained_heads["dino_head"]["w"])
    assert torch.equal(back.mask_token, bb.mask_token)
    bb.pretrained_heads = {}


def test_meta_export_round_trip(meta_bb, tmp_path):
    sd, bb = meta_bb
    exported = bb.meta_state_dict()
    assert set(exported) == set(sd)
    D = TINY.embed_dim
    for k in sd:
        if k.endswith("qkv.bias"):  # q and v kept, the (masked) k third exported as zeros
            assert torch.equal(exported[k][:D], sd[k][:D]) and torch.equal(exported[k][2 * D :], sd[k][2 * D :])
            assert not exported[k][D : 2 * D].any()
        else:
            assert torch.equal(exported[k].to(sd[k].dtype).reshape(sd[k].shape), sd[k]), k
    torch.save(exported, tmp_path / "again.pth")
    _same(_outputs(dinoapp.load_backbone(tmp_path / "again.pth")), _outputs(bb))


def test_released_architectures_detected_from_shapes():
    """Every released model's layout is recognised from tensor shapes alone (meta device: no memory)."""
    for name in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16"):
        arch = ARCHS[name]
        with torch.device("meta"):
            sd = make_meta_state_dict(arch.replace(depth=2), seed=0)
        if name == "vit7b16":
            sd["local_cls_norm.weight"] = torch.empty(arch.embed_dim, device="meta")
        got = infer_arch(sd)
        assert got == arch.replace(depth=2, local_cls_norm=name == "vit7b16"), name


def test_distilled_zero_biases_detected_as_no_bias(tmp_path):
    sd = make_meta_state_dict(TINY, seed=2)
    for k in sd:
        if k.endswith("qkv.bias"):
            sd[k] = torch.zeros_like(sd[k])
    assert not infer_arch(sd).qkv_bias
    torch.save(sd, tmp_path / "z.pth")
    assert not dinoapp.load_backbone(tmp_path / "z.pth").arch.qkv_bias


def test_layout_detection_and_wrappers(tiny_sd):
    assert detect_layout(tiny_sd) == "meta"
    wrapped = {"module." + k: v for k, v in tiny_sd.items()}
    assert detect_layout(wrapped) == "meta"
    assert detect_layout({"teacher": {}}) == "teacher"
    assert timm_to_meta({"reg_token": torch.zeros(1, 4, 8)})["storage_tokens"].shape == (1, 4, 8)
