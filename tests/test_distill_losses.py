"""Feature-level distillation (dinoapp.distill.losses): loop references, invariances, round trips, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoapp.distill.losses import (
    FEATURE_LOSS_KINDS,
    Projector,
    align_patch_grid,
    distill_gram_loss,
    feature_loss,
    head_from_state_dict,
)
from dinoapp.errors import CheckpointMismatchError, ConfigError, InputError
from dinoapp.ssl.gram import gram_loss, resize_patch_grid
from dinoapp.ssl.heads import DINOHead


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- align_patch_grid


def test_align_equal_grids_returns_input():
    x = _rand(2, 12, 5)
    assert align_patch_grid(x, (3, 4), (3, 4)) is x


def test_align_integer_shrink_is_block_mean():
    b, d, h, w = 2, 3, 4, 4
    x = _rand(b, h * w, d, dtype=torch.float64)
    out = align_patch_grid(x.float(), (h, w), (2, 2))
    assert out.shape == (b, 4, d) and out.dtype == torch.float32
    ref = torch.zeros(b, 4, d, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            cells = [x[:, (2 * i + di) * w + (2 * j + dj)] for di in range(2) for dj in range(2)]
            ref[:, i * 2 + j] = sum(cells) / 4
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


def test_align_rectangular_shrink_one_dim():
    # 4x6 -> 4x3: rows untouched, pairs of columns averaged
    x = _rand(1, 24, 2)
    out = align_patch_grid(x, (4, 6), (4, 3))
    grid = x.reshape(1, 4, 6, 2)
    ref = (grid[:, :, 0::2] + grid[:, :, 1::2]) / 2
    torch.testing.assert_close(out, ref.reshape(1, 12, 2))


def test_align_non_integer_shrink_matches_adaptive_avg_pool():
    x = _rand(2, 25, 3)
    out = align_patch_grid(x, (5, 5), (2, 2))
    grid = x.reshape(2, 5, 5, 3).permute(0, 3, 1, 2)
    ref = F.adaptive_avg_pool2d(grid, (2, 2)).permute(0, 2, 3, 1).reshape(2, 4, 3)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("src,dst", [((3, 3), (6, 6)), ((4, 2), (2, 4))])
def test_align_growing_or_mixed_is_bicubic(src, dst):
    x = _rand(2, src[0] * src[1], 4)
    out = align_patch_grid(x, src, dst)
    assert out.shape == (2, dst[0] * dst[1], 4)
    torch.testing.assert_close(out, resize_patch_grid(x, src, dst))


def test_align_keeps_dtype_and_gradient():
    x = _rand(1, 16, 3).bfloat16().requires_grad_()
    out = align_patch_grid(x, (4, 4), (2, 2))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), torch.full((1, 16, 3), 0.25))


@pytest.mark.parametrize(
    "shape,src,dst",
    [((2, 15, 4), (4, 4), (2, 2)), ((16, 4), (4, 4), (2, 2)), ((2, 16, 4), (4, 4), (0, 2))],
)
def test_align_bad_shapes(shape, src, dst):
    with pytest.raises(InputError, match="align_patch_grid"):
        align_patch_grid(torch.zeros(shape), src, dst)


# ---------------------------------------------------------------------------------------------- feature_loss


def naive_feature_loss(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Both kinds written as loops over vectors (and dims) in float64."""
    d = s.shape[-1]
    s, t = s.double().reshape(-1, d), t.double().reshape(-1, d)
    total = 0.0
    for v in range(s.shape[0]):
        sv, tv = s[v], t[v]
        if kind == "cosine":
            total += 1 - float((sv * tv).sum() / ((sv * sv).sum().sqrt() * (tv * tv).sum().sqrt()))
        else:
            mean = sum(float(tv[k]) for k in range(d)) / d
            var = sum((float(tv[k]) - mean) ** 2 for k in range(d)) / d  # biased, as layer norm
            for k in range(d):
                total += (float(sv[k]) - (float(tv[k]) - mean) / (var + 1e-6) ** 0.5) ** 2 / d
    return torch.tensor(total / s.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("kind", FEATURE_LOSS_KINDS)
@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8)])
def test_feature_loss_matches_loops(kind, shape):
    s, t = _rand(*shape, seed=1), _rand(*shape, seed=2) * 3 + 0.5
    got = feature_loss(s, t, kind)
    assert got.ndim == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_feature_loss(s, t, kind), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", FEATURE_LOSS_KINDS)
