"""GPU catalogue: relative throughput, memory and bandwidth of NVIDIA GPU products.

Keys of the lookup are the values GPU Feature Discovery (GFD) writes to the node label
``nvidia.com/gpu.product``: the NVML device name with spaces replaced by '-', e.g.
``NVIDIA-H100-80GB-HBM3``, ``NVIDIA-A100-SXM4-40GB``, ``Tesla-T4``. Short spellings typed on a command
line (``H100``, ``A100-80GB``, ``4090``) resolve too. GFD suffixes are understood:

- ``-SHARED`` (time-slicing renames the product): same GPU, ``shared=True``.
- ``-MIG-<g>g.<m>gb`` (MIG "single" strategy): the parent GPU with ``fraction = g/7`` and ``m`` GiB.

Figures are from the public NVIDIA datasheets / architecture whitepapers (cited per entry). Throughput is
*dense* (no 2:4 sparsity) FP16 tensor-core TFLOPS with FP32 accumulate, the mode mixed-precision diffusion
inference uses; where a datasheet lists FP16-accumulate separately (GeForce, A10G) the FP32-accumulate
figure is taken, which is half rate on those cards. ``relative_speed`` is that figure over the H100 SXM's
989.4 TFLOPS. Memory is the marketed capacity, in GiB (NVML reports slightly less); bandwidth in GB/s.

A bare family name picks the SXM form with the smallest memory (``A100`` is the A100 SXM4 40GB). An unknown
product resolves to a conservative default (relative speed 0.05, below every catalogued GPU, 16 GiB) with
``known=False`` and a warning on the ``stadi.gpus`` logger; :func:`resolve` never raises for a string.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

__all__ = ["CATALOGUE", "DEFAULT_SPEC", "GpuSpec", "ResolvedGpu", "relative_speed", "resolve"]

logger = logging.getLogger("stadi.gpus")

H100_SXM_FP16_TFLOPS = 989.4
"""Dense FP16 tensor TFLOPS of the H100 SXM5, the unit of ``relative_speed``."""

MIG_SLICES = 7
"""Compute slices of a full GPU under MIG (A100, H100, H200)."""


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU product."""

    key: str  # canonical key, e.g. "H100-SXM"
    name: str  # marketing name
    fp16_tflops: float  # dense FP16 tensor TFLOPS (FP32 accumulate)
    relative_speed: float  # fp16_tflops / H100 SXM's
    memory_gib: float
    memory_bandwidth_gbs: float
    source: str  # citation of the spec figures


@dataclass(frozen=True, kw_only=True)
class ResolvedGpu:
    """A ``nvidia.com/gpu.product`` value resolved against the catalogue."""

    product: str  # the string given
    spec: GpuSpec
    memory_gib: float  # spec memory, or the MIG slice's
    fraction: float = 1.0  # MIG slice share of the SMs
    shared: bool = False  # time-sliced ("-SHARED")
    known: bool = True  # False when the default spec stands in for an unknown product

    @property
    def speed(self) -> float:
        """Throughput relative to a whole H100 SXM: ``spec.relative_speed * fraction``."""
        return self.spec.relative_speed * self.fraction


def _spec(key: str, name: str, tflops: float, memory_gib: float, bw_gbs: float, source: str) -> GpuSpec:
    """A spec whose relative speed is derived from its TFLOPS."""
    relative = tflops / H100_SXM_FP16_TFLOPS
    return GpuSpec(key, name, float(tflops), relative, float(memory_gib), float(bw_gbs), source)


