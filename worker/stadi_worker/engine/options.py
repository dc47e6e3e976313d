"""The engine's switches: set by the worker's settings (``STADI_CUDA_GRAPHS``, ``STADI_COMPILE``) or by a
benchmark, never read from the environment here."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineOptions:
    """``cuda_graphs``: replay steps as CUDA graphs on a GPU (off: eager steps, for debugging). ``compile``
    overrides the job's ``model.compile``: None follows the job, "0" never compiles, "1" means inductor, any
    other value names a ``torch.compile`` backend (the CPU tests use aot_eager)."""

    cuda_graphs: bool = True
    compile: str | None = None

    def compile_backend(self, requested: bool) -> str | None:
        """The ``torch.compile`` backend of denoiser steps (inductor when the job asks), or None."""
        value = (self.compile or "").strip()
        if value == "":
            return "inductor" if requested else None
        if value == "0":
            return None
        return "inductor" if value == "1" else value

    def graphs_on(self, device: torch.device) -> bool:
        """Whether steps on ``device`` run as CUDA graphs."""
        return device.type == "cuda" and self.cuda_graphs