def test_feature_loss_gradient_reaches_student_only(kind):
    s = _rand(2, 4, 6, seed=1).requires_grad_()
    t = _rand(2, 4, 6, seed=2).requires_grad_()
    feature_loss(s, t, kind).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    t_frozen = _rand(2, 4, 6, seed=3)
    loss = feature_loss(s, t_frozen, kind)
    assert loss.requires_grad and not t_frozen.requires_grad


def test_feature_loss_bf16_inputs_give_float32():
    s, t = _rand(4, 8, seed=1).bfloat16(), _rand(4, 8, seed=2).bfloat16()
    got = feature_loss(s, t, "mse")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, feature_loss(s.float(), t.float(), "mse"))


def test_feature_loss_ignores_autocast():
    s, t = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = {k: feature_loss(s, t, k) for k in FEATURE_LOSS_KINDS}
        grid = align_patch_grid(_rand(1, 16, 8), (4, 4), (2, 2))
    for k in FEATURE_LOSS_KINDS:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], feature_loss(s, t, k), atol=0, rtol=0)
    assert grid.dtype == torch.float32


def test_feature_loss_cosine_zero_and_scale_invariant():
    s, t = _rand(3, 7, 8, seed=1), _rand(3, 7, 8, seed=2)
    assert float(feature_loss(s, s.clone(), "cosine")) == pytest.approx(0.0, abs=1e-6)
    base = feature_loss(s, t, "cosine")
    assert float(base) > 0.1
    torch.testing.assert_close(feature_loss(5.0 * s, 0.01 * t, "cosine"), base)


def test_feature_loss_mse_zero_for_standardised_target_and_teacher_scale_free():
    s, t = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    target = F.layer_norm(t, (8,), eps=1e-6)
    assert float(feature_loss(target, t, "mse")) == pytest.approx(0.0, abs=1e-10)
    # an affine rescaling of every teacher vector leaves the target unchanged
    torch.testing.assert_close(feature_loss(s, 7.0 * t + 3.0, "mse"), feature_loss(s, t, "mse"), atol=1e-5, rtol=1e-5)


def test_feature_loss_errors():
    s = torch.zeros(2, 4)
    with pytest.raises(ConfigError, match="cosine, mse"):
        feature_loss(s, s, "l1")
    with pytest.raises(InputError, match="same shape"):
        feature_loss(s, torch.zeros(2, 5))
    with pytest.raises(InputError, match="float"):
        feature_loss(s.long(), s.long())


# ---------------------------------------------------------------------------------------------- Gram


def test_distill_gram_loss_across_widths():
    s = _rand(2, 9, 6, seed=1).requires_grad_()
    t = _rand(2, 9, 10, seed=2)
    got = distill_gram_loss(s, t)
    assert float(got.detach()) > 0
    torch.testing.assert_close(got, gram_loss(s, t))
    got.backward()
    assert s.grad is not None
    torch.testing.assert_close(distill_gram_loss(s, t, remove_negatives=True), gram_loss(s, t, remove_negatives=True))


def test_distill_gram_loss_zero_for_same_features():
    s = _rand(2, 9, 6, seed=1)
    assert float(distill_gram_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-10)
    # same patch structure at another width: an orthogonal embedding of the student features
    q, _ = torch.linalg.qr(_rand(10, 6, seed=4))  # [10, 6], orthonormal columns
    assert float(distill_gram_loss(s, s @ q.T)) == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------------------------------------- Projector


@pytest.mark.parametrize(
    "in_dim,out_dim,kind,resolved,n_params",
    [
        (8, 8, "auto", "identity", 0),
        (8, 12, "auto", "linear", 8 * 12 + 12),
        (8, 8, "linear", "linear", 8 * 8 + 8),
        (8, 12, "mlp", "mlp", 8 * 12 + 12 + 12 * 12 + 12),
        (8, 8, "identity", "identity", 0),
    ],
)
def test_projector_kinds(in_dim, out_dim, kind, resolved, n_params):
    p = Projector(in_dim, out_dim, kind)
    assert p.kind == resolved
    assert sum(x.numel() for x in p.parameters()) == n_params
    x = _rand(2, 3, in_dim)
    y = p(x)
    assert y.shape == (2, 3, out_dim)
    assert p(x[0, 0]).shape == (out_dim,)
    if resolved == "identity":
        assert y is x


