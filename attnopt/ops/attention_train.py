"""`torch.ops.attnopt.attention_train` and `torch.ops.attnopt.attention_backward`: attention that
autograd can differentiate.

`attention_train` runs the same quantized forward as `attnopt::attention` (the Triton kernels on
CUDA, the reference elsewhere) and also returns the natural-log LSE, which the backward needs to
recompute P. `register_autograd` routes its gradient to `attention_backward`, whose body runs the
backward kernels (codegen/attention/backward.py) or their reference (ops/attention_bwd_ref.py) in
the mode the forward was given: "exact" (16-bit, straight-through over the quantized forward) or
"int8" (SageBwd). Both are triton_ops installed with aot_inline, so on CUDA AOTAutograd traces
their bodies and Inductor inlines the kernels; elsewhere each stays one call. `attnopt::attention`
itself is untouched: inference computes exactly what it did.
"""

from __future__ import annotations

import math

import torch

from .. import switches
from . import aot_inline
from ..codegen.arch import ARCHS
from .attention_bwd_ref import MODES, attention_backward_reference
from .attention_ref import attention_reference
from .checks import OperandError, check_attention_operands
from .schema import attention_schema

BACKWARD_MODES = MODES  # "exact" | "int8"

class BackwardUnsupported(ValueError):
    """The attention backward cannot run these arguments: the pass keeps the site's attention and
    records this message as the reason."""


def check_backward_args(backward: str, softcap: float) -> None:
    """Raise BackwardUnsupported unless `backward` can differentiate this forward."""
    if backward not in BACKWARD_MODES:
        raise BackwardUnsupported(f"attention backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if softcap < 0 or not math.isfinite(softcap):
        raise BackwardUnsupported(f"softcap must be 0 (off) or a positive finite number, got {softcap}")


def _attention_train_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None,
    keep_mask: torch.Tensor | None,
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
    softcap: float,
    backward: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attnopt::attention's forward -> (out [B, Hq, Nq, Dv] q's dtype, lse [B, Hq, Nq] fp32, natural log)."""
    check_attention_operands("attnopt::attention_train", q, k, v, attn_bias, keep_mask)
    check_backward_args(backward, softcap)
    if switches.use_triton(q, arch, impl):
        from ..codegen.attention.launch import attention_triton

        return attention_triton(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale,
                                quant, pv, smooth_k, smooth_q, arch, return_lse=True, softcap=softcap)
    block_n = ARCHS[arch].default_tile(q.shape[-1], quant, pv).block_n \
        if q.shape[-1] <= max(ARCHS[arch].attn_tiles) else None
    return attention_reference(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant,
                               pv, smooth_k, smooth_q, return_lse=True, block_n=block_n, softcap=softcap)


attention_train_op = torch.library.triton_op(
    "attnopt::attention_train", mutates_args=(),
    schema=attention_schema("bool smooth_q", "str arch", "str impl", "float softcap", "str backward",
                            returns="(Tensor, Tensor)"))(_attention_train_body)
aot_inline.install(attention_train_op, _attention_train_body)


@attention_train_op.register_fake
def _attention_train_fake(q, k, v, attn_bias, keep_mask, masked_value, is_causal, causal_offset, scale, quant, pv,
                          smooth_k, smooth_q, arch, impl, softcap, backward):
    # shapes only, as attnopt::attention's fake (no guard on the sequence length)
    check_attention_operands("attnopt::attention_train", q, k, v, attn_bias, keep_mask)
    check_backward_args(backward, softcap)
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    return out, lse


BACKWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? attn_bias, "
    "Tensor? keep_mask, float masked_value, bool is_causal, SymInt causal_offset, float scale, str quant, bool smooth_k, "
    "str arch, str impl, float softcap, str backward) -> (Tensor, Tensor, Tensor)")


def _attention_backward_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    attn_bias: torch.Tensor | None,
    keep_mask: torch.Tensor | None,
    masked_value: float,
    is_causal: bool,
    causal_offset: int,
    scale: float,
    quant: str,
    smooth_k: bool,
    arch: str,
    impl: str,
    softcap: float,
    backward: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_train's output for upstream gradient `grad_out` (no gradient for
    the masks); `backward` picks the arithmetic (attention_bwd_ref's modes); `quant` and
    `smooth_k` are the forward's (they say what its LSE holds)."""
    check_attention_operands("attnopt::attention_backward", q, k, v, attn_bias, keep_mask)
    if out.shape != grad_out.shape or tuple(lse.shape) != tuple(q.shape[:3]):
        raise OperandError(f"attnopt::attention_backward: out {tuple(out.shape)}, grad_out "
                           f"{tuple(grad_out.shape)} and lse {tuple(lse.shape)} do not fit q {tuple(q.shape)}")
    check_backward_args(backward, softcap)
    if switches.use_triton(q, arch, impl):
        from ..codegen.attention.backward import attention_backward_triton

        grads = attention_backward_triton(q, k, v, out, lse, grad_out, attn_bias, keep_mask, masked_value,
                                          is_causal, causal_offset, scale, smooth_k, softcap, backward, quant)
    else:
        grads = attention_backward_reference(q, k, v, out, lse, grad_out, attn_bias, keep_mask, masked_value,
                                             is_causal, causal_offset, scale, smooth_k, softcap, backward, quant)
    return tuple(g.contiguous() for g in grads)  # the layout the fake promises, whatever q's strides


attention_backward_op = torch.library.triton_op(
    "attnopt::attention_backward", mutates_args=(), schema=BACKWARD_SCHEMA)(_attention_backward_body)
aot_inline.install(attention_backward_op, _attention_backward_body)


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, out, lse, grad_out, attn_bias, keep_mask, masked_value, is_causal,
                             causal_offset, scale, quant, smooth_k, arch, impl, softcap, backward):
    check_attention_operands("attnopt::attention_backward", q, k, v, attn_bias, keep_mask)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the body's


# ------------------------------------------------------------------------------------ autograd

_FWD_ARGS = ("masked_value", "is_causal", "causal_offset", "scale", "quant", "pv", "smooth_k", "smooth_q",
             "arch", "impl", "softcap", "backward")


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, keep_mask, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias, keep_mask)
    ctx.args = dict(zip(_FWD_ARGS, rest))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    if ctx.needs_input_grad[3]:  # never silently drop a gradient (the compiler rejects such sites)
        raise RuntimeError("attnopt::attention_train: attn_bias requires grad, and its backward gives the bias "
                           "no gradient")
    q, k, v, out, lse, attn_bias, keep_mask = ctx.saved_tensors
    a = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attnopt.attention_backward(
        q, k, v, out, lse, grad_out.contiguous(), attn_bias, keep_mask, a["masked_value"], a["is_causal"],
        a["causal_offset"], a["scale"], a["quant"], a["smooth_k"], a["arch"], a["impl"], a["softcap"], a["backward"])
    return (dq, dk, dv) + (None,) * (2 + len(_FWD_ARGS))


attention_train_op.register_autograd(_backward, setup_context=_setup_context)
