"""The affine cost model of one denoiser step and of the activation exchange (docs/architecture.md, "The planner")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from stadi import gpus
from stadi.families import SHARED_TEXT, FamilyProfile, text_bands

# Link bandwidths in GB/s as the planner assumes them: NVLink between SXM parts of one node, PCIe between
# other GPUs of one node, and a 100 Gb/s network between nodes.
LINKS: dict[str, float] = {"nvlink": 150.0, "pcie": 20.0, "network": 12.5}

# One collective's fixed latency (launch + NCCL handshake) paid at every synchronisation point.
COLLECTIVE_MS = 0.05

# How the engine exchanges stale band context, which decides what a banded step pays (PlanRequest.exchange):
# - "bucketed" (the engine since issue 16, the default): a window-start step copies its fresh activations into
#   one send buffer, ONE bucketed all_gather per window starts after it and is waited for only at the next
#   window start. Local steps have nothing of it in their way, and stale steps pay only the staging copies;
#   synchronous (warmup) steps still run the per-layer exchange and pay band_exchange_ms. Banded steps run
#   compiled when the job compiles (the family's compiled_band). Predicted: not yet measured on two GPUs.
# - "per-layer" (the engine measured in bench/results/speed-2xh200-*.json): ~190 per-layer collectives on
#   every window-start step, each banded step paying band_exchange_ms, the window-start step of a strided
#   window slowed while it waits (window_wait_drag), and banded steps never compiled.
Exchange = Literal["bucketed", "per-layer"]
EXCHANGES: tuple[str, ...] = ("bucketed", "per-layer")
DEFAULT_EXCHANGE: Exchange = "bucketed"

# A whole-frame step (one GPU, a CFG branch) compiled with torch.compile and replayed as a CUDA graph costs this
# share of the uncompiled graph (spec.model.compile). On 2x H200: SD3 40.3 against 52.0 ms per full step and
# 21.8 against 27.6 ms per branch (bench/results/speed-2xh200-compile.json against speed-2xh200-all.json);
# SDXL 32.7 against 42.0 ms (issue 5's figures for the same host).
COMPILED_WHOLE_FRAME = 0.78

# Predicted, not measured: a device-to-device copy at speed 1.0 (an H100's 3.35 TB/s HBM3, every byte read and
# written once). A bucketed exchange stages the rank's fresh activations into its send buffer at this rate.
STAGING_GBYTES_PER_S = 1500.0


@dataclass(frozen=True)
class CostModel:
    """Step and exchange times for one model family at one latent size."""

    profile: FamilyProfile
    latent_height: int
    latent_width: int
    link_gbytes_per_s: float
    compiled: bool = False  # spec.model.compile: whole-frame steps run compiled, banded ones too if bucketed
    exchange: Exchange = DEFAULT_EXCHANGE

    @property
    def width_scale(self) -> float:
        return self.latent_width / 128.0

    @property
    def window_drag(self) -> float:
        """The share of a waiting window-start step's pace lost to its pending per-layer collectives (none
        when the exchange is bucketed: nothing is pending while a rank computes)."""
        return self.profile.window_wait_drag if self.exchange == "per-layer" else 0.0

    def step_ms(self, rows: int, batch: int, speed: float, banded: bool = False, synchronous: bool = False,
                text: bool = True) -> float:
        """c_r(h) = (alpha + beta * b * h * W/128) / v_r, plus the band exchange's fixed cost where the step
        pays it (``affine``); a rank with no rows costs nothing."""
        return self._at(self.affine(batch, banded, synchronous, text), rows, speed)

    def compute_ms(self, rows: int, batch: int, speed: float, banded: bool = False, text: bool = True) -> float:
        """The step's compute alone, without any exchange (what a rank's profiled step measures)."""
        return self._at(self.compute_affine(batch, banded, text), rows, speed)

    def _at(self, affine: tuple[float, float], rows: int, speed: float) -> float:
        if rows <= 0:
            return 0.0
        fixed, per_granule = affine
        return (fixed + per_granule * rows / self.profile.granularity) / speed

    def compute_affine(self, batch: int, banded: bool = False, text: bool = True) -> tuple[float, float]:
        """(fixed cost, cost per granule of rows) of one step's compute at speed 1: c(u granules) = (a + b * u) / v.
        A banded step of the bucketed engine also computes its context (``band_context_ms``). A compiled job's
        whole-frame steps cost ``COMPILED_WHOLE_FRAME`` of the graph's, its banded steps the family's
        ``compiled_band`` (bucketed engine only: the per-layer one never compiled bands). ``text`` False: a band
        whose group's text stream another band computes (``FamilyProfile.text_ms``) does not pay it."""
        p = self.profile
        scale, fixed = 1.0, p.alpha_ms
        if banded and not text:
            fixed -= p.text_ms
        if banded and self.exchange == "bucketed":
            fixed += p.band_context_ms
            scale = p.compiled_band if self.compiled else 1.0
        elif self.compiled and not banded:
            scale = COMPILED_WHOLE_FRAME
        return fixed * scale, p.beta_ms * batch * p.granularity * self.width_scale * scale

    def affine(self, batch: int, banded: bool = False, synchronous: bool = False, text: bool = True
               ) -> tuple[float, float]:
        """``compute_affine`` plus the fixed cost of the banded steps that run per-layer collectives: the
        synchronous ones, and with the per-layer exchange every one (its collectives' NCCL kernels share the SMs
        with compute even when overlapped). ``band_exchange_ms`` holds their context too (it was fitted as a
        measured step less the band alone), so a bucketed synchronous step adds only the rest of it."""
        fixed, per_granule = self.compute_affine(batch, banded, text)
        if banded and (synchronous or self.exchange == "per-layer"):
            fixed += self.profile.band_exchange_ms
            if self.exchange == "bucketed":
                fixed -= self.profile.band_context_ms * (self.profile.compiled_band if self.compiled else 1.0)
        return fixed, per_granule

    def texts(self, strides: Sequence[int]) -> list[bool]:
        """Which bands of a group (in band order, with these strides) compute the text stream (``text_bands``)."""
        return text_bands(self.profile.family, strides)

    def text_rows(self) -> float:
        """Latent rows (at this width) whose image tokens weigh what the shared text stream does in compute and in
        exchanged keys and values (``text_ms``), 0 where the family's bands do not share one."""
        p = self.profile
        return p.text_ms / (p.beta_ms * self.width_scale) if p.family in SHARED_TEXT else 0.0

    def staging_ms(self, rows: int, batch: int, speed: float) -> float:
        """A bucketed window start's copies of the rank's fresh activations into the send buffer (the per-layer
        exchange's are inside ``band_exchange_ms``). A copy kernel on a GPU at speed v gets v of its SMs."""
        if self.exchange == "per-layer" or rows <= 0:
            return 0.0
        nbytes = self.profile.act_bytes_per_row * batch * rows * self.width_scale
        return nbytes / (STAGING_GBYTES_PER_S * 1e9) * 1e3 / speed

    def exchange_ms(self, rows_received: int, batch: int) -> float:
        """Time to receive the other bands' activations for one step."""
        if rows_received <= 0:
            return 0.0
        nbytes = self.profile.act_bytes_per_row * batch * rows_received * self.width_scale
        return nbytes / (self.link_gbytes_per_s * 1e9) * 1e3

    def latent_exchange_ms(self) -> float:
        """Time to swap one noise prediction between CFG branches: one collective and its transfer."""
        return COLLECTIVE_MS + self.latent_transfer_ms()

    def latent_transfer_ms(self) -> float:
        """Time to send one latent-sized tensor (4-16 latent channels, fp16) over the link."""
        nbytes = 16 * 2 * self.latent_height * self.latent_width
        return nbytes / (self.link_gbytes_per_s * 1e9) * 1e3


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
