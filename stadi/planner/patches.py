"""Latent bands: the elastic split (balanced per-window work) and the equal split (the baseline)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence


def elastic_units(costs: Sequence[Callable[[int], float]], total: int) -> list[int]:
    """Give `total` granules to ranks so that the largest per-window time is as small as possible.

    `costs[r](u)` is rank r's time with u granules, non-decreasing in u; ranks are ordered fastest first.
    Granules go one at a time to the rank whose time after taking it is smallest (ties: the faster rank).
    For non-decreasing costs this greedy order is optimal for the maximum, and it is exact, where rounding
    a continuous split (largest remainder) can leave one granule on the wrong rank. A rank that ends with
    no granule is left out by the caller.
    """
    units = [0] * len(costs)
    heap = [(cost(1), r) for r, cost in enumerate(costs)]
    heapq.heapify(heap)
    for _ in range(total):
        _, r = heapq.heappop(heap)
        units[r] += 1
        heapq.heappush(heap, (costs[r](units[r] + 1), r))
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
