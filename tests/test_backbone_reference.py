"""Our backbone against the independent reference ViT written from the spec."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_meta_state_dict
from reference_vit import ReferenceViT

import dinoapp
from dinoapp.arch import ARCHS

ATOL = 1e-5


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def vits_file(tmp_path_factory):
    sd = make_meta_state_dict(ARCHS["vits16"], seed=0, periods_dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("vits") / "dinov3_vits16_pretrain_lvd1689m-00000000.pth"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("hw", [(224, 224), (160, 96), (100, 131)])
def test_forward_features_matches_reference(vits_file, hw):
    path, sd = vits_file
    bb = dinoapp.load_backbone(path)
    ref = ReferenceViT(sd, num_heads=6)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = bb.forward_features(x)
        theirs = ref.forward_features(x)
    gh, gw = hw[0] // 16, hw[1] // 16  # pixels past a multiple of 16 are dropped
    assert ours["x_norm_patchtokens"].shape == (2, gh * gw, 384)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        _close(ours[key], theirs[key])
    assert ours["masks"] is None
    _close(bb(x), theirs["x_norm_clstoken"])


def test_bf16_rope_periods_are_honoured(vits_file):
    """Meta files may round the RoPE periods to bf16: Meta's model computes with those values."""
    path, sd = vits_file
    assert sd["rope_embed.periods"].dtype == torch.bfloat16
    bb = dinoapp.load_backbone(path)
    assert torch.equal(bb.vit.rope.periods, sd["rope_embed.periods"].float())


def test_intermediate_layers_match_reference(vits_file):
    path, sd = vits_file
    bb = dinoapp.load_backbone(path)
    ref = ReferenceViT(sd, num_heads=6)
    x = torch.randn(1, 3, 224, 176, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for kwargs in (
            dict(n=1),
            dict(n=4, reshape=True),
            dict(n=[2, 5, 8, 11], return_class_token=True),
            dict(n=[0, 11], return_extra_tokens=True, norm=False),
            dict(n=2, return_class_token=True, return_extra_tokens=True, reshape=True),
        ):
            ours = bb.get_intermediate_layers(x, **kwargs)
            theirs = ref.get_intermediate_layers(x, **kwargs)
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                if isinstance(a, tuple):
                    assert len(a) == len(b)
                    for u, v in zip(a, b):
                        _close(u, v)
                else:
                    _close(a, b)
        last = bb.get_intermediate_layers(x, n=1)[0]
        _close(last, bb.forward_features(x)["x_norm_patchtokens"])
        sq = bb.get_intermediate_layers(x, n=1, reshape=True)[0]
        assert sq.shape == (1, 384, 14, 11)


def test_masks_use_mask_token(tiny_sd, tiny_meta_file):
    bb = dinoapp.load_backbone(tiny_meta_file)
    ref = ReferenceViT(tiny_sd, num_heads=TINY.num_heads)
    x = torch.randn(2, 3, 64, 48)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [1, 4, 7]] = True
    masks[1, 0] = True
    with torch.no_grad():
        ours = bb.forward_features(x, masks=masks)
        theirs = ref.forward_features(x, masks=masks)
        clean = bb.forward_features(x)
    assert ours["masks"] is masks
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        _close(ours[key], theirs[key])
    assert (ours["x_norm_clstoken"] - clean["x_norm_clstoken"]).abs().max() > 1e-3


def test_list_input_gives_list_of_dicts(tiny_meta_file):
    bb = dinoapp.load_backbone(tiny_meta_file)
    xs = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)]
    with torch.no_grad():
        outs = bb.forward_features(xs)
        single = bb.forward_features(xs[1])
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[1]["x_norm_patchtokens"].shape == (3, 4, TINY.embed_dim)
    _close(outs[1]["x_norm_clstoken"], single["x_norm_clstoken"])
    assert bb(xs[0], is_training=True)["x_prenorm"].shape == (2, 1 + 4 + 16, TINY.embed_dim)


