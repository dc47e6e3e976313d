"""The affine cost model of one denoiser step and of the activation exchange (docs/architecture.md, "The planner")."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stadi import gpus
from stadi.families import FamilyProfile

# Link bandwidths in GB/s as the planner assumes them: NVLink between SXM parts of one node, PCIe between
# other GPUs of one node, and a 100 Gb/s network between nodes.
LINKS: dict[str, float] = {"nvlink": 150.0, "pcie": 20.0, "network": 12.5}

# One collective's fixed latency (launch + NCCL handshake) paid at every synchronisation point.
COLLECTIVE_MS = 0.05

# A whole-frame step (one GPU, a CFG branch) compiled with torch.compile and replayed as a CUDA graph costs this
# share of the uncompiled graph (spec.model.compile). On 2x H200: SD3 40.3 against 52.0 ms per full step and
# 21.8 against 27.6 ms per branch (bench/results/speed-2xh200-compile.json against speed-2xh200-all.json);
# SDXL 32.7 against 42.0 ms (issue 5's figures for the same host). Banded steps are not compiled.
COMPILED_WHOLE_FRAME = 0.78


@dataclass(frozen=True)
class CostModel:
    """Step and exchange times for one model family at one latent size."""

    profile: FamilyProfile
    latent_height: int
    latent_width: int
    link_gbytes_per_s: float
    compiled: bool = False  # whole-frame steps run compiled (spec.model.compile)

    @property
    def width_scale(self) -> float:
        return self.latent_width / 128.0

    def step_ms(self, rows: int, batch: int, speed: float, banded: bool = False) -> float:
        """c_r(h) = (alpha + beta * b * h * W/128) / v_r, plus the band exchange's fixed cost when the rank
        shares rows with other ranks (``banded``); a rank with no rows costs nothing."""
        if rows <= 0:
            return 0.0
        fixed, per_granule = self.affine(batch, banded)
        return (fixed + per_granule * rows / self.profile.granularity) / speed

    def affine(self, batch: int, banded: bool = False) -> tuple[float, float]:
        """(fixed cost, cost per granule of rows) of one step at speed 1: c(u granules) = (a + b * u) / v.

        A banded step's fixed cost includes ``band_exchange_ms``: its per-layer collectives slow the step
        even when overlapped, on every step the rank runs (a strided rank pays it on fewer steps). A
        whole-frame step of a compiled job costs ``COMPILED_WHOLE_FRAME`` of the graph's."""
        p = self.profile
        if banded:
            return p.alpha_ms + p.band_exchange_ms, p.beta_ms * batch * p.granularity * self.width_scale
        scale = COMPILED_WHOLE_FRAME if self.compiled else 1.0
        return p.alpha_ms * scale, p.beta_ms * batch * p.granularity * self.width_scale * scale

    def exchange_ms(self, rows_received: int, batch: int) -> float:
        """Time to receive the other bands' activations for one step."""
        if rows_received <= 0:
            return 0.0
        nbytes = self.profile.act_bytes_per_row * batch * rows_received * self.width_scale
        return nbytes / (self.link_gbytes_per_s * 1e9) * 1e3

    def latent_exchange_ms(self) -> float:
        """Time to swap one noise prediction (4-16 latent channels, fp16) between CFG branches."""
        nbytes = 16 * 2 * self.latent_height * self.latent_width
        return COLLECTIVE_MS + nbytes / (self.link_gbytes_per_s * 1e9) * 1e3


def default_link(gpus_at: Iterable[tuple[str, str | None]]) -> float:
    """The slowest link among GPUs given as (product, node): network across nodes, NVLink when every GPU
    of the one node is an SXM part, PCIe otherwise."""
    placed = list(gpus_at)
    if len({node for _, node in placed}) > 1:
        return LINKS["network"]
    keys = [gpus.resolve(product).spec.key for product, _ in placed]
    if all("SXM" in k or k.startswith("H200") for k in keys):
        return LINKS["nvlink"]
    return LINKS["pcie"]
