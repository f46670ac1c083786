"""dinoapp.ssl.schedules: hand-computed values (DINOv3 spec, section 2, "Optimisation")."""

from __future__ import annotations

import math

import pytest

from dinoapp.errors import ConfigError
from dinoapp.ssl.schedules import cosine, linear_warmup, ramp, warmup_constant, warmup_cosine


def test_cosine_weight_decay_and_ema_recipes():
    assert cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)  # halfway: the mean
    assert cosine(25, 100, 0.04, 0.4) == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4)))
    assert cosine(100, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert cosine(150, 100, 0.992, 1.0) == pytest.approx(1.0)  # clamped past the end
    assert cosine(-5, 100, 0.992, 1.0) == pytest.approx(0.992)  # and before the start
    assert cosine(3, 0, 0.992, 1.0) == 1.0


def test_warmup_cosine_lr():
    # 10 warm-up steps 0 -> 1e-3, then 20 cosine steps 1e-3 -> 1e-6
    assert warmup_cosine(0, 30, 1e-3, 1e-6, 10) == 0.0
    assert warmup_cosine(4, 30, 1e-3, 1e-6, 10) == pytest.approx(4e-4)
    assert warmup_cosine(10, 30, 1e-3, 1e-6, 10) == pytest.approx(1e-3)
    assert warmup_cosine(20, 30, 1e-3, 1e-6, 10) == pytest.approx((1e-3 + 1e-6) / 2)
    assert warmup_cosine(30, 30, 1e-3, 1e-6, 10) == pytest.approx(1e-6)
    assert warmup_cosine(5, 30, 1e-3, 1e-6, 10, start=2e-4) == pytest.approx(6e-4)
    assert warmup_cosine(0, 30, 1e-3, 1e-6, 0) == pytest.approx(1e-3)  # no warm-up
    assert warmup_cosine(12, 10, 1e-3, 1e-6, 10) == pytest.approx(1e-6)  # warm-up as long as the run


def test_warmup_constant_and_linear_warmup():
    assert warmup_constant(0, 100, 5e-5) == 0.0
    assert warmup_constant(25, 100, 5e-5) == pytest.approx(1.25e-5)
    assert warmup_constant(100, 100, 5e-5) == pytest.approx(5e-5)
    assert warmup_constant(10**6, 100, 5e-5, start=1e-6) == pytest.approx(5e-5)
    # teacher temperature 0.04 -> 0.07 over 30 steps, then held
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(10, 30, 0.04, 0.07) == pytest.approx(0.05)
    assert linear_warmup(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(500, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(0, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_ramp():
    assert ramp(99, 100, 50) == 0.0
    assert ramp(100, 100, 50) == 0.0
    assert ramp(110, 100, 50) == pytest.approx(0.2)
    assert ramp(150, 100, 50) == 1.0
    assert ramp(1000, 100, 50) == 1.0
    assert (ramp(99, 100, 0), ramp(100, 100, 0)) == (0.0, 1.0)  # a step function


def test_negative_lengths_are_config_errors():
    with pytest.raises(ConfigError, match="total_steps"):
        cosine(0, -1, 0.0, 1.0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        warmup_cosine(0, 10, 1.0, 0.0, -2)
    with pytest.raises(ConfigError, match="ramp_steps"):
        ramp(0, 0, -1)
