"""`torch.ops.attnopt.attention`: the op every captured attention site becomes.

Registered with `torch.library.triton_op`. On CUDA its body launches the Triton kernels through
`wrap_triton`, and AOTAutograd traces that body so Inductor inlines the kernels into its generated
code (`ops/aot_inline.py` says when); on other devices the body is the pure-PyTorch reference,
which computes the same quantized arithmetic (so CPU runs show the accuracy a GPU run gives).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import switches
from . import aot_inline
from ..codegen.arch import ARCHS, resolve_pv
from .attention_ref import attention_reference
from .checks import check_attention_operands
from .schema import GATE_ARGS, attention_schema, gate_closed

IMPLS = switches.IMPLS


def _attention_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    keep_mask: Optional[torch.Tensor],
    masked_value: float,
    is_causal: bool,
    causal_offset: int,
    scale: float,
    quant: str,
    pv: str,
    smooth_k: bool,
    smooth_q: bool,
    arch: str,
    impl: str,
    softcap: float = 0.0,
    gate: Optional[torch.Tensor] = None,
    gate_id: int = 0,
) -> torch.Tensor:
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> out [B, Hq, Nq, Dv] (q's dtype).

    `pv` must already be resolved ('fp16' | 'fp8' | 'fp4' | 'fp8_acc16'); `arch` is a name from codegen.arch.
    `softcap` > 0: logits soft-capped to softcap * tanh(scale * q.k / softcap) before masks (0: off).
    `gate` (int32, one element; a scheduled site's variant index, passes/schedule_rewrite.py): the
    attention runs only when it holds `gate_id`; otherwise the result is left unwritten (the graph
    selects another variant's output with torch.where).
    """
    check_attention_operands("attnopt::attention", q, k, v, attn_bias, keep_mask)
    if switches.use_triton(q, arch, impl):
        from ..codegen.attention.launch import attention_triton

        return attention_triton(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                                scale, quant, pv, smooth_k, smooth_q, arch, softcap=softcap, gate=gate,
                                gate_id=gate_id)
    if gate_closed(gate, gate_id):
        return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    # the key tile the kernel's online softmax uses; head dims no kernel runs take one tile
    block_n = ARCHS[arch].default_tile(q.shape[-1], quant, pv).block_n \
        if q.shape[-1] <= max(ARCHS[arch].attn_tiles) else None
    return attention_reference(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset,
                               scale, quant, pv, smooth_k, smooth_q, block_n=block_n, softcap=softcap)


attention_op = torch.library.triton_op(
    "attnopt::attention", mutates_args=(),
    schema=attention_schema("bool smooth_q", "str arch", "str impl", "float softcap=0.", *GATE_ARGS))(_attention_body)
aot_inline.install(attention_op, _attention_body)


@attention_op.register_fake
def _attention_fake(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                    smooth_k, smooth_q, arch, impl, softcap=0.0, gate=None, gate_id=0):
    # Shape only: running the body on fake tensors would guard on the sequence length (the
    # reference's block padding) and recompile for every new length under dynamic shapes. The
    # operands are checked as the kernels would, so a wrong rewrite fails here, at compile time.
    check_attention_operands("attnopt::attention", q, k, v, attn_bias, keep_mask)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def _to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bnhd" else t


def split_mask(attn_mask):
    """SDPA's `attn_mask` as the op's (additive bias, boolean keep mask): a bool mask keeps, any
    other dtype adds."""
    if attn_mask is None:
        return None, None
    return (None, attn_mask) if attn_mask.dtype == torch.bool else (attn_mask, None)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    quant: str = "int8",
    pv: str = "auto",
    smooth_k: bool = True,
    smooth_q: bool = False,
    layout: str = "bhnd",
    impl: str = "auto",
    arch: str = "auto",
    softcap: float | None = None,
    backward: str | None = None,
) -> torch.Tensor:
    """Drop-in for `F.scaled_dot_product_attention`, running attnopt's quantized attention.

    Same masking rules as SDPA: a bool `attn_mask` keeps True positions, a float one is added;
    `is_causal` masks keys after the query (top-left aligned); rows with no kept key give 0.
    `layout="bnhd"` takes and returns [B, N, H, D] tensors. `impl="triton"` on CPU tensors runs
    the kernels through Triton's interpreter (TRITON_INTERPRET=1 must be set before import).
    `softcap` (Gemma 2 / Grok logit soft-capping): the scaled logits become
    softcap * tanh(logits / softcap) before the mask is added; None or 0 is off.
    `backward` makes the result differentiable in q, k and v (`attnopt::attention_train`, same
    forward numbers): "int8" (SageBwd arithmetic) or "exact" (16-bit, straight-through over the
    quantized forward); None (the default) runs `attnopt::attention`, which has no gradient.
    """
    from ..config import ConfigError
    from ..codegen.arch import resolve_arch

    if dropout_p != 0.0:
        raise ValueError("attnopt.attention does not implement dropout (dropout_p must be 0)")
    if quant not in ("int8", "fp8", "fp4", "none"):
        raise ConfigError("quant", quant, "'int8' | 'fp8' | 'fp4' | 'none'")
    if pv not in ("fp16", "fp8", "fp4", "fp8_acc16", "auto"):
        raise ConfigError("pv", pv, "'fp16' | 'fp8' | 'fp4' | 'fp8_acc16' | 'auto'")
    if layout not in ("bhnd", "bnhd"):
        raise ConfigError("layout", layout, "'bhnd' | 'bnhd'")
    if impl not in IMPLS:
        raise ConfigError("impl", impl, " | ".join(repr(i) for i in IMPLS))
    q, k, v = (_to_bhnd(t, layout) for t in (query, key, value))
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attnopt.attention takes 4-D q, k, v")
    if k.shape[1] != q.shape[1] and not enable_gqa:
        raise ValueError(f"q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for GQA")
    spec = resolve_arch(arch, q.device)
    pv_fmt = resolve_pv(pv, quant, spec)
    bias, keep = split_mask(attn_mask)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cap = float(softcap or 0.0)
    if cap < 0 or not math.isfinite(cap):
        raise ValueError(f"softcap must be a positive finite number (or None), got {softcap}")
    if backward is not None:
        from .attention_train import BACKWARD_MODES

        if backward not in BACKWARD_MODES:
            raise ConfigError("backward", backward, " | ".join(repr(m) for m in BACKWARD_MODES) + " | None")
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("attnopt.attention(backward=...) gives an additive attn_mask no gradient, and this "
                             "one requires grad (a learnable bias): detach it, or use F.scaled_dot_product_attention")
        out, _ = torch.ops.attnopt.attention_train(q, k, v, bias, keep, -math.inf, bool(is_causal), 0, s, quant,
                                                   pv_fmt, smooth_k, smooth_q, spec.name, impl, cap, backward)
        return _to_bhnd(out, layout)
    out = torch.ops.attnopt.attention(q, k, v, bias, keep, -math.inf, bool(is_causal), 0, s,
                                      quant, pv_fmt, smooth_k, smooth_q, spec.name, impl, cap)
    return _to_bhnd(out, layout)
