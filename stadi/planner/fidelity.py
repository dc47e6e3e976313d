"""Fidelity classes of plans, and what ``spec.parallelism.quality`` lets ``auto`` pick (docs/architecture.md,
"The planner").

- exact: equal to one GPU up to float error: ``single``, ``cfg`` (and ``stadi+cfg`` with one GPU per branch,
  which is cfg), and any plan whose every step is synchronous (warmup covering every step);
- bounded: within the bound below on the trained-model figures measured for the plan's name;
- approximate: beyond the bound, or not measured (e.g. stride 4).

The figures were measured on 2 ranks; a plan on more is classed by its largest stride (the oldest context a
band can read), an extrapolation until plans of more ranks are measured.

The bound: mean PSNR against the serial image >= ``BOUND_PSNR_DB`` and mean seam score <= ``BOUND_SEAM``
(``stadi bench fidelity``: the gradient energy across the band edges over the serial image's, 1.0 no seam).
Every plan measured so far with stale context or strides of at most 3 is within it; SDXL's stride 3 only just
(seam 1.557). The worst single case is recorded but not bounded: stale context costs a few cases much more
than the mean (SDXL strides (1, 2): 19.4 dB worst for 32.7 dB mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stadi.api import FIDELITIES, Fidelity, Parallelism, Quality

DEFAULT_QUALITY: Quality = Parallelism.model_fields["quality"].default  # spec.parallelism.quality's

BOUND_PSNR_DB = 30.0
BOUND_SEAM = 1.6


@dataclass(frozen=True)
class Figures:
    """One plan's fidelity against the serial image of the same seed, over the measured cases."""

    psnr_db: float  # mean
    worst_psnr_db: float  # the lowest case
    seam: float | None  # mean seam score; None: the plan has no band edge


# Copied from bench/results/fidelity-{sdxl,sd3,flux}-small.json (``results``: each plan's mean
# ``psnr``, the lowest ``cases[].psnr``, ``seam``), which tests/unit/test_planner_fidelity.py keeps equal: the
# built-in trained models, float32, 256^2, 30 steps, 4 warmup steps, 2 Gloo ranks, 16 cases.
# Names as `stadi bench fidelity --plans` takes them (``bench_name``): a plan measured later under its name
# (e.g. "cfg-stride:1-2") is classed by the row added here, with no other change.
MEASURED: dict[str, dict[str, Figures]] = {
    "sdxl": {
        "exact": Figures(100.0, 100.0, 1.0),
        "patch": Figures(37.509, 24.405, 1.0452),
        "stadi:1-1": Figures(37.509, 24.405, 1.0452),
        "stadi:1-2": Figures(32.694, 19.443, 1.3987),
        "stadi:1-3": Figures(32.277, 19.516, 1.5571),
        "cfg": Figures(100.0, 100.0, None),
        "hybrid": Figures(55.131, 41.146, None),
        "cfg-stride:1-2": Figures(34.48, 20.906, None),
        "cfg-stride:1-3": Figures(35.919, 22.234, None),
        "cfg-stride:1-4": Figures(33.928, 21.286, None),
        "cfg-stride+band:1-1": Figures(30.102, 21.427, 1.6361),
        "cfg-stride+band:1-2": Figures(28.786, 19.519, 1.3805),
        "cfg-stride+band:1-3": Figures(31.329, 22.53, 1.0671),
    },
    "sd3": {
        "exact": Figures(100.0, 100.0, 1.0),
        "patch": Figures(41.81, 35.943, 1.0331),
        "stadi:1-1": Figures(41.81, 35.943, 1.0331),
        "stadi:1-2": Figures(36.645, 31.82, 1.1058),
        "stadi:1-3": Figures(34.427, 30.51, 1.242),
        "cfg": Figures(100.0, 100.0, None),
        "hybrid": Figures(45.605, 42.933, None),
        "cfg-stride:1-2": Figures(31.39, 23.284, None),
        "cfg-stride:1-3": Figures(30.085, 24.439, None),
        "cfg-stride:1-4": Figures(27.545, 22.957, None),
        "cfg-stride+band:1-1": Figures(39.267, 30.76, 1.0485),
        "cfg-stride+band:1-2": Figures(30.939, 23.148, 1.107),
        "cfg-stride+band:1-3": Figures(29.093, 23.852, 1.0598),
    },
    "flux": {
        "exact": Figures(100.0, 100.0, 1.0),
        "patch": Figures(51.546, 46.428, 0.9906),
        "stadi:1-2": Figures(44.312, 39.289, 0.9451),
        "stadi:1-3": Figures(41.316, 38.14, 0.9206),
    },
}
# Families not measured take their kind's figures, as stadi/families.py takes their cost constants (UNet: SDXL,
# DiT: SD3).
MEASURED_AS: dict[str, str] = {"sdxl": "sdxl", "sd15": "sdxl", "sd3": "sd3", "pixart": "sd3", "flux": "flux"}

# The classes auto may pick under each spec.parallelism.quality.
ADMITS: dict[str, tuple[str, ...]] = {
    "exact": ("exact",),
    "balanced": ("exact", "bounded"),
    "fastest": FIDELITIES,
}


def bench_name(strategy: str, strides: Sequence[int]) -> str:
    """The two-rank plan measured for this one, named as ``stadi bench fidelity --plans`` takes it:
    ``stadi:1-k``, ``cfg-stride:1-k`` and ``cfg-stride+band:1-k`` with k the largest stride, ``patch`` for
    stadi with every stride 1 and for stadi+cfg's bands (stride 1, stale context, like patch's), else the
    strategy's name."""
    if strategy == "stadi" and max(strides) == 1:
        return "patch"  # the same plan: where both were measured, their figures are equal
    if strategy in ("stadi", "cfg-stride", "cfg-stride+band"):
        return f"{strategy}:1-{max(strides)}"
    if strategy == "stadi+cfg":
        return "patch"
    return strategy


def within_bound(figures: Figures) -> bool:
    return figures.psnr_db >= BOUND_PSNR_DB and (figures.seam is None or figures.seam <= BOUND_SEAM)


def classify(family: str, strategy: str, strides: Sequence[int], banded: bool, synchronous: bool) -> Fidelity:
    """The fidelity class of a plan of ``strategy`` with these strides (one per active rank); ``banded``: some
    branch is split into bands; ``synchronous``: the warmup covers every step (hybrid's pipeline window does
    not depend on it)."""
    if strategy in ("single", "cfg") or (strategy == "stadi+cfg" and not banded):
        return "exact"
    if synchronous and strategy != "hybrid":
        return "exact"
    figures = MEASURED.get(MEASURED_AS.get(family, ""), {}).get(bench_name(strategy, strides))
    if figures is None or not within_bound(figures):
        return "approximate"
    return "bounded"
