"""Where the 8-bit training linear's kernels are: the per-block quantizer and the block-scaled GEMM
that runs all three of a linear's GEMMs (ops/linear_train_ref.py is the arithmetic they match).

- `_quant_block_kernel`: one program per 32 x 32 block of a 2-D tensor (any strides): max |t| of
  the block, its fp32 scale, and the block rounded to INT8 / e4m3 / e5m2 (one read of t, one
  8-bit write, one scale).
- `_block_gemm_kernel`: C = A B^T (+ bias) for A [M, R] and B [N, R] block-quantized, R reduced
  in 32-deep slices: each slice's 8-bit dot (int32 for INT8, fp32 for fp8 products) is scaled by
  the two blocks' scales and added to an fp32 accumulator. A, B, their scales and C are read
  through strides, so the backward GEMMs take transposes without copies: dX = dY W reads W [N, K]
  as B = W^T [K, N]; dW = dY^T X reads dY and the saved X transposed.

Why one scale per 32-deep slice: per-block scales change along the reduced dimension every 32
elements, so the dot must be split there (Jetfire's block GEMM); the scale multiply costs one fp32
FMA per output element per slice on the CUDA cores, beside the tensor cores' 32-deep MMA. (A
model, not a measurement: no GPU was at hand when this was written.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import casts
from ..arch import GemmTile, autotune_bucket
from ..casts import dot_8_16bit, to_e4m3, to_e5m2
from .block_formats import BLOCK, DTYPES, QMAX, n_blocks, operand_formats
from ...switches import interpreted
from .splitk import store_output
from .tiles import grouped_tile

FMT_IDS = {"int8": 0, "e4m3": 1, "e5m2": 2}


@triton.jit
def _round_block(y, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 y (already divided by its scale) onto the 8-bit grid: INT8 half away from zero, fp8 to
    nearest even."""
    if FMT == 0:
        return tl.minimum(tl.maximum(tl.where(y >= 0, y + 0.5, y - 0.5), -127.0), 127.0).to(tl.int8)
    elif FMT == 1:
        return to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), EMULATE)
    else:
        return to_e5m2(tl.minimum(tl.maximum(y, -57344.0), 57344.0), EMULATE)


