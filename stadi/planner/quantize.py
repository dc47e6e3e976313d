"""Temporal quantization: integer strides per rank and the sync period P = lcm(strides)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence


def stride_cap(speed: float, fastest: float, max_stride: int, steps: int, warmup: int, min_effective: int) -> int:
    """The largest stride a rank may take.

    Bounded by the ideal stride k* = v_max / v_r (rounded half up: a GPU at 0.9x the fastest keeps every
    step), by maxStride, and by minEffectiveSteps (W + ceil((T - W) / k) >= minEffectiveSteps).
    """
    ideal = max(1, math.floor(fastest / speed + 0.5))
    cap = min(ideal, max_stride)
    remaining = steps - warmup
    if remaining <= 0:
        return 1
    while cap > 1 and warmup + math.ceil(remaining / cap) < min_effective:
        cap -= 1
    return cap


def stride_candidates(caps: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Stride vectors for ranks ordered fastest first: ranks sharing a cap share a stride, strides never
    decrease as speed decreases, and each stays within its cap. The fastest class (cap 1) gets stride 1."""
    classes = sorted(set(caps))

    def assign(i: int, floor: int) -> Iterator[dict[int, int]]:
        if i == len(classes):
            yield {}
            return
        cap = classes[i]
        for s in range(floor, cap + 1):
            for rest in assign(i + 1, s):
                yield {cap: s, **rest}

    for choice in assign(0, 1):
        yield tuple(choice[c] for c in caps)


def sync_period(strides: Sequence[int]) -> int:
    """P = lcm of the strides: every rank stands on the same timestep every P base steps."""
    return math.lcm(*strides) if strides else 1
