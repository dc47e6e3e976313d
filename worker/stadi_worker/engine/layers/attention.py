"""Self-attention of a band against the keys and values of the full image.

Queries come from our band only; keys/values of every band are gathered (uneven: band heights differ).
We gather K and V after projection rather than the hidden states, so no rank recomputes the projections
of the other bands. Cross-attention (text keys) is untouched: it is local per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stadi_worker.engine.comm import CommManager


def full_kv(comm: CommManager, key: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N_band, D) keys and values -> (B, N_full, D), bands in row order."""
    if comm.size == 1:
        return k, v
    kv = torch.cat([k, v], dim=-1)
    parts = comm.exchange(key, kv, comm.layout.scaled(kv.shape[1]), dim=1)
    full = torch.cat([parts[i] for i in comm.layout.order], dim=1)
    return full.chunk(2, dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class PatchSelfAttnProcessor:
    """AttnProcessor2_0 of diffusers 0.42 (self-attention branch) with full-image K/V."""

    def __init__(self, comm: CommManager):
        self.comm = comm
        self.key = comm.new_key()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("band self-attention takes no encoder states and no mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            raise NotImplementedError("attention with its own GroupNorm is not wrapped (VAE only)")
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = full_kv(self.comm, self.key, attn.to_k(hidden_states), attn.to_v(hidden_states))
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PatchJointAttnProcessor:
    """JointAttnProcessor2_0 (SD3 MMDiT) with full-image K/V: image queries of our band and the text
    queries (computed on every rank) attend to the whole image plus the text."""

    def __init__(self, comm: CommManager):
        self.comm = comm
        self.key = comm.new_key()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("band joint attention takes no mask")
        batch, n_img = hidden_states.shape[:2]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key, value = full_kv(self.comm, self.key, attn.to_k(hidden_states), attn.to_v(hidden_states))
        key, value = _heads(key, attn.heads), _heads(value, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            ck = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            cv = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query = torch.cat([query, cq], dim=2)
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, context
        return out