@triton.jit
def _quant_block_kernel(T, stride_tr, stride_tc, Q, stride_qr, stride_qc, S, stride_sr, stride_sc, R, C,
                        QMAX: tl.constexpr, FMT: tl.constexpr, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """One 32 x 32 block: scale = max|t| / QMAX (1 for a zero block), q = round(t / scale)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK + tl.arange(0, BLOCK)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    t = tl.load(T + rows[:, None] * stride_tr + cols[None, :] * stride_tc, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(t), 1), 0)
    scale = amax / QMAX
    scale = tl.where(scale > 0, scale, 1.0)
    q = _round_block(tl.math.div_rn(t, scale), FMT, EMULATE)
    tl.store(Q + rows[:, None] * stride_qr + cols[None, :] * stride_qc, q, mask=mask)
    tl.store(S + pid_r * stride_sr + pid_c * stride_sc, scale)


@triton.jit
def _block_gemm_kernel(A, stride_am, stride_ak, SA, stride_sam, stride_sak,
                       B, stride_bn, stride_bk, SB, stride_sbn, stride_sbk,
                       C, stride_cm, stride_cn, BIAS, M, N, K, M_BUCKET,
                       INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr, QBLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C [M, N] = sum over 32-deep slices kb of (A[:, kb] . B[:, kb]^T) * SA[m // 32, kb] * SB[n // 32, kb]."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, QBLOCK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [QBLOCK, BLOCK_N]
    sa_ptrs = SA + (offs_m // QBLOCK) * stride_sam
    sb_ptrs = SB + (offs_n // QBLOCK) * stride_sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, QBLOCK)):
        k_ok = (kb * QBLOCK + offs_k) < K
        if INT8:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            part = tl.dot(a, b).to(tl.float32)  # exact int32 sum of 32 products
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            part = dot_8_16bit(a, b, EMULATE)  # fp8 products are exact in fp32
        sa = tl.load(sa_ptrs + kb * stride_sak, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n_ok, other=0.0)
        acc += part * (sa[:, None] * sb[None, :])
        a_ptrs += QBLOCK * stride_ak
        b_ptrs += QBLOCK * stride_bk
    store_output(acc, C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, m_ok[:, None] & n_ok[None, :],
                 BIAS, offs_n, N, HAS_BIAS, EMULATE)


# (BLOCK_M, BLOCK_N, warps, stages): the GPU autotunes over these; 32-deep K steps hold little
# shared memory per stage ((BLOCK_M + BLOCK_N) x 32 bytes), so every tile fits every arch
# (the 32-deep partial product and the fp32 accumulator both live in registers: 4 warps on a
# 128 x 64 tile spilled on sm80, so those take 8)
TRAIN_TILES = (GemmTile(128, 128, 32, 8, 3), GemmTile(128, 64, 32, 8, 4), GemmTile(64, 128, 32, 8, 4),
               GemmTile(64, 64, 32, 4, 4))
_INTERPRETER_TILE = GemmTile(32, 32, 32, 4, 1)


@functools.lru_cache(maxsize=None)
def autotuned_block_gemm():
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "GROUP_M": t.group_m},
                             num_warps=t.warps, num_stages=t.stages) for t in TRAIN_TILES]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "INT8", "HAS_BIAS"])(_block_gemm_kernel)


def quantize_blocks_triton(t: torch.Tensor, qfmt: str, out: torch.Tensor | None = None):
    """t [R, C] (any strides) -> (q [R, C] contiguous in `qfmt`, scales [ceil(R/32), ceil(C/32)] fp32)."""
    r, c = t.shape
    q = out if out is not None else torch.empty(r, c, dtype=DTYPES[qfmt], device=t.device)
    s = torch.empty(n_blocks(r), n_blocks(c), dtype=torch.float32, device=t.device)
    if r and c:
        wrap_triton(_quant_block_kernel)[(n_blocks(r), n_blocks(c))](
            t, t.stride(0), t.stride(1), q, q.stride(0), q.stride(1), s, s.stride(0), s.stride(1), r, c,
            QMAX=QMAX[qfmt], FMT=FMT_IDS[qfmt], EMULATE=casts.EMULATE, BLOCK=BLOCK, num_warps=4)
    return q, s


def block_gemm_triton(a, sa, b, sb, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                      tile: GemmTile | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """C [M, N] = A B^T (+ bias) for block-quantized A [M, R], B [N, R] (views with any strides, e.g.
    transposes) and their block scales (views too). On a GPU autotuned over TRAIN_TILES unless
    `tile` forces one; the interpreter runs a 32 x 32 tile; CPU tensors (compile checks) the first
    tile. `out` lets tests pass a poisoned buffer."""
    m, k = a.shape
    n = b.shape[0]
    c = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_() if bias is None else c.copy_(bias.expand(m, n))
    args = (a, a.stride(0), a.stride(1), sa, sa.stride(0), sa.stride(1),
            b, b.stride(0), b.stride(1), sb, sb.stride(0), sb.stride(1),
            c, c.stride(0), c.stride(1), bias if bias is not None else sa, m, n, k, autotune_bucket(m))
    consts = dict(INT8=a.dtype == torch.int8, HAS_BIAS=bias is not None, EMULATE=casts.EMULATE, QBLOCK=BLOCK)
    if interpreted():
        tile = _INTERPRETER_TILE
    elif tile is None and a.device.type != "cuda":
        tile = TRAIN_TILES[0]
    if tile is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(autotuned_block_gemm())[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
        wrap_triton(_block_gemm_kernel)[grid](*args, **consts, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                              GROUP_M=tile.group_m, num_warps=tile.warps, num_stages=tile.stages)
    return c


def linear_train_forward_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: str):
    """(y [..., N], xq [M, K], xs): x and W quantized per 32 x 32 block, one block GEMM with bias."""
    act, _ = operand_formats(fmt)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_blocks_triton(x2, act)
    wq, ws = quantize_blocks_triton(w, act)
    y = block_gemm_triton(xq, xs, wq, ws, x.dtype, bias)
    return y.reshape(*x.shape[:-1], w.shape[0]), xq, xs


def linear_train_backward_triton(gy: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, fmt: str,
                                 need_dx: bool = True, need_dw: bool = True):
    """(dX [M, K], dW [N, K]) from dY [M, N]: dY quantized per block, W quantized again, two block
    GEMMs reading transposes through strides; one not needed is skipped (returned empty)."""
    act, grad = operand_formats(fmt)
    gq, gs = quantize_blocks_triton(gy, grad)
    dx, dw = gy.new_empty(0), w.new_empty(0)
    if need_dx:
        wq, ws = quantize_blocks_triton(w, act)
        dx = block_gemm_triton(gq, gs, wq.t(), ws.t(), gy.dtype)
    if need_dw:
        dw = block_gemm_triton(gq.t(), gs.t(), xq.t(), xs.t(), w.dtype)
    return dx, dw
