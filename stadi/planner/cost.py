"""The affine cost model of one denoiser step and of the activation exchange (DESIGN section 3)."""

from __future__ import annotations

from dataclasses import dataclass

from stadi.families import FamilyProfile

# One collective's fixed latency (launch + NCCL handshake) paid at every synchronisation point.
COLLECTIVE_MS = 0.05


@dataclass(frozen=True)
class CostModel:
    """Step and exchange times for one model family at one latent size."""

    profile: FamilyProfile
    latent_height: int
    latent_width: int
    link_gbytes_per_s: float

    @property
    def width_scale(self) -> float:
        return self.latent_width / 128.0

    def step_ms(self, rows: int, batch: int, speed: float) -> float:
        """c_r(h) = (alpha + beta * b * h * W/128) / v_r; a rank with no rows costs nothing."""
        if rows <= 0:
            return 0.0
        p = self.profile
        return (p.alpha_ms + p.beta_ms * batch * rows * self.width_scale) / speed

    def affine(self, batch: int) -> tuple[float, float]:
        """(alpha, cost per granule of rows) of one step at speed 1: c(u granules) = (a + b * u) / v."""
        p = self.profile
        return p.alpha_ms, p.beta_ms * batch * p.granularity * self.width_scale

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
