"""Edge cases found in review: each once crashed with an untyped error or lost information."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import TINY

import dinoapp
from dinoapp.errors import CheckpointMismatchError, UnsupportedFormatError
from dinoapp.preprocess import to_tensor


def test_in_chans_with_per_channel_statistics(tiny_meta_file):
    bb = dinoapp.load_backbone(tiny_meta_file, in_chans=4, mean=[0.1, 0.2, 0.3, 0.4], std=[0.5] * 4)
    assert bb.mean == (0.1, 0.2, 0.3, 0.4) and bb.std == (0.5,) * 4 and bb.in_chans == 4
    again = dinoapp.load_backbone(bb, mean=np.array([0.2] * 4))
    assert again.mean == (0.2,) * 4


def test_timm_q_bias_without_v_bias_is_refused(tmp_path):
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, embed_dim=192, depth=1, num_heads=3)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("v_bias")}
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(CheckpointMismatchError, match="without v_bias"):
        dinoapp.load_backbone(tmp_path / "t.pth")


def test_zero_bias_model_exports_meta_keys(tiny_sd, tmp_path):
    sd = {k: (torch.zeros_like(v) if k.endswith("qkv.bias") else v) for k, v in tiny_sd.items()}
    torch.save(sd, tmp_path / "z.pth")
    bb = dinoapp.load_backbone(tmp_path / "z.pth")
    assert not bb.arch.qkv_bias and set(bb.meta_state_dict()) == set(sd)
    back = dinoapp.load_backbone(dinoapp.save_backbone(bb, tmp_path / "z.safetensors"))
    assert set(back.meta_state_dict()) == set(sd)


def test_periods_that_do_not_fit_the_heads(tiny_meta_file):
    with pytest.raises(CheckpointMismatchError, match="wrong num_heads"):
        dinoapp.load_backbone(tiny_meta_file, num_heads=6)


def test_odd_inputs_get_typed_errors_or_work(tiny_meta_file, tmp_path):
    bb = dinoapp.load_backbone(tiny_meta_file)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(dinoapp.InputError, match="masks"):
        bb.forward_features(x, masks=torch.zeros(7, dtype=torch.bool))
    m = np.zeros((2, 2, 2), dtype=bool)
    m[0, 0, 0] = True
    assert bb.forward_features(x, masks=m)["x_prenorm"].shape == (2, 9, TINY.embed_dim)
    assert len(bb.get_intermediate_layers(x, n=np.int64(2))) == 2
    torch.save({0: torch.zeros(1)}, tmp_path / "k.pth")
    with pytest.raises(UnsupportedFormatError, match="non-text keys"):
        dinoapp.load_backbone(tmp_path / "k.pth")
    big = np.arange(12, dtype=">u2").reshape(3, 4) * 1000
    assert torch.allclose(to_tensor(big), torch.from_numpy(big.astype(np.float32) / 65535)[None])
    with pytest.raises(dinoapp.ConfigError, match="batch_size"):
        dinoapp.extract(bb, x, batch_size=0)
    f = dinoapp.extract(bb, torch.ones(1, 3, 32, 32, dtype=torch.bool), size=None)
    assert f.cls.shape == (1, TINY.embed_dim)
