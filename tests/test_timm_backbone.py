"""TimmBackbone: any timm model with a dense feature map behind the backbone contract.

Checked against timm's own ``forward_intermediates`` (an independent reference), through
save/load round trips, the ``timm:`` sources of ``load_backbone`` and the frozen-feature code
(extract, dense features, heads, identity). Tiny models (ConvNeXt-atto, ResNet-18) at 64 px.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinoapp
from dinoapp.checkpoint import backbone_record, check_record
from dinoapp.errors import (
    CheckpointMismatchError,
    ConfigError,
    HubUnavailableError,
    InputError,
    UnknownSourceError,
    UnsupportedFormatError,
)
from dinoapp.identity import backbone_fingerprint, backbone_identity
from dinoapp.preprocess import preprocess
from dinoapp.timm_backbone import TimmArch, TimmBackbone


def _randomise_norm(bb: TimmBackbone, seed: int = 1) -> TimmBackbone:
    """A non-identity affine on the trainable norm, so tests see it applied (it starts as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bb.norm.weight.copy_(1 + 0.3 * torch.randn(bb.embed_dim, generator=g))
        bb.norm.bias.copy_(0.2 * torch.randn(bb.embed_dim, generator=g))
    return bb


@pytest.fixture(scope="module")
def atto() -> TimmBackbone:
    """ConvNeXt-atto, patch map = stage 2 (stride 16, 160 channels)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _randomise_norm(TimmBackbone("convnext_atto", out_index=2)).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # [B, C, H, W]


def _reference_stage(bb: TimmBackbone, x: torch.Tensor, stage: int) -> torch.Tensor:
    """timm's own map of ``stage`` [B, C, h, w], from an unpruned copy of the model holding bb's weights."""
    import timm

    ref = timm.create_model(bb.arch.model_name, num_classes=0, in_chans=bb.in_chans, **bb.arch.model_kwargs).eval()
    missing, unexpected = ref.load_state_dict(bb.model.state_dict(), strict=False)
    assert not unexpected and missing  # every weight of bb fits; only the pruned stages/head stay random
    with torch.no_grad():
        return ref.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]


# --- the contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_index", "stride", "dim", "n_blocks"), [(2, 16, 160, 3), (-1, 32, 320, 4)])
def test_contract_shapes(out_index, stride, dim, n_blocks):
    bb = TimmBackbone("convnext_atto", out_index=out_index).eval()
    assert (bb.patch_size, bb.embed_dim, bb.n_blocks) == (stride, dim, n_blocks)
    assert bb.num_heads is None and bb.n_registers == 0 and bb.n_storage_tokens == 0 and bb.in_chans == 3
    assert bb.mean == dinoapp.LVD_MEAN and bb.std == dinoapp.LVD_STD
    assert bb.arch.out_index == n_blocks - 1  # stored as an absolute stage index
    assert bb.stage_dims[-1] == dim and bb.stage_strides[-1] == stride and len(bb.stage_dims) == n_blocks
    assert torch.equal(bb.norm.weight, torch.ones(dim)) and torch.equal(bb.norm.bias, torch.zeros(dim))
    x = torch.randn(2, 3, 64, 96)
    h, w = 64 // stride, 96 // stride
    with torch.no_grad():
        out = bb.forward_features(x)
        assert out["x_norm_clstoken"].shape == (2, dim)
        assert out["x_storage_tokens"].shape == (2, 0, dim)
        assert out["x_norm_patchtokens"].shape == (2, h * w, dim)
        assert out["x_prenorm"].shape == (2, 1 + h * w, dim) and out["masks"] is None
        assert torch.equal(bb(x), out["x_norm_clstoken"])
        assert torch.equal(bb(x, is_training=True)["x_norm_patchtokens"], out["x_norm_patchtokens"])
        # the pooled token is the mean of the pre-norm patch tokens; norm applies to both
        pre = out["x_prenorm"]
        assert torch.allclose(pre[:, 0], pre[:, 1:].mean(1), atol=1e-5)
        assert torch.allclose(bb.norm(pre)[:, 1:], out["x_norm_patchtokens"])
        # list input -> list of dicts, each as if run alone (batch 1 and another size)
        outs = bb.forward_features([x[:1], x[:1, :, :stride, : 2 * stride]])
        assert isinstance(outs, list) and len(outs) == 2
        assert torch.allclose(outs[0]["x_norm_patchtokens"], out["x_norm_patchtokens"][:1], atol=1e-5)
        assert outs[1]["x_norm_patchtokens"].shape == (1, 2, dim)
        assert bb.forward_features([x, x], masks=[None, None])[1]["x_norm_clstoken"].shape == (2, dim)


def test_bad_inputs_and_masks(atto, x):
    with pytest.raises(InputError, match="unmasked crops only"):
        atto.forward_features(x, masks=torch.zeros(2, 24, dtype=torch.bool))
    with pytest.raises(InputError, match="ViTs"):
        atto.forward_features([x, x], masks=[torch.zeros(2, 24, dtype=torch.bool), None])
    with pytest.raises(InputError, match=r"56x96 is not a multiple of the 16px stride.*e\.g\. 48x96 or 64x96"):
        atto.forward_features(x[..., :56, :])
    with pytest.raises(InputError, match="multiple"):
        atto.forward_features(x[..., :8, :8])  # smaller than one patch
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        atto.forward_features(x[0])
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        atto.forward_features(torch.randn(1, 4, 64, 64))
    with pytest.raises(InputError, match="n=5"):
        atto.get_intermediate_layers(x, n=5)
    with pytest.raises(InputError, match=r"stage indices \[3\]"):
        atto.get_intermediate_layers(x, n=[0, 3])


def test_patch_tokens_match_timm_forward_intermediates(atto, x):
    """Independent reference: timm's stage map, flattened row-major, LayerNorm'd with bb's affine."""
    ref = _reference_stage(atto, x, 2)  # [B, 160, 4, 6]
    assert ref.shape == (2, 160, 4, 6)
    tokens = ref.flatten(2).transpose(1, 2)  # [B, 24, 160]
    w, b = atto.norm.weight.detach(), atto.norm.bias.detach()
    with torch.no_grad():
        out = atto.forward_features(x)
    assert torch.allclose(out["x_prenorm"][:, 1:], tokens, atol=1e-5)
    assert torch.allclose(out["x_norm_patchtokens"], F.layer_norm(tokens, (160,), w, b, eps=1e-6), atol=1e-4)
    assert torch.allclose(out["x_norm_clstoken"], F.layer_norm(ref.mean((2, 3)), (160,), w, b, eps=1e-6), atol=1e-4)
    # row-major: token r*w + c is grid cell (r, c)
    assert torch.allclose(out["x_prenorm"][:, 1 + 1 * 6 + 4], ref[:, :, 1, 4], atol=1e-5)


def test_later_stages_not_run(atto, x):
    """Stages after out_index are pruned (no parameters, never computed); earlier-only requests stop early."""
    assert len(atto.model.stages) == 3
    assert not any(k.startswith("model.stages.3") for k in atto.state_dict())
    calls: list[int] = []
    hooks = [s.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, s in enumerate(atto.model.stages)]
    try:
        with torch.no_grad():
            atto.forward_features(x)
            assert calls == [0, 1, 2]
            calls.clear()
            atto.get_intermediate_layers(x, n=[0])
            assert calls == [0]  # stop_early: stage 0 only
    finally:
        for h in hooks:
            h.remove()


def test_later_stages_not_run_without_pruning(monkeypatch, x):
    """A model without prune_intermediate_layers keeps its later stages, but forward stops early."""
    from timm.models.convnext import ConvNeXt

    monkeypatch.delattr(ConvNeXt, "prune_intermediate_layers")
    bb = TimmBackbone("convnext_atto", out_index=2).eval()
    assert len(bb.model.stages) == 4
    fired: list[int] = []
    hook = bb.model.stages[3].register_forward_hook(lambda *a: fired.append(3))
    try:
        with torch.no_grad():
            out = bb.forward_features(x)
            bb.get_intermediate_layers(x, n=3)
    finally:
        hook.remove()
    assert not fired and out["x_norm_patchtokens"].shape == (2, 24, 160)


def test_intermediate_stages(atto, x):
    with torch.no_grad():
        out = atto.forward_features(x)
        (last,) = atto.get_intermediate_layers(x)
        assert torch.allclose(last, out["x_norm_patchtokens"], atol=1e-6)
        outs = atto.get_intermediate_layers(x, n=[0, 1, -1], reshape=True, return_class_token=True,
                                            return_extra_tokens=True)  # fmt: skip
        assert [tuple(p.shape) for p, _, _ in outs] == [(2, 40, 4, 6), (2, 80, 4, 6), (2, 160, 4, 6)]
        assert [tuple(c.shape) for _, c, _ in outs] == [(2, 40), (2, 80), (2, 160)]
        assert [tuple(e.shape) for _, _, e in outs] == [(2, 0, 40), (2, 0, 80), (2, 0, 160)]
        assert torch.allclose(outs[2][1], out["x_norm_clstoken"], atol=1e-5)
        assert torch.allclose(outs[2][0].flatten(2).transpose(1, 2), out["x_norm_patchtokens"], atol=1e-6)
        # stage 0 (stride 4): mean of its cells inside each 16px patch, parameter-free layer norm
        s0 = _reference_stage(atto, x, 0)  # [B, 40, 16, 24]
        pooled = s0.reshape(2, 40, 4, 4, 6, 4).mean((3, 5))  # [B, 40, 4, 6], naive block average
        assert torch.allclose(outs[0][0], F.layer_norm(pooled.permute(0, 2, 3, 1), (40,), eps=1e-6).permute(0, 3, 1, 2),
                              atol=1e-4)  # fmt: skip
        assert torch.allclose(outs[0][1], F.layer_norm(s0.mean((2, 3)), (40,), eps=1e-6), atol=1e-4)
        raw = atto.get_intermediate_layers(x, n=2, norm=False)  # the last 2 stages, before any norm
        assert [tuple(p.shape) for p in raw] == [(2, 24, 80), (2, 24, 160)]
        assert torch.allclose(raw[1], out["x_prenorm"][:, 1:], atol=1e-6)


def test_grad_checkpointing_drop_path_and_in_chans():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = TimmBackbone("convnext_atto", out_index=2).train()
    x = torch.randn(2, 3, 32, 32)
    ref = bb.forward_features(x)["x_norm_patchtokens"]
    ref.square().mean().backward()
    g_ref = bb.model.stem[0].weight.grad.clone()
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    assert bb.grad_checkpointing
    out = bb.forward_features(x)["x_norm_patchtokens"]
    assert bb.model.stages[0].grad_checkpointing  # delegated to timm in train mode with grads
    out.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(bb.model.stem[0].weight.grad, g_ref, atol=1e-6)
    with torch.no_grad():
        bb.eval()(x)
    assert not bb.model.stages[0].grad_checkpointing  # off for inference
    dp = TimmBackbone("convnext_atto", out_index=1, drop_path_rate=0.2, in_chans=4)
    assert dp.in_chans == 4 and len(dp.mean) == 4 and dp.arch.in_chans == 4
    assert dp.train()(torch.randn(2, 4, 32, 32)).shape == (2, 80)


def test_resnet_any_timm_model(tmp_path):
    """A ResNet (stem stage at stride 2, BatchNorm buffers) through the same contract and a round trip."""
    bb = TimmBackbone("resnet18", out_index=-2)
    assert (bb.patch_size, bb.embed_dim, bb.n_blocks, bb.stage_strides) == (16, 256, 4, [2, 4, 8, 16])
    x = torch.randn(2, 3, 64, 48)
    bb.train()(x)  # one train-mode step moves the BatchNorm running statistics
    bb.eval()
    with torch.no_grad():
        out = bb.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (2, 12, 256) and out["x_norm_clstoken"].shape == (2, 256)
    ref = _reference_stage(bb, x, 3)  # [B, 256, 4, 3]
    assert torch.allclose(out["x_prenorm"][:, 1:], ref.flatten(2).transpose(1, 2), atol=1e-5)
    assert not hasattr(bb.model, "layer4") or not any(p.numel() for p in bb.model.layer4.parameters())
    back = dinoapp.load_backbone(dinoapp.save_backbone(bb, tmp_path / "r.safetensors"))
    assert torch.equal(back.model.bn1.running_mean, bb.model.bn1.running_mean)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x)["x_norm_patchtokens"], out["x_norm_patchtokens"])


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_round_trip(atto, x, tmp_path, suffix):
    bb = TimmBackbone("convnext_atto", out_index=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                      provenance={"run": "distill-test"})  # fmt: skip
    bb.load_state_dict(atto.state_dict())
    g = torch.Generator().manual_seed(3)
    bb.pretrained_heads = {"proj": {"weight": torch.randn(8, 160, generator=g), "bias": torch.randn(8, generator=g)}}
    path = dinoapp.save_backbone(bb, tmp_path / f"student{suffix}")
    back = dinoapp.load_backbone(path)
    assert isinstance(back, TimmBackbone) and not back.training
    assert back.arch == bb.arch and back.mean == bb.mean and back.std == bb.std
    assert (back.patch_size, back.embed_dim, back.n_blocks) == (16, 160, 3)
    assert back.provenance["run"] == "distill-test" and back.provenance["layout"] == "dinoapp"
    assert back.provenance["sha256"] and back.provenance["normalisation"] == "file"
    assert set(back.pretrained_heads) == {"proj"}
    for k, v in bb.pretrained_heads["proj"].items():
        assert torch.equal(back.pretrained_heads["proj"][k], v)
    with torch.no_grad():
        a, b = bb.eval().forward_features(x), back.forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[k], b[k])
    assert backbone_fingerprint(back) == backbone_fingerprint(bb)


