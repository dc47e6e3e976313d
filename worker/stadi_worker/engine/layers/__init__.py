"""Layer wrappers of displaced patch parallelism: one per layer type, sharing one ``CommManager``.

``DenoiserPatch`` builds the wrappers of one model and one ``CommManager`` once; ``apply`` swaps them into
the loaded UNet or DiT in place and ``restore`` puts the original modules back, so one loaded pipeline
serves serial and parallel runs (and several plans, each with its own wrappers and exchange buffers).
"""

from __future__ import annotations

from typing import Any

from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
)
from torch import nn

from stadi_worker.engine.comm import CommManager
from stadi_worker.engine.layers.attention import PatchJointAttnProcessor, PatchSelfAttnProcessor
from stadi_worker.engine.layers.conv import PatchConv2d, needs_halo
from stadi_worker.engine.layers.embed import PatchBandEmbed
from stadi_worker.engine.layers.flux import (
    PatchFluxAttnProcessor,
    PatchFluxPosEmbed,
    PatchFluxSingleAttnProcessor,
    PatchFluxSingleBlock,
    PatchFluxTextEmbed,
)
from stadi_worker.engine.layers.norm import PatchGroupNorm

__all__ = ["DenoiserPatch", "PatchBandEmbed", "PatchConv2d", "PatchFluxAttnProcessor", "PatchFluxPosEmbed",
           "PatchFluxSingleBlock", "PatchFluxTextEmbed", "PatchGroupNorm", "PatchJointAttnProcessor",
           "PatchSelfAttnProcessor"]


class DenoiserPatch:
    """The band wrappers of every spatial layer of ``model`` for one group; built once, applied as needed."""

    def __init__(self, model: nn.Module, comm: CommManager):
        self.model = model
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, name, original, wrapper
        self.procs: list[tuple[Any, object, object]] = []  # attention, original, band processor
        skip: set[int] = set()
        layout = comm.layout
        if isinstance(model, FluxTransformer2DModel) and layout.text not in (None, layout.index):
            self.swaps.append((model, "context_embedder", model.context_embedder,
                               PatchFluxTextEmbed(model.context_embedder)))
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
            elif isinstance(mod, FluxPosEmbed):
                new = PatchFluxPosEmbed(mod, comm.layout)
            elif isinstance(mod, FluxSingleTransformerBlock):  # its attention's processor needs the text length
                single = PatchFluxSingleAttnProcessor(comm)
                self.procs.append((mod.attn, mod.attn.processor, single))
                new = PatchFluxSingleBlock(mod, single)
                skip.add(id(mod.attn))
            elif isinstance(mod, FluxAttention):
                self.procs.append((mod, mod.processor, PatchFluxAttnProcessor(comm)))
            elif isinstance(mod, Attention) and not mod.is_cross_attention:
                proc = mod.processor
                if isinstance(proc, JointAttnProcessor2_0):
                    self.procs.append((mod, proc, PatchJointAttnProcessor(comm)))
                elif isinstance(proc, AttnProcessor2_0):
                    self.procs.append((mod, proc, PatchSelfAttnProcessor(comm)))
                else:
                    raise NotImplementedError(f"{name}: no band version of attention processor "
                                              f"{type(proc).__name__}")
            if new is not None and parent is not None:
                self.swaps.append((parent, child, mod, new))

    def apply(self) -> None:
        for parent, child, _, new in self.swaps:
            setattr(parent, child, new)
        for attn, _, band in self.procs:
            attn.set_processor(band)

    def restore(self) -> None:
        for parent, child, orig, _ in reversed(self.swaps):
            setattr(parent, child, orig)
        for attn, orig, _ in self.procs:
            attn.set_processor(orig)