def test_projector_init():
    torch.manual_seed(0)
    p = Projector(256, 512, "mlp", hidden=384)
    for m in (p.net[0], p.net[2]):
        assert torch.all(m.bias == 0)
        assert float(m.weight.detach().std()) == pytest.approx(0.02, rel=0.05)


def test_projector_mlp_hidden():
    p = Projector(4, 6, "mlp", hidden=5)
    assert p.hidden == 5 and p.net[0].out_features == 5 and p.net[2].in_features == 5
    assert isinstance(p.net[1], nn.GELU)


@pytest.mark.parametrize(
    "args,kwargs",
    [((8, 12, "identity"), {}), ((8, 12, "conv"), {}), ((8, 12, "linear"), {"hidden": 4}), ((0, 12), {})],
)
def test_projector_config_errors(args, kwargs):
    with pytest.raises(ConfigError):
        Projector(*args, **kwargs)


def test_projector_wrong_input_width():
    with pytest.raises(InputError, match=r"\[\.\.\., 8\]"):
        Projector(8, 12)(torch.zeros(2, 7))


# ---------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_head_round_trip(n_layers):
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, n_layers=n_layers)
    rebuilt = head_from_state_dict(head.state_dict())
    assert (rebuilt.in_dim, rebuilt.n_prototypes) == (32, 100)
    assert len([m for m in rebuilt.mlp if isinstance(m, nn.Linear)]) == n_layers
    assert rebuilt.last_layer.in_features == 16
    x = _rand(5, 32)
    torch.testing.assert_close(rebuilt(x), head(x), atol=0, rtol=0)


def test_head_bare_linear_mlp_and_weight_norm():
    """Meta's 1-layer head (mlp is a bare Linear) and a DINOv2 weight-normed last layer."""
    torch.manual_seed(0)
    head = DINOHead(32, 100, bottleneck_dim=16, n_layers=1)
    sd = {k.replace("mlp.0.", "mlp."): v for k, v in head.state_dict().items()}
    w = sd.pop("last_layer.weight")
    g = _rand(100, 1, seed=5).abs() + 0.5
    sd["last_layer.weight_v"] = w
    sd["last_layer.weight_g"] = g
    rebuilt = head_from_state_dict(sd)
    assert "last_layer.weight_v" in sd  # the caller's dict is not modified
    expected = g * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rebuilt.last_layer.weight.detach(), expected)
    # against torch's own weight norm
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 100, bias=False))
    ref.load_state_dict({"parametrizations.weight.original0": g, "parametrizations.weight.original1": w})
    torch.testing.assert_close(rebuilt.last_layer.weight.detach(), ref.weight.detach())


def test_head_missing_last_layer():
    sd = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, n_layers=3).state_dict()
    del sd["last_layer.weight"]
    with pytest.raises(CheckpointMismatchError, match="last_layer.weight") as err:
        head_from_state_dict(sd)
    assert err.value.missing == ["last_layer.weight"]


def test_head_malformed():
    sd = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, n_layers=3).state_dict()
    no_bias = {k: v for k, v in sd.items() if k != "mlp.2.bias"}
    with pytest.raises(CheckpointMismatchError, match="mlp.2.bias") as err:
        head_from_state_dict(no_bias)
    assert err.value.missing == ["mlp.2.bias"]
    bn = {**sd, "mlp.1.weight": torch.ones(64), "mlp.1.bias": torch.zeros(64)}
    with pytest.raises(CheckpointMismatchError, match="batch-norm"):
        head_from_state_dict(bn)
    wrong = {**sd, "last_layer.weight": torch.zeros(100, 8)}
    with pytest.raises(CheckpointMismatchError, match="last_layer.weight") as err:
        head_from_state_dict(wrong)
    assert err.value.mismatched == ["last_layer.weight"]
    with pytest.raises(CheckpointMismatchError):
        head_from_state_dict({})
