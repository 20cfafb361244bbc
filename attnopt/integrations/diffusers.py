"""attnopt's quantized attention for diffusers models, through diffusers' public processor API.

    from attnopt.integrations.diffusers import apply
    swapped = apply(transformer, quant="int8")   # {processor path: "attnopt" or why it was kept}

`apply` replaces only diffusers' default processors (AttnProcessor2_0, AttnProcessor), whose
computation AttnoptProcessor reproduces step for step (spatial / group norms, optional q / k
norms, cross-attention, masks, output projection, residual, rescale) with attnopt's attention in
the middle. Every other processor (rotary embeddings, joint text-video attention, IP-adapters, ...)
is kept and the reason logged: those models can be compiled with `backend="attnopt"` instead,
which rewrites the attention inside any processor. AttnoptProcessor raises on inputs it does not
implement (rotary embeddings, extra arguments) instead of ignoring them.

Models whose processors go through diffusers' attention dispatcher (Flux, Wan, HunyuanVideo,
QwenImage, ...) can instead use attnopt as a dispatcher backend, without torch.compile:
`register_backend(options)`, `track_sites(model)`, `model.set_attention_backend("attnopt")`
(diffusers_backend.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..ops.attention import attention
from .diffusers_backend import decisions, register_backend, use_backend
from .diffusers_sites import track_sites

log = logging.getLogger(__name__)

DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")

__all__ = ["AttnoptProcessor", "apply", "swappable", "register_backend", "track_sites", "use_backend", "decisions"]


class AttnoptProcessor:
    """A drop-in for AttnProcessor2_0 (attn_scale=False, its softmax scale 1/sqrt(d)) or AttnProcessor
    (attn_scale=True: the module's own `attn.scale`), running attnopt's quantized attention."""

    def __init__(self, quant: str = "int8", pv: str = "auto", smooth_k: bool = True, min_seq_len: int = 0,
                 attn_scale: bool = False):
        self.quant, self.pv, self.smooth_k, self.min_seq_len = quant, pv, smooth_k, min_seq_len
        self.attn_scale = attn_scale

    # image_rotary_emb is named so that diffusers' Attention passes it on (it drops arguments a
    # processor's signature does not name) and we can refuse it rather than lose it
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 image_rotary_emb=None, **kwargs):
        _refuse(args, {"image_rotary_emb": image_rotary_emb, **kwargs})
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
        query, key, value = (_heads(t, batch, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self._attend(attn, query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_like:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, attn, q, k, v, mask):
        """attnopt's attention, or SDPA for keys shorter than min_seq_len (what the default would run)."""
        scale = attn.scale if self.attn_scale else None
        if k.shape[2] < self.min_seq_len:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return attention(q, k, v, attn_mask=mask, scale=scale, quant=self.quant, pv=self.pv, smooth_k=self.smooth_k)


def _heads(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _refuse(args: tuple, kwargs: dict) -> None:
    """Inputs the default processors do not take would change the result if ignored: say so."""
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if args or given:
        what = ", ".join(given + ([f"{len(args)} positional argument(s)"] if args else []))
        raise NotImplementedError(
            f"AttnoptProcessor does not implement {what}: it stands in for diffusers' default processors only. "
            "Use attnopt.integrations.diffusers.apply(model), which keeps model-specific processors, or compile "
            "the model with backend='attnopt'.")


def swappable(processor) -> str | None:
    """None if `processor` is a diffusers default AttnoptProcessor reproduces, else why it is kept."""
    from diffusers.models import attention_processor as ap

    defaults = tuple(getattr(ap, n) for n in DEFAULT_PROCESSORS if hasattr(ap, n))
    if type(processor) in defaults:  # exact type: a subclass may compute something else
        return None
    return (f"{type(processor).__name__} is model-specific (not one of {', '.join(DEFAULT_PROCESSORS)}); "
            "compile with backend='attnopt' to rewrite its attention")


def apply(model: torch.nn.Module, quant: str = "int8", pv: str = "auto", smooth_k: bool = True,
          min_seq_len: int = 0) -> dict[str, str]:
    """Swap every default processor in `model` for AttnoptProcessor; keep the rest.

    Returns {module path + '.processor': 'attnopt' or the reason it was kept}; kept ones are logged.
    """
    from diffusers.models import attention_processor as ap

    done = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
            continue
        key, proc = f"{name}.processor", module.processor
        if isinstance(proc, AttnoptProcessor):
            done[key] = "attnopt"
            continue
        why = swappable(proc)
        if why is None:
            classic = type(proc) is getattr(ap, "AttnProcessor", None)
            module.set_processor(AttnoptProcessor(quant, pv, smooth_k, min_seq_len, attn_scale=classic))
            done[key] = "attnopt"
        else:
            log.info("attnopt: %s kept: %s", key, why)
            done[key] = f"kept: {why}"
    return done
