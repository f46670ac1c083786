"""Shared fixtures: random Meta-layout checkpoints written in every layout, tiny backbones."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network from tests

import pytest
import torch

from dinoapp.arch import ARCHS, ArchSpec


def make_meta_state_dict(arch: ArchSpec, seed: int = 0, periods_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A Meta release-layout state dict with random non-zero weights, q/v biases included.

    The k third of each qkv bias is random too: Meta's ``bias_mask`` (zeros there) must hide it.
    """
    g = torch.Generator().manual_seed(seed)
    D, p, C = arch.embed_dim, arch.patch_size, arch.in_chans

    def rnd(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "cls_token": rnd(1, 1, D, std=0.5),
        "mask_token": rnd(1, D, std=0.5),
        "patch_embed.proj.weight": rnd(D, C, p, p, std=0.05),
        "patch_embed.proj.bias": rnd(D, std=0.1),
        "norm.weight": rnd(D, std=0.2, mean=1.0),
        "norm.bias": rnd(D, std=0.1),
    }
    if arch.n_registers:
        sd["storage_tokens"] = rnd(1, arch.n_registers, D, std=0.5)
    hd = arch.head_dim
    sd["rope_embed.periods"] = torch.tensor(
        [arch.rope_base ** (4 * j / hd) for j in range(hd // 4)], dtype=torch.float32
    ).to(periods_dtype)
    for i in range(arch.depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = rnd(D, std=0.2, mean=1.0)
        sd[b + "norm1.bias"] = rnd(D, std=0.1)
        sd[b + "attn.qkv.weight"] = rnd(3 * D, D, std=D**-0.5)
        if arch.qkv_bias:
            sd[b + "attn.qkv.bias"] = rnd(3 * D, std=0.2)
            mask = torch.ones(3 * D)
            mask[D : 2 * D] = 0
            sd[b + "attn.qkv.bias_mask"] = mask
        sd[b + "attn.proj.weight"] = rnd(D, D, std=D**-0.5)
        sd[b + "attn.proj.bias"] = rnd(D, std=0.1)
        sd[b + "ls1.gamma"] = rnd(D, std=0.1, mean=0.5)
        sd[b + "norm2.weight"] = rnd(D, std=0.2, mean=1.0)
        sd[b + "norm2.bias"] = rnd(D, std=0.1)
        H = arch.ffn_hidden
        if arch.ffn == "swiglu":
            for n, shape in (("w1", (H, D)), ("w2", (H, D)), ("w3", (D, H))):
                sd[b + f"mlp.{n}.weight"] = rnd(*shape, std=shape[1] ** -0.5)
                sd[b + f"mlp.{n}.bias"] = rnd(shape[0], std=0.1)
        else:
            sd[b + "mlp.fc1.weight"] = rnd(H, D, std=D**-0.5)
            sd[b + "mlp.fc1.bias"] = rnd(H, std=0.1)
            sd[b + "mlp.fc2.weight"] = rnd(D, H, std=H**-0.5)
            sd[b + "mlp.fc2.bias"] = rnd(D, std=0.1)
        sd[b + "ls2.gamma"] = rnd(D, std=0.1, mean=0.5)
    return sd


TINY = ARCHS["vit_tiny"]


@pytest.fixture(scope="module")
def bb():
    """A tiny ViT whose features depend on the image (LayerScale 0.5; a random init's tiny gamma would not).
    Module-scoped; test files with a `bb` of their own use theirs."""
    import dinoapp

    m = dinoapp.load_backbone("vit_tiny", depth=2, seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    return m


@pytest.fixture(scope="session")
def tiny_sd() -> dict[str, torch.Tensor]:
    return make_meta_state_dict(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_meta_file(tmp_path_factory, tiny_sd) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_meta.pth"
    torch.save(tiny_sd, path)
    return str(path)


@pytest.fixture
def one_thread():
    """Run with 1 intra-op thread, as augmentation does in DataLoader workers (many tiny ops are slow
    with idle threads to wake)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 64, 80, generator=g)


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skip them, visibly, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
