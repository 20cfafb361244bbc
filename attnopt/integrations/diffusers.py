"""An attention processor for diffusers models, through its public processor API.

    from attnopt.integrations.diffusers import AttnoptProcessor
    transformer.set_attn_processor(AttnoptProcessor(quant="int8"))

It follows diffusers' standard `Attention` processing (the one AttnProcessor2_0 implements: spatial
/ group norms, optional q / k norms, cross-attention, masks, output projection, residual, rescale)
with attnopt's quantized attention in the middle. Models whose blocks use their own processors
(rotary embeddings, joint text-image attention) keep those; compile them with
`backend="attnopt"` to rewrite their attention instead.
"""

from __future__ import annotations

import torch

from ..ops.attention import attention


class AttnoptProcessor:
    def __init__(self, quant: str = "int8", pv: str = "auto", smooth_k: bool = True, min_seq_len: int = 0):
        self.quant, self.pv, self.smooth_k, self.min_seq_len = quant, pv, smooth_k, min_seq_len

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_like = hidden_states.ndim == 4
        if image_like:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, ctx_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, ctx_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if key.shape[2] < self.min_seq_len:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            out = attention(query, key, value, attn_mask=attention_mask, scale=attn.scale, quant=self.quant,
                            pv=self.pv, smooth_k=self.smooth_k)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_like:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
