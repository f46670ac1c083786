"""Student/teacher networks, the combined objective against a naive loop version, EMA maths, schedules."""

import math

import pytest
import torch

from dinoapp.loading import load_backbone
from dinoapp.ssl.config import load_config
from dinoapp.ssl.heads import DINOHead
from dinoapp.ssl.losses import ibot_loss, koleo_loss
from dinoapp.ssl.model import SSLNetworks, collapse_stats, ema_update, make_teacher, ssl_loss, teacher_targets
from dinoapp.ssl.train import schedule_values, stage_requires_grad


def _nets(K=32):
    torch.manual_seed(0)
    bb = load_backbone("vit_tiny", depth=2, seed=0)
    bb.set_rope_rescale(2.0)
    return SSLNetworks(bb, DINOHead(192, K, hidden_dim=64, bottleneck_dim=16), DINOHead(192, K + 8, hidden_dim=64,
                                                                                      bottleneck_dim=16))


def _naive_ce(s_logits, t_probs, temp):
    # -sum_k P_t[k] log softmax(S/temp)[k], one sample
    logp = [x / temp for x in s_logits.tolist()]
    mx = max(logp)
    lse = mx + math.log(sum(math.exp(v - mx) for v in logp))
    return -sum(p * (v - lse) for p, v in zip(t_probs.tolist(), logp))


def test_ssl_loss_matches_naive_loops():
    torch.manual_seed(1)
    G, L, B, K, N, D = 2, 8, 3, 5, 4, 6
    student = {
        "dino_global": torch.randn(G * B, K),
        "dino_local": torch.randn(L * B, K),
        "cls_global": torch.randn(G * B, D),
    }
    masks = torch.rand(G * B, N) < 0.5
    masks[0] = False
    M = int(masks.sum())
    student["ibot"] = torch.randn(M, K)
    targets = {"dino": torch.softmax(torch.randn(G, B, K), -1), "ibot": torch.softmax(torch.randn(M, K), -1)}
    out = ssl_loss(student, targets, masks, n_global=G, n_local=L, student_temp=0.1, koleo_weight=0.1)

    sg, sl = student["dino_global"].reshape(G, B, K), student["dino_local"].reshape(L, B, K)
    loc = [_naive_ce(sl[s, b], targets["dino"][t, b], 0.1) for s in range(L) for t in range(G) for b in range(B)]
    glo = [_naive_ce(sg[s, b], targets["dino"][t, b], 0.1) for s in range(G) for t in range(G) if s != t
           for b in range(B)]  # fmt: skip
    assert out["dino_local"].item() == pytest.approx(sum(loc) / len(loc), rel=1e-5)
    assert out["dino_global"].item() == pytest.approx(sum(glo) / len(glo), rel=1e-5)
    ko = sum(koleo_loss(student["cls_global"].reshape(G, B, D)[i]) for i in range(G))
    ib = ibot_loss(student["ibot"], targets["ibot"], masks, 0.1)
    want = 16 / 18 * out["dino_local"] + 2 / 18 * out["dino_global"] + ib + 0.1 * ko
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["koleo"].item() == pytest.approx(ko.item(), rel=1e-6) and out["ibot"].item() == pytest.approx(ib.item())
    # without local crops the global term carries all the DINO weight
    no_local = ssl_loss(student, targets, None, n_global=G, n_local=0, koleo_weight=0.0)
    assert no_local["loss"].item() == pytest.approx(out["dino_global"].item(), rel=1e-6)


def test_ema_update_maths():
    torch.manual_seed(2)
    s, t = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for b, p, q in zip(before, t.parameters(), s.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * q, rtol=0, atol=1e-7)
    ema_update(t, s, 1.0)  # momentum 1 keeps the teacher
    ema_update(t, s, 0.0)  # momentum 0 copies the student
    for p, q in zip(t.parameters(), s.parameters()):
        assert torch.equal(p, q)


def test_teacher_is_frozen_eval_copy_and_targets_are_distributions():
    nets = _nets()
    teacher = make_teacher(nets)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert teacher.backbone.rope_rescale is None and nets.backbone.rope_rescale == 2.0
    x = torch.rand(2 * 3, 3, 64, 64)
    masks = torch.zeros(6, 16, dtype=torch.bool)
    masks[1, :5] = True
    masks[4, 3:9] = True
    tg = teacher_targets(teacher, x, masks, n_global=2, temp=0.04)
    assert tg["dino"].shape == (2, 3, 32) and tg["ibot"].shape == (11, 40)
    torch.testing.assert_close(tg["dino"].sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(tg["ibot"].sum(-1), torch.ones(11))
    # teacher == student (eval) gives the student's own clean features
    nets.eval()
    torch.testing.assert_close(teacher.backbone(x), nets.backbone(x))
    stats = collapse_stats(tg, {"cls_global": torch.randn(6, 192)})
    assert 0 < stats["target_entropy"] <= 1 + 1e-5 and stats["cls_spread"] > 0.5
    same = collapse_stats(tg, {"cls_global": torch.ones(6, 192)})
    assert same["cls_spread"] < 1e-3


def test_frozen_backbone_gets_no_graph_and_tokens_freeze():
    nets = _nets()
    stage_requires_grad(nets, backbone_frozen=True, freeze_tokens=True, train_mask_token=True)
    x, loc = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 32, 32)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :4] = True
    out = nets(x, loc, masks)
    (out["dino_global"].sum() + out["dino_local"].sum() + out["ibot"].sum()).backward()
    assert all(p.grad is None for p in nets.backbone.parameters())
    assert nets.dino_head.last_layer.weight.grad is not None and nets.ibot_head.last_layer.weight.grad is not None
    stage_requires_grad(nets, backbone_frozen=False, freeze_tokens=True, train_mask_token=True)
    frozen = {n for n, p in nets.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"vit.cls_token", "mask_token"}
    stage_requires_grad(nets, backbone_frozen=False, freeze_tokens=False, train_mask_token=False)
    assert {n for n, p in nets.backbone.named_parameters() if not p.requires_grad} == {"mask_token"}


def test_schedule_values_follow_the_recipe():
    cfg = load_config("cpu-smoke", ["train.steps=100", "optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr=0",
                                    "loss.teacher_temp_warmup_steps=20", "optim.freeze_last_layer_steps=5",
                                    "train.freeze_backbone_steps=30", "train.unfreeze_ramp_steps=10"])  # fmt: skip
    v0, v5, v10, v35, v100 = (schedule_values(cfg, s) for s in (0, 5, 10, 35, 100))
    assert v0["lr"] == 0 and v5["lr"] == pytest.approx(5e-4) and v10["lr"] == pytest.approx(1e-3)
    assert v100["lr"] == pytest.approx(0, abs=1e-12)
    assert v0["teacher_temp"] == pytest.approx(0.04) and v10["teacher_temp"] == pytest.approx(0.055)
    assert v35["teacher_temp"] == pytest.approx(0.07)
    assert v0["momentum"] == pytest.approx(0.992) and v100["momentum"] == pytest.approx(1.0)
    assert v0["weight_decay"] == pytest.approx(0.04) and v100["weight_decay"] == pytest.approx(0.4)
    assert v0["freeze_last_layer"] == 1.0 and v5["freeze_last_layer"] == 0.0
    assert v10["backbone_scale"] == 0 and v35["backbone_scale"] == pytest.approx(0.5) and v100["backbone_scale"] == 1
