"""Band geometry and the communication manager of displaced patch parallelism (DistriFusion-style).

Every wrapped layer owns a slot in the ``CommManager``: the buffers holding every band's last exchanged
tensor and, in stale mode, the handle of the exchange in flight. Layers call ``gather`` with their fresh
local tensor and get one tensor per band back: fresh for every band in synchronous mode; in stale mode their
own fresh tensor and the other bands' tensors from the previous step, while this step's exchange runs in the
background (``async_op=True``) until the same layer asks again one step later.

With strided sub-grids (DESIGN section 4) only window starts are shared by every rank: there the mode is
stale (the exchange of the latest activations starts, asynchronously); the steps a fast rank takes inside a
window are local: no collective, each layer waits for the exchange in flight at its first use and then
reuses the other bands' context from the last exchange.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class BandLayout:
    """The bands of one group of ranks, in latent rows, listed in group-rank order; ``index`` is ours."""

    bands: tuple[tuple[int, int], ...]
    index: int
    height: int

    @property
    def size(self) -> int:
        return len(self.bands)

    @property
    def mine(self) -> tuple[int, int]:
        return self.bands[self.index]

    @property
    def order(self) -> list[int]:
        """Group indices sorted by band start (top to bottom)."""
        return sorted(range(self.size), key=lambda i: self.bands[i][0])

    @property
    def above(self) -> int | None:
        pos = self.order.index(self.index)
        return self.order[pos - 1] if pos > 0 else None

    @property
    def below(self) -> int | None:
        pos = self.order.index(self.index)
        return self.order[pos + 1] if pos + 1 < self.size else None

    def scaled(self, local: int) -> list[int]:
        """Every band's extent at the resolution where our band measures ``local`` (rows or tokens)."""
        mine = self.mine[1] - self.mine[0]
        out = []
        for start, end in self.bands:
            num = local * (end - start)
            if num % mine:
                raise ValueError(f"band {start}:{end} does not scale to an integer size at this layer "
                                 f"(our band {self.mine} has {local}); the band granularity is too fine")
            out.append(num // mine)
        return out


def all_gather_uneven(tensor: torch.Tensor, sizes: list[int], dim: int, group: Any = None,
                      backend: str = "gloo", async_op: bool = False) -> tuple[Any, list[torch.Tensor], Any]:
    """Start an all_gather of tensors whose extent along ``dim`` differs per rank (``sizes``).

    NCCL takes a list of unequal tensors; Gloo needs equal ones, so we pad to the largest and trim after.
    Returns (work or None, receive buffers, a function turning the buffers into the trimmed list).
    """
    dim = dim % tensor.dim()
    tensor = tensor.contiguous()
    equal = len(set(sizes)) == 1
    if equal or backend == "nccl":
        recv = []
        for n in sizes:
            shape = list(tensor.shape)
            shape[dim] = n
            recv.append(torch.empty(shape, dtype=tensor.dtype, device=tensor.device))
        work = dist.all_gather(recv, tensor, group=group, async_op=async_op)
        return work, recv, lambda bufs: bufs
    top = max(sizes)
    pad = [0, 0] * (tensor.dim() - dim - 1) + [0, top - tensor.shape[dim]]
    padded = F.pad(tensor, pad)
    recv = [torch.empty_like(padded) for _ in sizes]
    work = dist.all_gather(recv, padded, group=group, async_op=async_op)
    return work, recv, lambda bufs: [b.narrow(dim, 0, n) for b, n in zip(bufs, sizes, strict=True)]


@dataclass
class _Slot:
    buffers: list[torch.Tensor] | None = None
    pending: tuple[Any, list[torch.Tensor], Any] | None = None


@dataclass
class CommManager:
    """Owns the per-layer exchange buffers and async handles of one patch-parallel group."""

    layout: BandLayout
    group: Any = None  # a ProcessGroup, or None for the default (world) group
    backend: str = "gloo"
    sync: bool = True
    local: bool = False  # inside a window: no collective, the last exchange's context
    slots: dict[int, _Slot] = field(default_factory=dict)
    bytes_sent: int = 0
    exchanges: int = 0  # denoiser steps that started an exchange (sync or stale), counted not timed
    waiting: Any = None  # () -> context manager timing blocked waits (StepTimer.waiting), or None

    @property
    def size(self) -> int:
        return self.layout.size

    def new_key(self) -> int:
        """A slot for one wrapped layer; keys are handed out in module order, the same on every rank."""
        key = len(self.slots)
        self.slots[key] = _Slot()
        return key

    def begin_step(self, sync: bool, mode: Literal["exchange", "local"] = "exchange") -> None:
        """Set the mode of the coming denoiser step: synchronous (exact) or stale, and whether it is a
        step every rank takes (``exchange``) or one inside a window that only this rank takes (``local``)."""
        self.sync = sync
        self.local = mode == "local" and not sync
        if not self.local and self.size > 1:
            self.exchanges += 1

    def _wait(self) -> AbstractContextManager[Any]:
        return self.waiting() if self.waiting is not None else nullcontext()

    def gather(self, key: int, local: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
        """Every band's tensor for layer ``key`` (group order); ours is ``local`` itself."""
        if self.size == 1:
            return [local]
        slot = self.slots[key]
        if self.local:
            if slot.pending is not None:  # first use inside the window: wait for the window-start exchange
                self._finish(slot)
            if slot.buffers is None:
                raise RuntimeError(f"layer slot {key}: a local step before any exchange")
            out = list(slot.buffers)
            out[self.layout.index] = local
            return out
        self.bytes_sent += local.numel() * local.element_size()
        if self.sync or (slot.buffers is None and slot.pending is None):
            if slot.pending is not None:  # keep the collective sequence identical on every rank
                self._finish(slot)
            with self._wait():
                _, recv, trim = all_gather_uneven(local, sizes, dim, self.group, self.backend)
            out = trim(recv)
            out[self.layout.index] = local
            slot.buffers = out
            return list(out)
        if slot.pending is not None:
            self._finish(slot)
        assert slot.buffers is not None
        out = list(slot.buffers)
        out[self.layout.index] = local
        # the send buffer must not change while in flight: the model may reuse ``local``'s storage
        slot.pending = all_gather_uneven(local.clone(), sizes, dim, self.group, self.backend, async_op=True)
        return out

    def _finish(self, slot: _Slot) -> None:
        assert slot.pending is not None
        work, recv, trim = slot.pending
        if work is not None:
            with self._wait():
                work.wait()
        slot.buffers = trim(recv)
        slot.pending = None

    def drain(self) -> None:
        """Wait for every exchange in flight (end of the loop), so no collective outlives the generation."""
        for slot in self.slots.values():
            if slot.pending is not None:
                self._finish(slot)
