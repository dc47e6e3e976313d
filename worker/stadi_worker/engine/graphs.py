"""CUDA graphs of denoiser steps: one graph per step function, phase and input shape, captured on second use.

An eager step on a GPU is launch-bound (an SDXL UNet step costs ~100 ms on our H100 host at any band
height); replayed as a graph it costs what its kernels cost. The first call of a key runs eagerly: it
initialises what is lazily created (cuBLAS workspaces, NCCL communicators, the exchange buffers at fixed
addresses); the second call captures and replays; later calls copy their inputs into the graph's static
inputs and replay. Collectives inside the step (the band exchanges) are captured with it. A compiled step may
compile again on its second call (a guard on state its first call changed); with a cold inductor cache that
compile benchmarks kernels, which a capture forbids: a failed capture is tried once more on the next call (the
compile is done by then) before the key runs eagerly for good.

All graphs of one ``StepGraphs`` share one memory pool: they never run concurrently and each replay
writes its intermediates before reading them; outputs are copied out at once, so no graph reads memory
another one wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)
CAPTURE_TRIES = 2  # captures of one key before it runs eagerly for good


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


@dataclass
class StepGraphs:
    """Runs step functions ``fn(*tensors) -> tensor`` eagerly, or as CUDA graphs when ``enabled``."""

    enabled: bool
    _graphs: dict[Hashable, _Graph] = field(default_factory=dict)
    _seen: set[Hashable] = field(default_factory=set)
    _failed: dict[Hashable, int] = field(default_factory=dict)  # failed captures per key
    # what a step function notes about itself while its Python runs (eager or capture), for its replays
    notes: dict[Hashable, Any] = field(default_factory=dict)
    _pool: Any = None
    captures: int = 0

    def captured(self, key: Hashable, *inputs: torch.Tensor) -> bool:
        return self._full_key(key, inputs) in self._graphs

    @staticmethod
    def _full_key(key: Hashable, inputs: tuple[torch.Tensor, ...]) -> Hashable:
        return key, tuple((tuple(t.shape), t.dtype) for t in inputs)

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """``fn(*inputs)``; ``key`` must name everything besides the input shapes that changes what ``fn``
        launches (the phase of the exchange, the plan)."""
        if not self.enabled:
            return fn(*inputs)
        full = self._full_key(key, inputs)
        entry = self._graphs.get(full)
        if entry is None:
            if full not in self._seen or self._failed.get(full, 0) >= CAPTURE_TRIES:
                self._seen.add(full)
                return fn(*inputs)
            try:
                entry = self._graphs[full] = self._capture(fn, inputs)
            except RuntimeError as error:  # a slower step, not a failed job: every rank fails alike
                self._failed[full] = self._failed.get(full, 0) + 1
                final = self._failed[full] >= CAPTURE_TRIES
                log.warning("CUDA graph capture failed (%s); the step runs eagerly%s", str(error)[:300],
                            "" if final else " and is captured again on its next call", extra={"key": repr(key)})
                torch.cuda.synchronize()
                return fn(*inputs)
        for static, x in zip(entry.inputs, inputs, strict=True):
            static.copy_(x)
        entry.graph.replay()
        return entry.output.clone()

    @property
    def eager_keys(self) -> int:
        """How many keys gave up their graph (failed every capture) and run eagerly."""
        return sum(1 for n in self._failed.values() if n >= CAPTURE_TRIES)

    def close(self) -> None:
        """Free every graph. Graphs holding captured NCCL collectives must be gone before the process group
        is destroyed, or ``destroy_process_group`` waits forever."""
        if self._graphs:
            torch.cuda.synchronize()
        for entry in self._graphs.values():
            entry.graph.reset()
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()
        self.notes.clear()
        self._pool = None

    def _capture(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Graph:
        static = [x.clone() for x in inputs]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: the NCCL watchdog thread polls its events while we capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn(*static)
        self.captures += 1
        return _Graph(graph=graph, inputs=static, output=out)
