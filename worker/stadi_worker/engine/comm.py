"""Band geometry and the communication manager of displaced patch parallelism (DistriFusion-style).

Every wrapped layer owns a slot in the ``CommManager``: persistent send and receive buffers holding every
band's last exchanged tensor. A layer calls ``exchange`` with its fresh local tensor and a ``combine``
function that turns one tensor per band into what the layer needs (a halo concatenation, full-image K/V,
pooled GroupNorm statistics). In synchronous mode every band's tensor is fresh (a blocking all_gather). In
stale mode ``combine`` reads the other bands' tensors of the previous exchange, ours fresh; then this
step's all_gather starts on a side stream into the same buffers, overlapped with the layers that follow,
and the step joins it at its end (``end_step``).

The buffers are allocated once, outside any capture, at fixed addresses: so a whole denoiser step, its
collectives included, can be captured as a CUDA graph and replayed (``graphs.StepGraphs``). Reading the
stale buffers before overwriting them is safe because ``combine`` materialises a new tensor (cat, stack)
and the side stream waits for everything the step enqueued before it.

With strided sub-grids (docs/architecture.md, "Execution") only window starts are shared by every rank: there
the mode is stale (the exchange of the latest activations starts); the steps a fast rank takes inside a window are
local: no collective, the other bands' context of the last exchange.
"""

from __future__ import annotations

from collections.abc import Callable
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
    An empty extent (an idle rank's band) is padded on NCCL too: one equal all_gather, no empty transfer.
    Returns (work or None, receive buffers, a function turning the buffers into the trimmed list).
    """
    dim = dim % tensor.dim()
    tensor = tensor.contiguous()
    equal = len(set(sizes)) == 1
    if equal or (backend == "nccl" and min(sizes) > 0):
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
    """One layer's persistent buffers: ``send`` (our tensor padded to the largest band) and ``recv``
    (world, *send.shape); band i's tensor is ``recv[i]`` narrowed to ``sizes[i]`` along ``dim``."""

    send: torch.Tensor
    recv: torch.Tensor
    sizes: list[int]
    dim: int
    filled: bool = False

    def parts(self) -> list[torch.Tensor]:
        return [self.recv[i].narrow(self.dim, 0, n) for i, n in enumerate(self.sizes)]


@dataclass
class CommManager:
    """Owns the per-layer exchange buffers of one patch-parallel group, and the side stream of stale
    exchanges on a GPU."""

    layout: BandLayout
    group: Any = None  # a ProcessGroup, or None for the default (world) group
    backend: str = "gloo"
    sync: bool = True
    local: bool = False  # inside a window: no collective, the last exchange's context
    slots: dict[int, _Slot | None] = field(default_factory=dict)
    bytes_sent: int = 0
    exchanges: int = 0  # denoiser steps that started an exchange (sync or stale), counted not timed
    waiting: Any = None  # () -> context manager timing blocked waits (StepTimer.waiting), or None
    _side: Any = None  # the CUDA stream of stale exchanges (created on first use)
    _forked: bool = False  # a stale exchange was enqueued on the side stream this step
    _pending: list[Any] = field(default_factory=list)  # asynchronous Gloo exchanges of this step

    @property
    def size(self) -> int:
        return self.layout.size

    def new_key(self) -> int:
        """A slot for one wrapped layer; keys are handed out in module order, the same on every rank."""
        key = len(self.slots)
        self.slots[key] = None
        return key

    def begin_step(self, sync: bool, mode: Literal["exchange", "local"] = "exchange") -> None:
        """Set the mode of the coming denoiser step: synchronous (exact) or stale, and whether it is a
        step every rank takes (``exchange``) or one inside a window that only this rank takes (``local``)."""
        self.sync = sync
        self.local = mode == "local" and not sync
        if not self.local and self.size > 1:
            self.exchanges += 1

    def end_step(self) -> None:
        """Join this step's stale exchanges (they ran beside the later layers: on the GPU on the side
        stream, on the CPU as asynchronous Gloo work)."""
        if self._pending:
            with self._wait():
                for work in self._pending:
                    work.wait()
            self._pending.clear()
        if self._forked:
            torch.cuda.current_stream().wait_stream(self._side)
            self._forked = False

    def _wait(self) -> AbstractContextManager[Any]:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return self.waiting() if self.waiting is not None and not capturing else nullcontext()

    def _slot(self, key: int, local: torch.Tensor, sizes: list[int], dim: int) -> _Slot:
        slot = self.slots[key]
        shape = list(local.shape)
        shape[dim] = max(sizes)
        if slot is None or list(slot.send.shape) != shape or slot.sizes != sizes:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"layer slot {key}: exchange buffers must exist before a CUDA graph capture")
            send = local.new_empty(shape)
            slot = _Slot(send=send, recv=local.new_empty([self.size, *shape]), sizes=list(sizes), dim=dim)
            self.slots[key] = slot
        return slot

    @staticmethod
    def _stage(slot: _Slot, local: torch.Tensor) -> None:
        slot.send.narrow(slot.dim, 0, local.shape[slot.dim]).copy_(local)

    def _all_gather(self, slot: _Slot, async_op: bool = False) -> Any:
        """Every band's ``send`` (ours zero-padded to the largest band) into ``slot.recv``: one collective."""
        slot.filled = True
        if self.backend == "nccl":
            return dist.all_gather_into_tensor(slot.recv, slot.send, group=self.group, async_op=async_op)
        # Gloo: a list of views of the one buffer
        return dist.all_gather(list(slot.recv.unbind(0)), slot.send, group=self.group, async_op=async_op)

    def exchange(self, key: int, local: torch.Tensor, sizes: list[int], dim: int,
                 combine: Callable[[list[torch.Tensor]], Any]) -> Any:
        """``combine`` of every band's tensor for layer ``key`` (group order; ours is ``local`` itself),
        fresh (sync) or from the last exchange (stale, local); a stale step then starts its exchange."""
        if self.size == 1:
            return combine([local])
        dim = dim % local.dim()
        slot = self._slot(key, local, sizes, dim)
        fresh = self.sync or (not self.local and not slot.filled)
        if not fresh and not slot.filled:
            raise RuntimeError(f"layer slot {key}: a local step before any exchange")
        if fresh:
            self.bytes_sent += local.numel() * local.element_size()
            self._stage(slot, local)
            with self._wait():
                self._all_gather(slot)
        parts = slot.parts()
        parts[self.layout.index] = local
        out = combine(parts)
        if fresh or self.local:
            return out
        self.bytes_sent += local.numel() * local.element_size()
        # staged on the compute stream: ``local``'s memory may be reused as soon as the layer returns
        self._stage(slot, local)
        if local.device.type != "cuda":
            self._pending.append(self._all_gather(slot, async_op=True))
            return out
        if self._side is None:
            self._side = torch.cuda.Stream(local.device)
        # the side stream waits for everything enqueued so far: ``combine`` has read the old buffers
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            self._all_gather(slot)
        self._forked = True
        return out
