"""The distributed runtime of a rank: its process group from torchrun's environment, idle waits, teardown."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a dead peer surfaces as an error after this, never as a hang
# How long an idle rank waits for the active ones to finish an image: a failed gang is torn down by its
# launcher (stadi run, the operator), so this only has to outlast the longest image.
IDLE_WAIT = timedelta(days=1)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the gang."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" or "nccl"; the group exists only when world_size > 1
    store: Any = field(default=None, compare=False, repr=False)  # the rendezvous key-value store, if any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

    ``device`` is "cpu" (Gloo) or "cuda" (NCCL, one GPU per local rank). Without WORLD_SIZE (or with 1)
    no group is created. ``timeout_s`` bounds every collective, so a rank that died makes the others fail
    instead of waiting forever.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but no CUDA device is visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    if world > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"WORLD_SIZE={world} but {name} is not set")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    store = None
    if world > 1:
        try:  # env:// (torchrun's agent store included) keeps its store here only
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            log.debug("no rendezvous store: idle ranks wait in the final gather")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                       store=store)


def hold_idle(ctx: DistContext, key: str, *, idle: bool, announce: bool) -> None:
    """Keep an idle rank out of collectives until the active ranks are done with an image: a collective waits
    at most the group's timeout, an image may take longer. The rank that ``announce``s sets ``key`` in the
    rendezvous store when it is done; ``idle`` ranks wait for it (``IDLE_WAIT`` at most)."""
    if ctx.store is None:
        return
    if announce:
        ctx.store.set(key, "1")
    elif idle:
        ctx.store.wait([key], IDLE_WAIT)


TEARDOWN_S = 20.0


def shutdown(ctx: DistContext, teardown_s: float = TEARDOWN_S) -> None:
    """Leave the process group (if any); call last, on success, on every rank.

    With NCCL communicators that took part in CUDA graph captures, ``destroy_process_group`` can wait
    forever (torch 2.11 on 2xH200). The work is done by then: the teardown gets ``teardown_s`` seconds in a
    background thread, after which the process exits with status 0 and leaves the rest to the OS.
    """
    if ctx.world_size <= 1 or not dist.is_initialized():
        return
    if ctx.backend != "nccl":
        # every rank leaves together: a rank still tearing down when rank 0 (the rendezvous store's host) has
        # exited can abort in a background thread ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        return
    dist.barrier(device_ids=[ctx.device.index])
    torch.cuda.synchronize(ctx.device)
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
    teardown.start()
    teardown.join(teardown_s)
    if teardown.is_alive():
        log.warning("NCCL teardown did not finish; exiting without it", extra={"seconds": teardown_s})
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