def test_record_versions(atto, tmp_path):
    rec = backbone_record(atto)
    assert rec["version"] == 2 and rec["arch"]["family"] == "timm"
    assert set(rec["state_dict"]) == set(atto.state_dict())
    assert {k.split(".")[0] for k in rec["state_dict"]} == {"model", "norm"}
    json.dumps(rec["arch"])  # plain JSON
    assert TimmArch.from_dict(rec["arch"]) == atto.arch
    vit = dinoapp.load_backbone("vit_tiny", seed=0, depth=1)
    assert backbone_record(vit)["version"] == 1  # ViT records stay readable by older dinoapp releases
    with pytest.raises(UnsupportedFormatError, match="upgrade dinoapp"):
        check_record({**rec, "version": 3}, tmp_path / "f.pth")
    with pytest.raises(UnsupportedFormatError, match="family 'onnx'"):
        check_record({**rec, "arch": {**rec["arch"], "family": "onnx"}}, tmp_path / "f.pth")
    with pytest.raises(ConfigError, match="ViT-only"):
        atto.meta_state_dict()
    with pytest.raises(ConfigError, match="ViT-only"):
        atto.load_meta_state_dict({})


def test_tampered_files(atto, tmp_path):
    path = dinoapp.save_backbone(atto, tmp_path / "s.pth")
    rec = torch.load(path, weights_only=True)
    del rec["state_dict"]["model.stages.2.blocks.0.conv_dw.weight"]
    torch.save(rec, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="missing keys: model.stages.2.blocks.0.conv_dw.weight") as e:
        dinoapp.load_backbone(tmp_path / "missing.pth")
    assert e.value.missing == ["model.stages.2.blocks.0.conv_dw.weight"] and "missing.pth" in str(e.value)
    rec = torch.load(path, weights_only=True)
    rec["arch"]["out_index"] = 3  # the file says stage 3 but holds weights up to stage 2
    torch.save(rec, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointMismatchError, match="missing keys: model.stages.3") as e:
        dinoapp.load_backbone(tmp_path / "deeper.pth")
    rec = torch.load(path, weights_only=True)
    rec["state_dict"]["norm.weight"] = torch.ones(7)
    torch.save(rec, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"norm.weight: file \(7,\) vs model \(160,\)"):
        dinoapp.load_backbone(tmp_path / "shape.pth")
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = dinoapp.save_backbone(atto, tmp_path / "s.safetensors")
    with safe_open(str(st), framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del sd["norm.bias"]
    save_file(sd, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match="missing keys: norm.bias"):
        dinoapp.load_backbone(tmp_path / "cut.safetensors")
    with pytest.raises(ConfigError, match="ViT-only"):
        dinoapp.load_backbone(path, in_chans=4)


# --- load_backbone sources ----------------------------------------------------------------------


def test_timm_names_random_init():
    state = torch.random.get_rng_state()
    a = dinoapp.load_backbone("timm:convnext_atto", seed=0)
    b = dinoapp.load_backbone("timm:convnext_atto", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    c = dinoapp.load_backbone("timm:convnext_atto", seed=1)
    assert isinstance(a, TimmBackbone) and not a.training
    assert (a.patch_size, a.embed_dim) == (32, 320)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.stem.0.weight"], sc["model.stem.0.weight"])
    assert a.provenance["source"] == "timm:convnext_atto" and a.provenance["seed"] == 0
    assert a.provenance["weights"] == "random init"
    s = dinoapp.load_backbone("timm:convnext_atto", seed=0, out_index=2, ls_init_value=0.5, mean=(0.1, 0.2, 0.3))
    assert (s.patch_size, s.embed_dim, s.n_blocks) == (16, 160, 3) and s.mean == (0.1, 0.2, 0.3)
    assert s.arch.model_kwargs == {"ls_init_value": 0.5}
    assert torch.all(s.model.stages[0].blocks[0].gamma == 0.5)
    assert dinoapp.load_backbone(s) is s
    same = dinoapp.load_backbone(s, std=(0.5, 0.5, 0.5))
    assert same is s and s.std == (0.5, 0.5, 0.5) and s.provenance["normalisation"] == "user"
    four = dinoapp.load_backbone("timm:convnext_atto", seed=0, in_chans=4, out_index=1)
    assert four.in_chans == 4 and four.arch.in_chans == 4 and len(four.std) == 4


def test_timm_name_errors(atto, tmp_path):
    with pytest.raises(UnknownSourceError, match="Did you mean convnext_atto"):
        dinoapp.load_backbone("timm:convnext_atoo")
    with pytest.raises(UnknownSourceError, match="available: .*convnext_atto.d2_in1k"):
        dinoapp.load_backbone("timm:convnext_atto.no_such_tag")
    with pytest.raises(UnknownSourceError, match="needs a model name"):
        dinoapp.load_backbone("timm:")
    with pytest.raises(ConfigError, match=r"out_index=7 is out of range .*0: stride 4, 40 ch"):
        dinoapp.load_backbone("timm:convnext_atto", out_index=7)
    with pytest.raises(ConfigError, match="refuses an argument.*not_an_option"):
        dinoapp.load_backbone("timm:convnext_atto", not_an_option=1)
    with pytest.raises(ConfigError, match="set by TimmBackbone itself"):
        dinoapp.load_backbone("timm:convnext_atto", num_classes=10)
    with pytest.raises(ConfigError, match="plain JSON"):
        TimmBackbone("convnext_atto", model_kwargs={"act_layer": torch.nn.ReLU})
    with pytest.raises(ConfigError, match="no stochastic depth"):
        dinoapp.load_backbone("timm:ghostnet_050", drop_path_rate=0.1)
    with pytest.raises(ConfigError, match="num_heads"):
        dinoapp.load_backbone("timm:convnext_atto", num_heads=4)
    path = dinoapp.save_backbone(atto, tmp_path / "s.pth")
    with pytest.raises(ConfigError, match="overrides .*out_index.* only apply"):
        dinoapp.load_backbone(path, out_index=1)


def test_tagged_name_offline(monkeypatch, tmp_path):
    """Pretrained weights come from the local cache only; offline without them: a clear error, at once."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="downloaded once with internet"):
        dinoapp.load_backbone("timm:convnext_atto.d2_in1k", cache_dir=tmp_path / "empty")
    # the same name with its weights in a Hugging Face cache folder: loaded from there, no network
    import timm
    from safetensors.torch import save_file

    snap = tmp_path / "hub" / "models--timm--convnext_atto.d2_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        full = timm.create_model("convnext_atto")  # with its 1000-class head, as timm publishes it
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(snap / "model.safetensors"))
    bb = dinoapp.load_backbone("timm:convnext_atto.d2_in1k", cache_dir=tmp_path / "hub", out_index=2)
    assert torch.equal(bb.model.stages[2].blocks[0].conv_dw.weight, full.stages[2].blocks[0].conv_dw.weight)
    assert bb.provenance["weights"] == "d2_in1k" and len(bb.provenance["sha256"]) == 64
    assert bb.provenance["normalisation"] == "timm pretrained_cfg" and bb.arch.model_name == "convnext_atto.d2_in1k"


# --- the frozen-feature code --------------------------------------------------------------------


def test_extract_dense_identity_and_heads(atto):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 3, 70, 90, generator=g) * 255).to(torch.uint8)
    f = dinoapp.extract(atto, images, size=64, layers=[1, -1], batch_size=3)
    assert f.cls.shape == (4, 160) and f.registers.shape == (4, 0, 160) and f.patches.shape == (4, 4, 4, 160)
    assert f.grid == (4, 4) and sorted(f.layers) == [1, 2] and f.layers[1].shape == (4, 4, 4, 80)
    with torch.no_grad():
        ref = atto.forward_features(preprocess(images, atto, size=64))
    assert torch.allclose(f.cls, ref["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(f.patches.flatten(1, 2), ref["x_norm_patchtokens"], atol=1e-5)

    img = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    df = dinoapp.dense_features(atto, img, resolution=96, layers=[0])
    assert df.patches.shape == (4, 6, 160) and df.cls.shape == (160,) and df.layers[0].shape == (4, 6, 40)
    tiled = dinoapp.dense_features(atto, img, resolution=192, max_tokens=16, tile=64, overlap=32)
    assert tiled.windows > 1 and tiled.patches.shape == (8, 12, 160) and torch.isfinite(tiled.patches).all()

    ident = backbone_identity(atto)
    json.dumps(ident)
    assert ident["arch"]["family"] == "timm" and ident["source"] == "timm:convnext_atto"
    assert ident["fingerprint"] == backbone_fingerprint(atto)

    knn = dinoapp.KNNClassifier(k=1).fit(f.cls, [0, 0, 1, 1])
    assert knn.predict(f.cls).tolist() == [0, 0, 1, 1]
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    masks[:, :, 32:] = 1
    head = dinoapp.fit_seg_head(f, masks, 2, layers=[1, 2], epochs=2, size=64, backbone=atto)
    assert head.module.in_channels == 80 + 160
    assert head.segment(atto, images[:2]).shape == (2, 70, 90)


def test_tiled_dense_features_take_stages_of_other_widths():
    """Sliding-window dense features over several stages: each stage keeps its own width."""
    from dinoapp.dense import dense_features

    bb = dinoapp.load_backbone("timm:convnext_atto", out_index=2, seed=0)
    img = torch.rand(3, 256, 256)
    d = dense_features(bb, img, layers=[0, 2], max_tokens=16, tile=128, overlap=32)
    assert d.windows > 1
    assert tuple(d.layers[0].shape) == (16, 16, 40) and tuple(d.layers[2].shape) == (16, 16, 160)
    whole = dense_features(bb, img, layers=[0, 2])  # one pass: the tiled result is a blend of the same features
    assert whole.windows == 1 and tuple(whole.layers[0].shape) == (16, 16, 40)
