"""The denoiser as a sequence of units, and where to cut it in two for the pipeline window of ``hybrid``.

A unit is one module the worker calls in order (``worker/stadi_worker/stages.py`` walks the same list):
for a UNet conv_in, every resnet, attention, down- and upsampler, then conv_out; for an MMDiT every
transformer block. Relative costs are analytic multiply-accumulate counts from the model's config at the
job's latent size (convolutions k*k*cin*cout per pixel; attention projections, scores and feed-forward per
token), so they follow the resolution (attention grows with the square of the tokens). The reference
architectures are SDXL base and SD3-medium; the worker builds the same table from its own model's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

ACT_BYTES = 2  # fp16 activations cross the link
SDXL_TEXT_TOKENS = 77  # CLIP context
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens (zeros when the T5 encoder is left out)


@dataclass(frozen=True)
class Unit:
    """One step of the linearised denoiser."""

    name: str  # module path in the denoiser, e.g. "up_blocks.0.attentions.1"
    kind: str  # conv_in, resnet, attn, down, up, conv_out (UNet); block (MMDiT)
    macs: float  # multiply-accumulates per batch item
    pop: bool = False  # a UNet up resnet: concatenates the newest skip before it runs
    push: bool = False  # a UNet down unit whose output is kept as a skip
    out_bytes: float = 0.0  # its output per batch item (fp16)


@dataclass(frozen=True)
class UNetArch:
    """What the cost of a UNet2DConditionModel depends on (diffusers config names)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    reverse_transformer_layers_per_block: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    in_channels: int
    out_channels: int
    cross_attention_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetArch:
        """From a diffusers UNet config (the model's ``config`` or its config.json)."""
        levels = len(config["block_out_channels"])

        def per_level(value: Any) -> tuple[int, ...]:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * levels

        depth = per_level(config.get("transformer_layers_per_block", 1))
        reverse = config.get("reverse_transformer_layers_per_block")
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"mid block {config.get('mid_block_type')!r} is not supported by the stage split")
        return cls(
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=per_level(config["layers_per_block"]),
            transformer_layers_per_block=depth,
            reverse_transformer_layers_per_block=tuple(reverse) if reverse else tuple(reversed(depth)),
            down_block_types=tuple(config["down_block_types"]),
            up_block_types=tuple(config["up_block_types"]),
            in_channels=int(config["in_channels"]),
            out_channels=int(config["out_channels"]),
            cross_attention_dim=int(config["cross_attention_dim"]),
        )


@dataclass(frozen=True)
class DiTArch:
    """What the cost of an SD3 MMDiT depends on."""

    num_layers: int
    dim: int  # heads * head dim
    patch_size: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiTArch:
        return cls(int(config["num_layers"]), int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                   int(config["patch_size"]))


# SDXL base 1.0 and SD3-medium, as published (worker/stadi_worker/tiny.py builds the same shapes).
SDXL = UNetArch((320, 640, 1280), (2, 2, 2), (1, 2, 10), (10, 2, 1),
                ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), 4, 4, 2048)
SD3_MEDIUM = DiTArch(24, 1536, 2)
REFERENCE: dict[str, UNetArch | DiTArch] = {"sdxl": SDXL, "sd3": SD3_MEDIUM}


def _resnet(cin: int, cout: int, pixels: int) -> float:
    return (9 * cin * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)) * pixels


def _transformer(c: int, depth: int, tokens: int, text: int, text_dim: int) -> float:
    """Transformer2DModel (linear projections): proj in/out, then per block self-attention (QKV + out
    projections and the scores), cross-attention to the text, and a GEGLU feed-forward of 4x width."""
    per_block = 18 * c * c * tokens + 2 * tokens * tokens * c + 2 * tokens * text * c + 2 * text * text_dim * c
    return 2 * c * c * tokens + depth * per_block


