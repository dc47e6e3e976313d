"""Layer wrappers of displaced patch parallelism: one per layer type, sharing one ``CommManager``.

``patch_denoiser`` swaps them into a loaded UNet or DiT in place and returns a function that puts the
original modules back, so one loaded pipeline serves serial and parallel runs alike.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed
from torch import nn

from stadi_worker.comm import CommManager
from stadi_worker.layers.attention import PatchJointAttnProcessor, PatchSelfAttnProcessor
from stadi_worker.layers.conv import PatchConv2d, needs_halo
from stadi_worker.layers.embed import PatchBandEmbed
from stadi_worker.layers.norm import PatchGroupNorm

__all__ = ["PatchBandEmbed", "PatchConv2d", "PatchGroupNorm", "PatchJointAttnProcessor",
           "PatchSelfAttnProcessor", "patch_denoiser"]


def patch_denoiser(model: nn.Module, comm: CommManager) -> Callable[[], None]:
    """Wrap every spatial layer of ``model`` for band-parallel execution; returns the undo function."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    procs: list[tuple[Attention, object]] = []
    skip: set[int] = set()
    # named_modules walks in registration order, identical on every rank: the comm slots line up
    for name, mod in list(model.named_modules()):
        if id(mod) in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        new: nn.Module | None = None
        if isinstance(mod, PatchEmbed):
            new = PatchBandEmbed(mod, comm.layout)
            skip.update(id(m) for m in mod.modules())
        elif isinstance(mod, nn.Conv2d) and needs_halo(mod):
            new = PatchConv2d(mod, comm)
        elif isinstance(mod, nn.GroupNorm):
            new = PatchGroupNorm(mod, comm)
        elif isinstance(mod, Attention) and not mod.is_cross_attention:
            proc = mod.processor
            if isinstance(proc, JointAttnProcessor2_0):
                procs.append((mod, proc))
                mod.set_processor(PatchJointAttnProcessor(comm))
            elif isinstance(proc, AttnProcessor2_0):
                procs.append((mod, proc))
                mod.set_processor(PatchSelfAttnProcessor(comm))
            else:
                raise NotImplementedError(f"{name}: no band version of attention processor {type(proc).__name__}")
        if new is not None and parent is not None:
            swaps.append((parent, child, mod))
            setattr(parent, child, new)

    def restore() -> None:
        for parent, child, mod in reversed(swaps):
            setattr(parent, child, mod)
        for attn, proc in procs:
            attn.set_processor(proc)

    return restore
