"""`torch.ops.attnopt.linear_train`: the op linear sites of a training graph become with
`linear.training` 'int8' / 'fp8' (arithmetic: linear_train_ref.py, docs/algorithms.md#linear-training).

Three ops, because autograd can only keep what an op takes or returns:
- `attnopt::linear_train(x, weight, bias, fmt, arch, impl) -> y`, the op the linear pass inserts:
  CompositeImplicitAutograd, it is `linear_train_fwd(...)[0]`.
- `attnopt::linear_train_fwd(...) -> (y, xq, xs)`: quantizes x and W per 32 x 32 block and runs the
  block GEMM; returns the quantized x and its scales beside y, so that its `register_autograd`
  saves those (8-bit, plus one fp32 scale per 1024 values) and the weight (the parameter itself,
  no copy) — never the 16-bit x.
- `attnopt::linear_train_bwd(grad, xq, xs, weight, fmt, arch, impl, need_dx, need_dw) -> (dx, dw)`:
  dY quantized per block (INT8, or e5m2 for 'fp8'), W quantized again, dX = Q(dY) Q(W) and
  dW = Q(dY)^T Q(x), each only when needed (a frozen weight keeps no Q(x) and gets no dW).
dBias is dY summed over tokens (fp32, then the bias dtype). On CUDA the bodies launch the Triton
kernels (AOTAutograd traces them in, aot_inline.py); elsewhere they run the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..codegen.linear.block_formats import DTYPES, n_blocks, operand_formats
from ..switches import use_triton as _triton
from . import aot_inline
from . import linear_train_ref as R


def _fwd_body(x, weight, bias, fmt, arch, impl):
    if _triton(x, arch, impl):
        from ..codegen.linear.block_gemm import linear_train_forward_triton

        return linear_train_forward_triton(x, weight, bias, fmt)
    return R.linear_train_forward_ref(x, weight, bias, fmt)


@torch.library.triton_op("attnopt::linear_train_fwd", mutates_args=())
def linear_train_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: str, arch: str,
                     impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [..., K] Q(W)^T + b in x's dtype, Q(x) [M, K], its block scales [M/32, K/32] fp32)."""
    return _fwd_body(x, weight, bias, fmt, arch, impl)


@linear_train_fwd.register_fake
def _(x, weight, bias, fmt, arch, impl):
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    act, _ = operand_formats(fmt)
    return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(m, k, dtype=DTYPES[act]),
            x.new_empty(n_blocks(m), n_blocks(k), dtype=torch.float32))


def _bwd_body(grad, xq, xs, weight, fmt, arch, impl, need_dx, need_dw):
    if _triton(grad, arch, impl):
        from ..codegen.linear.block_gemm import linear_train_backward_triton

        return linear_train_backward_triton(grad, xq, xs, weight, fmt, need_dx, need_dw)
    return R.linear_train_backward_ref(grad, xq, xs, weight, fmt, need_dx, need_dw)


@torch.library.triton_op("attnopt::linear_train_bwd", mutates_args=())
def linear_train_bwd(grad: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, fmt: str,
                     arch: str, impl: str, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [M, K] in grad's dtype, dW [N, K] in the weight's) from dY [M, N] and what forward saved;
    a gradient not needed (need_dx / need_dw False: a frozen weight, an input that needs none) is
    not computed and comes back empty ([0])."""
    return _bwd_body(grad, xq, xs, weight, fmt, arch, impl, need_dx, need_dw)


@linear_train_bwd.register_fake
def _(grad, xq, xs, weight, fmt, arch, impl, need_dx, need_dw):
    dx = grad.new_empty(grad.shape[0], weight.shape[1]) if need_dx else grad.new_empty(0)
    return dx, weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)  # contiguous


def _setup_context(ctx, inputs, output):
    x, weight, bias, fmt, arch, impl = inputs
    _, xq, xs = output
    ctx.mark_non_differentiable(xq, xs)
    if ctx.needs_input_grad[1]:
        ctx.save_for_backward(xq, xs, weight)
    else:  # a frozen weight (LoRA's base layers): dW is never computed, so Q(x) is not kept
        ctx.save_for_backward(None, None, weight)
    ctx.args = (fmt, arch, impl)
    ctx.x_shape = x.shape
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, gy, _gxq, _gxs):
    xq, xs, weight = ctx.saved_tensors
    g2 = gy.reshape(-1, gy.shape[-1])
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dw = None
    if need_dx or need_dw:
        if xq is None:  # only dX: the kernels still take operands, none of which are read
            xq, xs = weight.new_empty(0, 0, dtype=torch.int8), weight.new_empty(0, 0, dtype=torch.float32)
        dx, dw = linear_train_bwd(g2, xq, xs, weight, *ctx.args, need_dx, need_dw)
    db = g2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return (dx.reshape(ctx.x_shape) if need_dx else None), (dw if need_dw else None), db, None, None, None


linear_train_fwd.register_autograd(_backward, setup_context=_setup_context)
aot_inline.install(linear_train_fwd, _fwd_body)
aot_inline.install(linear_train_bwd, _bwd_body)

_LIB = torch.library.Library("attnopt", "FRAGMENT")
_LIB.define("linear_train(Tensor x, Tensor weight, Tensor? bias, str fmt, str arch, str impl) -> Tensor")


def linear_train(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: str, arch: str,
                 impl: str) -> torch.Tensor:
    """y = Q(x) Q(W)^T + b, differentiable: what a training graph's linear becomes."""
    return torch.ops.attnopt.linear_train_fwd(x, weight, bias, fmt, arch, impl)[0]


_LIB.impl("linear_train", linear_train, "CompositeImplicitAutograd")


def site_error(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: str, arch: str = "cpu",
               impl: str = "auto", seed: int = 0) -> dict:
    """A training site's measured error: the op's Y, dX, dW (and dBias) against float64 autograd
    on these inputs, with a random standard-normal upstream gradient (seeded). For the report's
    per-site gradient error: {"y": {...}, "dx": {...}, "dw": {...}[, "db": {...}]}, each
    attnopt.metrics.compare's {rel_l1, cos, max_abs, rmse}."""
    from ..metrics import compare

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = weight.shape[0]
    gy = torch.randn(*x.shape[:-1], n, generator=gen).to(device=x.device, dtype=x.dtype)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    with torch.enable_grad():
        y = linear_train(*leaves, fmt, arch, impl)
        y.backward(gy)
        exact = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        ref = torch.nn.functional.linear(*exact)
        ref.backward(gy.double())
    out = {"y": compare(y, ref), "dx": compare(leaves[0].grad, exact[0].grad),
           "dw": compare(leaves[1].grad, exact[1].grad)}
    if bias is not None:
        out["db"] = compare(leaves[2].grad, exact[2].grad)
    return out
