"""Gram anchoring (dinoapp.ssl.gram): the loss against a loop reference, invariances, resize, schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinoapp.errors import ConfigError, InputError
from dinoapp.ssl.gram import (
    GramLoss,
    dino_local_scale,
    gram_copy_due,
    gram_copy_steps,
    gram_loss,
    gram_matrix,
    gram_weight,
    resize_patch_grid,
)


def naive_gram_loss(xs: torch.Tensor, xt: torch.Tensor, remove_negatives: bool = False) -> torch.Tensor:
    """Spec section 3 written as loops: per image and patch pair, the squared difference of cosine similarities."""
    b_, n_, _ = xs.shape
    xt = xt.detach()
    total = xs.new_zeros(())
    for b in range(b_):
        zs = [xs[b, i] / torch.sqrt((xs[b, i] ** 2).sum()) for i in range(n_)]
        zt = [xt[b, i] / torch.sqrt((xt[b, i] ** 2).sum()) for i in range(n_)]
        for i in range(n_):
            for j in range(n_):
                s, t = (zs[i] * zs[j]).sum(), (zt[i] * zt[j]).sum()
                if remove_negatives:
                    s = s if s >= 0 else s * 0
                    t = t if t >= 0 else t * 0
                total = total + (s - t) ** 2
    return total / (b_ * n_ * n_)


def features(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


@pytest.mark.parametrize("remove_negatives", [False, True])
def test_matches_loop_reference_values_and_grads(remove_negatives):
    xs = features(3, 6, 5, seed=0, requires_grad=True)
    xt = features(3, 6, 5, seed=1)
    got = gram_loss(xs, xt, remove_negatives=remove_negatives)
    (g_got,) = torch.autograd.grad(got, xs)
    want = naive_gram_loss(xs, xt, remove_negatives)
    (g_want,) = torch.autograd.grad(want, xs)
    assert got.shape == () and got.dtype == torch.float32 and got > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    module = GramLoss(remove_negatives=remove_negatives)
    assert torch.equal(module(xs, xt), got) and f"remove_negatives={remove_negatives}" in repr(module)


def test_identical_inputs_give_zero_loss_and_zero_grad():
    xs = features(2, 7, 4, seed=2, requires_grad=True)
    loss = gram_loss(xs, xs)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xs.grad) == 0


def test_invariant_to_feature_scale_and_to_a_shared_patch_permutation():
    xs, xt = features(2, 9, 6, seed=3), features(2, 9, 6, seed=4)
    base = gram_loss(xs, xt)
    torch.testing.assert_close(gram_loss(3.0 * xs, 0.25 * xt), base)
    scale = torch.rand(2, 9, 1) + 0.1  # every patch vector its own positive factor
    torch.testing.assert_close(gram_loss(xs * scale, xt / scale), base)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gram_loss(xs[:, perm], xt[:, perm]), base)
    assert not torch.allclose(gram_loss(xs[:, perm], xt), base)  # a permutation of one side alone does matter


def test_gradient_reaches_only_the_student():
    xs = features(2, 5, 4, seed=5, requires_grad=True)
    xt = features(2, 5, 4, seed=6, requires_grad=True)
    gram_loss(xs, xt).backward()
    assert xt.grad is None
    assert xs.grad is not None and xs.grad.abs().sum() > 0


def test_remove_negatives_zeroes_negative_similarities_on_both_sides():
    xs = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], requires_grad=True)  # similarity -1
    xt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # similarity 0
    assert gram_loss(xs, xt).item() == pytest.approx(0.5)  # off-diagonal (-1 - 0)^2 twice, over 4 entries
    kept = gram_loss(xs, xt, remove_negatives=True)
    kept.backward()
    assert kept.item() == 0.0 and torch.count_nonzero(xs.grad) == 0
    xt_neg = torch.tensor([[[1.0, 0.0], [-0.6, 0.8]]])  # teacher similarity -0.6 -> 0 as well
    assert gram_loss(xs.detach(), xt_neg, remove_negatives=True).item() == 0.0
    assert gram_loss(xs.detach(), xt_neg).item() == pytest.approx(2 * 0.4**2 / 4)


def test_bf16_inputs_and_autocast_give_a_float32_result():
    xs, xt = features(2, 8, 16, seed=7), features(2, 8, 16, seed=8)
    xs16, xt16 = xs.bfloat16().requires_grad_(), xt.bfloat16()
    loss = gram_loss(xs16, xt16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, gram_loss(xs16.float(), xt16.float()), rtol=1e-6, atol=0)
    loss.backward()
    assert xs16.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the bmm in bf16
        inside = gram_loss(xs, xt)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, gram_loss(xs, xt), rtol=1e-6, atol=0)


def test_teacher_width_may_differ_but_images_and_patches_must_match():
    xs = features(2, 5, 4, seed=9)
    wide = torch.cat([xs, torch.zeros(2, 5, 3)], dim=-1)  # [2, 5, 7], the same cosine similarities
    assert gram_loss(xs, wide).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match=r"same images B and patches N .*resize_patch_grid"):
        gram_loss(xs, features(2, 6, 4, seed=0))
    with pytest.raises(InputError, match="same images B"):
        gram_loss(xs, features(3, 5, 4, seed=0))
    with pytest.raises(InputError, match=r"teacher patch features must be a float tensor \[B, N, D\]"):
        gram_loss(xs, xs[0])
    with pytest.raises(InputError, match="student patch features must be a float"):
        gram_loss(torch.ones(2, 5, 4, dtype=torch.long), xs)
    with pytest.raises(InputError, match="no patches"):
        gram_loss(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))


# ---------------------------------------------------------------------------------------------- resize


def naive_gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N]: the cosine similarity of every pair of rows, one pair at a time."""
    n_ = x.shape[0]
    out = torch.empty(n_, n_)
    for i in range(n_):
        for j in range(n_):
            out[i, j] = (x[i] * x[j]).sum() / (x[i].norm() * x[j].norm())
    return out


