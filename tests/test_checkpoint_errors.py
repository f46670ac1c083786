"""Bad checkpoints raise the library's typed errors, naming the problem."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY

import dinoapp
from dinoapp.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    HubUnavailableError,
    SourceNotFoundError,
    UnknownSourceError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)


def _save(sd, tmp_path, name="m.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_missing_key(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    del sd["blocks.2.attn.proj.weight"]
    with pytest.raises(CheckpointMismatchError, match="missing keys: blocks.2.attn.proj.weight") as e:
        dinoapp.load_backbone(_save(sd, tmp_path))
    assert e.value.missing == ["blocks.2.attn.proj.weight"]
    assert isinstance(e.value, ValueError)


def test_missing_mask_token_and_missing_block(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    del sd["mask_token"]
    with pytest.raises(CheckpointMismatchError, match="mask_token"):
        dinoapp.load_backbone(_save(sd, tmp_path))
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match=r"blocks \[1\] are missing"):
        dinoapp.load_backbone(_save(sd, tmp_path))


def test_cut_meta_release_file_is_caught_by_its_name(tmp_path):
    from conftest import make_meta_state_dict

    from dinoapp.arch import ARCHS

    sd = make_meta_state_dict(ARCHS["vits16"].replace(depth=11), seed=0)
    path = _save(sd, tmp_path, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    with pytest.raises(CheckpointMismatchError, match="named as vits16"):
        dinoapp.load_backbone(path)


def test_unexpected_key(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: blocks.0.attn.extra.weight"):
        dinoapp.load_backbone(_save(sd, tmp_path))


def test_mis_shaped_key(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd["blocks.3.norm2.weight"] = torch.ones(TINY.embed_dim + 1)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes: blocks.3.norm2.weight: file \(193,\)") as e:
        dinoapp.load_backbone(_save(sd, tmp_path))
    assert e.value.mismatched


def test_truncated_files(tiny_meta_file, tmp_path):
    data = Path(tiny_meta_file).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        dinoapp.load_backbone(tmp_path / "cut.pth")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(100)}, str(tmp_path / "x.safetensors"))
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-200])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        dinoapp.load_backbone(tmp_path / "cut.safetensors")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointCorruptError):
        dinoapp.load_backbone(tmp_path / "text.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dinoapp_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    if os.path.exists("/tmp/dinoapp_pwned"):
        os.remove("/tmp/dinoapp_pwned")
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="pickled objects.*system"):
        dinoapp.load_backbone(path)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="pickled objects"):
        dinoapp.load_backbone(legacy)
    assert not os.path.exists("/tmp/dinoapp_pwned")


def test_wrong_paths_and_names(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no such file"):
        dinoapp.load_backbone(tmp_path / "nope.pth")
    with pytest.raises(SourceNotFoundError):
        dinoapp.load_backbone("some/dir/model.safetensors")
    with pytest.raises(FileNotFoundError):  # the built-in type works too
        dinoapp.load_backbone(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="without model.safetensors"):
        dinoapp.load_backbone(tmp_path / "empty")
    with pytest.raises(UnknownSourceError, match="vits16"):
        dinoapp.load_backbone("resnet50")
    with pytest.raises(UnknownSourceError, match="not a timm DINOv3"):
        dinoapp.load_backbone("vit_tiny_patch16_dinov3")
    with pytest.raises(UnknownSourceError, match="no pretrained weights"):
        dinoapp.load_backbone("vit_small_patch16_dinov3.imagenet")


def test_not_a_backbone(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="not a DINOv3 backbone"):
        dinoapp.load_backbone(_save({"fc.weight": torch.zeros(2, 2)}, tmp_path))
    with pytest.raises(UnsupportedFormatError, match="holds a list"):
        dinoapp.load_backbone(_save([torch.zeros(2)], tmp_path))
    with pytest.raises(UnsupportedFormatError, match="entries"):
        dinoapp.load_backbone(_save({"model": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path))


def test_timm_name_offline_fails_fast(tmp_path):
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE") as e:
        dinoapp.load_backbone("vit_small_patch16_dinov3.lvd1689m", cache_dir=tmp_path)
    assert "timm/vit_small_patch16_dinov3.lvd1689m" in str(e.value)
    assert isinstance(e.value, ConnectionError)


def test_overrides_only_with_arch_names(tiny_meta_file):
    with pytest.raises(dinoapp.ConfigError, match="overrides"):
        dinoapp.load_backbone(tiny_meta_file, depth=2)
    with pytest.raises(dinoapp.ConfigError, match="unknown architecture fields"):
        dinoapp.load_backbone("vit_tiny", depht=2)


def _rewrite_record(path: Path, out: Path, tensors=None, **arch_changes) -> Path:
    """A copy of a dinoapp .safetensors file whose architecture record says something else (and, with
    ``tensors``, other contents): what a damaged or crafted file looks like."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as r:
        meta = dict(r.metadata())
        stored = {k: r.get_tensor(k) for k in r.keys()}  # noqa: SIM118
    info = json.loads(meta["dinoapp"])
    for k, v in arch_changes.items():
        info["arch"][k] = {**info["arch"][k], **v} if isinstance(v, dict) else v
    meta["dinoapp"] = json.dumps(info)
    save_file(stored if tensors is None else tensors, str(out), metadata=meta)
    return out


def test_a_record_asking_for_a_model_far_bigger_than_its_file_is_refused_before_building(tmp_path, monkeypatch):
    from dinoapp import loading
    from dinoapp.checkpoint import save_backbone

    f = save_backbone(dinoapp.load_backbone("vit_tiny", depth=1, seed=0), tmp_path / "t.safetensors")
    evil = _rewrite_record(f, tmp_path / "evil.safetensors", tensors={"x": torch.zeros(1)}, embed_dim=8192, depth=200,
                           num_heads=64)  # fmt: skip
    built = []
    monkeypatch.setattr(loading.DinoBackbone, "__init__", lambda *a, **k: built.append(1) or (_ for _ in ()).throw(
        AssertionError("built")))  # fmt: skip
    with pytest.raises(CheckpointCorruptError, match=r"describes \d+\.\dM parameters but the file holds only"):
        dinoapp.load_backbone(evil)
    assert built == []  # refused from the record and the tensor sizes alone


def test_a_timm_record_cannot_make_timm_read_other_files(tmp_path):
    pytest.importorskip("timm")
    from dinoapp.checkpoint import save_backbone
    from dinoapp.errors import ConfigError

    f = save_backbone(dinoapp.load_backbone("timm:test_convnext"), tmp_path / "rec.safetensors")
    other = tmp_path / "private.pth"
    other.write_bytes(b"a server file")
    evil = _rewrite_record(f, tmp_path / "evil.safetensors", model_kwargs={"checkpoint_path": str(other)})
    with pytest.raises(ConfigError, match=r"\['checkpoint_path'\] are set by TimmBackbone itself"):
        dinoapp.load_backbone(evil)
    big = _rewrite_record(f, tmp_path / "big.safetensors", model_kwargs={"dims": [512, 1024, 2048, 4096]})
    with pytest.raises(CheckpointCorruptError, match="describes"):
        dinoapp.load_backbone(big)
