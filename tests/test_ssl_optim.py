"""dinoapp.ssl.optim: layer-wise lr decay, no-decay set, per-step lr / wd (DINOv3 spec, section 2)."""

from __future__ import annotations

import datetime
import json
import time

import pytest
import torch
import torch.multiprocessing as mp

from dinoapp.loading import load_backbone
from dinoapp.ssl.heads import DINOHead
from dinoapp.ssl.optim import build_optimizer, param_groups, set_lr_wd

DEPTH = 2


def _parts(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    backbone = load_backbone("vit_tiny", depth=DEPTH)
    return {"backbone": backbone, "dino_head": DINOHead(192, 16, 8, 4), "ibot_head": DINOHead(192, 16, 8, 4)}


def expected_lr_mult(name: str) -> float:
    """The recipe spelled out by hand for a 2-block backbone (decay 0.9, patch embed x0.2)."""
    part, rest = name.split(".", 1)
    if part != "backbone":
        return 1.0
    if rest.startswith("vit.patch_embed."):
        return 0.9**3 * 0.2
    if rest in ("mask_token", "vit.cls_token", "vit.reg_token"):
        return 0.9**3
    if rest.startswith("vit.blocks.0."):
        return 0.9**2
    if rest.startswith("vit.blocks.1."):
        return 0.9
    assert rest.startswith("vit.norm."), rest
    return 1.0


def expected_no_decay(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("bias", "q_bias", "v_bias", "gamma_1", "gamma_2") or ".norm" in name


def _flat(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["names"]}


def test_every_parameter_once_with_recipe_multipliers():
    parts = _parts()
    parts["backbone"].vit.cls_token.requires_grad_(False)  # frozen params stay in the groups
    groups = param_groups(parts)
    flat = _flat(groups)
    all_names = [f"{p}.{n}" for p, m in parts.items() for n, _ in m.named_parameters()]
    assert sorted(flat) == sorted(all_names) and len(flat) == sum(len(g["params"]) for g in groups)
    for name, g in flat.items():
        assert g["lr_mult"] == pytest.approx(expected_lr_mult(name)), name
        assert g["wd_mult"] == (0.0 if expected_no_decay(name) else 1.0), name
        assert g["is_backbone"] == name.startswith("backbone.")
        assert g["is_last_layer"] == (".last_layer." in name)
    decayed = {n for n, g in flat.items() if g["wd_mult"] == 1.0 and n.startswith("backbone.")}
    assert decayed == {"backbone.mask_token", "backbone.vit.cls_token", "backbone.vit.reg_token",
                       "backbone.vit.patch_embed.proj.weight"} | {
        f"backbone.vit.blocks.{i}.{w}.weight" for i in range(DEPTH)
        for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}  # fmt: skip


def test_groups_are_merged_and_deterministic():
    parts = _parts()
    groups = param_groups(parts)
    keys = [(g["is_backbone"], round(g["lr_mult"], 12), g["wd_mult"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # both heads share their groups: (mlp weights), (mlp biases), (last layers)
    head_groups = [g for g in groups if not g["is_backbone"]]
    assert [len(g["names"]) for g in head_groups] == [6, 6, 2]
    assert head_groups[2]["names"] == ["dino_head.last_layer.weight", "ibot_head.last_layer.weight"]
    again = param_groups(_parts(seed=1))
    assert [g["names"] for g in again] == [g["names"] for g in groups]
    custom = _flat(param_groups(parts, layer_decay=0.5, patch_embed_lr_mult=1.0, head_lr_mult=3.0))
    assert custom["backbone.vit.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.125)
    assert custom["backbone.vit.blocks.1.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.5)
    assert custom["ibot_head.mlp.0.weight"]["lr_mult"] == 3.0
    shared = DINOHead(192, 16, 8, 4)  # one head under two names: its parameters are optimised once
    tied = param_groups({"dino_head": shared, "ibot_head": shared})
    assert sum(len(g["params"]) for g in tied) == len(list(shared.parameters()))


def test_set_lr_wd_and_frozen_last_layer():
    opt = build_optimizer(param_groups(_parts()))
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # nothing moves before set_lr_wd
    set_lr_wd(opt, lr=1e-3, weight_decay=0.04, head_lr=2e-3, backbone_scale=0.5, freeze_last_layer=True)
    for g in opt.param_groups:
        name = g["names"][0]
        if g["is_last_layer"]:
            expected = 0.0
        elif g["is_backbone"]:
            expected = 1e-3 * 0.5 * expected_lr_mult(name)
        else:
            expected = 2e-3
        assert g["lr"] == pytest.approx(expected), name
        assert g["weight_decay"] == pytest.approx(0.04 * (not expected_no_decay(name)))
    set_lr_wd(opt, lr=1e-3, weight_decay=0.4)
    last = [g for g in opt.param_groups if g["is_last_layer"]]
    assert [g["lr"] for g in last] == [pytest.approx(1e-3)]  # unfrozen; head lr defaults to lr
    set_lr_wd(opt, lr=1e-3, weight_decay=0.4, head_lr=0.0)  # 0 is a value, not "unset"
    assert all(g["lr"] == 0.0 for g in opt.param_groups if not g["is_backbone"])


def test_optimizer_steps_with_frozen_backbone():
    parts = _parts()
    parts["backbone"].requires_grad_(False)  # continued pretraining stage 1: heads only
    opt = build_optimizer(param_groups(parts))
    assert not opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.999)
    set_lr_wd(opt, lr=1e-2, weight_decay=0.04)
    before = {k: v.clone() for k, v in parts["backbone"].state_dict().items()}
    head_before = parts["dino_head"].mlp[0].weight.clone()
    feats = parts["backbone"](torch.randn(2, 3, 32, 32))
    (parts["dino_head"](feats).sum() + parts["ibot_head"](feats).sum()).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in parts["backbone"].state_dict().items())
    assert not torch.equal(head_before, parts["dino_head"].mlp[0].weight)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert len(opt.state) == n_params - len(list(parts["backbone"].parameters()))


def _fsdp_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    parts = _parts()
    for blk in parts["backbone"].vit.blocks:
        fully_shard(blk)
    for m in parts.values():
        fully_shard(m)
    groups = param_groups(parts)
    opt = build_optimizer(groups)
    set_lr_wd(opt, lr=1e-3, weight_decay=0.04)
    parts["dino_head"](parts["backbone"](torch.randn(2, 3, 32, 32))).sum().backward()
    opt.step()
    is_dtensor = all(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    summary = [[g["names"], g["lr_mult"], g["wd_mult"]] for g in groups]
    with open(f"{tmp}/fsdp.json", "w") as f:
        json.dump({"dtensor": is_dtensor, "groups": summary}, f)
    dist.destroy_process_group()


def test_param_groups_after_fsdp2_fully_shard(tmp_path):
    ctx = mp.spawn(_fsdp_worker, args=(str(tmp_path),), nprocs=1, join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            ctx.processes[0].kill()
            pytest.fail("FSDP2 worker did not finish in 60 s")
    result = json.loads((tmp_path / "fsdp.json").read_text())
    assert result["dtensor"]
    plain = [[g["names"], g["lr_mult"], g["wd_mult"]] for g in param_groups(_parts())]
    assert result["groups"] == plain


@pytest.mark.gpu
def test_fused_adamw_on_cuda():
    parts = {k: m.cuda() for k, m in _parts().items()}
    opt = build_optimizer(param_groups(parts))
    assert opt.defaults["fused"]
    set_lr_wd(opt, lr=1e-3, weight_decay=0.04)
    w = parts["dino_head"].mlp[0].weight.clone()
    parts["dino_head"](torch.randn(4, 192, device="cuda")).sum().backward()
    opt.step()
    assert not torch.equal(w, parts["dino_head"].mlp[0].weight)
