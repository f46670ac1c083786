"""dinoapp.ssl.losses and heads against naive loop implementations (DINOv3 spec, section 2)."""

from __future__ import annotations

import datetime
import math
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinoapp.errors import ConfigError, InputError
from dinoapp.ssl.heads import DINOHead
from dinoapp.ssl.losses import dino_loss, dino_term_weights, ibot_loss, koleo_loss, sinkhorn_knopp

# --- naive references: plain loops, float64 -------------------------------------------------------


def naive_sinkhorn(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """The spec's algorithm literally, on Q [K, N] (float64; shifted by the global max)."""
    t = logits.double()
    q = torch.exp((t - t.max()) / temp).T.clone()  # [K, N]
    K, N = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        for k in range(K):
            q[k] /= q[k].sum()
        q /= K
        for n in range(N):
            q[:, n] /= q[:, n].sum()
        q /= N
    q *= N
    return q.T


def naive_ce(p_teacher: torch.Tensor, s_logits: torch.Tensor, temp: float) -> torch.Tensor:
    return -(p_teacher.double() * torch.log_softmax(s_logits.double() / temp, dim=-1)).sum()


def naive_dino(student: torch.Tensor, teacher: torch.Tensor, temp: float, ignore_diagonal: bool) -> torch.Tensor:
    total, count = 0.0, 0
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            for b in range(student.shape[1]):
                total = total + naive_ce(teacher[t, b], student[s, b], temp)
                count += 1
    return total / count


def naive_ibot(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, temp: float) -> torch.Tensor:
    total, row = 0.0, 0
    for b in range(masks.shape[0]):
        idx = [n for n in range(masks.shape[1]) if masks[b, n]]
        per_image = 0.0
        for _ in idx:
            per_image = per_image + naive_ce(teacher[row], student[row], temp)
            row += 1
        if idx:
            total = total + per_image / len(idx)
    return total / masks.shape[0]


def naive_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    z = F.normalize(x.double(), dim=-1)
    zd = z.detach()
    total = 0.0
    for i in range(len(z)):
        best, best_j = -math.inf, None
        for j in range(len(z)):
            if j != i and float(zd[i] @ zd[j]) > best:
                best, best_j = float(zd[i] @ zd[j]), j
        total = total + torch.log(torch.linalg.vector_norm(z[i] - z[best_j]) + eps)
    return -total / len(z)


def _probs(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


# --- Sinkhorn-Knopp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_iters", [1, 3])
def test_sinkhorn_matches_loop_version(n_iters):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g)  # [N, K]
    q = sinkhorn_knopp(logits, temp=0.07, n_iters=n_iters)
    assert q.dtype == torch.float32 and q.shape == (12, 7)
    torch.testing.assert_close(q.double(), naive_sinkhorn(logits, 0.07, n_iters), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))


def test_sinkhorn_is_fp32_for_bf16_input_and_has_no_grad():
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    q = sinkhorn_knopp(logits, temp=0.04)
    assert q.dtype == torch.float32 and not q.requires_grad
    torch.testing.assert_close(q.double(), naive_sinkhorn(logits.detach().float(), 0.04), rtol=1e-5, atol=1e-7)


def test_sinkhorn_stable_for_large_and_spread_logits():
    g = torch.Generator().manual_seed(2)
    logits = 3 + 2 * torch.rand(16, 6, generator=g)  # exp(5 / 0.04) overflows float32 without a shift
    logits[:, 2] -= 6.0  # one prototype far below the global max: underflows with a single global shift
    q = sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(q.double(), naive_sinkhorn(logits, 0.04), rtol=1e-4, atol=1e-7)


def test_sinkhorn_empty_and_bad_input():
    assert sinkhorn_knopp(torch.zeros(0, 8), temp=0.05).shape == (0, 8)
    with pytest.raises(InputError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), temp=0.05)
    with pytest.raises(ConfigError, match="temperature"):
        sinkhorn_knopp(torch.zeros(2, 3), temp=0.0)


# --- DINO ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("S", "T", "ignore"), [(8, 2, False), (2, 2, True), (3, 3, True), (2, 2, False)])
def test_dino_loss_matches_pair_loop(S, T, ignore):
    g = torch.Generator().manual_seed(S * 10 + T)
    student = torch.randn(S, 4, 9, generator=g, dtype=torch.float64).requires_grad_()
    teacher = _probs(T, 4, 9, seed=S + T).double()
    fast = dino_loss(student.float(), teacher, 0.1, ignore_diagonal=ignore)
    ref = naive_dino(student, teacher, 0.1, ignore)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    (g_fast,) = torch.autograd.grad(fast, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-7)


