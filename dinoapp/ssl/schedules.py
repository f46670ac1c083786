"""Step schedules for self-supervised training (DINOv3 spec, section 2, "Optimisation").

Pure functions of the step: floats in, one float out, so a resumed run recomputes every value
from the step alone. The recipe uses them as follows:

- learning rate: :func:`warmup_cosine` (linear warm-up from 0, then cosine to a final value);
  continued pretraining stage 2 uses a low constant lr: :func:`warmup_constant`;
- weight decay: :func:`cosine` 0.04 -> 0.4;
- EMA (teacher) momentum: :func:`cosine` 0.992 -> 1.0;
- teacher temperature: :func:`linear_warmup` 0.04 -> 0.07, then held;
- loss weights switched on part-way (Gram anchoring, an unfreezing backbone): :func:`ramp`.
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps``).

    ``step`` is clamped to [0, total_steps]; ``total_steps == 0`` gives ``end``.
    """
    _check_steps(total_steps=total_steps)
    if total_steps == 0:
        return float(end)
    t = min(max(step, 0), total_steps) / total_steps
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t)))


def warmup_cosine(
    step: int, total_steps: int, peak: float, final: float, warmup_steps: int, start: float = 0.0
) -> float:
    """Linear ``start`` -> ``peak`` over ``warmup_steps``, then cosine ``peak`` -> ``final`` over the
    remaining ``total_steps - warmup_steps`` steps (the spec's lr schedule)."""
    _check_steps(total_steps=total_steps, warmup_steps=warmup_steps)
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps, start, peak)
    return cosine(step - warmup_steps, max(total_steps - warmup_steps, 0), peak, final)


def warmup_constant(step: int, warmup_steps: int, value: float, start: float = 0.0) -> float:
    """Linear ``start`` -> ``value`` over ``warmup_steps``, then ``value`` (continued pretraining,
    stage 2: a low constant lr)."""
    return linear_warmup(step, warmup_steps, start, value)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ``start`` -> ``end`` over ``warmup_steps`` (``end`` reached at ``step == warmup_steps``),
    then ``end`` (teacher temperature 0.04 -> 0.07). ``warmup_steps == 0`` gives ``end``."""
    _check_steps(warmup_steps=warmup_steps)
    if step >= warmup_steps:
        return float(end)
    t = max(step, 0) / warmup_steps
    return float(start + (end - start) * t)


def ramp(step: int, start_step: int, ramp_steps: int) -> float:
    """0 before ``start_step``, then linear 0 -> 1 over ``ramp_steps``, then 1.

    ``ramp_steps == 0`` is a step function: 1 from ``start_step`` on.
    """
    _check_steps(ramp_steps=ramp_steps)
    if step < start_step:
        return 0.0
    if ramp_steps == 0:
        return 1.0
    return float(min((step - start_step) / ramp_steps, 1.0))
