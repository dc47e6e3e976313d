"""Per model family facts the planner and the API need: latent geometry and the affine cost constants.

Cost constants are for one denoiser step on an H100 SXM (relative speed 1.0) replayed as a CUDA graph,
fp16: ``c(h) = alpha_ms + beta_ms * batch * h * (latent_width / 128)``, plus ``band_exchange_ms`` on a step that
runs the per-layer band exchange; ``window_wait_drag`` slows a strided window's exchange step while it waits for
the other ranks (the per-layer exchange only: stadi.planner.cost.EXCHANGES). Measured runs refine them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Family = Literal["sdxl", "sd3", "sd15", "pixart", "flux"]
FAMILIES: tuple[str, ...] = ("sdxl", "sd3", "sd15", "pixart", "flux")
# Small trained checkpoints that ship inside the worker (``builtin://NAME``), by name: their family. Trained from
# scratch on the sample images of scikit-image and scikit-learn (stadi bench train; README, "Built-in models").
BUILTIN_MODELS: dict[str, str] = {"sdxl-small": "sdxl", "sd3-small": "sd3", "flux-small": "flux"}
# Guidance-distilled families: the guidance scale is an input of their one forward per step (FLUX.1-dev's
# guidance embedding), so no unconditional branch exists to run, split or stride.
GUIDANCE_DISTILLED: tuple[str, ...] = ("flux",)
# Families whose bands share one text stream: of a group of bands, one computes the text tokens and the others
# attend to its keys and values with the image's (``text_bands``; FLUX.1's 512 T5 tokens cost ~11% of a step on
# every rank otherwise). The others compute the text with every band (SD3 batches it with the guidance branches).
SHARED_TEXT: tuple[str, ...] = ("flux",)


def runs_cfg(family: str, guidance_scale: float) -> bool:
    """Whether a job runs classifier-free guidance: two branches per step (the scale above 1, the family not
    guidance-distilled)."""
    return guidance_scale > 1.0 and family not in GUIDANCE_DISTILLED


@dataclass(frozen=True)
class FamilyProfile:
    """What the planner knows about one model family."""

    family: str
    granularity: int  # latent rows a band must be a multiple of (2^downsamplings, or the DiT patch size)
    vae_factor: int  # pixels per latent row
    alpha_ms: float  # fixed cost of a step (launches, norms, text paths): small bands are not free
    beta_ms: float  # cost per latent row per batch item at latent width 128
    act_bytes_per_row: float  # activation bytes exchanged per latent row per batch item (fp16, width 128)
    # fixed cost of a step that runs the per-layer band exchange (its group splits rows), even overlapped: the
    # per-layer collectives' NCCL kernels share the SMs with compute. Synchronous steps always run it; with the
    # bucketed exchange stale steps do not. Fitted as the measured stale step less the band-alone compute, it
    # also holds whatever reading the other bands' context costs (attention over their K/V): the bucketed
    # prediction, which drops it from stale steps, is optimistic by that share until measured.
    band_exchange_ms: float
    # share of a rank's compute lost while its window-start exchange waits for ranks still running the local
    # steps of their strides: the pending collective's NCCL kernel occupies SMs of that GPU meanwhile (the
    # per-layer exchange; the bucketed one has nothing pending while a rank computes)
    window_wait_drag: float
    default_scheduler: str
    # a banded step compiled (torch.compile inside its CUDA graph) costs this share of the graph's: measured per
    # family on one H200 (the derivations below PROFILES); families not measured take their kind's
    compiled_band: float
    # what a banded step computes beyond alpha + beta * rows, with no collective: its wrappers staging its K/V
    # (or halos, GroupNorm sums) and its queries attending over the whole image's K/V. Measured on one H200 (the
    # derivations below PROFILES); the bucketed exchange's stale steps pay it, band_exchange_ms holds it already.
    band_context_ms: float
    source: str  # where the constants come from
    # the share of alpha_ms that is the text stream (its tokens through every block), which of a banded group only
    # ``text_bands``' rank pays in a SHARED_TEXT family
    text_ms: float = 0.0

    @property
    def pixel_multiple(self) -> int:
        """Height and width in pixels must be a multiple of this."""
        return self.granularity * self.vae_factor


# band_exchange_ms, measured on 2x H200 over NVLink as CUDA graphs, 1024^2, b=2, 50 steps
# (bench/results/speed-2xh200-graphs.json, level 100): a stale patch step of 64 rows took 33.04 ms (SDXL) and
# 33.30 ms (SD3) where (alpha + beta * 2 * 64) / v predicts 25.52 and 26.70 ms, v being the GPU's speed on
# this H100 scale measured from the same run's full-frame steps (1.005 and 1.013; the catalogue has H200 =
# H100 = 1.0): 7.5 and 6.7 ms at speed 1.0 (SDXL ~190 per-layer collectives, SD3 24 larger ones). Families
# not measured take the figure of their measured kind (UNet: SDXL, DiT: SD3) scaled by act_bytes_per_row.
#
# window_wait_drag, measured on the same 2x H200 with the second GPU at 50% and 25% of its SMs (CUDA MPS),
# stadi with strides (1, 2) and (1, 3) (bench/results/speed-2xh200-all.json, levels "50" and "25", step_ms of
# the three runs, median run shown): the slow rank's strided step takes longer than its own first window
# start of the same run (same rows, stale, but every rank starts it together, so nothing waits), by a share of
# the time the fast rank spends on its k - 1 local steps meanwhile:
#   SDXL  50%: (65.4 - 58.7) / 30.9 = 0.22      25%: (113.4 - 91.9) / (2 * 36.8) = 0.29   -> 0.25
#   SD3   50%: (77.5 - 62.0) / 31.0 = 0.50      25%: (156.8 - 102.3) / (2 * 36.0) = 0.76  -> 0.63
# The fast rank's local steps match c(h) with band_exchange_ms (30.9 ms, predicted 30.7 at SDXL 50%): the loss
# is the waiting rank's. SD3's first exchange of a step is a layer's whole K/V (a large message NCCL spreads
# over many channels, each a block on an SM), SDXL's a conv halo or GroupNorm statistics (small ones).
# Families not measured take their kind's figure (UNet: SDXL, DiT: SD3).
PROFILES: dict[str, FamilyProfile] = {
    # Measured on an H100 as CUDA graphs, b=2 at 1024^2: 42.7 ms @128 rows, 34.0 @96, 25.2 @64, 17.2 @32,
    # and 27.4 ms @128 rows with b=1  ->  alpha ~ 9 ms, beta ~ 0.13 ms/row/item (the founding design's figures).
    # Attention inputs at 64^2 (10 layers x 640 ch) and 32^2 (60 layers x 1280 ch): ~1.6 MB per row.
    "sdxl": FamilyProfile("sdxl", 4, 8, 9.0, 0.13, 1.64e6, 7.5, 0.25, "euler", 0.90, 5.2,
                          "measured: H100 CUDA graph, 1024^2; band exchange, window wait: 2x H200 NVLink"),
    # SD3-medium as CUDA graphs on an H100, b=2: 53.6 / 25.7 / 15.0 ms at 128 / 64 / 32 rows;
    # least-squares affine fit. 24 joint blocks x 1536 ch of image tokens (64 per latent row pair).
    "sd3": FamilyProfile("sd3", 2, 8, 1.06, 0.203, 2.4e6, 6.7, 0.63, "flow-euler", 0.80, 4.2,
                         "measured: H100 CUDA graph, 1024^2; band exchange, window wait: 2x H200 NVLink"),
    # Estimates scaled from the SDXL measurement by parameter count; refined by measured runs.
    "sd15": FamilyProfile("sd15", 8, 8, 6.0, 0.06, 0.9e6, 4.1, 0.25, "ddim", 0.90, 5.2,
                          "estimate from SDXL by parameter count; band exchange from SDXL's by bytes per row, "
                          "window wait SDXL's"),
    "pixart": FamilyProfile("pixart", 2, 8, 3.0, 0.07, 1.8e6, 5.0, 0.63, "dpmpp-2m", 0.80, 4.2,
                            "estimate from SD3 by parameter count; band exchange from SD3's by bytes per row, "
                            "window wait SD3's"),
    # FLUX.1-dev's shapes on one H200 as CUDA graphs, 1024^2, one branch (bench/results/steps-flux-*.json): a band
    # step with its context costs 186.9 / 129.4 / 109.8 / 88.1 ms at 128 / 80 / 64 / 48 latent rows, a slope of
    # beta = 1.226 ms per latent row (least squares, residuals under 1.2 ms); the whole-frame step costs 177.2 ms,
    # so alpha = 177.2 - 128 * 1.226 = 20.3 ms (the 512 text tokens through 57 blocks, the embedders). A band
    # step carries 9-11 ms over alpha + beta * rows at every height (its K/V staging and attention over the whole
    # image's K/V): inside band_exchange_ms, still SD3's per-layer cost scaled by the layer count (57 / 24),
    # which two GPUs measure. Exchanged per latent row: the image tokens (32 per latent row at width 128) of 57
    # attention layers x 3072 channels, fp16, counted as SD3's figure counts its 24 x 1536: 11.2 MB. Window wait
    # SD3's.
    # text_ms: the 512 text tokens cost what as many image tokens do (the same width through the same blocks,
    # attending over the same keys): 512 x beta / 32 = 19.6 ms of alpha; the remaining 0.7 ms (time, guidance and
    # pooled-text embedders, the output norm) every rank pays. Derived, not measured on its own: two GPUs check it.
    "flux": FamilyProfile("flux", 2, 8, 20.3, 1.226, 11.2e6, 15.9, 0.63, "flow-euler", 0.86, 11.0,
                          "measured: H200 CUDA graph, 1024^2 (steps-flux-*.json); band exchange scaled from SD3's "
                          "by layer count, window wait SD3's", text_ms=19.6),
}


# compiled_band, compiled over graphed band steps on one H200 (fp16, 1024^2, each band with its context):
# SD3 (issue 16's first measurement, (rows, batch, graph ms, compiled ms)): the median of six ratios, 0.7996.
SD3_BAND_COMPILE_MS: tuple[tuple[int, int, float, float], ...] = (
    (128, 2, 51.0, 41.6), (80, 2, 31.0, 24.7), (64, 2, 24.8, 19.9), (48, 2, 19.8, 15.1),
    (128, 1, 26.5, 21.6), (80, 1, 17.2, 13.4),
)
# SDXL (steps-sdxl-bands.json), fitted on 128 and 48 rows of both batches: 0.945, 0.904, 0.896, 0.866 -> 0.90
# (its 64-row bands, 0.917 and 0.877, check it). FLUX.1 (steps-flux-bands.json, batch 1), fitted on 128 and 48
# rows: 0.857, 0.866 -> 0.86 (80 and 64 rows, 0.860 and 0.865, check it). The share falls with the band for the
# UNet (its fixed cost is launches compile removes less of) and holds for the DiTs. SD 1.5 takes SDXL's, PixArt
# SD3's.
#
# band_context_ms, graphed band steps with their context on one H200 less the profile's alpha + beta * b * rows
# (bands smaller than the frame; a 128-row band has no other band to read): SD3 (steps-sd3-warm.json) 4.2 / 6.1
# ms at 64 / 48 rows b=2, 3.7 / 4.3 at b=1 -> median 4.2 (checked on steps-sd3-cold.json's graphed bands);
# SDXL (steps-sdxl-bands.json) 5.7 / 4.6 at 64 / 48 rows b=2 -> 5.2 (its b=1 bands, 4.3 / 4.4, check it);
# FLUX.1 (steps-flux-bands.json, b=1) 11.0 / 11.0 at 80 / 64 rows -> 11.0 (48 rows, 9.0, checks it). SD 1.5
# takes SDXL's, PixArt SD3's.

@dataclass(frozen=True)
class HybridSchedule:
    """When strategy ``hybrid`` leaves the condition split for its pipeline window (arXiv 2602.21760)."""

    window: int  # L: steps over which the slope of the discrepancy d_t is taken
    slope_threshold: float  # the window starts once that slope (d's decrease per step) is in [0, this)
    pipeline_steps: int  # k: steps the window lasts
    cap_step: int  # the window starts at this step at the latest


# The paper's settings for SDXL and SD3 (its reference implementation's defaults). Other families have no
# stage split of their denoiser, so hybrid does not apply to them.
HYBRID_DEFAULTS: dict[str, HybridSchedule] = {
    "sdxl": HybridSchedule(window=12, slope_threshold=4e-4, pipeline_steps=5, cap_step=15),
    "sd3": HybridSchedule(window=15, slope_threshold=5e-4, pipeline_steps=5, cap_step=40),
}


def text_bands(family: str, strides: Sequence[int]) -> list[bool]:
    """Which bands of a group (in band order, top first, with these strides) compute the text stream: every one,
    unless the family's bands share it (``SHARED_TEXT``) and several split the rows; then only the first of the
    smallest stride, whose context the others read freshest (the planner lists the fastest GPU's band first)."""
    if len(strides) < 2 or family not in SHARED_TEXT:
        return [True] * len(strides)
    owner = min(range(len(strides)), key=lambda i: strides[i])
    return [i == owner for i in range(len(strides))]


def profile(family: str) -> FamilyProfile:
    """The profile of a family; KeyError names the families we know."""
    try:
        return PROFILES[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}") from None