def test_gram_matrix_matches_loop_of_cosine_similarities_in_every_layout():
    x = features(2, 3, 4, 5, seed=3)  # [B, h, w, D]
    want = torch.stack([naive_gram_matrix(x[b].reshape(12, 5)) for b in range(2)])  # [B, N, N], row-major patches
    torch.testing.assert_close(gram_matrix(x[0].reshape(12, 5)), want[0])  # [N, D] -> [N, N]
    torch.testing.assert_close(gram_matrix(x[0], batched=False), want[0])  # [h, w, D] -> [h*w, h*w]
    torch.testing.assert_close(gram_matrix(x.reshape(2, 12, 5), batched=True), want)  # [B, N, D] -> [B, N, N]
    torch.testing.assert_close(gram_matrix(x), want)  # [B, h, w, D] -> [B, h*w, h*w]
    torch.testing.assert_close(gram_matrix(x[0].numpy(), batched=False), want[0])  # numpy in, tensor out
    g = gram_matrix(x[0].to(torch.bfloat16), batched=False)
    assert g.dtype == torch.float32 and g.shape == (12, 12)
    torch.testing.assert_close(torch.diagonal(gram_matrix(x), dim1=1, dim2=2), torch.ones(2, 12))
    torch.testing.assert_close(gram_matrix(x, remove_negatives=True), want.clamp(min=0))


def test_gram_matrix_is_what_the_gram_loss_compares():
    xs, xt = features(3, 6, 5, seed=4, requires_grad=True), features(3, 6, 7, seed=5)
    loss = (gram_matrix(xs, batched=True) - gram_matrix(xt, batched=True)).square().mean()
    torch.testing.assert_close(loss, gram_loss(xs, xt))
    (grad,) = torch.autograd.grad(loss, xs)  # the graph is kept
    assert grad.abs().sum() > 0