def test_dino_loss_upcasts_bf16():
    student = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(3)).bfloat16()
    teacher = _probs(2, 3, 50, seed=4).bfloat16()
    out = dino_loss(student, teacher, 0.1, ignore_diagonal=True)
    assert out.dtype == torch.float32
    ref = naive_dino(student.float(), teacher.float(), 0.1, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_dino_loss_shape_errors():
    with pytest.raises(InputError, match="same crops"):
        dino_loss(torch.zeros(3, 2, 4), torch.zeros(2, 2, 4), ignore_diagonal=True)
    with pytest.raises(InputError, match=r"\[S, B, K\]"):
        dino_loss(torch.zeros(3, 2, 4), torch.zeros(2, 3, 4))


def test_dino_term_weights():
    assert dino_term_weights(2, 8) == pytest.approx((16 / 18, 2 / 18))
    assert dino_term_weights(2, 0) == (0.0, 1.0)
    assert dino_term_weights(1, 4) == (1.0, 0.0)
    assert dino_term_weights(3, 2) == pytest.approx((6 / 12, 6 / 12))
    with pytest.raises(ConfigError, match="2 global crops"):
        dino_term_weights(1, 0)


# --- iBOT ----------------------------------------------------------------------------------------------


def test_ibot_loss_matches_loop_with_unmasked_images():
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[2, :5] = True  # images 1 and 3 have no masked patch: count 0 but stay in B = 4
    masks[3, 5] = True
    M = int(masks.sum())
    student = torch.randn(M, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
    teacher = _probs(M, 11, seed=6).double()
    fast = ibot_loss(student.float(), teacher, masks, 0.1)
    ref = naive_ibot(student, teacher, masks, 0.1)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fast, student)[0], torch.autograd.grad(ref, student)[0],
                               rtol=1e-4, atol=1e-7)  # fmt: skip


def test_ibot_loss_no_masked_patches_is_connected_zero():
    student = torch.randn(0, 8, requires_grad=True)
    out = ibot_loss(student.bfloat16(), torch.zeros(0, 8), torch.zeros(3, 5, dtype=torch.bool))
    assert out.item() == 0.0 and out.grad_fn is not None and out.dtype == torch.float32
    out.backward()
    assert student.grad is not None and student.grad.shape == (0, 8)


def test_ibot_loss_count_mismatch():
    masks = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(InputError, match="select 6 patches but 5"):
        ibot_loss(torch.zeros(5, 4), torch.zeros(5, 4), masks)


# --- KoLeo ---------------------------------------------------------------------------------------------


def test_koleo_matches_loop():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64).requires_grad_()
    fast = koleo_loss(x.float())
    ref = naive_koleo(x)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fast, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-4, atol=1e-6)