# (spec, spellings). Spellings are compared upper-cased with everything but letters and digits removed,
# after the NVIDIA/Tesla/GeForce prefixes are stripped, so "NVIDIA-H100-80GB-HBM3" matches "H10080GBHBM3".
_ENTRIES: tuple[tuple[GpuSpec, tuple[str, ...]], ...] = (
    (_spec("H200", "NVIDIA H200 SXM 141GB", 989.4, 141, 4800,
           "NVIDIA H200 datasheet: 1979 TFLOPS FP16 sparse (989 dense), 141 GB HBM3e, 4.8 TB/s"),
     ("H200", "H200-SXM", "H200-SXM5", "H200-141GB", "H200-141GB-HBM3e")),
    (_spec("H200-NVL", "NVIDIA H200 NVL 141GB", 835.5, 141, 4800,
           "NVIDIA H200 datasheet: H200 NVL 1671 TFLOPS FP16 sparse (835.5 dense), 141 GB, 4.8 TB/s"),
     ("H200-NVL",)),
    (_spec("H100-SXM", "NVIDIA H100 SXM5 80GB", 989.4, 80, 3350,
           "NVIDIA H100 datasheet: 989 TFLOPS FP16 dense (1979 sparse), 80 GB HBM3, 3.35 TB/s"),
     ("H100", "H100-SXM", "H100-SXM5", "H100-80GB-HBM3", "H100-SXM5-80GB", "H100-SXM-80GB")),
    (_spec("H100-PCIe", "NVIDIA H100 PCIe 80GB", 756.5, 80, 2000,
           "NVIDIA H100 datasheet: H100 PCIe 1513 TFLOPS FP16 sparse (756.5 dense), 80 GB HBM2e, 2 TB/s"),
     ("H100-PCIe", "H100-PCIe-80GB")),
    (_spec("H100-NVL", "NVIDIA H100 NVL 94GB", 835.5, 94, 3900,
           "NVIDIA H100 datasheet: H100 NVL 1671 TFLOPS FP16 sparse (835.5 dense), 94 GB HBM3, 3.9 TB/s"),
     ("H100-NVL", "H100-NVL-94GB")),
    (_spec("A100-SXM4-40GB", "NVIDIA A100 SXM4 40GB", 312, 40, 1555,
           "NVIDIA A100 datasheet: 312 TFLOPS FP16 dense (624 sparse), 40 GB HBM2, 1555 GB/s"),
     ("A100", "A100-SXM", "A100-SXM4", "A100-40GB", "A100-SXM4-40GB", "A100-SXM-40GB")),
    (_spec("A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB", 312, 80, 2039,
           "NVIDIA A100 datasheet: 312 TFLOPS FP16 dense (624 sparse), 80 GB HBM2e, 2039 GB/s"),
     ("A100-80GB", "A100-SXM4-80GB", "A100-SXM-80GB")),
    (_spec("A100-PCIe-40GB", "NVIDIA A100 PCIe 40GB", 312, 40, 1555,
           "NVIDIA A100 datasheet: 312 TFLOPS FP16 dense (624 sparse), 40 GB HBM2, 1555 GB/s"),
     ("A100-PCIe", "A100-PCIe-40GB", "A100-40GB-PCIe")),
    (_spec("A100-PCIe-80GB", "NVIDIA A100 PCIe 80GB", 312, 80, 1935,
           "NVIDIA A100 datasheet: 312 TFLOPS FP16 dense (624 sparse), 80 GB HBM2e, 1935 GB/s"),
     ("A100-80GB-PCIe", "A100-PCIe-80GB")),
    (_spec("L40S", "NVIDIA L40S 48GB", 362.05, 48, 864,
           "NVIDIA L40S datasheet: 362 TFLOPS FP16 dense (733 sparse), 48 GB GDDR6, 864 GB/s"),
     ("L40S",)),
    (_spec("L40", "NVIDIA L40 48GB", 181.05, 48, 864,
           "NVIDIA L40 datasheet: 181 TFLOPS FP16 (FP32 acc.) dense (362 sparse), 48 GB GDDR6, 864 GB/s"),
     ("L40",)),
    (_spec("L4", "NVIDIA L4 24GB", 121, 24, 300,
           "NVIDIA L4 datasheet: 242 TFLOPS FP16 sparse (121 dense), 24 GB GDDR6, 300 GB/s"),
     ("L4",)),
    (_spec("A10", "NVIDIA A10 24GB", 125, 24, 600,
           "NVIDIA A10 datasheet: 125 TFLOPS FP16 dense (250 sparse), 24 GB GDDR6, 600 GB/s"),
     ("A10",)),
    (_spec("A10G", "NVIDIA A10G 24GB (AWS)", 70, 24, 600,
           "AWS G5 / GA102 (80 SMs, 1.71 GHz, half-rate FP32 acc.): ~70 TFLOPS FP16 dense, 24 GB, 600 GB/s"),
     ("A10G",)),
    (_spec("T4", "NVIDIA T4 16GB", 65, 16, 320,
           "NVIDIA T4 datasheet: 65 TFLOPS FP16/FP32 mixed precision, 16 GB GDDR6, 320 GB/s"),
     ("T4",)),
    (_spec("V100-SXM2-16GB", "NVIDIA V100 SXM2 16GB", 125, 16, 900,
           "NVIDIA V100 datasheet: SXM2 125 TFLOPS tensor (mixed precision), 16 GB HBM2, 900 GB/s"),
     ("V100", "V100-SXM2", "V100-16GB", "V100-SXM2-16GB")),
    (_spec("V100-SXM2-32GB", "NVIDIA V100 SXM2 32GB", 125, 32, 900,
           "NVIDIA V100 datasheet: SXM2 125 TFLOPS tensor (mixed precision), 32 GB HBM2, 900 GB/s"),
     ("V100-32GB", "V100-SXM2-32GB")),
    (_spec("V100-PCIe-16GB", "NVIDIA V100 PCIe 16GB", 112, 16, 900,
           "NVIDIA V100 datasheet: PCIe 112 TFLOPS tensor (mixed precision), 16 GB HBM2, 900 GB/s"),
     ("V100-PCIe", "V100-PCIe-16GB")),
    (_spec("V100-PCIe-32GB", "NVIDIA V100 PCIe 32GB", 112, 32, 900,
           "NVIDIA V100 datasheet: PCIe 112 TFLOPS tensor (mixed precision), 32 GB HBM2, 900 GB/s"),
     ("V100-PCIe-32GB",)),
    (_spec("RTX-4090", "NVIDIA GeForce RTX 4090 24GB", 165.2, 24, 1008,
           "NVIDIA Ada whitepaper: RTX 4090 165.2 TFLOPS FP16 (FP32 acc.) dense, 24 GB GDDR6X, 1008 GB/s"),
     ("RTX-4090", "4090")),
    (_spec("RTX-3090", "NVIDIA GeForce RTX 3090 24GB", 71, 24, 936,
           "NVIDIA GA102 whitepaper: RTX 3090 71 TFLOPS FP16 (FP32 acc.) dense, 24 GB GDDR6X, 936 GB/s"),
     ("RTX-3090", "3090")),
    (_spec("RTX-A6000", "NVIDIA RTX A6000 48GB", 154.8, 48, 768,
           "NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor sparse (154.8 dense), 48 GB GDDR6, 768 GB/s"),
     ("RTX-A6000", "A6000")),
)

