"""FLUX.1's band layers: attention of a band's image tokens (and of every text token, on every rank) against the
keys and values of the full image, and the rotary positions of the band's true rows.

Keys are exchanged after the rotary embedding: each band rotates its own keys at its true positions, so the
gathered keys need no positions of the other bands. Text tokens are computed on every rank; they attend to the
full image's keys and values too (stale ones outside synchronous steps), so every rank carries the same text
stream in exact mode.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock
from torch import nn

from stadi_worker.engine.comm import BandLayout, CommManager
from stadi_worker.engine.layers.attention import full_kv


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
    """FluxAttnProcessor's attention from the normalised (B, N, heads, head_dim) projections of [text; band]:
    rotary at the tokens' positions, then the band's keys and values replaced by the full image's."""
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        keys = apply_rotary_emb(keys, rotary, sequence_dim=1)
    heads = keys.shape[2:]
    full_k, full_v = full_kv(comm, key, keys[:, text:].flatten(2), values[:, text:].flatten(2))
    keys = torch.cat([keys[:, :text], full_k.unflatten(-1, heads)], dim=1)
    values = torch.cat([values[:, :text], full_v.unflatten(-1, heads)], dim=1)
    out = dispatch_attention_fn(query, keys, values)
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