def test_koleo_bf16_duplicates_and_single_row():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    out = koleo_loss(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_koleo(x.bfloat16().float()), rtol=1e-5, atol=1e-6)
    dup = torch.cat([x[:3], x[:1]]).requires_grad_()  # rows 0 and 3 coincide: distance 0, log(eps)
    loss = koleo_loss(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()
    one = torch.randn(1, 4, requires_grad=True)
    out = koleo_loss(one)
    assert out.item() == 0.0 and out.grad_fn is not None


# --- two processes (gloo) ------------------------------------------------------------------------------


def _init_pg(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip


def _sk_worker(rank: int, tmp: str, logits: torch.Tensor, splits: list[list[int]]) -> None:
    import torch.distributed as dist

    _init_pg(rank, 2, tmp)
    out = []
    for sizes in splits:  # each case: the rank's contiguous block of rows
        start = sum(sizes[:rank])
        out.append(sinkhorn_knopp(logits[start : start + sizes[rank]], temp=0.05))
    torch.save(out, f"{tmp}/sk{rank}.pt")
    dist.barrier()  # nobody tears gloo down while the other rank still talks
    dist.destroy_process_group()


def _koleo_worker(rank: int, tmp: str, inputs: torch.Tensor, weight: torch.Tensor) -> None:
    import torch.distributed as dist

    _init_pg(rank, 2, tmp)
    w = weight.clone().requires_grad_()  # a parameter replicated on both ranks, as under DDP
    B = inputs.shape[0] // 2
    loss = koleo_loss(inputs[rank * B : (rank + 1) * B] @ w, gather=True)
    loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= 2  # DDP's gradient averaging
    torch.save((loss.detach(), w.grad), f"{tmp}/koleo{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _spawn_two(fn, tmp_path, *args, timeout: float = 60.0) -> None:
    ctx = mp.spawn(fn, args=(str(tmp_path), *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout} s")


def test_sinkhorn_two_processes_equals_one(tmp_path):
    logits = torch.randn(14, 9, generator=torch.Generator().manual_seed(9)) * 2
    splits = [[5, 9], [0, 14], [14, 0]]  # unequal N, and a rank with no rows (iBOT: no masked patch)
    _spawn_two(_sk_worker, tmp_path, logits, splits)
    ranks = [torch.load(tmp_path / f"sk{r}.pt") for r in range(2)]
    expected = sinkhorn_knopp(logits, temp=0.05)
    for i, sizes in enumerate(splits):
        assert [len(ranks[r][i]) for r in range(2)] == sizes
        torch.testing.assert_close(torch.cat([ranks[0][i], ranks[1][i]]), expected, rtol=1e-5, atol=1e-7)


def test_koleo_gather_two_processes_equals_one(tmp_path):
    g = torch.Generator().manual_seed(10)
    inputs, weight = torch.randn(10, 6, generator=g), torch.randn(6, 4, generator=g)
    _spawn_two(_koleo_worker, tmp_path, inputs, weight)
    (l0, g0), (l1, g1) = (torch.load(tmp_path / f"koleo{r}.pt") for r in range(2))
    w = weight.clone().requires_grad_()
    single = koleo_loss(inputs @ w)
    single.backward()
    torch.testing.assert_close((l0 + l1) / 2, single.detach())
    torch.testing.assert_close(g0, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, w.grad, rtol=1e-5, atol=1e-6)
    # without the gather each rank only sees its own 5 rows: a different loss
    local = (koleo_loss(inputs[:5] @ weight) + koleo_loss(inputs[5:] @ weight)) / 2
    assert not torch.allclose(local, single.detach())


# --- DINOHead ------------------------------------------------------------------------------------------


def test_dino_head_layout_and_forward():
    torch.manual_seed(0)
    head = DINOHead(16, n_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    assert (head.in_dim, head.n_prototypes) == (16, 32)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (24, 16), "mlp.0.bias": (24,), "mlp.2.weight": (24, 24), "mlp.2.bias": (24,),
                      "mlp.4.weight": (8, 24), "mlp.4.bias": (8,), "last_layer.weight": (32, 8)}  # fmt: skip
    assert all((m.bias == 0).all() for m in head.mlp if isinstance(m, torch.nn.Linear))
    assert 0.015 < float(head.mlp[2].weight.detach().std()) < 0.025
    x = torch.randn(3, 5, 16)
    out = head(x)
    assert out.shape == (3, 5, 32)
    bottleneck = F.gelu(F.gelu(x @ head.mlp[0].weight.T) @ head.mlp[2].weight.T) @ head.mlp[4].weight.T
    torch.testing.assert_close(out, F.normalize(bottleneck, dim=-1) @ head.last_layer.weight.T)
    assert DINOHead(16, 32, 24, 8, n_layers=1).mlp[0].weight.shape == (8, 16)
    with pytest.raises(ConfigError, match="n_prototypes"):
        DINOHead(16, n_prototypes=0)


@pytest.mark.gpu
def test_losses_on_cuda_bf16_match_cpu():
    g = torch.Generator().manual_seed(11)
    masks = torch.rand(3, 10, generator=g) < 0.4
    masks[1] = False
    M = int(masks.sum())
    s, t = torch.randn(M, 32, generator=g), _probs(M, 32, seed=12)
    logits, feats = torch.randn(20, 32, generator=g), torch.randn(6, 8, generator=g)
    cpu = [ibot_loss(s.bfloat16(), t, masks), sinkhorn_knopp(logits.bfloat16(), 0.04), koleo_loss(feats.bfloat16())]
    dev = [ibot_loss(s.bfloat16().cuda(), t.cuda(), masks.cuda()), sinkhorn_knopp(logits.bfloat16().cuda(), 0.04),
           koleo_loss(feats.bfloat16().cuda())]  # fmt: skip
    for a, b in zip(cpu, dev):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


def test_sinkhorn_outlier_sample_keeps_a_distribution():
    """A sample whose logits lie far below every prototype's best sample still gets a full target
    row (the log-domain normalisation cannot underflow to an all-zero row)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    logits[3] -= 50.0  # 50 / 0.04 = 1250 below the others in exp space
    q = sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(q.sum(-1), torch.ones(6))
    assert torch.isfinite(q).all() and q[3].max() > 0.05