CATALOGUE: Mapping[str, GpuSpec] = MappingProxyType({spec.key: spec for spec, _ in _ENTRIES})
"""Catalogued GPUs by canonical key (read-only)."""

DEFAULT_SPEC = _spec("UNKNOWN", "Unknown GPU", 0.05 * H100_SXM_FP16_TFLOPS, 16, 300,
                     "conservative default for a product not in the catalogue")
"""Stands in for a product the catalogue does not know."""


def _compact(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


_ALIASES: Mapping[str, GpuSpec] = MappingProxyType(
    {_compact(alias): spec for spec, aliases in _ENTRIES for alias in aliases}
)
_PREFIX = re.compile(r"^(?:(?:NVIDIA|TESLA|GEFORCE)[\s_-]*)+")
_SHARED = re.compile(r"[\s_-]*SHARED$")
_MIG = re.compile(r"[\s_-]*MIG[\s_-]*(?:\d+C\.)?([1-7])G\.(\d+)GB(?:\+ME)?$")
_MAX_LEN = 200  # no real product name comes close; longer strings are unknown without being parsed


def resolve(product: str) -> ResolvedGpu:
    """Resolve a ``nvidia.com/gpu.product`` value (or a short spelling) to its catalogue entry.

    Never raises for a string; an unknown product gets :data:`DEFAULT_SPEC` with ``known=False`` and a
    warning logged once per product.
    """
    return _resolve(product)


@lru_cache(maxsize=1024)
def _resolve(product: str) -> ResolvedGpu:
    # Cached, so the warning below is logged once per product (while it stays among the last 1024).
    text, shared, fraction, mig_memory, spec = product.strip().upper(), False, 1.0, 0.0, None
    if len(text) <= _MAX_LEN:
        shared = bool(_SHARED.search(text))
        text = _SHARED.sub("", text)
        if mig := _MIG.search(text):
            fraction, mig_memory = int(mig.group(1)) / MIG_SLICES, float(mig.group(2))
            text = text[: mig.start()]
        spec = _ALIASES.get(_compact(_PREFIX.sub("", text.strip())))
    if spec is None:
        logger.warning("unknown GPU product %.100r: assuming relative speed %.2g and %g GiB",
                       product, DEFAULT_SPEC.relative_speed, DEFAULT_SPEC.memory_gib)
    chosen = spec or DEFAULT_SPEC
    return ResolvedGpu(product=product, spec=chosen, memory_gib=mig_memory or chosen.memory_gib,
                       fraction=fraction, shared=shared, known=spec is not None)


def relative_speed(product: str) -> float:
    """Throughput of ``product`` relative to an H100 SXM (MIG slices count their share)."""
    return resolve(product).speed
