"""Band geometry and the communication manager of displaced patch parallelism (DistriFusion-style).

Every wrapped layer owns a slot in the ``CommManager`` and calls ``exchange`` with its fresh local tensor; it
gets back one tensor per band (ours the fresh one) and combines them itself (a halo concatenation, full-image
K/V, pooled GroupNorm statistics), so the combining stays traceable by ``torch.compile``.

- **Synchronous steps** (warmup, exact mode): each layer needs every band's fresh tensor before it can go on,
  so each runs its own blocking all_gather (counted as ``layer`` collectives).
- **Window starts** (stale, mode ``exchange``): each layer reads the other bands' tensors of the last window
  exchange and copies its fresh one into its region of one flat send buffer. After the step (``end_step``, outside
  any captured graph) one all_gather of that buffer starts asynchronously (a ``window`` collective); it is waited
  for only where it is next read (``settle``): at the next window start, before a synchronous step, and when
  the share is left (end of an image, a re-plan). A fast rank's local steps never wait for a slow rank's step.
- **Local steps** (inside a window): no collective, and the window start's own exchange has not arrived (it
  completes when the slowest rank ends its step). They read the other bands' context extrapolated linearly to
  the window start through the last two exchanges (``ahead``). Read as is, the previous exchange is one window
  older than what the per-layer exchange gave them: on the trained models (``stadi bench fidelity``, 16 cases,
  PSNR against serial) that lost 0.73 and 0.96 dB (SDXL), 1.61 and 1.80 dB (SD3) at strides (1, 2) and (1, 3)
  against the per-layer exchange (bench/results/fidelity-*-small.json); extrapolated, 0.15 and -0.02 dB (SDXL),
  0.13 and 0.05 dB (SD3). ``patch`` (one-step windows, no local step) is unchanged to the bit. The receive side is
  double-buffered: the exchange in flight writes ``incoming`` while the layers read ``read`` (window starts)
  and ``ahead`` (local steps; kept only on ranks that take them).

Why this shape. One collective per window, not one per layer (about 190 per SD3 step, ≈7 ms of launches at
100% SMs on an H200), and no layer's collective ties the fast rank to the slow rank's progress through its step.
NCCL's all_gather rather than the copy engines: one NCCL launch per window moves one flat buffer over NVLink
at near link bandwidth, while peer copies (cudaMemcpyPeer) between two processes need CUDA IPC handles of every
buffer exchanged out of band and the copies ordered by hand on both sides. On the CPU (Gloo) it is one
asynchronous work. Settling copies ``incoming`` into ``read`` (the other bands' rows only) rather than swapping
the two: CUDA graphs and compiled steps keep fixed addresses, where a swap would need two graphs (and two
compiles' guards) per phase, one per buffer parity, each captured on its own second use.

Volume: with 2 equal bands, fp16, batch 2 (guidance), SD3-medium at 1024² sends K and V of its 24 joint blocks
for half the image, 24 × 2 × 2048 tokens × 2 × 1536 × 2 B ≈ 604 MB per rank per window, and receives as much
(≈1.7 ms at 350 GB/s of NVLink all_gather, beside the local steps). At a window start settling copies it once
(≈0.3 ms at the H200's ≈4 TB/s) and a rank with local steps extrapolates it in one more pass (≈0.4 ms), against
steps of 20-50 ms. Lower precision is not sent: fp16 is already the model's precision (fp32 runs are CPU tests).

Buffers are allocated once, outside any capture, at fixed addresses: a slot lives in standalone buffers during
the first (synchronous) step, which creates every slot; after it, ``end_step`` lays every slot out in one flat
byte buffer per role (one collective whatever the dtypes: GroupNorm statistics are fp32 in an fp16 model), so
whole denoiser steps, per-layer synchronous collectives included, replay as CUDA graphs (``graphs.StepGraphs``).
Every method that calls ``torch.distributed`` is ``torch.compiler.disable``d: a compiled step breaks its graph
there.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

ALIGN = 64  # bytes: every slot's region in the flat buffers starts aligned for any dtype's view
Mode = Literal["exchange", "local"]


@dataclass(frozen=True)
class BandLayout:
    """The bands of one group of ranks, in latent rows, listed in group-rank order; ``index`` is ours."""

    bands: tuple[tuple[int, int], ...]
    index: int
    height: int
    # the group index of the band that computes the text stream its family's bands share (Plan.computes_text),
    # or None: every band computes its own
    text: int | None = None

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


@torch.compiler.disable
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
    """One layer's buffers: ``send`` (our tensor, zero-padded to the largest band along ``dim``) and ``rows``,
    one tensor of ``send``'s shape per band: band i's last exchanged tensor is ``rows[i]`` narrowed to
    ``sizes[i]``."""

    send: torch.Tensor
    rows: list[torch.Tensor]
    sizes: list[int]
    dim: int
    ahead: list[torch.Tensor] | None = None  # the local steps' rows (extrapolated), like ``rows``

    @property
    def nbytes(self) -> int:
        return self.send.numel() * self.send.element_size()

    def parts(self, local: bool) -> list[torch.Tensor]:
        rows = self.ahead if local and self.ahead is not None else self.rows
        return [r.narrow(self.dim, 0, n) for r, n in zip(rows, self.sizes, strict=True)]


@dataclass
class _Bucket:
    """The flat byte buffers every slot is a view into: ``send`` (N bytes), ``read`` (world, N: the context
    synchronous steps and window starts read), ``incoming`` (world * N: what the window exchange in flight
    writes) and ``ahead`` (world, N: the local steps' context, or None); ``regions`` (dtype, start, end) cut N
    into one byte range per dtype (slots are laid out grouped by dtype), so arithmetic on them is one op each."""

    send: torch.Tensor
    read: torch.Tensor
    incoming: torch.Tensor
    ahead: torch.Tensor | None
    regions: list[tuple[torch.dtype, int, int]]


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """``like``'s dtype and shape over ``flat``'s bytes from ``offset``."""
    nbytes = like.numel() * like.element_size()
    return flat[offset:offset + nbytes].view(like.dtype).view(like.shape)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class CommManager:
    """Owns the exchange buffers of one patch-parallel group, its window exchange in flight and the counts of
    the collectives it launched (``collectives``: ``layer`` per layer of a synchronous step, ``window`` per
    window start)."""

    layout: BandLayout
    group: Any = None  # a ProcessGroup, or None for the default (world) group
    local_steps: bool = False  # this rank takes steps inside windows (a stride below the period): keep ``ahead``
    # window starts read ``ahead`` too: the last two exchanges extrapolated to the start (cfg-stride+band's bands,
    # each evaluated once per window, on context a whole window old)
    extrapolate_starts: bool = False
    sync: bool = True
    local: bool = False  # inside a window: no collective, the extrapolated context
    slots: dict[int, _Slot | None] = field(default_factory=dict)
    collectives: Counter[str] = field(default_factory=Counter)
    waiting: Any = None  # () -> context manager timing blocked waits (StepTimer.waiting), or None
    _bucket: _Bucket | None = None
    _due: bool = False  # this step staged the window exchange that end_step starts
    _flight: Any = None  # the window exchange in flight (async work), or None
    # base step indices: of the context in ``read``, of the window start running, of the exchange in flight
    _read_at: int = 0
    _start_at: int = 0
    _flight_at: int = 0
    _ahead: bool = False  # ``ahead`` holds this window's local context

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def window_bytes(self) -> int:
        """Bytes this rank sends per window exchange (its flat send buffer), 0 before the first step."""
        return 0 if self._bucket is None else self._bucket.send.numel()

    def new_key(self) -> int:
        """A slot for one wrapped layer; keys are handed out in module order, the same on every rank."""
        key = len(self.slots)
        self.slots[key] = None
        return key

    @torch.compiler.disable
    def begin_step(self, sync: bool, mode: Mode = "exchange", index: int = 0) -> None:
        """Set the mode of the coming denoiser step at base step ``index`` (it dates the context a synchronous step
        or a window start exchanges; a local step needs none): synchronous (exact) or stale, and
        whether it is a step every rank takes (``exchange``: a window start) or one inside a window that only
        this rank takes (``local``). A window start reads, and a synchronous step overwrites, what the exchange
        in flight brings: settle it (a window start also extrapolates its local steps' context from it)."""
        self.sync = sync
        self.local = mode == "local" and not sync
        if self.local:
            if not self._ahead:  # no exchange settled since the last synchronous step: its context as is
                self._extrapolate(None)
            return
        self.settle(target=None if sync else index)
        if self.extrapolate_starts and not sync and not self._ahead:
            self._extrapolate(None)  # no exchange arrived since the last synchronous step: its context as is
        if sync:
            self._read_at = index
        self._start_at = index
        self._due = not sync and self.size > 1

    @torch.compiler.disable
    def end_step(self) -> None:
        """After a step, outside its graph: lay the slots out in the flat buffers once the first step has created
        them all; after a window start, start its one exchange."""
        if self.size == 1:
            return
        if self._bucket is None:
            self._build()
        if not self._due:
            return
        self._due = False
        assert self._bucket is not None  # a stale step read exchanged context: a synchronous step came first
        self.collectives["window"] += 1
        self._flight_at = self._start_at
        self._flight = dist.all_gather_into_tensor(self._bucket.incoming, self._bucket.send, group=self.group,
                                                   async_op=True)

    @torch.compiler.disable
    def settle(self, target: int | None = None) -> None:
        """Wait for the window exchange in flight, if any, and make it the context window starts read; with a
        ``target`` (the base index of the window start about to run), extrapolate its local steps' context to
        it. On a GPU the wait holds the compute stream, not the host."""
        self._ahead = False
        if self._flight is None:
            return
        with self._wait():
            self._flight.wait()
        self._flight = None
        bucket = self._bucket
        assert bucket is not None
        if target is not None:
            # the straight line through both exchanges, at the window start
            self._extrapolate((target - self._flight_at) / (self._flight_at - self._read_at))
        incoming = bucket.incoming.view(self.size, -1)
        for i in self._others():
            bucket.read[i].copy_(incoming[i])
        self._read_at = self._flight_at

    def _others(self) -> list[int]:
        """The other bands' rows: ours is never read (layers use their fresh tensor)."""
        return [i for i in range(self.size) if i != self.layout.index]

    def _extrapolate(self, slope: float | None) -> None:
        """On ranks that take local steps: ``ahead`` = incoming + slope * (incoming - read) where an exchange just
        arrived (one op per dtype region and band), else ``read`` as is (slope None)."""
        self._ahead = True
        bucket = self._bucket
        if bucket is None or bucket.ahead is None:
            return
        incoming = bucket.incoming.view(self.size, -1)
        for i in self._others():
            if slope is None:
                bucket.ahead[i].copy_(bucket.read[i])
                continue
            for dtype, start, end in bucket.regions:
                new, read = incoming[i, start:end].view(dtype), bucket.read[i, start:end].view(dtype)
                torch.lerp(read, new, 1.0 + slope, out=bucket.ahead[i, start:end].view(dtype))

    def _wait(self) -> AbstractContextManager[Any]:
        return self.waiting() if self.waiting is not None and not _capturing() else nullcontext()

    def _build(self) -> None:
        """One flat byte buffer per role, every slot a view into it (grouped by dtype), its contents kept."""
        if any(s is None for s in self.slots.values()):
            return  # a wrapped layer has not run yet
        if _capturing():
            raise RuntimeError("the exchange buffers must be laid out before a CUDA graph capture")
        # the same order on every rank: module order within each dtype
        slots = sorted((s for s in self.slots.values() if s is not None), key=lambda s: str(s.send.dtype))
        offsets, regions, total = [], [], 0
        for slot in slots:
            if not regions or regions[-1][0] != slot.send.dtype:
                regions.append((slot.send.dtype, total, total))
            offsets.append(total)
            total += -(-slot.nbytes // ALIGN) * ALIGN
            regions[-1] = (slot.send.dtype, regions[-1][1], total)
        device = slots[0].send.device
        send = torch.zeros(total, dtype=torch.uint8, device=device)
        read = torch.zeros(self.size, total, dtype=torch.uint8, device=device)
        ahead = torch.zeros_like(read) if self.local_steps or self.extrapolate_starts else None
        for slot, offset in zip(slots, offsets, strict=True):
            rows = [_view(read[i], offset, slot.send) for i in range(self.size)]
            for new, old in zip(rows, slot.rows, strict=True):
                new.copy_(old)
            slot.send, slot.rows = _view(send, offset, slot.send), rows
            if ahead is not None:
                slot.ahead = [_view(ahead[i], offset, slot.send) for i in range(self.size)]
        incoming = torch.zeros(self.size * total, dtype=torch.uint8, device=device)
        self._bucket = _Bucket(send=send, read=read, incoming=incoming, ahead=ahead, regions=regions)

    def _slot(self, key: int, local: torch.Tensor, sizes: list[int], dim: int) -> _Slot:
        slot = self.slots[key]
        shape = list(local.shape)
        shape[dim] = max(sizes)
        if slot is not None:
            if list(slot.send.shape) != shape or slot.sizes != sizes or slot.send.dtype != local.dtype:
                raise RuntimeError(f"layer slot {key}: shape {shape} {local.dtype} differs from its buffers' "
                                   f"{list(slot.send.shape)} {slot.send.dtype} (one share, one shape per layer)")
            return slot
        if not self.sync:
            raise RuntimeError(f"layer slot {key}: a stale step before any exchange (the first step is synchronous)")
        if self._bucket is not None or _capturing():
            raise RuntimeError(f"layer slot {key}: every slot must exist after the first step, before any capture")
        send = local.new_zeros(shape)
        slot = _Slot(send=send, rows=list(local.new_zeros([self.size, *shape]).unbind(0)), sizes=list(sizes),
                     dim=dim)
        self.slots[key] = slot
        return slot

    @torch.compiler.disable
    def exchange(self, key: int, local: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
        """Every band's tensor for layer ``key`` in group order, ours ``local`` itself: the others fresh in a
        synchronous step, else those of the last settled exchange; a window start also stages ``local`` for the
        exchange ``end_step`` starts."""
        if self.size == 1:
            return [local]
        dim = dim % local.dim()
        slot = self._slot(key, local, sizes, dim)
        if self.sync or not self.local:
            # staged on the compute stream: ``local``'s memory may be reused as soon as the layer returns
            slot.send.narrow(dim, 0, local.shape[dim]).copy_(local)
        if self.sync:
            self._gather_layer(slot)
        parts = slot.parts(self.local or (self.extrapolate_starts and not self.sync))
        parts[self.layout.index] = local
        return parts

    def _gather_layer(self, slot: _Slot) -> None:
        """A synchronous step's blocking all_gather of one layer into its rows, through one contiguous buffer (the
        rows are strided views of ``read``): the start of ``incoming``, free in a synchronous step (nothing is in
        flight) and at a fixed address, as a captured collective needs; a fresh one in the first step."""
        shape = [self.size * slot.send.shape[0], *slot.send.shape[1:]]
        if self._bucket is None:
            gathered = slot.send.new_empty(shape)
        else:
            gathered = self._bucket.incoming[:self.size * slot.nbytes].view(slot.send.dtype).view(shape)
        with self._wait():
            dist.all_gather_into_tensor(gathered, slot.send, group=self.group)
        self.collectives["layer"] += 1
        for row, part in zip(slot.rows, gathered.chunk(self.size), strict=True):
            row.copy_(part)
