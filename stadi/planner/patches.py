"""Latent bands: the elastic split (balanced per-window work) and the equal split (the baseline)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def elastic_units(multipliers: Sequence[float], fixed: float | Sequence[float], per_unit: float, total: int
                  ) -> list[int]:
    """Give `total` granules to ranks so that the largest per-window time is as small as possible.

    Rank r's time with u > 0 granules is `multipliers[r] * (fixed[r] + per_unit * u)` (the affine cost model
    times the steps it runs per window over its speed; ``fixed`` one figure for every rank or one per rank);
    ranks are ordered fastest first. The result is what handing out granules one at a time to the rank that
    would finish soonest gives (ties: the faster rank), which is exactly optimal for the maximum, unlike
    rounding a continuous split by largest remainder. To be fast it starts from the floor of the continuous
    optimum, which that greedy order always reaches, and hands out only the remaining few granules one at a
    time. A rank may end with none: the caller drops it.
    """
    n = len(multipliers)
    f = [float(fixed)] * n if isinstance(fixed, int | float) else [float(x) for x in fixed]
    # Equal finishing time tau over the ranks that take part: u_r = (tau / m_r - f_r) / per_unit summing to
    # `total`. They are a prefix in the order of m_r * f_r, a rank's time at the margin of no granule (water
    # filling): the longest prefix whose last rank still gets a non-negative share.
    order = sorted(range(n), key=lambda r: (multipliers[r] * f[r], multipliers[r]))
    tau, inverse, fixed_sum = 0.0, 0.0, 0.0
    for r in order:
        inverse += 1.0 / multipliers[r]
        fixed_sum += f[r]
        candidate = (total * per_unit + fixed_sum) / inverse
        if candidate / multipliers[r] < f[r]:
            break
        tau = candidate
    shares = [(tau / m - fr) / per_unit for m, fr in zip(multipliers, f, strict=True)]
    units = [math.floor(s + 1e-9) if s > 0 else 0 for s in shares]
    heap = [(multipliers[r] * (f[r] + per_unit * (units[r] + 1)), r) for r in range(n)]
    heapq.heapify(heap)
    for _ in range(total - sum(units)):
        _, r = heapq.heappop(heap)
        units[r] += 1
        heapq.heappush(heap, (multipliers[r] * (f[r] + per_unit * (units[r] + 1)), r))
    return units


def equal_units(n: int, total: int) -> list[int]:
    """Granules split as evenly as possible; the remainder goes to the first (fastest) ranks."""
    base, extra = divmod(total, n)
    return [base + (1 if r < extra else 0) for r in range(n)]


def bands(units: Sequence[int], granularity: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) latent row ranges from granule counts."""
    out, start = [], 0
    for u in units:
        end = start + u * granularity
        out.append((start, end))
        start = end
    return out
