"""Emulated heterogeneity, for tests and benchmarks only: make rank r look FACTOR times slower.

``stadi run --slowdown 1=3.0`` (the ranks get ``STADI_SLOWDOWN="1=3.0"``); the launcher of a rank injects it,
the engine never reads it. On CPU the rank paces its compute: after each denoiser step it sleeps
(FACTOR - 1) times the step's compute time (``pacer``, the engine's ``pace`` hook), so the step takes FACTOR
times as long. On a GPU the rank runs in a CUDA green context holding 1/FACTOR of the SMs
(``green_context``); a GPU step does not slow down linearly with the SM share, so measured speeds tell the
real factor.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from stadi_worker.engine.sampling import Pace


def parse_slowdown(text: str | None) -> dict[int, float]:
    """``"1=3.0,2=1.5"`` -> {1: 3.0, 2: 1.5}; ValueError on a malformed item or a factor below 1."""
    out: dict[int, float] = {}
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        rank, sep, factor = item.partition("=")
        try:
            r, f = int(rank), float(factor)
        except ValueError:
            r, f = -1, 0.0
        if not sep or r < 0 or not f >= 1.0:
            raise ValueError(f"slowdown {item!r}: expected RANK=FACTOR with RANK >= 0 and FACTOR >= 1")
        out[r] = f
    return out


def slowdown_factor(rank: int, text: str) -> float:
    """This rank's factor in ``text`` (``"1=3.0,2=1.5"``); 1.0 when absent."""
    return parse_slowdown(text).get(rank, 1.0)


def pacer(factor: float, device: torch.device) -> Pace | None:
    """CPU pacing of a ``factor`` times slower device: after a step of ``compute_ms``, sleep (factor - 1) times
    as long. None where there is nothing to pace (factor 1, or a GPU: it runs in a green context instead)."""
    if factor <= 1.0 or device.type != "cpu":
        return None

    def pace(compute_ms: float) -> None:
        time.sleep((factor - 1.0) * compute_ms / 1e3)

    return pace


@contextlib.contextmanager
def green_context(factor: float, device: torch.device) -> Iterator[Any]:
    """On a CUDA device with factor > 1: run the body in a green context of 1/factor of the SMs.

    Raises RuntimeError naming the reason when this torch/driver has no green contexts (torch >= 2.11
    built with them, CUDA 12.4+ driver). Untested on CPU-only machines; a no-op elsewhere.
    """
    if factor <= 1.0 or device.type != "cuda":
        yield None
        return
    try:
        from torch.cuda.green_contexts import SUPPORTED, GreenContext
    except ImportError:
        SUPPORTED, GreenContext = False, None
    if not SUPPORTED or GreenContext is None:
        raise RuntimeError(f"--slowdown on a GPU needs CUDA green contexts (torch.cuda.green_contexts, "
                           f"torch 2.11 built with them); this torch {torch.__version__} has none")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    sms = max(1, round(total / factor))
    try:
        ctx = GreenContext.create(sms, index)
        ctx.set_context()
    except Exception as error:  # driver without green-context support, MIG, etc.
        raise RuntimeError(f"cannot create a green context of {sms}/{total} SMs on cuda:{index}: {error}") from error
    try:
        yield ctx
    finally:
        torch.cuda.synchronize(index)
        with contextlib.suppress(Exception):
            ctx.pop_context()
