"""Pure-PyTorch reference of attnopt's 8-bit linear training (docs/algorithms.md#linear-training).

What `attnopt::linear_train` computes, and what its Triton kernels (codegen/linear/block_gemm.py)
are tested against. Every GEMM operand is quantized in square BLOCK x BLOCK (32 x 32) blocks,
one fp32 scale per block (Jetfire's per-block quantization): a square block has one scale along
either of its dimensions, so the activation quantized for the forward GEMM (reduced over K) is
the very operand dW = dY^T X needs (reduced over tokens), and the same holds for W (forward over
K, dX = dY W over N) and dY (dX over N, dW over tokens). A GEMM then sums, per 32-deep slice of
the reduced dimension, the 8-bit dot (exact: int32, or fp32 for fp8 products) times the two
blocks' scales, in fp32.

Formats (`fmt`): 'int8' quantizes X, W and dY to INT8 (scale = max|block| / 127, rounding half
away from zero); 'fp8' quantizes X and W to e4m3 (max 448) and dY to e5m2 (max 57344), both
rounded to nearest even. Outputs are in the input's dtype (dW in the weight's: master weights
stay as they are); dBias is the sum of dY over tokens in float.
"""

from __future__ import annotations

import torch

from ..codegen.linear.block_formats import BLOCK, DTYPES, FORMATS, QMAX, n_blocks, operand_formats

__all__ = ["BLOCK", "DTYPES", "FORMATS", "QMAX", "n_blocks", "operand_formats", "quantize_blocks",
           "dequantize_blocks", "block_gemm_ref", "linear_train_forward_ref", "linear_train_backward_ref"]


def block_scales(t: torch.Tensor, qfmt: str) -> torch.Tensor:
    """t [R, C] -> fp32 scales [ceil(R/32), ceil(C/32)]: max |block| / qmax, 1 for a zero block."""
    r, c = t.shape
    tf = torch.nn.functional.pad(t.float().abs(), (0, n_blocks(c) * BLOCK - c, 0, n_blocks(r) * BLOCK - r))
    amax = tf.reshape(n_blocks(r), BLOCK, n_blocks(c), BLOCK).amax(dim=(1, 3))
    s = amax / QMAX[qfmt]
    return torch.where(s > 0, s, torch.ones_like(s)).contiguous()


def expand_scales(s: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Per-block scales [Rb, Cb] -> one per element [r, c]."""
    return s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:r, :c]


def quantize_blocks(t: torch.Tensor, qfmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (q [R, C] in `qfmt`, scales [ceil(R/32), ceil(C/32)] fp32)."""
    s = block_scales(t, qfmt)
    y = t.float() / expand_scales(s, *t.shape)
    qmax = QMAX[qfmt]
    if qfmt == "int8":
        q = torch.trunc(y + 0.5 * torch.sign(y)).clamp(-qmax, qmax).to(torch.int8)
    else:
        q = y.clamp(-qmax, qmax).to(DTYPES[qfmt])
    return q.contiguous(), s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The values of a block-quantized tensor (float64: exact; fp32: one rounding per value)."""
    return q.to(dtype) * expand_scales(s, *q.shape).to(dtype)


def block_gemm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                   out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """C = A B^T (+ bias) for block-quantized A [M, R] and B [N, R] (R reduced); float64 sums of the
    exact products, which the kernel's fp32 accumulation matches to rounding."""
    c = dequantize_blocks(a, sa) @ dequantize_blocks(b, sb).T
    if bias is not None:
        c = c + bias.double()
    return c.to(out_dtype)


def transposed(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-quantized tensor's transpose (values and scales): square blocks stay blocks."""
    return q.t(), s.t()


def linear_train_forward_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: str):
    """(y [..., N], xq [M, K], xs): y = Q(x) Q(W)^T + b; xq / xs what backward keeps of x."""
    act, _ = operand_formats(fmt)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_blocks(x2, act)
    wq, ws = quantize_blocks(w, act)
    y = block_gemm_ref(xq, xs, wq, ws, x.dtype, bias)
    return y.reshape(*x.shape[:-1], w.shape[0]), xq, xs


def linear_train_backward_ref(gy: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, fmt: str,
                              need_dx: bool = True, need_dw: bool = True):
    """(dX [M, K] in gy's dtype, dW [N, K] in w's dtype) from dY [M, N] (2-D), the saved Q(x) and W:
    dX = Q(dY) Q(W), dW = Q(dY)^T Q(x), the weight quantized again (as in forward). One not
    needed comes back empty."""
    act, grad = operand_formats(fmt)
    gq, gs = quantize_blocks(gy, grad)
    dx, dw = gy.new_empty(0), w.new_empty(0)
    if need_dx:
        wq, ws = quantize_blocks(w, act)
        dx = block_gemm_ref(gq, gs, *transposed(wq, ws), gy.dtype)
    if need_dw:
        dw = block_gemm_ref(*transposed(gq, gs), *transposed(xq, xs), w.dtype)
    return dx, dw
