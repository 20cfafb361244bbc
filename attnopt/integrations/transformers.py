"""`attn_implementation="attnopt"` for transformers models, through its public AttentionInterface.

    import attnopt.integrations.transformers as att
    att.register(quant="int8", pv="auto")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnopt")

Prefill runs attnopt's quantized attention; decode (one query token), soft-capping and requested
attention weights fall back to transformers' own SDPA path, so nothing is silently changed there.
"""

from __future__ import annotations

NAME = "attnopt"


def register(quant: str = "int8", pv: str = "auto", smooth_k: bool = True, min_seq_len: int = 0,
             name: str = NAME) -> str:
    """Register attnopt as an attention implementation (and its mask format) under `name`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..ops.attention import attention

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        unsupported = (kwargs.get("softcap") is not None or kwargs.get("output_attentions") or dropout
                       or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None)
        if unsupported or q_len == 1 or kv_len < min_seq_len:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:  # an empty static cache's prefill: only the first q_len keys exist
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
                        enable_gqa=key.shape[1] != query.shape[1], quant=quant, pv=pv, smooth_k=smooth_k)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)  # boolean masks, as SDPA takes them
    return name