def unet_units(arch: UNetArch, latent_h: int, latent_w: int, text_tokens: int = SDXL_TEXT_TOKENS) -> list[Unit]:
    """The units of a UNet in call order, with their cost at a latent of ``latent_h`` x ``latent_w``."""
    units: list[Unit] = []
    skips: list[int] = []  # channels of the skips on the stack
    ch, level = arch.block_out_channels[0], 0

    def pixels(lv: int) -> int:
        return (latent_h >> lv) * (latent_w >> lv)

    def add(name: str, kind: str, macs: float, out_ch: int, pop: bool = False, push: bool = False) -> None:
        units.append(Unit(name, kind, macs, pop, push, out_ch * pixels(level) * ACT_BYTES))
        if push:
            skips.append(out_ch)

    add("conv_in", "conv_in", 9 * arch.in_channels * ch * pixels(0), ch, push=True)
    last = len(arch.block_out_channels) - 1
    for i, (kind, cout) in enumerate(zip(arch.down_block_types, arch.block_out_channels, strict=True)):
        attn = kind.startswith("CrossAttn")
        for j in range(arch.layers_per_block[i]):
            add(f"down_blocks.{i}.resnets.{j}", "resnet", _resnet(ch, cout, pixels(level)), cout, push=not attn)
            ch = cout
            if attn:
                add(f"down_blocks.{i}.attentions.{j}", "attn", _transformer(
                    ch, arch.transformer_layers_per_block[i], pixels(level), text_tokens, arch.cross_attention_dim),
                    ch, push=True)
        if i < last:
            level += 1
            add(f"down_blocks.{i}.downsamplers.0", "down", 9 * ch * ch * pixels(level), ch, push=True)
    mid_attn = _transformer(ch, arch.transformer_layers_per_block[-1], pixels(level), text_tokens,
                            arch.cross_attention_dim)
    add("mid_block.resnets.0", "resnet", _resnet(ch, ch, pixels(level)), ch)
    add("mid_block.attentions.0", "attn", mid_attn, ch)
    add("mid_block.resnets.1", "resnet", _resnet(ch, ch, pixels(level)), ch)
    reversed_channels = tuple(reversed(arch.block_out_channels))
    for i, (kind, cout) in enumerate(zip(arch.up_block_types, reversed_channels, strict=True)):
        attn = kind.startswith("CrossAttn")
        for j in range(arch.layers_per_block[last - i] + 1):
            cin = ch + skips.pop()
            add(f"up_blocks.{i}.resnets.{j}", "resnet", _resnet(cin, cout, pixels(level)), cout, pop=True)
            ch = cout
            if attn:
                add(f"up_blocks.{i}.attentions.{j}", "attn", _transformer(
                    ch, arch.reverse_transformer_layers_per_block[i], pixels(level), text_tokens,
                    arch.cross_attention_dim), ch)
        if i < last:
            level -= 1
            add(f"up_blocks.{i}.upsamplers.0", "up", 9 * ch * ch * pixels(level), ch)
    add("conv_out", "conv_out", 9 * ch * arch.out_channels * pixels(0), arch.out_channels)
    return units


def dit_units(arch: DiTArch, latent_h: int, latent_w: int, text_tokens: int = SD3_TEXT_TOKENS) -> list[Unit]:
    """The joint blocks of an MMDiT: equal cost (QKV + out projections, scores, 4x MLP over image and text
    tokens); the output of each is the image and text token streams."""
    tokens = (latent_h // arch.patch_size) * (latent_w // arch.patch_size) + text_tokens
    d = arch.dim
    macs = 12 * d * d * tokens + 2 * tokens * tokens * d
    return [Unit(f"transformer_blocks.{i}", "block", macs, out_bytes=tokens * d * ACT_BYTES)
            for i in range(arch.num_layers)]


def units_of(arch: UNetArch | DiTArch, latent_h: int, latent_w: int) -> list[Unit]:
    return unet_units(arch, latent_h, latent_w) if isinstance(arch, UNetArch) else dit_units(arch, latent_h, latent_w)


@lru_cache(maxsize=64)
def reference_units(family: str, latent_h: int, latent_w: int) -> tuple[Unit, ...]:
    """The unit table of the family's reference model; KeyError for families without a stage split."""
    return tuple(units_of(REFERENCE[family], latent_h, latent_w))


def carry_bytes(units: Sequence[Unit], boundary: int) -> float:
    """Bytes per batch item that stage 0 hands to stage 1 when the cut is before unit ``boundary``: the
    hidden state, plus (UNet) every skip pushed before the cut and popped after it."""
    stack: list[float] = []
    for u in units[:boundary]:
        if u.pop:
            stack.pop()
        if u.push:
            stack.append(u.out_bytes)
    return sum(stack) + units[boundary - 1].out_bytes


def balanced_boundary(units: Sequence[Unit], speed0: float, speed1: float) -> int:
    """The cut (1 <= b < len(units)) that makes the stage times most equal: stage 0 runs units [0, b) at
    ``speed0``, stage 1 the rest at ``speed1``. The slower GPU gets the smaller share of the work; ties go
    to the smaller hand-over, then the earlier cut."""
    if len(units) < 2:
        raise ValueError("a denoiser of fewer than 2 units cannot be cut into two stages")
    total = sum(u.macs for u in units)
    best: tuple[float, float, int] | None = None
    done = 0.0
    for b in range(1, len(units)):
        done += units[b - 1].macs
        slowest = max(done / total / speed0, (total - done) / total / speed1)
        key = (round(slowest, 12), carry_bytes(units, b), b)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2]


def share(units: Sequence[Unit], boundary: int) -> float:
    """Stage 0's fraction of the denoiser's work."""
    total = sum(u.macs for u in units)
    return sum(u.macs for u in units[:boundary]) / total
