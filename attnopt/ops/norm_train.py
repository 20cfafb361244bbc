"""`torch.ops.attnopt.norm_train`: an RMSNorm / LayerNorm of a training graph whose output feeds only
training linears (linear.training 'int8' / 'fp8'), keeping its input for backward in 8 bits.

Why: a norm's backward needs its input, and a plain norm keeps it in 16 bits. In a block of norms
and linears that is a large share of what is saved for backward (the linears keep 8-bit inputs),
enough to hold the whole model above 0.6x of its bf16 run (benchmarks/training_memory.py has the
numbers). COAT quantizes the inputs of non-linear layers it saves for backward to FP8 for the same
reason (per group there; here the linears' 32 x 32 blocks, one quantizer for both).

The forward output is the norm computed in fp32 from the exact input, as torch computes it; only
what backward reads is quantized: Q(x) per 32 x 32 block in the linears' activation format (INT8
or e4m3) and each row's fp32 statistics (rstd; mean and rstd for LayerNorm), taken from the exact
x. Backward dequantizes x and applies the usual formulas, n = (x^ - mean) * rstd, g = dY * gamma:
dX = rstd * (g - mean(g) - n * mean(g * n)) (RMSNorm: no mean(g) term, mean = 0),
dgamma = sum over rows of dY * n, dbeta = sum of dY.
Like linear_train.py: `norm_train` (CompositeImplicitAutograd) is `norm_train_fwd(...)[0]`, whose
autograd keeps (xq, xs, stats, gamma); `norm_train_bwd` computes the gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..codegen.linear.block_formats import DTYPES, n_blocks, operand_formats
from ..switches import use_triton as _triton
from . import aot_inline
from . import linear_train_ref as R

KINDS = ("rms", "layer")


def _quantize(x2, fmt, arch, impl):
    act, _ = operand_formats(fmt)
    if _triton(x2, arch, impl):
        from ..codegen.linear.block_gemm import quantize_blocks_triton

        return quantize_blocks_triton(x2, act)
    return R.quantize_blocks(x2, act)


def norm_train_forward_ref(x, weight, bias, eps: float, kind: str):
    """(y in x's dtype, stats [M, 2] fp32: mean (0 for RMSNorm) and rstd per row) from the exact x."""
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    if kind == "layer":
        mean = xf.mean(-1, keepdim=True)
        xc = xf - mean
    else:
        mean = torch.zeros_like(xf[:, :1])
        xc = xf
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(x.shape), torch.cat([mean, rstd], dim=1)


def norm_train_backward_ref(gy2, xq, xs, stats, weight, kind: str, has_bias: bool):
    """(dX [M, K] fp32, dgamma, dbeta or an empty tensor) from dY [M, K] and the dequantized x."""
    x = R.dequantize_blocks(xq, xs, torch.float32)  # fp32: what the GPU runs traced (no float64)
    mean, rstd = stats[:, :1], stats[:, 1:]
    n = (x - mean) * rstd
    g = gy2.float() * weight.float()
    dx = g - n * (g * n).mean(-1, keepdim=True)
    if kind == "layer":
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd
    dw = (gy2.float() * n).sum(0)
    db = gy2.float().sum(0) if has_bias else gy2.new_empty(0, dtype=torch.float32)
    return dx, dw, db


def _fwd_body(x, weight, bias, eps, kind, fmt, arch, impl):
    y, stats = norm_train_forward_ref(x, weight, bias, eps, kind)
    xq, xs = _quantize(x.reshape(-1, x.shape[-1]), fmt, arch, impl)
    return y, xq, xs, stats


@torch.library.triton_op("attnopt::norm_train_fwd", mutates_args=())
def norm_train_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, kind: str,
                   fmt: str, arch: str, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(x) in x's dtype, Q(x) [M, K], its block scales, per-row stats [M, 2] fp32)."""
    return _fwd_body(x, weight, bias, eps, kind, fmt, arch, impl)


@norm_train_fwd.register_fake
def _(x, weight, bias, eps, kind, fmt, arch, impl):
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    act, _ = operand_formats(fmt)
    return (x.new_empty(x.shape), x.new_empty(m, k, dtype=DTYPES[act]),
            x.new_empty(n_blocks(m), n_blocks(k), dtype=torch.float32), x.new_empty(m, 2, dtype=torch.float32))


def _bwd_body(grad, xq, xs, stats, weight, kind, has_bias):
    dx, dw, db = norm_train_backward_ref(grad, xq, xs, stats, weight, kind, has_bias)
    return dx.to(grad.dtype), dw.to(weight.dtype), db


@torch.library.triton_op("attnopt::norm_train_bwd", mutates_args=())
def norm_train_bwd(grad: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, stats: torch.Tensor,
                   weight: torch.Tensor, kind: str, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX [M, K] in grad's dtype, dgamma in gamma's dtype, dbeta fp32 (empty without a bias))."""
    return _bwd_body(grad, xq, xs, stats, weight, kind, has_bias)


@norm_train_bwd.register_fake
def _(grad, xq, xs, stats, weight, kind, has_bias):
    return (grad.new_empty(grad.shape), weight.new_empty(weight.shape),
            grad.new_empty(weight.shape[0] if has_bias else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, kind, fmt, arch, impl = inputs
    _, xq, xs, stats = output
    ctx.mark_non_differentiable(xq, xs, stats)
    ctx.save_for_backward(xq, xs, stats, weight)
    ctx.kind = kind
    ctx.x_shape = x.shape
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, gy, _gxq, _gxs, _gstats):
    xq, xs, stats, weight = ctx.saved_tensors
    g2 = gy.reshape(-1, gy.shape[-1])
    dx, dw, db = norm_train_bwd(g2, xq, xs, stats, weight, ctx.kind, ctx.bias_dtype is not None)
    dx = dx.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return dx, (dw if ctx.needs_input_grad[1] else None), db, None, None, None, None, None


norm_train_fwd.register_autograd(_backward, setup_context=_setup_context)
aot_inline.install(norm_train_fwd, _fwd_body)
aot_inline.install(norm_train_bwd, _bwd_body)

_LIB = torch.library.Library("attnopt", "FRAGMENT")
_LIB.define("norm_train(Tensor x, Tensor weight, Tensor? bias, float eps, str kind, str fmt, str arch, str impl) "
            "-> Tensor")


def norm_train(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, kind: str, fmt: str,
               arch: str, impl: str) -> torch.Tensor:
    """RMSNorm (kind 'rms') / LayerNorm ('layer') over the last dim, differentiable, keeping Q(x)."""
    return torch.ops.attnopt.norm_train_fwd(x, weight, bias, eps, kind, fmt, arch, impl)[0]


_LIB.impl("norm_train", norm_train, "CompositeImplicitAutograd")