def test_swiglu_and_no_register_variants_match_reference(tmp_path):
    for arch in (ARCHS["vit_tiny_swiglu"], TINY.replace(n_registers=0, qkv_bias=False)):
        sd = make_meta_state_dict(arch, seed=4)
        torch.save(sd, tmp_path / "m.pth")
        bb = dinoapp.load_backbone(tmp_path / "m.pth")
        assert bb.arch.ffn == arch.ffn and bb.n_registers == arch.n_registers
        ref = ReferenceViT(sd, num_heads=arch.num_heads)
        x = torch.randn(1, 3, 48, 80)
        with torch.no_grad():
            _close(bb.forward_features(x)["x_prenorm"], ref.forward_features(x)["x_prenorm"])


def test_rope_rescale_only_in_training(tiny_sd, tiny_meta_file):
    """Training mode multiplies both coordinates by one factor exp(U(-ln2, ln2)); eval never does."""
    bb = dinoapp.load_backbone(tiny_meta_file)
    ref = ReferenceViT(tiny_sd, num_heads=TINY.num_heads)
    x = torch.randn(1, 3, 64, 64)
    bb.set_rope_rescale(2.0)
    assert bb.rope_rescale == 2.0
    with torch.no_grad():
        _close(bb.forward_features(x)["x_prenorm"], ref.forward_features(x)["x_prenorm"])  # eval: off
        bb.train()
        torch.manual_seed(123)
        aug = bb.forward_features(x)["x_prenorm"]
        torch.manual_seed(123)  # the factor is the first random draw of the forward pass
        factor = torch.empty(1).uniform_(-torch.log(torch.tensor(2.0)).item(), torch.log(torch.tensor(2.0)).item())
        factor = factor.exp().item()
        assert 0.5 <= factor <= 2.0 and abs(factor - 1) > 1e-3
        _close(aug, ref.forward_features(x, coord_scale=factor)["x_prenorm"], atol=1e-4)
        bb.set_rope_rescale(None)
        _close(bb.forward_features(x)["x_prenorm"], ref.forward_features(x)["x_prenorm"])
    with pytest.raises(dinoapp.ConfigError):
        bb.set_rope_rescale(0.5)


def test_gradients_flow_and_checkpointing_matches(tiny_meta_file):
    bb = dinoapp.load_backbone(tiny_meta_file).train()
    x = torch.randn(2, 3, 32, 32)
    bb.forward_features(x)["x_norm_clstoken"].sum().backward()
    g1 = bb.vit.blocks[0].attn.qkv.weight.grad.clone()
    assert g1.abs().sum() > 0
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    bb.forward_features(x)["x_norm_clstoken"].sum().backward()
    _close(bb.vit.blocks[0].attn.qkv.weight.grad, g1, atol=1e-6)


def test_expand_input_channels_keeps_grey_images_identical(tiny_meta_file):
    rgb = dinoapp.load_backbone(tiny_meta_file)
    four = dinoapp.load_backbone(tiny_meta_file, in_chans=4)
    assert four.in_chans == 4 and four.arch.in_chans == 4 and len(four.mean) == 4
    assert four.mean[3] == pytest.approx(sum(rgb.mean) / 3)
    w3, w4 = rgb.vit.patch_embed.proj.weight, four.vit.patch_embed.proj.weight
    _close(w4[:, :3], w3 * 0.75, atol=1e-7)
    _close(w4[:, 3], w3.mean(1) * 0.75, atol=1e-7)
    grey = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        _close(four(grey.expand(-1, 4, -1, -1)), rgb(grey.expand(-1, 3, -1, -1)), atol=1e-5)
    one = dinoapp.load_backbone(tiny_meta_file, in_chans=1)
    with torch.no_grad():
        _close(one(grey), rgb(grey.expand(-1, 3, -1, -1)), atol=1e-5)


def test_bad_inputs_raise_input_error(tiny_meta_file):
    bb = dinoapp.load_backbone(tiny_meta_file)
    with pytest.raises(dinoapp.InputError, match="expected a batch"):
        bb(torch.randn(3, 64, 64))
    with pytest.raises(dinoapp.InputError, match="smaller than one"):
        bb(torch.randn(1, 3, 8, 64))
    with pytest.raises(dinoapp.InputError, match="masks"):
        bb.forward_features(torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(dinoapp.InputError, match="out of range"):
        bb.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=[7])