def test_gram_matrix_errors():
    with pytest.raises(InputError, match="batched=False.*batched=True"):
        gram_matrix(features(4, 4, 8, seed=0))  # [h, w, D] or [B, N, D]? must be said
    with pytest.raises(InputError, match="does not fit"):
        gram_matrix(features(4, 8, seed=0), batched=True)
    with pytest.raises(InputError, match="does not fit"):
        gram_matrix(features(2, 4, 4, 8, seed=0), batched=False)
    with pytest.raises(InputError, match="float"):
        gram_matrix(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(InputError, match="float"):
        gram_matrix(features(8, seed=0))
    with pytest.raises(InputError, match="no patches"):
        gram_matrix(torch.zeros(0, 8))


def test_resize_identity_shape_and_row_major_layout():
    x = features(2, 3 * 4, 5, seed=10)
    assert resize_patch_grid(x, (3, 4), (3, 4)) is x
    out = resize_patch_grid(x, (3, 4), (6, 2))
    assert out.shape == (2, 12, 5) and out.dtype == torch.float32
    grid = torch.empty(2, 5, 3, 4)  # [B, D, h, w] built entry by entry: token r * w + c is pixel (r, c)
    for r in range(3):
        for c in range(4):
            grid[:, :, r, c] = x[:, r * 4 + c]
    want = F.interpolate(grid, size=(6, 2), mode="bicubic", align_corners=False)  # [B, D, 6, 2]
    for r in range(6):
        for c in range(2):
            torch.testing.assert_close(out[:, r * 2 + c], want[:, :, r, c])


def test_resize_keeps_a_constant_grid_constant_and_the_dtype():
    x = torch.full((1, 32 * 32, 3), 0.7).bfloat16()  # a 512-px teacher crop with 16-px patches
    down = resize_patch_grid(x, (32, 32), (16, 16))
    assert down.shape == (1, 256, 3) and down.dtype == torch.bfloat16
    assert torch.equal(down, x[:, :256])
    up = resize_patch_grid(torch.full((2, 6, 4), -1.5), (2, 3), (5, 7))
    torch.testing.assert_close(up, torch.full((2, 35, 4), -1.5))


def test_resize_errors():
    with pytest.raises(InputError, match=r"\[B, 3\*4=12, D\]"):
        resize_patch_grid(torch.zeros(1, 13, 2), (3, 4), (2, 2))
    with pytest.raises(InputError, match=">= 1"):
        resize_patch_grid(torch.zeros(1, 12, 2), (3, 4), (0, 2))


# ---------------------------------------------------------------------------------------------- schedules


def test_gram_copy_steps_and_due():
    assert gram_copy_steps(100, 10_000, 3) == [100, 10_100, 20_100, 30_100]  # the copy + at most 3 refreshes
    assert gram_copy_steps(0, 5, 1) == [0, 5]
    assert gram_copy_steps(7, 0, 3) == gram_copy_steps(7, -2, 3) == gram_copy_steps(7, 10, 0) == [7]
    for args in ((100, 10, 3), (0, 5, 1), (7, 0, 3), (7, 10, 0), (3, 1, 4)):
        due = [s for s in range(200) if gram_copy_due(s, *args)]
        assert due == gram_copy_steps(*args)
    with pytest.raises(ConfigError, match="max_refreshes must be >= 0"):
        gram_copy_steps(0, 10, -1)


def test_gram_weight_cosine_ramp():
    w = [gram_weight(s, start=100, ramp_steps=10, weight=2.0) for s in (0, 99, 100, 102, 105, 110, 10_000)]
    assert w == pytest.approx([0.0, 0.0, 0.0, 1 - math.cos(math.pi / 5), 1.0, 2.0, 2.0])
    assert 1 - math.cos(math.pi / 5) == pytest.approx(0.190983, abs=1e-6)
    assert [gram_weight(s, start=100, ramp_steps=0, weight=1.5) for s in (99, 100, 101)] == [0.0, 1.5, 1.5]
    assert gram_weight(5, start=0, ramp_steps=0, weight=2.0) == 2.0
    with pytest.raises(ConfigError, match="ramp_steps must be >= 0"):
        gram_weight(5, start=0, ramp_steps=-1, weight=2.0)


def test_dino_local_scale_linear_to_the_end():
    got = [dino_local_scale(s, start=100, steps_total=200, end_scale=0.5) for s in (0, 100, 150, 175, 200, 300)]
    assert got == pytest.approx([1.0, 1.0, 0.75, 0.625, 0.5, 0.5])
    assert {dino_local_scale(s, start=10, steps_total=50, end_scale=1.0) for s in range(0, 80, 7)} == {1.0}
    assert [dino_local_scale(s, start=100, steps_total=100, end_scale=0.2) for s in (99, 100)] == [1.0, 0.2]
    with pytest.raises(ConfigError, match="end_scale"):
        dino_local_scale(0, start=0, steps_total=10, end_scale=-0.1)
