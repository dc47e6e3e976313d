"""Tests of the GPU catalogue (stadi.gpus)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stadi import gpus
from stadi.gpus import CATALOGUE, DEFAULT_SPEC, GpuSpec, ResolvedGpu, relative_speed, resolve

GFD_PRODUCTS = {
    "NVIDIA-H100-80GB-HBM3": "H100-SXM",
    "NVIDIA-H100-PCIe": "H100-PCIe",
    "NVIDIA-H100-NVL": "H100-NVL",
    "NVIDIA-H200": "H200",
    "NVIDIA-H200-NVL": "H200-NVL",
    "NVIDIA-A100-SXM4-80GB": "A100-SXM4-80GB",
    "NVIDIA-A100-SXM4-40GB": "A100-SXM4-40GB",
    "NVIDIA-A100-PCIE-40GB": "A100-PCIe-40GB",
    "NVIDIA-A100-80GB-PCIe": "A100-PCIe-80GB",
    "NVIDIA-L40S": "L40S",
    "NVIDIA-L40": "L40",
    "NVIDIA-L4": "L4",
    "NVIDIA-A10": "A10",
    "NVIDIA-A10G": "A10G",
    "Tesla-T4": "T4",
    "Tesla-V100-SXM2-16GB": "V100-SXM2-16GB",
    "Tesla-V100-SXM2-32GB": "V100-SXM2-32GB",
    "Tesla-V100-PCIE-16GB": "V100-PCIe-16GB",
    "Tesla-V100-PCIE-32GB": "V100-PCIe-32GB",
    "NVIDIA-GeForce-RTX-4090": "RTX-4090",
    "NVIDIA-GeForce-RTX-3090": "RTX-3090",
    "NVIDIA-RTX-A6000": "RTX-A6000",
}

SHORT_SPELLINGS = {
    "H100": "H100-SXM",
    "H100-SXM": "H100-SXM",
    "h100 sxm5": "H100-SXM",
    "H100-PCIe": "H100-PCIe",
    "H100 NVL": "H100-NVL",
    "H200": "H200",
    "A100": "A100-SXM4-40GB",
    "A100-40GB": "A100-SXM4-40GB",
    "A100-80GB": "A100-SXM4-80GB",
    "A100-PCIe": "A100-PCIe-40GB",
    "A100-80GB-PCIe": "A100-PCIe-80GB",
    "L40S": "L40S",
    "l40s": "L40S",
    "L40": "L40",
    "L4": "L4",
    "A10": "A10",
    "A10G": "A10G",
    "T4": "T4",
    "V100": "V100-SXM2-16GB",
    "V100-32GB": "V100-SXM2-32GB",
    "V100-PCIe": "V100-PCIe-16GB",
    "RTX4090": "RTX-4090",
    "RTX 4090": "RTX-4090",
    "GeForce RTX 4090": "RTX-4090",
    "4090": "RTX-4090",
    "RTX3090": "RTX-3090",
    "3090": "RTX-3090",
    "A6000": "RTX-A6000",
    "RTX-A6000": "RTX-A6000",
    "NVIDIA H100 80GB HBM3": "H100-SXM",  # the NVML name itself, spaces kept
    "  nvidia-l4  ": "L4",
}


@pytest.mark.parametrize(("product", "key"), sorted(GFD_PRODUCTS.items()))
def test_gfd_products_resolve(product: str, key: str) -> None:
    gpu = resolve(product)
    assert gpu.spec.key == key
    assert gpu.known
    assert gpu.product == product
    assert gpu.fraction == 1.0
    assert not gpu.shared
    assert gpu.memory_gib == gpu.spec.memory_gib
    assert gpu.speed == gpu.spec.relative_speed


@pytest.mark.parametrize(("product", "key"), sorted(SHORT_SPELLINGS.items()))
def test_short_spellings(product: str, key: str) -> None:
    assert resolve(product).spec.key == key
    assert resolve(product).known


@pytest.mark.parametrize("product", ["NVIDIA-H100-80GB-HBM3", "H100", "nvidia-h100-80gb-hbm3", "NVIDIA H100"])
def test_case_and_prefix_insensitive(product: str) -> None:
    assert resolve(product).spec is CATALOGUE["H100-SXM"]


@pytest.mark.parametrize(
    ("product", "key"),
    [("NVIDIA-A100-SXM4-40GB-SHARED", "A100-SXM4-40GB"), ("Tesla-T4-SHARED", "T4"), ("L4-shared", "L4")],
)
def test_shared_suffix(product: str, key: str) -> None:
    gpu = resolve(product)
    assert (gpu.spec.key, gpu.shared, gpu.known, gpu.fraction) == (key, True, True, 1.0)
    assert gpu.speed == CATALOGUE[key].relative_speed


@pytest.mark.parametrize(
    ("product", "key", "fraction", "memory"),
    [
        ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "A100-SXM4-40GB", 1 / 7, 5),
        ("NVIDIA-A100-SXM4-40GB-MIG-2g.10gb", "A100-SXM4-40GB", 2 / 7, 10),
        ("NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "A100-SXM4-40GB", 3 / 7, 20),
        ("NVIDIA-A100-SXM4-80GB-MIG-4g.40gb", "A100-SXM4-80GB", 4 / 7, 40),
        ("NVIDIA-A100-SXM4-80GB-MIG-7g.80gb", "A100-SXM4-80GB", 1.0, 80),
        ("NVIDIA-H100-80GB-HBM3-MIG-3g.40gb", "H100-SXM", 3 / 7, 40),
        ("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb", "H100-SXM", 1 / 7, 10),
        ("NVIDIA-H200-MIG-1g.18gb", "H200", 1 / 7, 18),
    ],
)
def test_mig_profiles(product: str, key: str, fraction: float, memory: float) -> None:
    gpu = resolve(product)
    assert gpu.spec.key == key
    assert gpu.known
    assert gpu.fraction == pytest.approx(fraction)
    assert gpu.memory_gib == memory
    assert gpu.speed == pytest.approx(CATALOGUE[key].relative_speed * fraction)
    assert relative_speed(product) == pytest.approx(gpu.speed)


def test_mig_and_shared_together() -> None:
    gpu = resolve("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED")
    assert (gpu.spec.key, gpu.fraction, gpu.memory_gib, gpu.shared) == ("A100-SXM4-40GB", 1 / 7, 5, True)


def test_unknown_product_default_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    product = "NVIDIA-Imaginary-X9000-test-warns-once"
    with caplog.at_level(logging.WARNING, logger="stadi.gpus"):
        first = resolve(product)
        second = resolve(product)
    assert first == second
    assert not first.known
    assert first.spec is DEFAULT_SPEC
    assert first.speed == pytest.approx(0.05)
    assert first.memory_gib == 16
    warnings = [r for r in caplog.records if r.name == "stadi.gpus" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "X9000" in warnings[0].getMessage()


GARBAGE = ["", "???", " ", "-SHARED", "MIG-1g.5gb", "H100-MIG-0g.5gb", "H100-MIG-9g.5gb", "\x00\n\t",
           "x" * 100_000, "-" * 100_000 + "SHARED", "H100" * 1000]


@pytest.mark.parametrize("product", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_garbage_never_raises(product: str) -> None:
    gpu = resolve(product)
    assert not gpu.known
    assert gpu.spec is DEFAULT_SPEC
    assert gpu.speed > 0


def test_h100_sxm_is_the_unit() -> None:
    assert CATALOGUE["H100-SXM"].relative_speed == 1.0
    assert relative_speed("NVIDIA-H100-80GB-HBM3") == 1.0
    assert relative_speed("H100") == 1.0


def test_ordering_sanity() -> None:
    order = ["H100-SXM", "H100-NVL", "H100-PCIe", "L40S", "A100-SXM4-80GB", "L40", "RTX-4090", "RTX-A6000",
             "A10", "L4", "RTX-3090", "A10G", "T4"]
    speeds = [CATALOGUE[key].relative_speed for key in order]
    assert speeds == sorted(speeds, reverse=True)
    assert relative_speed("H200") >= relative_speed("H100") > relative_speed("A100") > relative_speed("L4")
    assert relative_speed("L4") > relative_speed("T4")
    assert relative_speed("V100") > relative_speed("T4")
    assert CATALOGUE["H200"].memory_gib > CATALOGUE["H100-SXM"].memory_gib > CATALOGUE["L4"].memory_gib


@pytest.mark.parametrize("spec", list(CATALOGUE.values()), ids=list(CATALOGUE))
def test_catalogue_entries_consistent(spec: GpuSpec) -> None:
    assert spec.relative_speed == pytest.approx(spec.fp16_tflops / 989.4)
    assert 0 < spec.relative_speed <= 1.0
    assert spec.memory_gib > 0
    assert spec.memory_bandwidth_gbs > 0
    assert spec.source
    assert CATALOGUE[spec.key] is spec


def test_catalogue_is_read_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        CATALOGUE["H100-SXM"] = DEFAULT_SPEC  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE["H100-SXM"].fp16_tflops = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve("H100").fraction = 0.5  # type: ignore[misc]


def test_aliases_are_unambiguous() -> None:
    compact = [gpus._compact(alias) for _, aliases in gpus._ENTRIES for alias in aliases]
    assert len(compact) == len(set(compact))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_resolve_never_raises(product: str) -> None:
    logging.getLogger("stadi.gpus").disabled = True
    try:
        gpu = resolve(product)
    finally:
        logging.getLogger("stadi.gpus").disabled = False
    assert isinstance(gpu, ResolvedGpu)
    assert gpu.product == product
    assert 0 < gpu.fraction <= 1.0
    assert gpu.speed > 0
    assert gpu.memory_gib > 0


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(GFD_PRODUCTS)),
    st.integers(min_value=1, max_value=7),
    st.integers(min_value=1, max_value=200),
    st.booleans(),
)
def test_mig_property(product: str, g: int, gb: int, shared: bool) -> None:
    label = f"{product}-MIG-{g}g.{gb}gb" + ("-SHARED" if shared else "")
    gpu = resolve(label)
    assert gpu.spec.key == GFD_PRODUCTS[product]
    assert gpu.fraction == pytest.approx(g / 7)
    assert gpu.memory_gib == gb
    assert gpu.shared is shared
