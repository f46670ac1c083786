"""iBOT block masks (dinoapp.ssl.masking): exact counts, ratios, block structure, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from dinoapp.errors import ConfigError
from dinoapp.ssl.masking import UniformStream, block_mask, ibot_masks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_block_mask(h, w, n_masked, g, min_area=4, aspect=(0.3, 1 / 0.3)):
    """The same algorithm with per-patch Python loops and the same random draws, as a list of lists."""
    rand = UniformStream(g)
    uniform, randint = rand.uniform, rand.randint
    mask = [[False] * w for _ in range(h)]
    count = 0
    while n_masked - count >= min_area:
        remaining, added = n_masked - count, 0
        for _ in range(10):
            area = uniform(min_area, remaining)
            ratio = math.exp(uniform(math.log(aspect[0]), math.log(aspect[1])))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (0 < bh <= h and 0 < bw <= w):
                continue
            top, left = randint(h - bh + 1), randint(w - bw + 1)
            cells = [(i, j) for i in range(top, top + bh) for j in range(left, left + bw)]
            new = sum(not mask[i][j] for i, j in cells)
            if 0 < new <= remaining:
                for i, j in cells:
                    mask[i][j] = True
                added = new
                break
        if added == 0:
            break
        count += added
    free = [k for k in range(h * w) if not mask[k // w][k % w]]
    for k in torch.randperm(len(free), generator=g)[: n_masked - count].tolist():
        mask[free[k] // w][free[k] % w] = True
    return mask


def components(mask: torch.Tensor) -> int:
    """Number of 4-connected components of True cells."""
    h, w = mask.shape
    seen, n = set(), 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and (i, j) not in seen:
                n += 1
                stack = [(i, j)]
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    for y, x in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= y < h and 0 <= x < w and mask[y, x] and (y, x) not in seen:
                            seen.add((y, x))
                            stack.append((y, x))
    return n


def test_uniform_stream_matches_torch_rand_in_chunks():
    g, ref = gen(4), gen(4)
    rand = UniformStream(g, chunk=8)
    got = [rand() for _ in range(20)]
    assert got == torch.rand(24, generator=ref, dtype=torch.float64).tolist()[:20]
    assert all(0 <= rand.randint(3) < 3 for _ in range(100))


@pytest.mark.parametrize(("h", "w"), [(14, 14), (7, 10), (1, 5), (3, 3)])
def test_block_mask_exact_count(h, w):
    for n in sorted({0, 1, 3, 4, 5, (h * w) // 3, (h * w) // 2, h * w - 1, h * w}):
        for seed in range(5):
            m = block_mask(h, w, n, gen(seed))
            assert m.shape == (h, w) and m.dtype == torch.bool and int(m.sum()) == n


def test_block_mask_matches_naive_loop_version():
    for seed, (h, w, n) in enumerate([(14, 14, 20), (14, 14, 98), (8, 12, 60), (5, 5, 25), (6, 4, 3)]):
        want = torch.tensor(naive_block_mask(h, w, n, gen(seed)))
        assert torch.equal(block_mask(h, w, n, gen(seed)), want)


def test_block_mask_is_a_few_blocks_not_scattered_patches():
    n = 59  # ratio 0.3 of 14 x 14
    blocks = [components(block_mask(14, 14, n, gen(s))) for s in range(30)]
    scattered = []
    for s in range(30):
        m = torch.zeros(196, dtype=torch.bool)
        m[torch.randperm(196, generator=gen(100 + s))[:n]] = True
        scattered.append(components(m.view(14, 14)))
    assert sum(blocks) / 30 <= 5 and max(blocks) <= 10
    assert sum(scattered) / 30 > 15  # what the check would see without rectangles


def test_block_mask_determinism_and_errors():
    assert torch.equal(block_mask(14, 14, 50, gen(1)), block_mask(14, 14, 50, gen(1)))
    assert not torch.equal(block_mask(14, 14, 50, gen(1)), block_mask(14, 14, 50, gen(2)))
    with pytest.raises(ConfigError, match="cannot mask 17 patches of a 4 x 4 grid"):
        block_mask(4, 4, 17, gen(0))


@pytest.mark.parametrize(("n_images", "prob"), [(8, 0.5), (7, 0.5), (6, 1.0), (4, 0.0), (1, 0.5), (10, 0.3)])
def test_ibot_masks_counts_and_ratios(n_images, prob):
    h, w = 6, 7
    masks = ibot_masks(n_images, h, w, gen(3), ratio_range=(0.1, 0.5), sample_prob=prob)
    assert masks.shape == (n_images, h * w) and masks.dtype == torch.bool
    n_m = int(n_images * prob)
    counts = masks.sum(1).tolist()
    assert sum(c > 0 for c in counts) == n_m
    want = sorted(int(round((0.1 + (i + 1) * 0.4 / n_m) * h * w)) for i in range(n_m))
    assert sorted(c for c in counts if c > 0) == want
    if n_m:
        assert max(counts) == round(0.5 * h * w)  # the top ratio is hi itself: (lo, hi]


def test_ibot_masks_choose_images_at_random_and_deterministically():
    a, b = ibot_masks(16, 4, 4, gen(0)), ibot_masks(16, 4, 4, gen(0))
    assert torch.equal(a, b)
    chosen = {tuple(ibot_masks(16, 4, 4, gen(s)).any(1).nonzero().flatten().tolist()) for s in range(10)}
    assert len(chosen) > 1 and all(len(c) == 8 for c in chosen)


def test_ibot_masks_errors():
    with pytest.raises(ConfigError, match="ratio_range"):
        ibot_masks(4, 4, 4, gen(0), ratio_range=(0.5, 0.1))
    with pytest.raises(ConfigError, match="sample_prob"):
        ibot_masks(4, 4, 4, gen(0), sample_prob=1.5)
