"""The pynvml boundary of the node agent: read every GPU's telemetry, and keep an NVML session that
degrades to zero GPUs (instead of crashing) where the driver or library is missing.

``nvml`` arguments are the :mod:`pynvml` module or any object with the same function names (tests pass
a fake); nothing here keeps module-level state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stadi.api import GpuTelemetry

log = logging.getLogger("stadi_operator.agent")

# Bits of nvmlClocksEventReasons (formerly nvmlClocksThrottleReasons) from nvml.h. The values are the
# driver's ABI, so they are spelled out here rather than read from the module (a fake has none).
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "GpuIdle"),
    (0x002, "ApplicationsClocksSetting"),
    (0x004, "SwPowerCap"),
    (0x008, "HwSlowdown"),
    (0x010, "SyncBoost"),
    (0x020, "SwThermalSlowdown"),
    (0x040, "HwThermalSlowdown"),
    (0x080, "HwPowerBrakeSlowdown"),
    (0x100, "DisplayClockSetting"),
)
# The reasons that mean the GPU runs slower than it could under load; GpuIdle and the clock settings
# are reported too, but an idle GPU or a pinned application clock is not a slowdown.
SLOWDOWN_REASONS = frozenset(
    {"SwPowerCap", "HwSlowdown", "SyncBoost", "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown"}
)

_KNOWN_MASK = sum(bit for bit, _ in THROTTLE_REASONS)

NVML_CLOCK_SM = 1  # nvmlClockType_t
NVML_ERROR_NOT_SUPPORTED = 3  # nvmlReturn_t: this GPU (or MIG mode) lacks the counter; not a fault
MIB = 1 << 20


def decode_throttle_reasons(mask: int) -> list[str]:
    """Bit mask -> reason names in bit order; unknown bits as hex, so a newer driver's reason is not lost."""
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    rest = mask & ~_KNOWN_MASK
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"0x{bit:x}")
            rest &= ~bit
        bit <<= 1
    return names


def gfd_product(name: str | bytes) -> str:
    """NVML's device name in the form of GPU Feature Discovery's ``nvidia.com/gpu.product`` label."""
    return _text(name).strip().replace(" ", "-")


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes; nvidia-ml-py returns str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _error_types(nvml: Any) -> tuple[type[BaseException], ...]:
    error = getattr(nvml, "NVMLError", None)
    return (error,) if isinstance(error, type) and issubclass(error, BaseException) else ()


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def collect(nvml: Any, *, now: datetime | None = None, problems: list[str] | None = None) -> list[GpuTelemetry]:
    """Read every GPU through ``nvml`` (initialised by the caller).

    A GPU whose handle, UUID or name cannot be read (e.g. fallen off the bus) is left out; a counter the
    GPU does not support reads as 0 / empty. Either kind of fault other than "not supported" is appended
    to ``problems`` as one line. An error of nvmlDeviceGetCount itself propagates: NVML is unusable.
    """
    errors = _error_types(nvml)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    notes = problems if problems is not None else []
    gpus: list[GpuTelemetry] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            product = gfd_product(nvml.nvmlDeviceGetName(handle))
        except errors as error:
            notes.append(f"GPU {index}: {_describe(error)}")
            continue
        gpus.append(_read_gpu(nvml, handle, index, uuid, product, now, notes))
    return gpus


def _read_gpu(
    nvml: Any, handle: Any, index: int, uuid: str, product: str, now: datetime, notes: list[str]
) -> GpuTelemetry:
    errors = _error_types(nvml)

    def read(what: str, fn: Callable[..., Any], *args: Any, default: Any) -> Any:
        try:
            return fn(*args)
        except errors as error:
            if getattr(error, "value", None) != NVML_ERROR_NOT_SUPPORTED:
                notes.append(f"GPU {index}: {what}: {_describe(error)}")
            return default

    memory = read("memory", nvml.nvmlDeviceGetMemoryInfo, handle, default=None)
    rates = read("utilization", nvml.nvmlDeviceGetUtilizationRates, handle, default=None)
    clock = read("SM clock", nvml.nvmlDeviceGetClockInfo, handle, NVML_CLOCK_SM, default=0)
    mask = read("clock event reasons", _throttle_mask, nvml, handle, default=0)
    processes = read("processes", nvml.nvmlDeviceGetComputeRunningProcesses, handle, default=[])
    return GpuTelemetry(
        index=index,
        uuid=uuid,
        product=product,
        memory_total_mib=int(memory.total) // MIB if memory is not None else 0,
        memory_used_mib=int(memory.used) // MIB if memory is not None else 0,
        # NVML gives percent; clamp so that an odd reading cannot fail validation and drop the node.
        utilization=min(max(float(rates.gpu) / 100.0, 0.0), 1.0) if rates is not None else 0.0,
        sm_clock_mhz=max(int(clock), 0),
        throttle_reasons=decode_throttle_reasons(int(mask)),
        process_count=len(processes or []),
        timestamp=now,
    )


