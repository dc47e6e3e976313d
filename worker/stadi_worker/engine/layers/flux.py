"""FLUX.1's band layers: attention of a band's image tokens against the keys and values of the full image and of
the text, the text stream computed by one band of the group, and the rotary positions of the band's true rows.

Keys are exchanged after the rotary embedding: each band rotates its own keys at its true positions, so the
gathered keys need no positions of the other bands. The 512 text tokens cost what as many image tokens do, on
every rank that computes them, so only the group's text band (``BandLayout.text``, ``Plan.computes_text``) does:
its part of every exchange is [text; band], and the other ranks feed the transformer no text at all (its
``context_embedder`` gives them an empty stream) and attend to that band's text keys and values as they do to its
image ones, fresh in synchronous steps (exact mode still equals serial), else from the last exchange.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock
from torch import nn

from stadi_worker.engine.comm import BandLayout, CommManager


class PatchFluxTextEmbed(nn.Module):
    """The text projection of a rank that does not compute the text stream: no tokens (the text band's rank
    computes them and its keys and values reach us through the exchange)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.embed(encoder_hidden_states[:, :0])


class PatchFluxPosEmbed(nn.Module):
    """The rotary embedding, unchanged; it tells the family where the band starts (``band_start``, latent rows),
    so that the ids it builds for the band's tokens are their rows in the full image."""

    def __init__(self, embed: FluxPosEmbed, layout: BandLayout):
        super().__init__()
        self.embed = embed
        self.band_start = layout.mine[0]

    def forward(self, ids: torch.Tensor) -> Any:
        return self.embed(ids)


def _attend(comm: CommManager, key: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rotary: Any,
            text: int) -> torch.Tensor:
    """FluxAttnProcessor's attention from the normalised (B, N, heads, head_dim) projections of [text; band], where
    ``text`` tokens lead (all of the text on the text band's rank, none on the others): rotary at the tokens'
    positions, then the keys and values of every band's part, the text band's text included."""
    layout = comm.layout
    if rotary is None or layout.text is None:
        raise NotImplementedError("Flux band attention needs the rotary embedding and the group's text band")
    missing = rotary[0].shape[0] - query.shape[1]  # text tokens computed on the text band's rank, not here
    rotary = tuple(r[missing:] for r in rotary)
    query = apply_rotary_emb(query, rotary, sequence_dim=1)
    keys = apply_rotary_emb(keys, rotary, sequence_dim=1)
    heads = keys.shape[2:]
    sizes = layout.scaled(keys.shape[1] - text)
    sizes[layout.text] += text + missing
    parts = comm.exchange(key, torch.cat([keys.flatten(2), values.flatten(2)], dim=-1), sizes, dim=1)
    full_k, full_v = torch.cat([parts[i] for i in layout.order], dim=1).chunk(2, dim=-1)
    out = dispatch_attention_fn(query, full_k.unflatten(-1, heads), full_v.unflatten(-1, heads))
    return out.flatten(2, 3).to(query.dtype)


def _projections(attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = (proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return attn.norm_q(q), attn.norm_k(k), v


class PatchFluxAttnProcessor:
    """FluxAttnProcessor of a double-stream block (diffusers 0.42) with full-image K/V."""

    def __init__(self, comm: CommManager):
        self.comm = comm
        self.key = comm.new_key()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        if attention_mask is not None or encoder_hidden_states is None:
            raise NotImplementedError("band joint attention takes the text stream and no mask")
        query, keys, values = _projections(attn, hidden_states)
        eq, ek, ev = (proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        text = encoder_hidden_states.shape[1]
        out = _attend(self.comm, self.key, torch.cat([attn.norm_added_q(eq), query], dim=1),
                      torch.cat([attn.norm_added_k(ek), keys], dim=1), torch.cat([ev, values], dim=1),
                      image_rotary_emb, text)
        context, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


class PatchFluxSingleAttnProcessor:
    """FluxAttnProcessor of a single-stream block with full-image K/V. Its input is [text; band] concatenated;
    the block's wrapper (``PatchFluxSingleBlock``) tells it the text length before each call."""

    def __init__(self, comm: CommManager):
        self.comm = comm
        self.key = comm.new_key()
        self.text_tokens = 0

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> torch.Tensor:
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError("band single-stream attention takes one stream and no mask")
        query, keys, values = _projections(attn, hidden_states)
        return _attend(self.comm, self.key, query, keys, values, image_rotary_emb, self.text_tokens)


class PatchFluxSingleBlock(nn.Module):
    """A single-stream block, unchanged, that first tells its band processor how many text tokens lead."""

    def __init__(self, block: FluxSingleTransformerBlock, processor: PatchFluxSingleAttnProcessor):
        super().__init__()
        self.block = block
        self.processor = processor

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        self.processor.text_tokens = encoder_hidden_states.shape[1]
        return self.block(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