def _throttle_mask(nvml: Any, handle: Any) -> int:
    # The "ClocksEvent" name replaced "ClocksThrottle" (driver 535+); the old one is deprecated and goes
    # away in CUDA 14. Use the new one where both the binding and the driver have it.
    errors = _error_types(nvml)
    new = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    old = getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    if new is not None:
        try:
            return int(new(handle))
        except errors:
            if old is None:
                raise
    if old is None:
        return 0
    return int(old(handle))


@dataclass(frozen=True)
class Reading:
    """One look at the node's GPUs: the telemetry, whether NVML worked, and what went wrong if anything."""

    gpus: list[GpuTelemetry] = field(default_factory=list)
    nvml: bool = False
    message: str = ""


def load_pynvml() -> Any:
    """The real binding (nvidia-ml-py); imported late so that a node without it still runs the agent."""
    import pynvml

    return pynvml


class NvmlSession:
    """NVML initialised on first use, read on every call, re-initialised quietly while it is missing.

    Without NVML (library absent, no driver, no GPU device nodes) it logs one warning, then reads as zero
    GPUs with ``nvml=False`` and retries init every ``retry_seconds`` at debug level. A later loss of
    NVML (e.g. a driver reload) warns once again.
    """

    def __init__(
        self,
        nvml: Any | None = None,
        *,
        retry_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], Any] = load_pynvml,
    ) -> None:
        self._module = nvml
        self._loader = loader
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._ready = False
        self._next_try: float | None = None  # None: try at once
        self._warned = False
        self._message = ""
        self._reported: set[str] = set()  # per-GPU problems already logged

    @property
    def ready(self) -> bool:
        """Whether NVML is initialised now."""
        return self._ready

    def read(self) -> Reading:
        """The GPUs now; never raises."""
        if not self._ready and (self._next_try is None or self._clock() >= self._next_try):
            self._init()
        if not self._ready:
            return Reading([], False, self._message)
        problems: list[str] = []
        try:
            gpus = collect(self._module, problems=problems)
        except Exception as error:
            # nvmlDeviceGetCount failed or the binding misbehaved: treat NVML as gone and start over.
            self._lost(error)
            return Reading([], False, self._message)
        for problem in problems:
            if problem not in self._reported:
                log.warning("GPU not fully readable", extra={"problem": problem})
        self._reported = set(problems)
        return Reading(gpus, True, "; ".join(problems))

    def close(self) -> None:
        """Shut NVML down if this session initialised it."""
        if self._ready:
            self._ready = False
            try:
                self._module.nvmlShutdown()
            except Exception as error:  # shutting down: nothing left to protect
                log.debug("nvmlShutdown failed", extra={"error": _describe(error)})

    def _init(self) -> None:
        try:
            if self._module is None:
                self._module = self._loader()
            self._module.nvmlInit()
        except Exception as error:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, OSError...
            self._next_try = self._clock() + self._retry_seconds
            reason = "pynvml is not installed" if isinstance(error, ImportError) else _describe(error)
            self._message = f"NVML unavailable: {reason}"
            if not self._warned:
                self._warned = True
                log.warning("NVML unavailable; reporting zero GPUs and retrying quietly",
                            extra={"error": reason, "retry_seconds": self._retry_seconds})
            else:
                log.debug("NVML still unavailable", extra={"error": reason})
            return
        self._ready = True
        self._message = ""
        if self._warned:
            log.info("NVML available again")
        self._warned = False

    def _lost(self, error: Exception) -> None:
        # Judge the error before close(): a binding bug (not an NVMLError) deserves its traceback.
        is_nvml = isinstance(error, _error_types(self._module))
        self.close()
        self._message = f"NVML stopped answering: {_describe(error)}"
        self._next_try = self._clock() + self._retry_seconds
        if not self._warned:
            self._warned = True
            log.warning("NVML stopped answering; reporting zero GPUs and retrying quietly",
                        extra={"error": _describe(error), "retry_seconds": self._retry_seconds},
                        exc_info=None if is_nvml else error)
